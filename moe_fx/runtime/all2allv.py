"""All2AllV ops: each routed row goes exactly to the rank owning its expert. Split sizes are
exchanged first and read on the host (a device-to-host sync), then the rows move with one
all_to_all_single."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx.runtime.comm import resolve_group
from moe_fx.runtime.library import LIB, fake_rows, sum_over_slots


@torch.library.custom_op(f"{LIB}::all2allv_dispatch", mutates_args=())
def all2allv_dispatch(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, group_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (tokens [R, H] expert-major, row_expert [R], offsets [e],
    send_order [S], send_splits [ep], recv_splits [ep], regroup [R])."""
    group = resolve_group(group_name)
    world = dist.get_world_size(group)
    k = topk_ids.shape[1]
    e = num_experts // world
    flat_ids = topk_ids.reshape(-1)
    # Sorted by expert, the rows are also grouped by destination rank (contiguous expert blocks).
    sorted_ids, send_order = torch.sort(flat_ids, stable=True)
    send_counts = torch.bincount(sorted_ids, minlength=num_experts)  # [E] = [ep, e] rank-major
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)  # [ep src, e]
    # NOTE: host sync: all_to_all_single takes split sizes as Python ints.
    send_splits = send_counts.view(world, e).sum(1)
    recv_splits = recv_counts.view(world, e).sum(1)
    received = x.new_empty((int(recv_splits.sum()), x.shape[1]))
    dist.all_to_all_single(
        received, x[send_order // k], recv_splits.tolist(), send_splits.tolist(), group=group
    )
    # Received rows are (source rank, local expert)-major; regroup them expert-major.
    rank = dist.get_rank(group)
    local_ids = torch.arange(e, device=x.device).repeat(world) + rank * e
    received_expert = torch.repeat_interleave(local_ids, recv_counts)
    row_expert, regroup = torch.sort(received_expert, stable=True)
    offsets = torch.cumsum(recv_counts.view(world, e).sum(0), 0).to(torch.int32)
    return received[regroup], row_expert, offsets, send_order, send_splits, recv_splits, regroup


@all2allv_dispatch.register_fake
def _(x, topk_ids, num_experts, group_name):
    world = dist.get_world_size(resolve_group(group_name))
    r = fake_rows()
    s = topk_ids.numel()
    i64 = dict(dtype=torch.int64)
    return (
        x.new_empty((r, x.shape[1])),
        topk_ids.new_empty((r,), **i64),
        topk_ids.new_empty((num_experts // world,), dtype=torch.int32),
        topk_ids.new_empty((s,), **i64),
        topk_ids.new_empty((world,), **i64),
        topk_ids.new_empty((world,), **i64),
        topk_ids.new_empty((r,), **i64),
    )


@torch.library.custom_op(f"{LIB}::all2allv_combine", mutates_args=())
def all2allv_combine(
    y: torch.Tensor,
    send_order: torch.Tensor,
    send_splits: torch.Tensor,
    recv_splits: torch.Tensor,
    regroup: torch.Tensor,
    group_name: str,
) -> torch.Tensor:
    """y [R, H] expert-major -> [S, H] in (t, k) order on the rank that sent the rows."""
    group = resolve_group(group_name)
    rank_major = torch.empty_like(y).index_copy_(0, regroup, y)
    returned = y.new_empty((send_order.shape[0], y.shape[1]))
    dist.all_to_all_single(
        returned, rank_major, send_splits.tolist(), recv_splits.tolist(), group=group
    )
    return torch.empty_like(returned).index_copy_(0, send_order, returned)


@all2allv_combine.register_fake
def _(y, send_order, send_splits, recv_splits, regroup, group_name):
    return y.new_empty((send_order.shape[0], y.shape[1]))


def _all2allv_dispatch_setup(ctx, inputs, output):
    x, topk_ids, _, group_name = inputs
    _, _, _, send_order, send_splits, recv_splits, regroup = output
    ctx.save_for_backward(send_order, send_splits, recv_splits, regroup)
    ctx.shape = (x.shape[0], topk_ids.shape[1], group_name)


def _all2allv_dispatch_backward(ctx, g_tokens, *unused):
    send_order, send_splits, recv_splits, regroup = ctx.saved_tensors
    t, k, group_name = ctx.shape
    rows = torch.ops.moe_fx.all2allv_combine(g_tokens, send_order, send_splits, recv_splits, regroup, group_name)
    return sum_over_slots(rows, t, k), None, None, None


torch.library.register_autograd(
    f"{LIB}::all2allv_dispatch", _all2allv_dispatch_backward, setup_context=_all2allv_dispatch_setup
)


@torch.library.custom_op(f"{LIB}::all2allv_return_grad", mutates_args=())
def all2allv_return_grad(
    grad_rows: torch.Tensor, send_order: torch.Tensor, send_splits: torch.Tensor,
    recv_splits: torch.Tensor, regroup: torch.Tensor, group_name: str,
) -> torch.Tensor:
    """Gradient of all2allv_combine: [S, H] in (t, k) order -> expert-major [R, H] on the expert ranks."""
    group = resolve_group(group_name)
    received = grad_rows.new_empty((regroup.shape[0], grad_rows.shape[1]))
    dist.all_to_all_single(
        received, grad_rows[send_order].contiguous(), recv_splits.tolist(), send_splits.tolist(), group=group
    )
    return received[regroup]


@all2allv_return_grad.register_fake
def _(grad_rows, send_order, send_splits, recv_splits, regroup, group_name):
    return grad_rows.new_empty((regroup.shape[0], grad_rows.shape[1]))


def _all2allv_combine_setup(ctx, inputs, output):
    _, send_order, send_splits, recv_splits, regroup, group_name = inputs
    ctx.save_for_backward(send_order, send_splits, recv_splits, regroup)
    ctx.group_name = group_name


def _all2allv_combine_backward(ctx, grad):
    send_order, send_splits, recv_splits, regroup = ctx.saved_tensors
    grad_y = torch.ops.moe_fx.all2allv_return_grad(grad, send_order, send_splits, recv_splits, regroup, ctx.group_name)
    return grad_y, None, None, None, None, None


torch.library.register_autograd(
    f"{LIB}::all2allv_combine", _all2allv_combine_backward, setup_context=_all2allv_combine_setup
)

