"""Lowerings: one dispatch/combine pair per strategy, chosen per MoE block."""

from __future__ import annotations

from moe_fx.lowering.all2allv import All2AllVLowering
from moe_fx.lowering.allgather import AllGatherLowering
from moe_fx.lowering.base import EPPlan, LocalLowering, LoweringPlan, Strategy
from moe_fx.lowering.mc2 import Mc2Lowering
from moe_fx.lowering.select import DEVICE_RULES, BlockFacts, LoweringChoice, choose_lowering
from moe_fx.lowering.switch import TokenSwitchLowering

# Strategy -> implementation (off Ascend; moe_fx/lowering/npu has its own table).
LOWERINGS: dict[Strategy, type[LocalLowering]] = {
    Strategy.LOCAL: LocalLowering,
    Strategy.ALLGATHER: AllGatherLowering,
    Strategy.ALL2ALLV: All2AllVLowering,
    Strategy.MC2: Mc2Lowering,
    Strategy.TOKEN_SWITCH: TokenSwitchLowering,
}


__all__ = [
    "BlockFacts",
    "DEVICE_RULES",
    "EPPlan",
    "LOWERINGS",
    "LocalLowering",
    "LoweringChoice",
    "LoweringPlan",
    "Strategy",
    "choose_lowering",
]
