"""EP lowerings: one dispatch/combine pair per strategy, chosen per MoE block."""

from __future__ import annotations

from moe_fx.lowering.all2allv import All2AllVLowering
from moe_fx.lowering.allgather import AllGatherLowering
from moe_fx.lowering.base import EPPlan, LocalLowering, Strategy
from moe_fx.lowering.mc2 import Mc2Lowering
from moe_fx.lowering.select import DEVICE_RULES, BlockFacts, LoweringChoice, choose_lowering
from moe_fx.lowering.switch import TokenSwitchLowering

# Strategy -> implementation.
LOWERINGS: dict[Strategy, type[LocalLowering]] = {
    Strategy.LOCAL: LocalLowering,
    Strategy.ALLGATHER: AllGatherLowering,
    Strategy.ALL2ALLV: All2AllVLowering,
    Strategy.MC2: Mc2Lowering,
    Strategy.TOKEN_SWITCH: TokenSwitchLowering,
}

# Strategies sized by a token count (LoweringChoice.capacity_tokens).
_SIZED = (Strategy.MC2, Strategy.TOKEN_SWITCH)


def build_lowering(plan: EPPlan, choice: LoweringChoice) -> LocalLowering:
    """The lowering object ``choice`` names, for this rank's ``plan``."""
    cls = LOWERINGS[choice.strategy]
    if choice.strategy in _SIZED:
        return cls(plan, capacity_tokens=choice.capacity_tokens)
    return cls(plan)


__all__ = [
    "BlockFacts",
    "DEVICE_RULES",
    "EPPlan",
    "LOWERINGS",
    "LocalLowering",
    "LoweringChoice",
    "Strategy",
    "build_lowering",
    "choose_lowering",
]
