"""MC2 lowering off Ascend: one statically shaped dispatch and combine with no host sync.

Every rank sends every rank a buffer of C*K rows (C = the capacity the lowering choice gives it:
``config.max_tokens_per_rank``, or ceil(T/ep) for static replicated tokens; the same on every rank), with the routed rows packed at the front and the rest marked as padding. Shapes never
depend on the routing, so the path can be captured in a CUDA graph; the price is padding traffic,
which is why it suits few tokens per rank (decode). Router weights are applied on the sending
rank, in the traced order, as with All2AllV.

``config.mc2_transport="symm_mem"`` moves the rows with torch symmetric memory instead
(moe_fx/runtime/symm_mem.py): the same fixed shapes and no host sync, but only routed rows travel.
On Ascend the strategy maps to torch_npu's MC2 ops (moe_fx/lowering/npu/mc2.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import moe_fx.runtime  # noqa: F401  (registers torch.ops.moe_fx)
from moe_fx.runtime import symm_mem
from moe_fx import config
from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering.base import Dispatched, EPPlan, LocalLowering, Strategy, weighted_sum_over_topk


@dataclass(frozen=True, kw_only=True)
class Mc2Dispatched(Dispatched):
    send_slot: torch.Tensor  # [S] slot of each (t, k) row in the [ep * C * K] send buffer
    recv_order: torch.Tensor  # [ep * C * K] received row at each expert-sorted position


@dataclass(frozen=True, kw_only=True)
class SymmMemDispatched(Dispatched):
    order: torch.Tensor  # [S] routed row (t*K + k) at each sorted position
    splits_offsets: torch.Tensor  # [2, E] chunk sizes and starts of the received layout


class Mc2Lowering(LocalLowering):
    strategy = Strategy.MC2

    def __init__(self, plan: EPPlan, *, capacity_tokens: int | None):
        super().__init__(plan)
        if capacity_tokens is None or capacity_tokens < 1:
            raise UnsupportedMoEError(
                f"MoE block {plan.block!r}: lowering='mc2' sizes its buffers from a token bound, and "
                f"moe_fx.config.max_tokens_per_rank is {config.max_tokens_per_rank!r}. Set it to the largest "
                "number of tokens any rank feeds this block (the same value on every rank)."
            )
        self.capacity_tokens = capacity_tokens
        self.transport = _checked_transport(plan)

    @property
    def render_name(self) -> str:
        return self.strategy.value if self.transport == "all_to_all" else f"{self.strategy.value}[{self.transport}]"

    def dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> Dispatched:
        p = self.plan
        tokens = hidden_TH.shape[0]
        message = (
            f"MoE block {p.block!r}: {tokens} tokens on rank {p.ep_rank} exceed the mc2 capacity "
            f"moe_fx.config.max_tokens_per_rank={self.capacity_tokens}; raise the bound or use "
            "lowering='all2allv'"
        )
        if isinstance(tokens, int) and tokens > self.capacity_tokens:
            raise UnsupportedMoEError(message)
        torch._check(tokens <= self.capacity_tokens, lambda: message)
        if self.transport == "symm_mem":
            unavailable = symm_mem.unavailable_reason(hidden_TH.device.type)
            if unavailable:
                raise UnsupportedMoEError(f"MoE block {p.block!r}: mc2_transport='symm_mem' cannot run: {unavailable}")
            x, row_expert, offsets, order, splits_offsets = torch.ops.moe_fx.symm_mc2_dispatch(
                hidden_TH, topk_ids_TK, p.num_experts, self.capacity_tokens, p.group_name
            )
            return SymmMemDispatched(tokens=x, offsets=offsets, row_expert=row_expert, order=order,
                                     splits_offsets=splits_offsets)
        x, row_expert, offsets, send_slot, recv_order = torch.ops.moe_fx.mc2_dispatch(
            hidden_TH, topk_ids_TK, p.num_experts, self.capacity_tokens, p.group_name
        )
        return Mc2Dispatched(
            tokens=x, offsets=offsets, row_expert=row_expert, send_slot=send_slot, recv_order=recv_order
        )

    def combine(self, out_RH, dispatched, topk_weights_TK) -> torch.Tensor:
        if isinstance(dispatched, SymmMemDispatched):
            rows_SH = torch.ops.moe_fx.symm_mc2_combine(
                out_RH, dispatched.order, dispatched.splits_offsets, self.capacity_tokens * topk_weights_TK.shape[1],
                self.plan.group_name,
            )
            return weighted_sum_over_topk(rows_SH, topk_weights_TK)
        assert isinstance(dispatched, Mc2Dispatched)
        rows_SH = torch.ops.moe_fx.mc2_combine(
            out_RH, dispatched.send_slot, dispatched.recv_order, self.plan.group_name
        )
        return weighted_sum_over_topk(rows_SH, topk_weights_TK)


def _checked_transport(plan: EPPlan) -> str:
    """config.mc2_transport, after checking the block fits the symmetric-memory kernels' limits."""
    transport = config.mc2_transport
    if transport not in ("all_to_all", "symm_mem"):
        raise ValueError(f"moe_fx.config.mc2_transport={transport!r} is not one of ['all_to_all', 'symm_mem']")
    if transport == "symm_mem":
        limits = ((plan.num_local_experts, symm_mem.MAX_EXPERTS_PER_RANK, "experts per rank"),
                  (plan.ep_size, symm_mem.MAX_RANKS, "ranks"))
        for value, limit, what in limits:
            if value > limit:
                raise UnsupportedMoEError(
                    f"MoE block {plan.block!r}: mc2_transport='symm_mem' handles at most {limit} {what} "
                    f"(torch's all_to_all_vdev_2d); this block has {value}. Use mc2_transport='all_to_all'."
                )
    return transport
