"""Row permutations shared by every strategy: sort rows by expert, and put rows back in place.

The sorts are plain torch calls, so the lowerings use them on ``fx.Proxy`` values (they emit the
same ops into the graph) and the runtime ops on tensors; ``unpermute`` serves the runtime ops.
"""

from __future__ import annotations

import torch


def sort_keys(ids: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Integer keys in [0, num_keys) as the narrowest type that holds them: a radix sort's passes
    grow with the key width (int16 takes a quarter of int64's)."""
    return ids.to(torch.int16) if num_keys <= torch.iinfo(torch.int16).max else ids


def stable_sort(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted keys, the index each came from). Stable: rows of one expert keep their (t, k)
    order, which is what makes every strategy's sums match the single-device order."""
    result = torch.sort(keys, stable=True)
    return result[0], result[1]


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed rows' expert ids sorted (stable) and the routed row (t*K + k) at each sorted
    position. Ids outside [0, num_experts) need keys wider than int16 could hold: pass a
    ``num_experts`` that covers them (padding ids, e.g. E for "not mine")."""
    return stable_sort(sort_keys(topk_ids.reshape(-1), num_experts))


def unpermute(rows: torch.Tensor, positions: torch.Tensor, num_rows: int | None = None) -> torch.Tensor:
    """out[positions[i]] = rows[i]: the inverse of ``rows = out[positions]``. ``num_rows`` larger
    than len(positions) leaves the other rows zero (padding that travels must be finite)."""
    if num_rows is None or num_rows == positions.shape[0]:
        return torch.empty_like(rows).index_copy_(0, positions, rows)
    return rows.new_zeros((num_rows, *rows.shape[1:])).index_copy_(0, positions, rows)
