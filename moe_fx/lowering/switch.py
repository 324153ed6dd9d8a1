"""The run-time token switch ("mc2|all2allv"): MC2 for small token counts, All2AllV for large ones,
chosen on every call without a recompile.

When no token bound is known at compile time (dynamic shapes, or a count that varies between
prefill and decode), the ranks agree at run time on the largest token count (one scalar all-reduce
MAX) and take the MC2 path while it fits the capacity C, All2AllV above it. Every rank takes the
same branch, so the collectives match. The host reads the agreed count, so this path is not
CUDA-graph capturable; a known bound (``config.max_tokens_per_rank``) gives plain MC2, which is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_fx.lowering.base import Dispatched, LocalLowering, Strategy, weighted_sum_over_topk


@dataclass(frozen=True, kw_only=True)
class SwitchDispatched(Dispatched):
    pick: fx.Proxy  # [S] position of each (t, k) row in the send buffer
    send_splits: fx.Proxy  # [ep] rows sent to each rank
    recv_splits: fx.Proxy  # [ep] rows received from each rank
    regroup: fx.Proxy  # [R] received (rank-major) row at each expert-major position


class TokenSwitchLowering(LocalLowering):
    strategy = Strategy.TOKEN_SWITCH

    def __repr__(self) -> str:
        return f"{super().__repr__()} [mc2 while max tokens per rank <= {self.plan.capacity_tokens}]"

    def dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> Dispatched:
        p = self.ep
        out = torch.ops.moe_fx.switch_dispatch(
            hidden_TH, topk_ids_TK, p.num_experts, self.plan.capacity_tokens, p.group_name
        )
        return SwitchDispatched(
            tokens=out[0], expert_ids=out[1], offsets=out[2], pick=out[3], send_splits=out[4],
            recv_splits=out[5], regroup=out[6],
        )

    def combine(self, out_RH, dispatched, topk_weights_TK, out_dtype=None):
        assert isinstance(dispatched, SwitchDispatched)
        d = dispatched
        rows_SH = torch.ops.moe_fx.switch_combine(
            out_RH, d.pick, d.send_splits, d.recv_splits, d.regroup, self.ep.group_name
        )
        return weighted_sum_over_topk(rows_SH, topk_weights_TK, out_dtype)
