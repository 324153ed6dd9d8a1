"""The run-time token switch ("mc2|all2allv"): MC2 while every rank's token count fits the
capacity, All2AllV above it, decided on every call with one agreed value.

The ranks agree on the largest token count (one scalar all-gather, read on the host), so every
rank takes the same branch and the collectives match. Both branches return All2AllV's handle
(moe_fx/runtime/exchange.py: MC2's send_slot counts its padding slots, its splits are C*K rows per
rank), so ``all2allv_combine`` serves them both.

Which branch ran is counted in ``torch._dynamo.utils.counters["moe_fx"]["ran_mc2"]`` and
``["ran_all2allv"]`` (once per block and call).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from moe_fx.runtime.all2allv import all2allv_dispatch, all2allv_dispatch_backward, fake_all2allv_dispatch
from moe_fx.runtime.comm import agree_on_token_counts, resolve_group
from moe_fx.runtime.library import LIB
from moe_fx.runtime.mc2 import mc2_dispatch


@torch.library.custom_op(f"{LIB}::switch_dispatch", mutates_args=())
def switch_dispatch(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, capacity_tokens: int, group_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns all2allv_dispatch's outputs (tokens [R, H] expert-major, row_expert [R], offsets [e],
    send_slot [S], send_splits [ep], recv_splits [ep], recv_order [R]); all2allv_combine undoes
    either branch. MC2's rows past offsets[-1] are padding."""
    group = resolve_group(group_name)
    _, largest = agree_on_token_counts(x, group)
    if largest > capacity_tokens:
        counters["moe_fx"]["ran_all2allv"] += 1
        return all2allv_dispatch(x, topk_ids, num_experts, group_name)
    counters["moe_fx"]["ran_mc2"] += 1
    tokens, row_expert, offsets, send_slot, recv_order = mc2_dispatch(
        x, topk_ids, num_experts, capacity_tokens, group_name
    )
    splits = topk_ids.new_full((dist.get_world_size(group),), capacity_tokens * topk_ids.shape[1], dtype=torch.int64)
    return tokens, row_expert, offsets, send_slot, splits, splits.clone(), recv_order


@switch_dispatch.register_fake
def _(x, topk_ids, num_experts, capacity_tokens, group_name):
    return fake_all2allv_dispatch(x, topk_ids, num_experts, group_name)


def _switch_dispatch_setup(ctx, inputs, output):
    x, topk_ids, _, _, group_name = inputs
    ctx.save_for_backward(*output[3:])
    ctx.shape = (x.shape[0], topk_ids.shape[1], group_name)


torch.library.register_autograd(
    f"{LIB}::switch_dispatch", all2allv_dispatch_backward, setup_context=_switch_dispatch_setup
)
