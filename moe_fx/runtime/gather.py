"""Row movement ops: gathering rows by index up to a device-side count, and gathering every rank's
rows (the replicated token layout's finalize)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx.runtime.comm import all_gather_rows, resolve_group
from moe_fx.runtime.library import LIB

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; the op's torch implementation serves every device
    triton = None


@torch.library.custom_op(f"{LIB}::gather_rows_upto", mutates_args=())
def gather_rows_upto(x: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [N, H], index [M], offsets [e] -> out [M, H] with out[i] = x[index[i]] for i < offsets[-1].
    Rows from offsets[-1] on are unspecified: a static buffer's padding (rows routed to other
    ranks' experts), which the grouped matmul skips and no one reads. On CUDA they are not
    written, so the gather moves only the rows routed here, with no host read of how many."""
    return x.index_select(0, index)


@gather_rows_upto.register_fake
def _(x, index, offsets):
    return x.new_empty((index.shape[0], x.shape[1]))


def _gather_rows_upto_setup(ctx, inputs, output):
    x, index, offsets = inputs
    ctx.save_for_backward(index, offsets)
    ctx.rows = x.shape[0]


def _gather_rows_upto_backward(ctx, grad):
    index, offsets = ctx.saved_tensors
    used = torch.arange(index.shape[0], device=index.device) < offsets[-1]
    rows = torch.where(used.unsqueeze(1), grad, 0)
    return grad.new_zeros((ctx.rows, grad.shape[1])).index_add_(0, index, rows), None, None


torch.library.register_autograd(f"{LIB}::gather_rows_upto", _gather_rows_upto_backward,
                                setup_context=_gather_rows_upto_setup)


if triton is not None:

    @triton.jit
    def _gather_rows_upto_kernel(x_ptr, index_ptr, offsets_ptr, out_ptr, hidden, x_row_stride, last_group,
                                 BLOCK_H: tl.constexpr):
        row = tl.program_id(0)
        if row < tl.load(offsets_ptr + last_group):
            source = tl.load(index_ptr + row).to(tl.int64)
            cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
            in_row = cols < hidden
            values = tl.load(x_ptr + source * x_row_stride + cols, mask=in_row)
            tl.store(out_ptr + row.to(tl.int64) * hidden + cols, values, mask=in_row)

    @gather_rows_upto.register_kernel("cuda")
    def _(x, index, offsets):
        out = x.new_empty((index.shape[0], x.shape[1]))
        if index.shape[0] == 0 or offsets.shape[0] == 0:
            return out
        x = x if x.stride(1) == 1 else x.contiguous()  # rows may be a column slice of a wider buffer
        block = min(1024, triton.next_power_of_2(x.shape[1]))
        grid = (index.shape[0], triton.cdiv(x.shape[1], block))
        _gather_rows_upto_kernel[grid](x, index.contiguous(), offsets, out, x.shape[1], x.stride(0),
                                       offsets.shape[0] - 1, BLOCK_H=block, num_warps=4)
        return out


@torch.library.custom_op(f"{LIB}::gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """[n, ...] on each rank -> [ep * n, ...], rank-major (every rank passes the same n)."""
    return all_gather_rows(x, resolve_group(group_name))


@gather_rows.register_fake
def _(x, group_name):
    world = dist.get_world_size(resolve_group(group_name))
    return x.new_empty((world * x.shape[0], *x.shape[1:]))


def _gather_rows_setup(ctx, inputs, output):
    x, group_name = inputs
    ctx.rows, ctx.group_name = x.shape[0], group_name


def _gather_rows_backward(ctx, grad):
    # Every rank holds the same gathered output and its own gradient of it; this rank's slice of
    # the sum over ranks is what its rows contributed (the tensor-parallel convention).
    rank = dist.get_rank(resolve_group(ctx.group_name))
    return grad[rank * ctx.rows : (rank + 1) * ctx.rows], None


torch.library.register_autograd(f"{LIB}::gather_rows", _gather_rows_backward, setup_context=_gather_rows_setup)
