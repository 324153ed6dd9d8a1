"""MC2 lowering off Ascend: one statically shaped dispatch and combine with no host sync.

Every rank sends every rank a buffer of C*K rows (C = the plan's capacity: ``config.max_tokens_per_rank``,
or ceil(T/ep) for static replicated tokens; the same on every rank), with the routed rows packed at
the front and the rest marked as padding. Shapes never depend on the routing, so the path can be
captured in a CUDA graph; the price is padding traffic, which is why it suits few tokens per rank
(decode). Router weights are applied on the sending rank, in the traced order, as with All2AllV.

``transport="symm_mem"`` moves the rows with torch symmetric memory instead
(moe_fx/runtime/symm_mem.py): the same fixed shapes and no host sync, but only routed rows travel.
On Ascend the strategy maps to torch_npu's MC2 ops (moe_fx/lowering/npu/mc2.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_fx.lowering.base import Dispatched, LocalLowering, Strategy, weighted_sum_over_topk


@dataclass(frozen=True, kw_only=True)
class Mc2Dispatched(Dispatched):
    send_slot: fx.Proxy  # [S] slot of each (t, k) row in the [ep * C * K] send buffer
    recv_order: fx.Proxy  # [ep * C * K] received row at each expert-sorted position


@dataclass(frozen=True, kw_only=True)
class SymmMemDispatched(Dispatched):
    order: fx.Proxy  # [S] routed row (t*K + k) at each sorted position
    splits_offsets: fx.Proxy  # [2, E] chunk sizes and starts of the received layout


class Mc2Lowering(LocalLowering):
    strategy = Strategy.MC2

    @property
    def render_name(self) -> str:
        transport = self.plan.transport
        return self.strategy.value if transport == "all_to_all" else f"{self.strategy.value}[{transport}]"

    def dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> Dispatched:
        p, capacity = self.ep, self.plan.capacity_tokens
        # The op raises on a rank with more tokens than the capacity (naming the block): a dropped
        # row would be a silently wrong answer.
        if self.plan.transport == "symm_mem":
            out = torch.ops.moe_fx.symm_mc2_dispatch(hidden_TH, topk_ids_TK, p.num_experts, capacity, p.group_name,
                                                     p.block)
            return SymmMemDispatched(tokens=out[0], expert_ids=out[1], offsets=out[2], order=out[3],
                                     splits_offsets=out[4])
        out = torch.ops.moe_fx.mc2_dispatch(hidden_TH, topk_ids_TK, p.num_experts, capacity, p.group_name, p.block)
        return Mc2Dispatched(tokens=out[0], expert_ids=out[1], offsets=out[2], send_slot=out[3], recv_order=out[4])

    def combine(self, out_RH, dispatched, topk_weights_TK, out_dtype=None):
        if isinstance(dispatched, SymmMemDispatched):
            rows_SH = torch.ops.moe_fx.symm_mc2_combine(
                out_RH, dispatched.order, dispatched.splits_offsets, self.plan.capacity_rows, self.ep.group_name,
            )
        else:
            assert isinstance(dispatched, Mc2Dispatched)
            rows_SH = torch.ops.moe_fx.mc2_combine(out_RH, dispatched.send_slot, dispatched.recv_order,
                                                   self.ep.group_name)
        return weighted_sum_over_topk(rows_SH, topk_weights_TK, out_dtype)
