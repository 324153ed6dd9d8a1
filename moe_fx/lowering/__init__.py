"""EP lowerings: one dispatch/combine pair per strategy, chosen per MoE block."""

from __future__ import annotations

from moe_fx.lowering.all2allv import All2AllVLowering
from moe_fx.lowering.allgather import AllGatherLowering
from moe_fx.lowering.base import EPPlan, LocalLowering, Strategy
from moe_fx.lowering.mc2 import Mc2Lowering
from moe_fx.lowering.select import LoweringChoice, choose_lowering

# Strategy -> implementation.
LOWERINGS: dict[Strategy, type[LocalLowering]] = {
    Strategy.LOCAL: LocalLowering,
    Strategy.ALLGATHER: AllGatherLowering,
    Strategy.ALL2ALLV: All2AllVLowering,
    Strategy.MC2: Mc2Lowering,
}

__all__ = [
    "EPPlan",
    "LOWERINGS",
    "LocalLowering",
    "LoweringChoice",
    "Strategy",
    "choose_lowering",
]
