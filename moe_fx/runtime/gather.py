"""Row movement ops: gathering rows by index up to a device-side count, and gathering every rank's
rows (the replicated token layout's finalize)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx.runtime.comm import all_gather_rows, resolve_group
from moe_fx.runtime.library import LIB, kernel_op

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; the op's torch implementation serves every device
    triton = None


# Each program moves ROWS rows of up to BLOCK_H values: a few KB in flight per program, and the
# programs past the last routed row return at once.
_GATHER_ROWS = 8
_GATHER_BLOCK_ELEMENTS = 1024

if triton is not None:

    @triton.jit
    def _gather_rows_upto_kernel(x_ptr, index_ptr, offsets_ptr, out_ptr, num_rows, hidden, x_row_stride, last_group,
                                 ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
        end = tl.load(offsets_ptr + last_group)
        first = tl.program_id(0) * ROWS
        if first < end:
            rows = first + tl.arange(0, ROWS)
            used = (rows < end) & (rows < num_rows)
            source = tl.load(index_ptr + rows, mask=used, other=0).to(tl.int64)
            cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
            mask = used[:, None] & (cols < hidden)[None, :]
            values = tl.load(x_ptr + source[:, None] * x_row_stride + cols[None, :], mask=mask)
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * hidden + cols[None, :], values, mask=mask)


@kernel_op("gather_rows_upto", has_triton=triton is not None)
def gather_rows_upto(x: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [N, H], index [M], offsets [e] -> out [M, H] with out[i] = x[index[i]] for i < offsets[-1].
    Rows from offsets[-1] on are unspecified: a static buffer's padding (rows routed to other
    ranks' experts), which the grouped matmul skips and no one reads. On CUDA they are not
    written, so the gather moves only the rows routed here, with no host read of how many."""
    if triton is None or x.device.type != "cuda" or index.shape[0] == 0 or offsets.shape[0] == 0:
        return x.index_select(0, index)
    out = x.new_empty((index.shape[0], x.shape[1]))
    x = x if x.stride(1) == 1 else x.contiguous()  # rows may be a column slice of a wider buffer
    block_h = min(_GATHER_BLOCK_ELEMENTS, triton.next_power_of_2(x.shape[1]))
    grid = (triton.cdiv(index.shape[0], _GATHER_ROWS), triton.cdiv(x.shape[1], block_h))
    torch.library.wrap_triton(_gather_rows_upto_kernel)[grid](
        x, index, offsets, out, index.shape[0], x.shape[1], x.stride(0), offsets.shape[0] - 1,
        ROWS=_GATHER_ROWS, BLOCK_H=block_h, num_warps=4)
    return out


def _gather_rows_upto_setup(ctx, inputs, output):
    x, index, offsets = inputs
    ctx.save_for_backward(index, offsets)
    ctx.rows = x.shape[0]


def _gather_rows_upto_backward(ctx, grad):
    index, offsets = ctx.saved_tensors
    used = torch.arange(index.shape[0], device=index.device) < offsets[-1]
    rows = torch.where(used.unsqueeze(1), grad, 0)
    return grad.new_zeros((ctx.rows, grad.shape[1])).index_add_(0, index, rows), None, None


gather_rows_upto.register_autograd(_gather_rows_upto_backward, setup_context=_gather_rows_upto_setup)


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
