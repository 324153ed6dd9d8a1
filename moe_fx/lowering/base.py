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

    def __init__(self, plan: EPPlan):
        self.plan = plan

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
        row_expert, order = torch.sort(topk_ids_TK.reshape(-1), stable=True)
        # offsets[j] = number of rows routed to experts <= j (static shape, no host sync)
        bounds = torch.arange(self.plan.num_experts, device=row_expert.device, dtype=row_expert.dtype)
        offsets = torch.searchsorted(row_expert, bounds, right=True).to(torch.int32)
        return LocalDispatched(
            tokens=hidden_TH[order // top_k], offsets=offsets, row_expert=row_expert, order=order
        )

    def combine(
        self, out_RH: torch.Tensor, dispatched: Dispatched, topk_weights_TK: torch.Tensor
    ) -> torch.Tensor:
        assert isinstance(dispatched, LocalDispatched)
        rows_SH = torch.empty_like(out_RH).index_copy(0, dispatched.order, out_RH)
        return weighted_sum_over_topk(rows_SH, topk_weights_TK)


def weighted_sum_over_topk(rows_SH: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Rows in (t, k) order -> [T, H]: the same product and sum the traced experts code did, so
    the result keeps its dtype promotion (bf16 outputs times fp32 weights sum in fp32)."""
    t, k = topk_weights_TK.shape
    weighted_SH = rows_SH * topk_weights_TK.reshape(-1, 1)
    return weighted_SH.view(t, k, rows_SH.shape[-1]).sum(dim=1)
