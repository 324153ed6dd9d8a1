"""Grouped matmul for the dtypes and shapes torch._grouped_mm cannot compile (fp32 / fp16 before
torch 2.14, unaligned sizes): one mm per expert, offsets read on the host."""

from __future__ import annotations

import torch

from moe_fx.runtime.library import LIB


@torch.library.custom_op(f"{LIB}::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, K] expert-major, w [G, K, N], offsets [G] int32 -> [M, N]; rows past offsets[-1] are 0."""
    out = x.new_zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
        start = end
    return out


@grouped_mm.register_fake
def _(x, w, offsets):
    torch._check(x.shape[1] == w.shape[1], lambda: f"grouped_mm: x {x.shape} vs w {w.shape}")
    return x.new_empty((x.shape[0], w.shape[2]))


def _grouped_mm_setup(ctx, inputs, output):
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _grouped_mm_backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.moe_fx.grouped_mm(grad, w.transpose(-2, -1), offsets)
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.moe_fx.grouped_mm_weight_grad(x, grad, offsets)
    return grad_x, grad_w, None


@torch.library.custom_op(f"{LIB}::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, K], grad [M, N] expert-major -> [G, K, N]: per-group x_g.T @ grad_g."""
    out = x.new_zeros((offsets.shape[0], x.shape[1], grad.shape[1]))
    start = 0
    for g, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end].t(), grad[start:end], out=out[g])
        start = end
    return out


@grouped_mm_weight_grad.register_fake
def _(x, grad, offsets):
    return x.new_empty((offsets.shape[0], x.shape[1], grad.shape[1]))


torch.library.register_autograd(f"{LIB}::grouped_mm", _grouped_mm_backward, setup_context=_grouped_mm_setup)

