"""The torch.library namespace of moe_fx's ops, and helpers for their fake implementations.

Shape legend for every op: T tokens on this rank, K top-k, S = T*K routed rows, H hidden, N output
features, E experts, e local experts, ep group size, R rows routed to this rank's experts.

Row orders: "expert-major" groups rows by expert, ascending, with ``offsets[j]`` the end of expert
j's rows; "(t, k) order" puts token t's k-th routing choice at row t*K + k, as
``topk_ids.reshape(-1)`` does.
"""

from __future__ import annotations

import torch

LIB = "moe_fx"


def fake_rows() -> int:
    """A fresh unbacked size for the data-dependent number of rows routed to this rank."""
    return torch.library.get_ctx().new_dynamic_size()
