"""The experts stage: one grouped matmul per projection over this rank's local experts.

Weights arrive as the model holds them: ``"out_in"`` is nn.Linear style [e, N, K] (used as
x @ w.T), ``"in_out"`` is [e, K, N] (used as x @ w).
"""

from __future__ import annotations

import torch

import moe_fx.runtime  # noqa: F401  (registers torch.ops.moe_fx)

# torch._grouped_mm compiles for bf16 only before torch 2.14 and needs 16-byte aligned rows.
_NATIVE_DTYPES = (torch.bfloat16,)
_ALIGN_ELEMENTS = 8


def _native_grouped_mm_ok(x: torch.Tensor, w_KN: torch.Tensor) -> bool:
    k, n = w_KN.shape[-2:]
    return (
        x.dtype in _NATIVE_DTYPES
        and w_KN.dtype == x.dtype
        and k % _ALIGN_ELEMENTS == 0
        and n % _ALIGN_ELEMENTS == 0
    )


def expert_matmul(
    tokens_RK: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, *, layout: str
) -> torch.Tensor:
    """tokens [R, K] expert-major, weight [e, N, K] or [e, K, N], offsets [e] -> [R, N]."""
    w_KN = weight.transpose(-2, -1) if layout == "out_in" else weight
    x = tokens_RK.to(w_KN.dtype)
    if _native_grouped_mm_ok(x, w_KN):
        return torch._grouped_mm(x, w_KN, offs=offsets)
    return torch.ops.moe_fx.grouped_mm(x, w_KN, offsets)


def add_expert_bias(rows_RN: torch.Tensor, bias, row_expert_R: torch.Tensor) -> torch.Tensor:
    """rows [R, N] + the bias of each row's (global) expert: ``bias`` is [E, N] or one [N] per expert."""
    bias_EN = torch.stack(bias) if isinstance(bias, (list, tuple)) else bias
    return rows_RN + bias_EN[row_expert_R]
