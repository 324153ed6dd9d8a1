"""The experts stage: one grouped matmul per projection over this rank's local experts.

Weights arrive as the model holds them: ``"out_in"`` is nn.Linear style [e, N, K] (used as
x @ w.T), ``"in_out"`` is [e, K, N] (used as x @ w).
"""

from __future__ import annotations

import torch

from moe_fx.runtime.grouped_mm import native_grouped_mm_ok


def expert_matmul(
    tokens_RK: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, *, layout: str
) -> torch.Tensor:
    """tokens [R, K] expert-major, weight [e, N, K] or [e, K, N], offsets [e] -> [R, N]."""
    w_KN = weight.transpose(-2, -1) if layout == "out_in" else weight
    x = tokens_RK.to(w_KN.dtype)
    if native_grouped_mm_ok(x, w_KN) and not (x.is_cuda and _no_grad(x, w_KN) and _recorded_as_cuda_graphs()):
        return torch._grouped_mm(x, w_KN, offs=offsets)
    # moe_fx's op picks its kernel per call (moe_fx/runtime/grouped_mm.py): in bf16, a Triton kernel
    # for few rows per expert inside a CUDA graph capture. Outside graphs bf16 stays on
    # torch._grouped_mm, whose launch costs the host less; so does a training graph, for its
    # backward, which reads no offsets on the host.
    return torch.ops.moe_fx.grouped_mm(x, w_KN, offsets)


def _no_grad(*tensors: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _recorded_as_cuda_graphs() -> bool:
    """Whether the graph being compiled will run as CUDA graphs: inductor's cudagraphs, which
    ``moe_fx.config.inner_mode = "reduce-overhead"`` turns on while it compiles."""
    from torch._inductor import config as inductor_config

    return bool(inductor_config.triton.cudagraphs)


def add_expert_bias(rows_RN: torch.Tensor, bias, row_expert_R: torch.Tensor) -> torch.Tensor:
    """rows [R, N] + the bias of each row's (global) expert: ``bias`` is [E, N] or one [N] per expert."""
    bias_EN = torch.stack(bias) if isinstance(bias, (list, tuple)) else bias
    return rows_RN + bias_EN[row_expert_R]
