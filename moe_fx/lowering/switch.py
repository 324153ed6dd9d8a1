"""The run-time token switch ("mc2|all2allv"): MC2 for small token counts, All2AllV for large ones,
chosen on every call without a recompile.

When no token bound is known at compile time (dynamic shapes, or a count that varies between
prefill and decode), the ranks agree at run time on the largest token count (one scalar
all-gather) and take the MC2 path while it fits the capacity C, All2AllV above it. Every rank takes
the same branch, so the collectives match. The host reads the agreed count, so this path is not
CUDA-graph capturable; a known bound (``config.max_tokens_per_rank``) gives plain MC2, which is.
"""

from __future__ import annotations

import torch

from moe_fx.lowering.all2allv import All2AllVLowering
from moe_fx.lowering.base import Strategy


class TokenSwitchLowering(All2AllVLowering):
    """All2AllV's handle and combine serve both branches (moe_fx/runtime/switch.py)."""

    strategy = Strategy.TOKEN_SWITCH

    def __repr__(self) -> str:
        return f"{super().__repr__()} [mc2 while max tokens per rank <= {self.plan.capacity_tokens}]"

    def _exchange_rows(self, hidden_TH, topk_ids_TK):
        p = self.ep
        return torch.ops.moe_fx.switch_dispatch(hidden_TH, topk_ids_TK, p.num_experts, self.plan.capacity_tokens,
                                                p.group_name)
