"""All2AllV ops: each routed row goes exactly to the rank owning its expert. Counts are exchanged
first and the split sizes read on the host (a device-to-host sync), then the rows move with one
all_to_all_single each way (moe_fx/runtime/exchange.py).

The handle the combine takes (``send_slot``, split sizes, ``recv_order``) is the one the run-time
switch's MC2 branch produces too (moe_fx/runtime/switch.py), so one combine serves both."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx.runtime.comm import exchange_rows, rank_splits, resolve_group
from moe_fx.runtime.exchange import return_rows_from_experts, send_rows_to_experts
from moe_fx.runtime.library import LIB, fake_rows, sum_over_slots
from moe_fx.runtime.permute import stable_sort, unpermute


def _splits(send_splits: torch.Tensor, recv_splits: torch.Tensor) -> tuple[list[int], list[int]]:
    world = send_splits.shape[0]
    return rank_splits(send_splits, world), rank_splits(recv_splits, world)


@torch.library.custom_op(f"{LIB}::all2allv_dispatch", mutates_args=())
def all2allv_dispatch(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, group_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (tokens [R, H] expert-major, row_expert [R], offsets [e],
    send_slot [S], send_splits [ep], recv_splits [ep], recv_order [R])."""
    group = resolve_group(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    k = topk_ids.shape[1]
    e = num_experts // world
    # Sorted by expert, the rows are also grouped by destination rank (contiguous expert blocks).
    sorted_ids, send_order = stable_sort(topk_ids.reshape(-1))
    send_counts = torch.bincount(sorted_ids, minlength=num_experts)  # [E] = [ep, e] rank-major
    recv_counts = exchange_rows(send_counts, group)  # [ep source, e]
    received = exchange_rows(x[send_order // k], group, rank_splits(send_counts, world),
                             rank_splits(recv_counts, world))
    # Received rows are (source rank, local expert)-major; sort them expert-major.
    local_ids = torch.arange(e, device=x.device).repeat(world) + rank * e
    row_expert, recv_order = stable_sort(torch.repeat_interleave(local_ids, recv_counts))
    offsets = torch.cumsum(recv_counts.view(world, e).sum(0), 0).to(torch.int32)
    send_slot = unpermute(torch.arange(send_order.shape[0], device=x.device), send_order)
    return (received[recv_order], row_expert, offsets, send_slot, send_counts.view(world, e).sum(1),
            recv_counts.view(world, e).sum(1), recv_order)


@all2allv_dispatch.register_fake
def fake_all2allv_dispatch(x, topk_ids, num_experts, group_name):
    """Also the run-time switch's: its two branches return this one form."""
    world = dist.get_world_size(resolve_group(group_name))
    r = fake_rows()
    i64 = dict(dtype=torch.int64)
    return (
        x.new_empty((r, x.shape[1])),
        topk_ids.new_empty((r,), **i64),
        topk_ids.new_empty((num_experts // world,), dtype=torch.int32),
        topk_ids.new_empty((topk_ids.numel(),), **i64),
        topk_ids.new_empty((world,), **i64),
        topk_ids.new_empty((world,), **i64),
        topk_ids.new_empty((r,), **i64),
    )


@torch.library.custom_op(f"{LIB}::all2allv_combine", mutates_args=())
def all2allv_combine(
    y: torch.Tensor, send_slot: torch.Tensor, send_splits: torch.Tensor, recv_splits: torch.Tensor,
    recv_order: torch.Tensor, group_name: str,
) -> torch.Tensor:
    """y [R, H] expert-major -> [S, H] in (t, k) order on the rank that sent the rows."""
    return return_rows_from_experts(y, send_slot, recv_order, resolve_group(group_name),
                                    _splits(send_splits, recv_splits))


@all2allv_combine.register_fake
def _(y, send_slot, send_splits, recv_splits, recv_order, group_name):
    return y.new_empty((send_slot.shape[0], y.shape[1]))


@torch.library.custom_op(f"{LIB}::all2allv_return_grad", mutates_args=())
def all2allv_return_grad(
    grad_rows: torch.Tensor, send_slot: torch.Tensor, send_splits: torch.Tensor, recv_splits: torch.Tensor,
    recv_order: torch.Tensor, group_name: str,
) -> torch.Tensor:
    """Gradient of all2allv_combine: [S, H] in (t, k) order -> expert-major [R, H] on the expert ranks."""
    return send_rows_to_experts(grad_rows, send_slot, recv_order, resolve_group(group_name),
                                _splits(send_splits, recv_splits))


@all2allv_return_grad.register_fake
def _(grad_rows, send_slot, send_splits, recv_splits, recv_order, group_name):
    return grad_rows.new_empty((recv_order.shape[0], grad_rows.shape[1]))


def _all2allv_dispatch_setup(ctx, inputs, output):
    x, topk_ids, _, group_name = inputs
    ctx.save_for_backward(*output[3:])  # send_slot, send_splits, recv_splits, recv_order
    ctx.shape = (x.shape[0], topk_ids.shape[1], group_name)


def all2allv_dispatch_backward(ctx, g_tokens, *unused):
    """Also the run-time switch's dispatch backward: both save the combine's handle."""
    t, k, group_name = ctx.shape
    rows = torch.ops.moe_fx.all2allv_combine(g_tokens, *ctx.saved_tensors, group_name)
    return (sum_over_slots(rows, t, k),) + (None,) * (len(ctx.needs_input_grad) - 1)


torch.library.register_autograd(
    f"{LIB}::all2allv_dispatch", all2allv_dispatch_backward, setup_context=_all2allv_dispatch_setup
)


def _all2allv_combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:5])
    ctx.group_name = inputs[5]


def _all2allv_combine_backward(ctx, grad):
    grad_y = torch.ops.moe_fx.all2allv_return_grad(grad, *ctx.saved_tensors, ctx.group_name)
    return grad_y, None, None, None, None, None


torch.library.register_autograd(
    f"{LIB}::all2allv_combine", _all2allv_combine_backward, setup_context=_all2allv_combine_setup
)
