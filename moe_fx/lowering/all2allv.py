"""All2AllV lowering: each routed row travels only to the rank that owns its expert.

Exact traffic (about S rows each way), at the price of a device-to-host sync for the split
sizes. Router weights are applied back on the sending rank, in the traced order, so the result
matches the single-device sum bit for bit in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_fx.lowering.base import Dispatched, LocalLowering, Strategy, weighted_sum_over_topk


@dataclass(frozen=True, kw_only=True)
class All2AllVDispatched(Dispatched):
    send_slot: fx.Proxy  # [S] position of each (t, k) row in the send buffer (moe_fx/runtime/exchange.py)
    send_splits: fx.Proxy  # [ep] rows sent to each rank
    recv_splits: fx.Proxy  # [ep] rows received from each rank
    recv_order: fx.Proxy  # [R] received (source-rank-major) row at each expert-major position


class All2AllVLowering(LocalLowering):
    strategy = Strategy.ALL2ALLV

    def _exchange_rows(self, hidden_TH, topk_ids_TK):
        """The dispatch op's outputs: (tokens, expert ids, offsets, send_slot, send_splits,
        recv_splits, recv_order)."""
        return torch.ops.moe_fx.all2allv_dispatch(hidden_TH, topk_ids_TK, self.ep.num_experts, self.ep.group_name)

    def dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> Dispatched:
        out = self._exchange_rows(hidden_TH, topk_ids_TK)
        return All2AllVDispatched(
            tokens=out[0], expert_ids=out[1], offsets=out[2], send_slot=out[3], send_splits=out[4],
            recv_splits=out[5], recv_order=out[6],
        )

    def combine(self, out_RH, dispatched, topk_weights_TK, out_dtype=None):
        assert isinstance(dispatched, All2AllVDispatched)
        d = dispatched
        rows_SH = torch.ops.moe_fx.all2allv_combine(out_RH, d.send_slot, d.send_splits, d.recv_splits, d.recv_order,
                                                    self.ep.group_name)
        return weighted_sum_over_topk(rows_SH, topk_weights_TK, out_dtype)
