"""MC2 lowering (fused static-capacity dispatch/combine). Not available yet."""

from __future__ import annotations

from moe_fx.errors import LoweringUnavailableError
from moe_fx.lowering.base import EPPlan


def unavailable(block: str, plan: EPPlan) -> LoweringUnavailableError:
    return LoweringUnavailableError(
        f"MoE block {block!r}: lowering='mc2' is not available yet in moe_fx "
        f"(E={plan.num_experts}, ep={plan.ep_size}). Use lowering='auto', 'allgather' or 'all2allv'."
    )
