"""AllGather lowering: gather every rank's tokens and routing, compute the local experts on the
rows routed to them, weight by the router on the expert side, reduce-scatter the partial sums.

NOTE: two host reads per block: the largest token count (one scalar all-gather: ranks may hold
different counts and the collectives need equal sizes) and the number of rows routed here (a
data-dependent size). Unlike All2AllV, no split sizes are exchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import moe_fx.runtime  # noqa: F401  (registers torch.ops.moe_fx)
from moe_fx.lowering.base import Dispatched, LocalLowering, Strategy


@dataclass(frozen=True, kw_only=True)
class AllGatherDispatched(Dispatched):
    row_weight: torch.Tensor  # [R] router weight of each row
    row_index: torch.Tensor  # [R] (t, k) row index in the gathered, padded, rank-major space
    tokens_per_rank: torch.Tensor  # [ep] token count of each rank
    top_k: int
    num_tokens: int  # T on this rank


class AllGatherLowering(LocalLowering):
    strategy = Strategy.ALLGATHER

    def dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> Dispatched:
        p = self.plan
        tokens, row_expert, row_weight, row_index, offsets, tokens_per_rank = (
            torch.ops.moe_fx.allgather_dispatch(
                hidden_TH, topk_ids_TK, topk_weights_TK, p.expert_start, p.num_local_experts, p.group_name
            )
        )
        return AllGatherDispatched(
            tokens=tokens,
            offsets=offsets,
            row_expert=row_expert,
            row_weight=row_weight,
            row_index=row_index,
            top_k=topk_ids_TK.shape[1],
            tokens_per_rank=tokens_per_rank,
            num_tokens=hidden_TH.shape[0],
        )

    def combine(self, out_RH, dispatched, topk_weights_TK) -> torch.Tensor:
        assert isinstance(dispatched, AllGatherDispatched)
        # Weighting before the reduce-scatter keeps the traffic at one row per token.
        partial_RH = out_RH * dispatched.row_weight.unsqueeze(-1)
        return torch.ops.moe_fx.allgather_combine(
            partial_RH,
            dispatched.row_index,
            dispatched.tokens_per_rank,
            dispatched.top_k,
            dispatched.num_tokens,
            self.plan.group_name,
        )
