"""All2AllV lowering: each routed row travels only to the rank that owns its expert.

Exact traffic (about S rows each way), at the price of a device-to-host sync for the split
sizes. Router weights are applied back on the sending rank, in the traced order, so the result
matches the single-device sum bit for bit in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import moe_fx.runtime  # noqa: F401  (registers torch.ops.moe_fx)
from moe_fx.lowering.base import Dispatched, LocalLowering, Strategy, weighted_sum_over_topk


@dataclass(frozen=True, kw_only=True)
class All2AllVDispatched(Dispatched):
    send_order: torch.Tensor  # [S] routed row sent at each position (rows sorted by expert)
    send_splits: torch.Tensor  # [ep] rows sent to each rank
    recv_splits: torch.Tensor  # [ep] rows received from each rank
    regroup: torch.Tensor  # [R] received (rank-major) row at each expert-major position


class All2AllVLowering(LocalLowering):
    strategy = Strategy.ALL2ALLV

    def dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> Dispatched:
        p = self.plan
        tokens, row_expert, offsets, send_order, send_splits, recv_splits, regroup = (
            torch.ops.moe_fx.all2allv_dispatch(hidden_TH, topk_ids_TK, p.num_experts, p.group_name)
        )
        return All2AllVDispatched(
            tokens=tokens,
            offsets=offsets,
            row_expert=row_expert,
            send_order=send_order,
            send_splits=send_splits,
            recv_splits=recv_splits,
            regroup=regroup,
        )

    def combine(self, out_RH, dispatched, topk_weights_TK) -> torch.Tensor:
        assert isinstance(dispatched, All2AllVDispatched)
        rows_SH = torch.ops.moe_fx.all2allv_combine(
            out_RH,
            dispatched.send_order,
            dispatched.send_splits,
            dispatched.recv_splits,
            dispatched.regroup,
            self.plan.group_name,
        )
        return weighted_sum_over_topk(rows_SH, topk_weights_TK)
