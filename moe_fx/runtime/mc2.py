"""MC2 ops (static capacity, off Ascend): every rank sends every rank a buffer of fixed size C*K
rows (C = the configured token bound), so shapes never depend on the routing and no value is read
on the host: the path can be captured in a CUDA graph. Rows are placed by device-side arithmetic
only (sort, searchsorted, index_copy)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx.runtime.comm import exchange_rows, resolve_group
from moe_fx.runtime.exchange import return_rows_from_experts, send_rows_to_experts
from moe_fx.runtime.library import LIB, check_capacity, sum_over_slots
from moe_fx.runtime.permute import stable_sort, unpermute


def _mc2_slots(topk_ids: torch.Tensor, num_experts: int, world: int, rows_per_rank: int) -> torch.Tensor:
    """[S] slot of each (t, k) row in the [ep * rows_per_rank] send buffer: destination-major,
    rows of one destination packed in expert order."""
    per_rank = num_experts // world
    sorted_ids, order = stable_sort(topk_ids.reshape(-1))
    dest = sorted_ids // per_rank
    ranks = torch.arange(world, device=dest.device, dtype=dest.dtype)
    first = torch.searchsorted(dest, ranks)  # first sorted row of each destination
    position = torch.arange(dest.numel(), device=dest.device) - first[dest]
    return unpermute(dest * rows_per_rank + position, order)


@torch.library.custom_op(f"{LIB}::mc2_dispatch", mutates_args=())
def mc2_dispatch(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, capacity_tokens: int, group_name: str,
    block: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (tokens [ep*C*K, H] expert-sorted, row_expert [ep*C*K], offsets [e],
    send_slot [S], recv_order [ep*C*K]). Rows past offsets[-1] are padding. ``block`` names the
    MoE block in the error a rank with more than C tokens raises."""
    group = resolve_group(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    check_capacity(block, x.shape[0], capacity_tokens, rank)
    k = topk_ids.shape[1]
    rows_per_rank = capacity_tokens * k
    per_rank = num_experts // world
    send_slot = _mc2_slots(topk_ids, num_experts, world, rows_per_rank)
    ids = topk_ids.new_full((world * rows_per_rank,), -1).index_copy_(0, send_slot, topk_ids.reshape(-1))
    received_ids = exchange_rows(ids, group)
    # Padding (-1) sorts after every local expert; it is excluded from the offsets.
    sorted_ids, recv_order = stable_sort(torch.where(received_ids < 0, num_experts, received_ids))
    local = torch.arange(rank * per_rank, (rank + 1) * per_rank, device=x.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, local, right=True).to(torch.int32)
    tokens = send_rows_to_experts(x.repeat_interleave(k, dim=0), send_slot, recv_order, group)
    row_expert = sorted_ids.clamp(max=rank * per_rank + per_rank - 1)  # padding reads a valid bias
    return tokens, row_expert, offsets, send_slot, recv_order


@mc2_dispatch.register_fake
def _(x, topk_ids, num_experts, capacity_tokens, group_name, block=""):
    world = dist.get_world_size(resolve_group(group_name))
    rows = world * capacity_tokens * topk_ids.shape[1]
    return (
        x.new_empty((rows, x.shape[1])),
        topk_ids.new_empty((rows,), dtype=torch.int64),
        topk_ids.new_empty((num_experts // world,), dtype=torch.int32),
        topk_ids.new_empty((topk_ids.numel(),), dtype=torch.int64),
        topk_ids.new_empty((rows,), dtype=torch.int64),
    )


@torch.library.custom_op(f"{LIB}::mc2_combine", mutates_args=())
def mc2_combine(
    y: torch.Tensor, send_slot: torch.Tensor, recv_order: torch.Tensor, group_name: str
) -> torch.Tensor:
    """y [ep*C*K, H] expert-sorted -> [S, H] in (t, k) order on the rank that sent the rows."""
    return return_rows_from_experts(y, send_slot, recv_order, resolve_group(group_name))


@mc2_combine.register_fake
def _(y, send_slot, recv_order, group_name):
    return y.new_empty((send_slot.shape[0], y.shape[1]))


@torch.library.custom_op(f"{LIB}::mc2_return_grad", mutates_args=())
def mc2_return_grad(
    grad_rows: torch.Tensor, send_slot: torch.Tensor, recv_order: torch.Tensor, group_name: str
) -> torch.Tensor:
    """Gradient of mc2_combine: (t, k)-ordered row gradients back to the expert ranks."""
    return send_rows_to_experts(grad_rows, send_slot, recv_order, resolve_group(group_name))


@mc2_return_grad.register_fake
def _(grad_rows, send_slot, recv_order, group_name):
    return grad_rows.new_empty((recv_order.shape[0], grad_rows.shape[1]))


def _mc2_dispatch_setup(ctx, inputs, output):
    x, topk_ids, _, _, group_name, _ = inputs
    _, _, _, send_slot, recv_order = output
    ctx.save_for_backward(send_slot, recv_order)
    ctx.shape = (x.shape[0], topk_ids.shape[1], group_name)


def _mc2_dispatch_backward(ctx, g_tokens, *unused):
    send_slot, recv_order = ctx.saved_tensors
    t, k, group_name = ctx.shape
    rows = torch.ops.moe_fx.mc2_combine(g_tokens, send_slot, recv_order, group_name)
    return sum_over_slots(rows, t, k), None, None, None, None, None


torch.library.register_autograd(f"{LIB}::mc2_dispatch", _mc2_dispatch_backward, setup_context=_mc2_dispatch_setup)


def _mc2_combine_setup(ctx, inputs, output):
    _, send_slot, recv_order, group_name = inputs
    ctx.save_for_backward(send_slot, recv_order)
    ctx.group_name = group_name


def _mc2_combine_backward(ctx, grad):
    send_slot, recv_order = ctx.saved_tensors
    return torch.ops.moe_fx.mc2_return_grad(grad, send_slot, recv_order, ctx.group_name), None, None, None


torch.library.register_autograd(f"{LIB}::mc2_combine", _mc2_combine_backward, setup_context=_mc2_combine_setup)

