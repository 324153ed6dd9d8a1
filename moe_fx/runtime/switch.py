"""The run-time token switch ("mc2|all2allv"): MC2 while every rank's token count fits the
capacity, All2AllV above it, decided on every call with one agreed value.

The ranks agree on the largest token count (one scalar all-reduce MAX, read on the host), so every
rank takes the same branch and the collectives match. Both branches return one handle form, so a
single combine serves them:

    pick [S]       position of each (t, k) row in the send buffer (MC2: its slot among the fixed
                   C*K rows per rank, padding included; All2AllV: its place in expert order)
    send_splits    [ep] rows sent to each rank (MC2: C*K each)
    recv_splits    [ep] rows received from each rank
    regroup [R]    received (rank-major) row at each expert-major position

Which branch ran is counted in ``torch._dynamo.utils.counters["moe_fx"]["ran_mc2"]`` and
``["ran_all2allv"]`` (once per block and call).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from moe_fx.runtime.all2allv import all2allv_dispatch
from moe_fx.runtime.comm import resolve_group
from moe_fx.runtime.library import LIB, fake_rows, sum_over_slots
from moe_fx.runtime.mc2 import mc2_dispatch, return_rows_from_experts, send_rows_to_experts


def largest_token_count(x: torch.Tensor, group: dist.ProcessGroup) -> int:
    """The largest token count over the group's ranks.
    NOTE: one scalar all-reduce and a device-to-host read (the branch is taken on the host)."""
    count = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    return int(count.item())


@torch.library.custom_op(f"{LIB}::switch_dispatch", mutates_args=())
def switch_dispatch(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, capacity_tokens: int, group_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (tokens [R, H] expert-major, row_expert [R], offsets [e], pick [S], send_splits [ep],
    recv_splits [ep], regroup [R]). MC2's rows past offsets[-1] are padding."""
    group = resolve_group(group_name)
    world = dist.get_world_size(group)
    if largest_token_count(x, group) <= capacity_tokens:
        counters["moe_fx"]["ran_mc2"] += 1
        tokens, row_expert, offsets, send_slot, recv_order = mc2_dispatch(
            x, topk_ids, num_experts, capacity_tokens, group_name
        )
        splits = topk_ids.new_full((world,), capacity_tokens * topk_ids.shape[1], dtype=torch.int64)
        return tokens, row_expert, offsets, send_slot, splits, splits.clone(), recv_order
    counters["moe_fx"]["ran_all2allv"] += 1
    tokens, row_expert, offsets, send_order, send_splits, recv_splits, regroup = all2allv_dispatch(
        x, topk_ids, num_experts, group_name
    )
    # All2AllV sends row send_order[i] at position i; pick is the inverse permutation.
    positions = torch.arange(send_order.shape[0], device=send_order.device)
    pick = torch.empty_like(send_order).index_copy_(0, send_order, positions)
    return tokens, row_expert, offsets, pick, send_splits, recv_splits, regroup


@switch_dispatch.register_fake
def _(x, topk_ids, num_experts, capacity_tokens, group_name):
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


def _splits(send_splits: torch.Tensor, recv_splits: torch.Tensor) -> tuple[list[int], list[int]]:
    # NOTE: host read of the split sizes (the switch already synchronized on the token count).
    return send_splits.tolist(), recv_splits.tolist()


@torch.library.custom_op(f"{LIB}::switch_combine", mutates_args=())
def switch_combine(
    y: torch.Tensor, pick: torch.Tensor, send_splits: torch.Tensor, recv_splits: torch.Tensor,
    regroup: torch.Tensor, group_name: str,
) -> torch.Tensor:
    """y [R, H] expert-major -> [S, H] in (t, k) order on the rank that sent the rows."""
    return return_rows_from_experts(y, pick, regroup, resolve_group(group_name), _splits(send_splits, recv_splits))


@switch_combine.register_fake
def _(y, pick, send_splits, recv_splits, regroup, group_name):
    return y.new_empty((pick.shape[0], y.shape[1]))


@torch.library.custom_op(f"{LIB}::switch_return_grad", mutates_args=())
def switch_return_grad(
    grad_rows: torch.Tensor, pick: torch.Tensor, send_splits: torch.Tensor, recv_splits: torch.Tensor,
    regroup: torch.Tensor, group_name: str,
) -> torch.Tensor:
    """Gradient of switch_combine: (t, k)-ordered row gradients back to the expert ranks."""
    return send_rows_to_experts(grad_rows, pick, regroup, resolve_group(group_name), _splits(send_splits, recv_splits))


@switch_return_grad.register_fake
def _(grad_rows, pick, send_splits, recv_splits, regroup, group_name):
    return grad_rows.new_empty((regroup.shape[0], grad_rows.shape[1]))


def _switch_dispatch_setup(ctx, inputs, output):
    x, topk_ids, _, _, group_name = inputs
    ctx.save_for_backward(*output[3:])
    ctx.shape = (x.shape[0], topk_ids.shape[1], group_name)


def _switch_dispatch_backward(ctx, g_tokens, *unused):
    t, k, group_name = ctx.shape
    rows = torch.ops.moe_fx.switch_combine(g_tokens, *ctx.saved_tensors, group_name)
    return sum_over_slots(rows, t, k), None, None, None, None


torch.library.register_autograd(
    f"{LIB}::switch_dispatch", _switch_dispatch_backward, setup_context=_switch_dispatch_setup
)


def _switch_combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:5])
    ctx.group_name = inputs[5]


def _switch_combine_backward(ctx, grad):
    grad_y = torch.ops.moe_fx.switch_return_grad(grad, *ctx.saved_tensors, ctx.group_name)
    return grad_y, None, None, None, None, None


torch.library.register_autograd(
    f"{LIB}::switch_combine", _switch_combine_backward, setup_context=_switch_combine_setup
)
