"""The agreement check at the entry of every rewritten MoE block (moe_fx/runtime/guard.py).

    topk_ids [T, K] -> moe_fx::guard(topk_ids, fingerprint, block, group, timeout_ms, every_call, checks_ids)
                    [-> _assert_async(ids in [0, E)), clamp     where the table is read on the first call only,
                                                                 off Ascend]
                    -> dispatch, experts, combine (as before, reading the checked ids)

``GuardPlan`` is resolved by the pass (moe_fx/passes/plan.py ``guard_plan``) from the block's
facts and config; ``emit_guard`` puts the op in the graph. The op is emitted first, so every
other op of the region (a dense form's ``gather`` included) reads ids that are known good.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_fx.runtime.guard import STRATEGIES, block_id, device_check, dtype_code


@dataclass(frozen=True, kw_only=True)
class GuardPlan:
    block: str
    num_experts: int
    hidden_size: int
    top_k: int
    dtype: torch.dtype
    strategy: str  # a Strategy value
    capacity: int | None  # tokens per rank the plan was built for (mc2, static AllGather, the switch point)
    limit: int | None  # token count above which the block refuses (per-rank tokens with a static buffer)
    ep_size: int
    group_name: str | None  # the EP group; None at ep = 1
    timeout_ms: int
    every_call: bool  # exchange and read the table on every call (else: the first call of the block)
    check_in_graph: bool  # calls without the table: the ids' device check as graph ops (else in the op)

    def fingerprint(self) -> list[int]:
        """The compile-time fields of moe_fx.runtime.guard.FIELDS, in order (without "call")."""
        return [block_id(self.block), self.num_experts, self.hidden_size, self.top_k, dtype_code(self.dtype),
                STRATEGIES.index(self.strategy), -1 if self.capacity is None else self.capacity, self.ep_size,
                -1 if self.limit is None else self.limit]


def emit_guard(plan: GuardPlan, topk_ids_TK: fx.Proxy) -> fx.Proxy:
    """The ids every later op of the region reads, after the ranks agreed on this call."""
    in_graph = plan.check_in_graph and not plan.every_call
    checked = torch.ops.moe_fx.guard(topk_ids_TK, plan.fingerprint(), plan.block, plan.group_name,
                                     plan.timeout_ms, plan.every_call, not plan.check_in_graph)
    # As graph ops the compiler fuses the check into one reduction and the clamp into the ids'
    # consumers, rather than the op launching them eagerly on every call.
    return device_check(checked, plan.num_experts, plan.block) if in_graph else checked
