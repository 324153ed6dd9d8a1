"""Unsort + weighted sum over top-k in one pass: the local lowering's combine.

    out[t] = sum_k w[t, k] * y[position[t*K + k]]      (terms with position -1 left out)

``y`` [R, H] holds the expert outputs expert-major, ``position`` [S] says where routed row
t*K + k landed, or -1 for a slot this rank did not compute (another rank's expert: AllGather's
partial sums). Rows of ``y`` no position names are never read (they may be unwritten padding). Written out in torch ops the compiler emits a reduction that re-loads the
position index for every output element; the CUDA kernel below reads each index once per token
and each row of ``y`` once, which is what the memory traffic allows. The arithmetic matches the
traced experts code: each product in the promoted dtype (bf16 rows times fp32 router weights in
fp32), summed over k in that dtype.
"""

from __future__ import annotations

import torch

from moe_fx.runtime.library import kernel_op

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; the op's torch implementation serves every device
    triton = None


def _reference(y: torch.Tensor, position: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor:
    t, k = w.shape
    out = _terms(y, position, w).view(t, k, y.shape[1]).sum(dim=1)
    return out if out_dtype is None else out.to(out_dtype)


def _rows(y: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y's row at each position, zero where the position is -1; the mask of valid positions)."""
    valid = position >= 0
    # A zero row past the end serves the -1 positions: no branch on y's row count, which may be
    # data-dependent (this function is the op's fake implementation too).
    padded = torch.cat([y, y.new_zeros((1, y.shape[1]))])
    return padded[torch.where(valid, position, y.shape[0])], valid


def _terms(y: torch.Tensor, position: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    rows, valid = _rows(y, position)
    return torch.where(valid.unsqueeze(1), rows * w.reshape(-1, 1), 0)


def _setup(ctx, inputs, output):
    y, position, w, _ = inputs
    ctx.save_for_backward(y, position, w)


def _backward(ctx, grad_out):
    y, position, w = ctx.saved_tensors
    t, k = w.shape
    grad_out = grad_out.to(torch.promote_types(y.dtype, w.dtype))  # what the cast's backward gave
    grad_y = grad_w = None
    valid = position >= 0
    if ctx.needs_input_grad[0]:
        rows = (grad_out.unsqueeze(1) * w.unsqueeze(-1)).reshape(t * k, -1).to(y.dtype)
        # Skipped slots write to one extra row, dropped after: no host read of how many there are.
        target = torch.where(valid, position, y.shape[0])
        grad_y = y.new_zeros((y.shape[0] + 1, y.shape[1])).index_copy_(0, target, rows)[: y.shape[0]]
    if ctx.needs_input_grad[2]:
        grad_w = (grad_out.unsqueeze(1) * _rows(y, position)[0].view(t, k, y.shape[1])).sum(-1).to(w.dtype)
    return grad_y, None, grad_w, None


if triton is not None:

    # No one row-block width suits every (H, K): on an H100 a fixed 1024 was 5-8x faster than
    # inductor's kernel at K = 8 but 0.76x of it at K = 4, H = 2880. Tuned once per (H, K).
    @triton.autotune(
        configs=[triton.Config({"BLOCK_H": b}, num_warps=w) for b, w in ((256, 2), (512, 4), (1024, 4), (1024, 8))],
        key=["hidden", "K"],
    )
    @triton.jit
    def _unsort_weighted_sum_kernel(y_ptr, position_ptr, w_ptr, out_ptr, hidden, K: tl.constexpr,
                                    PRODUCT_IN_W_DTYPE: tl.constexpr, BLOCK_H: tl.constexpr):
        token = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        in_row = cols < hidden
        # Products in promote(y, w)'s dtype, as torch computes them.
        product_dtype = w_ptr.dtype.element_ty if PRODUCT_IN_W_DTYPE else y_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)  # torch's sum accumulates in fp32 too
        for k in tl.static_range(K):
            row = tl.load(position_ptr + token * K + k).to(tl.int64)
            computed = row >= 0  # -1: another rank's slot, left out
            weight = tl.where(computed, tl.load(w_ptr + token * K + k), 0).to(product_dtype)
            values = tl.load(y_ptr + row * hidden + cols, mask=in_row & computed, other=0.0)
            acc += (values.to(product_dtype) * weight).to(tl.float32)
        # One rounding to the output dtype: the sum's own (to the promoted dtype) then the
        # model's cast would give the same value, since fp32 -> narrower rounds once either way.
        tl.store(out_ptr + token.to(tl.int64) * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=in_row)


@kernel_op("unsort_weighted_sum", has_triton=triton is not None)
def unsort_weighted_sum(
    y: torch.Tensor, position: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """y [S, H] expert-major, position [S], w [T, K] -> [T, H]: computed in promote(y, w)'s dtype,
    returned in ``out_dtype`` (default: that dtype). Casting here spares the model's own cast a
    pass over the output (bf16 rows times fp32 router weights sum in fp32, then go back to bf16)."""
    torch._check(position.shape[0] == w.shape[0] * w.shape[1], lambda: f"{position.shape} vs {w.shape}")
    if triton is None or y.device.type != "cuda":
        return _reference(y, position, w, out_dtype)
    t, k = w.shape
    product_dtype = torch.promote_types(y.dtype, w.dtype)
    # The kernel rounds its fp32 accumulator once; the contract rounds to product_dtype first.
    cast_after = out_dtype not in (None, product_dtype) and product_dtype != torch.float32
    out = y.new_empty((t, y.shape[1]), dtype=product_dtype if cast_after else out_dtype or product_dtype)
    if t > 0:
        grid = lambda meta: (t, triton.cdiv(y.shape[1], meta["BLOCK_H"]))  # noqa: E731
        torch.library.wrap_triton(_unsort_weighted_sum_kernel)[grid](
            y.contiguous(), position.contiguous(), w.contiguous(), out, y.shape[1], K=k,
            PRODUCT_IN_W_DTYPE=product_dtype == w.dtype)
    return out.to(out_dtype) if cast_after else out


unsort_weighted_sum.register_autograd(_backward, setup_context=_setup)
