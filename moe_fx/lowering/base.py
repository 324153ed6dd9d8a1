"""The contract every EP lowering implements.

    [router] -> topk_ids [T, K], topk_weights [T, K]          (left as traced)
        |
    dispatch   hidden [T, H] -> Dispatched: tokens [R, H] grouped by local expert,
        |      offsets [e], row_expert [R]   (communication + permutation)
    experts    grouped matmul (gate_up) -> activation as traced -> grouped matmul (down)
        |      (moe_fx.lowering.experts; the activation is copied from the original graph)
    combine    expert outputs [R, H] -> out [T, H]   (inverse of dispatch, router weights,
                                                      sum over top-k)

Legend: T tokens on this rank, K top-k, S = T*K routed rows, H hidden, E experts, e = E/ep local
experts, R rows this rank's experts process (data-dependent under EP).

ep == 1 is the base class (``LocalLowering``): sort, grouped matmul, unsort. The EP strategies
refine dispatch and combine. Lowering objects are immutable; each rewritten region holds one and
calls its bound ``dispatch`` / ``combine`` from the graph.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from moe_fx.errors import UnsupportedMoEError
from moe_fx.runtime.comm import current_ep_group


class Strategy(enum.Enum):
    LOCAL = "local"
    ALLGATHER = "allgather"
    ALL2ALLV = "all2allv"
    MC2 = "mc2"
    TOKEN_SWITCH = "mc2|all2allv"  # decided on every call from the largest rank's token count


@dataclass(frozen=True, kw_only=True)
class EPPlan:
    """Where this rank sits in the expert-parallel group, for one MoE block."""

    block: str  # module path of the experts, for messages
    num_experts: int
    ep_size: int = 1
    ep_rank: int = 0
    group_name: str | None = None  # None only when ep_size == 1

    @classmethod
    def for_block(cls, block: str, num_experts: int) -> "EPPlan":
        """This rank's plan for ``block`` in the configured EP group (ep == 1 without one)."""
        group = current_ep_group()
        if group is None or group.size() == 1:
            return cls(block=block, num_experts=num_experts)
        ep = group.size()
        if num_experts % ep:
            raise UnsupportedMoEError(
                f"MoE block {block!r}: {num_experts} experts cannot be split evenly over an "
                f"expert-parallel group of {ep} ranks ({num_experts} % {ep} = {num_experts % ep}). "
                f"Use a group whose size divides {num_experts} (moe_fx.config.ep_group)."
            )
        return cls(block=block, num_experts=num_experts, ep_size=ep, ep_rank=group.rank(), group_name=group.group_name)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def expert_start(self) -> int:
        return self.ep_rank * self.num_local_experts

    @property
    def local_experts(self) -> range:
        return range(self.expert_start, self.expert_start + self.num_local_experts)


@dataclass(frozen=True, kw_only=True)
class Dispatched:
    """What dispatch hands to the experts stage and, as the handle, to combine."""

    tokens: torch.Tensor  # [R, H] rows grouped by local expert (expert-major)
    offsets: torch.Tensor  # [e] int32, cumulative end row of each local expert
    row_expert: torch.Tensor  # [R] global expert id of each row


@dataclass(frozen=True, kw_only=True)
class LocalDispatched(Dispatched):
    order: torch.Tensor  # [S] routed row (t*K + k) that each sorted row came from


class LocalLowering:
    """ep == 1: one sort by expert, grouped matmuls, one unsort. No communication."""

    strategy = Strategy.LOCAL
    # How the rewrite places the stages: False, one graph call per stage (run as Python); True,
    # the stages' ops traced into the graph (moe_fx/lowering/npu/base.py says what that asks).
    inline_stages = False

    def __init__(self, plan: EPPlan):
        self.plan = plan

    @property
    def render_name(self) -> str:
        """The strategy's name in render_region's output."""
        return self.strategy.value

    def __repr__(self) -> str:
        p = self.plan
        return f"{self.strategy.value}(experts {p.expert_start}..{p.expert_start + p.num_local_experts - 1} of {p.num_experts}, ep {p.ep_rank}/{p.ep_size})"

    def local_weights(self, weight: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """[E, ...] -> this rank's contiguous block [e, ...] (a view). One tensor per expert (a
        ModuleList of nn.Linear): only the local ones are stacked (a copy per call)."""
        p = self.plan
        if isinstance(weight, (list, tuple)):
            return torch.stack(weight[p.expert_start : p.expert_start + p.num_local_experts])
        if p.ep_size == 1:
            return weight
        return weight[p.expert_start : p.expert_start + p.num_local_experts]

    def dispatch(
        self, hidden_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
    ) -> Dispatched:
        top_k = topk_ids_TK.shape[1]
        sorted_ids, order = torch.sort(_narrow_sort_keys(topk_ids_TK.reshape(-1), self.plan.num_experts), stable=True)
        # offsets[j] = number of rows routed to experts <= j (static shape, no host sync)
        bounds = torch.arange(self.plan.num_experts, device=sorted_ids.device, dtype=sorted_ids.dtype)
        offsets = torch.searchsorted(sorted_ids, bounds, right=True).to(torch.int32)
        return LocalDispatched(
            tokens=hidden_TH[order // top_k], offsets=offsets, row_expert=sorted_ids.long(), order=order
        )

    def combine(
        self, out_RH: torch.Tensor, dispatched: Dispatched, topk_weights_TK: torch.Tensor,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``out_dtype``: the dtype the model casts the result to, folded into the same pass."""
        assert isinstance(dispatched, LocalDispatched)
        # Unsort through the inverse permutation (a scatter of S indices, not of S rows), fused
        # with the weighted sum over top-k (moe_fx/runtime/unsort.py).
        order = dispatched.order
        position = torch.empty_like(order).index_copy_(0, order, torch.arange(order.shape[0], device=order.device))
        return torch.ops.moe_fx.unsort_weighted_sum(out_RH, position, topk_weights_TK, out_dtype)


def _narrow_sort_keys(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids as the narrowest integer type that holds them: a radix sort's passes grow with
    the key width (int16 takes a quarter of int64's)."""
    if num_experts <= torch.iinfo(torch.int16).max:
        return expert_ids.to(torch.int16)
    return expert_ids


def weighted_sum_over_topk(rows_SH: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Rows in (t, k) order -> [T, H]: the same product and sum the traced experts code did, so
    the result keeps its dtype promotion (bf16 outputs times fp32 weights sum in fp32)."""
    t, k = topk_weights_TK.shape
    weighted_SH = rows_SH * topk_weights_TK.reshape(-1, 1)
    return weighted_SH.view(t, k, rows_SH.shape[-1]).sum(dim=1)
