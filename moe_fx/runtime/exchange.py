"""Routed rows to the ranks that own their experts and back: the exchange MC2, All2AllV and the
run-time switch share. A row's place on each side is given by two index tensors:

    send_slot [S]    position of each (t, k) row in the send buffer (grouped by destination rank)
    recv_order [R]   received (source-rank-major) row at each expert-major position

``splits`` are (rows sent to each rank, rows received from each rank) as Python ints, or None for
equal blocks of len(recv_order) / ep rows (MC2's fixed buffers: no host read).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx.runtime.comm import exchange_rows
from moe_fx.runtime.permute import unpermute

Splits = tuple[list[int], list[int]]


def send_rows_to_experts(
    rows: torch.Tensor, send_slot: torch.Tensor, recv_order: torch.Tensor, group: dist.ProcessGroup,
    splits: Splits | None = None,
) -> torch.Tensor:
    """(t, k)-ordered rows -> the receiving ranks' expert-major rows (dispatch direction)."""
    # Fixed buffers (MC2, also the switch's MC2 branch) hold more slots than rows: those travel as zeros.
    send = unpermute(rows, send_slot, recv_order.shape[0] if splits is None else sum(splits[0]))
    return exchange_rows(send, group, *(splits or (None, None)))[recv_order]


def return_rows_from_experts(
    rows: torch.Tensor, send_slot: torch.Tensor, recv_order: torch.Tensor, group: dist.ProcessGroup,
    splits: Splits | None = None,
) -> torch.Tensor:
    """Expert-major rows -> (t, k)-ordered rows on the rank that sent them (combine direction)."""
    source_major = unpermute(rows, recv_order)
    if splits is None:
        return exchange_rows(source_major, group)[send_slot]
    sent, received = splits
    return exchange_rows(source_major, group, received, sent)[send_slot]
