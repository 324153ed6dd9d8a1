"""AllGather lowering: gather every rank's tokens and routing, compute the local experts on the
rows routed to them, weight by the router on the expert side, reduce-scatter the partial sums.

Two forms, by what the plan knows:

- a token bound C (``config.max_tokens_per_rank``, or ceil(T/tp) for replicated tokens): every rank
  pads to C rows and the exchange is two c10d functional all-gathers (tokens; ids and weights
  packed) and one reduce-scatter, all with static shapes. No host sync, no Python op on the
  path: it can be captured in a CUDA graph. The partial sums travel in the model's output dtype
  (bf16 models: the per-rank partials are rounded to bf16 before the cross-rank sum, one more
  rounding than on one device, within bf16's tolerance).
- no bound: ``moe_fx::allgather_dispatch`` / ``allgather_combine``. NOTE: two host reads per
  block: the largest token count (one scalar all-gather: ranks may hold different counts and the
  collectives need equal sizes) and the number of rows routed here (a data-dependent size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_fx.lowering.base import (
    Dispatched, LocalLowering, Strategy, example_value, arange, inverse_permutation, pad_rows_to, size,
)
from moe_fx.lowering.collectives import start_all_gather_rows, start_reduce_scatter_rows, wait
from moe_fx.runtime.library import capacity_message, check_capacity
from moe_fx.runtime.permute import sort_keys, stable_sort


@dataclass(frozen=True, kw_only=True)
class AllGatherDispatched(Dispatched):
    row_weight: fx.Proxy  # [R] router weight of each row
    row_index: fx.Proxy  # [R] (t, k) row index in the gathered, padded, rank-major space
    tokens_per_rank: fx.Proxy  # [ep] token count of each rank
    num_tokens: fx.Proxy | int  # T on this rank


@dataclass(frozen=True, kw_only=True)
class StaticGatherDispatched(Dispatched):
    order: fx.Proxy  # [ep*C*K] gathered (t, k) row at each sorted position; this rank's first
    local_TK: fx.Proxy  # [ep*C, K] bool: the gathered routing slot is one of this rank's experts
    weights_TK: fx.Proxy  # [ep*C, K] gathered router weights
    num_tokens: fx.Proxy | int  # T on this rank


@dataclass(frozen=True, kw_only=True)
class GatherIssued:
    """A bounded dispatch whose all-gather is issued and not yet awaited."""

    gathered: fx.Proxy  # [ep*C, H + routing columns], read through wait()
    gathered_weights: fx.Proxy | None  # training: the router weights' own all-gather, likewise
    hidden: int | fx.Proxy  # H: the routing columns follow
    weights_dtype: torch.dtype
    num_tokens: fx.Proxy | int  # T on this rank


@dataclass(frozen=True, kw_only=True)
class ScatterIssued:
    """A bounded combine whose reduce-scatter is issued and not yet awaited."""

    scattered: fx.Proxy  # [C, H], read through wait()
    num_tokens: fx.Proxy | int


class AllGatherLowering(LocalLowering):
    strategy = Strategy.ALLGATHER

    folds_out_dtype = True  # the partial sums cross ranks in the output dtype

    @property
    def overlap_chunks(self) -> int:
        return self.plan.overlap_chunks  # > 1 only with a bound (passes/plan._overlap_chunks)

    def dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> Dispatched:
        if self.plan.capacity_tokens is not None:
            return self.finish_dispatch(self.start_dispatch(hidden_TH, topk_ids_TK, topk_weights_TK))
        p = self.ep
        out = torch.ops.moe_fx.allgather_dispatch(
            hidden_TH, topk_ids_TK, topk_weights_TK, p.expert_start, p.num_local_experts, p.group_name
        )
        return AllGatherDispatched(
            tokens=out[0], expert_ids=out[1], row_weight=out[2], row_index=out[3], offsets=out[4],
            tokens_per_rank=out[5], num_tokens=size(hidden_TH, 0),
        )

    def combine(self, out_RH, dispatched, topk_weights_TK, out_dtype=None):
        if isinstance(dispatched, StaticGatherDispatched):
            return self.finish_combine(self.start_combine(out_RH, dispatched, topk_weights_TK, out_dtype))
        assert isinstance(dispatched, AllGatherDispatched)
        # Weighting before the reduce-scatter keeps the traffic at one row per token.
        partial_RH = out_RH * dispatched.row_weight.unsqueeze(-1)
        return torch.ops.moe_fx.allgather_combine(
            partial_RH, dispatched.row_index, dispatched.tokens_per_rank, self.plan.top_k, dispatched.num_tokens,
            self.ep.group_name, out_dtype,
        )

    # -- the bounded form in two halves each, so that chunks can overlap (passes/pipeline.py) ----

    def split_tokens(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> list[tuple[fx.Proxy, fx.Proxy, fx.Proxy]]:
        """The bound's C tokens as ``plan.overlap_chunks`` chunks of ceil(C/n) rows each (padding
        rows route to id -1, which no rank owns); ``join_tokens`` undoes it."""
        n, capacity, rows = self.plan.overlap_chunks, self.plan.capacity_tokens, self._chunk_rows()
        self._check_bound(hidden_TH, size(hidden_TH, 0), capacity)
        padded = (pad_rows_to(hidden_TH, n * rows), pad_rows_to(topk_ids_TK, n * rows, -1),
                  pad_rows_to(topk_weights_TK, n * rows))
        return [tuple(t.narrow(0, i * rows, rows) for t in padded) for i in range(n)]

    def join_tokens(self, outs: list[fx.Proxy], num_tokens) -> fx.Proxy:
        return torch.cat(outs, 0).narrow(0, 0, num_tokens)

    def _chunk_rows(self) -> int:
        return -(-self.plan.capacity_tokens // self.plan.overlap_chunks)

    def start_dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> GatherIssued:
        """Pad to the bound and issue the all-gather of the tokens and their routing."""
        capacity = self._chunk_rows() if self.plan.overlap_chunks > 1 else self.plan.capacity_tokens
        num_tokens = size(hidden_TH, 0)
        self._check_bound(hidden_TH, num_tokens, capacity)
        # One all-gather moves the tokens and their routing: ids (int32) and weights (fp32 bits,
        # exact for fp32/bf16/fp16) ride as extra columns of the token rows, bit-cast to their dtype.
        # (Two collectives get coalesced into one NCCL group, whose protocol then suits the small
        # one: 30 GB/s for the tokens on 2 H200s.) Padding rows carry id -1, which no rank owns.
        # A training graph gathers the weights on their own: the router's gradient flows through them.
        dtype, hidden = example_value(hidden_TH).dtype, size(hidden_TH, 1)
        columns = [pad_rows_to(topk_ids_TK.to(torch.int32), capacity, -1)]
        if not self.plan.training:
            columns.append(pad_rows_to(topk_weights_TK.to(torch.float32).view(torch.int32), capacity))
        routing = torch.cat(columns, 1) if len(columns) > 1 else columns[0]
        packed = torch.cat([pad_rows_to(hidden_TH, capacity), routing.view(dtype)], 1)
        weights = (start_all_gather_rows(pad_rows_to(topk_weights_TK, capacity), self.plan)
                   if self.plan.training else None)
        return GatherIssued(gathered=start_all_gather_rows(packed, self.plan), gathered_weights=weights,
                            hidden=hidden, weights_dtype=example_value(topk_weights_TK).dtype, num_tokens=num_tokens)

    def finish_dispatch(self, issued: GatherIssued) -> StaticGatherDispatched:
        """Await the all-gather and group the rows routed to this rank's experts."""
        p, k = self.ep, self.plan.top_k
        x_all, ids_TK, weights_TK = self.gathered(issued)
        local_id = ids_TK - p.expert_start
        local_TK = (local_id >= 0) & (local_id < p.num_local_experts)
        # Other ranks' slots sort after every local expert (key e) and are excluded from offsets.
        keys = sort_keys(torch.where(local_TK, local_id, p.num_local_experts).reshape(-1), p.num_local_experts + 1)
        sorted_keys, order = stable_sort(keys)
        bounds = arange(sorted_keys, p.num_local_experts, dtype=example_value(sorted_keys).dtype)
        offsets = torch.searchsorted(sorted_keys, bounds, right=True).to(torch.int32)
        # Rows past offsets[-1] are other ranks' slots: the grouped matmul leaves them unwritten
        # and the combine never reads them. Their expert id is clamped to a local one (a valid
        # index for biases).
        expert_ids = sorted_keys.clamp(max=p.num_local_experts - 1) + p.expert_start
        # Only the rows routed here are moved (on CUDA; elsewhere all ep*C*K).
        rows = torch.ops.moe_fx.gather_rows_upto(x_all, order // k, offsets)
        return StaticGatherDispatched(
            tokens=rows, offsets=offsets, expert_ids=expert_ids, order=order, local_TK=local_TK,
            weights_TK=weights_TK, num_tokens=issued.num_tokens,
        )

    def gathered(self, issued: GatherIssued) -> tuple[fx.Proxy, fx.Proxy, fx.Proxy]:
        """Await the all-gather: every rank's padded tokens [ep*C, H], expert ids [ep*C, K] (int32;
        padding rows -1) and router weights [ep*C, K], rank-major."""
        k, hidden = self.plan.top_k, issued.hidden
        gathered = wait(issued.gathered)  # [ep*C, H + routing columns]
        x_all = gathered.narrow(1, 0, hidden)
        routing = gathered.narrow(1, hidden, size(gathered, 1) - hidden).contiguous().view(torch.int32)
        ids_TK = routing.narrow(1, 0, k)
        if issued.gathered_weights is not None:
            weights_TK = wait(issued.gathered_weights)
        else:
            weights_TK = routing.narrow(1, k, k).contiguous().view(torch.float32).to(issued.weights_dtype)
        return x_all, ids_TK, weights_TK

    def start_combine(self, out_RH, dispatched: StaticGatherDispatched, topk_weights_TK,
                      out_dtype=None) -> ScatterIssued:
        """This rank's weighted partial sums for every gathered token; issue their reduce-scatter."""
        d = dispatched
        # Rows of other ranks' experts (position -1) are skipped: the sum is this rank's part.
        position = torch.where(d.local_TK.reshape(-1), inverse_permutation(d.order), -1)
        partial = torch.ops.moe_fx.unsort_weighted_sum(out_RH, position, d.weights_TK, out_dtype)
        return ScatterIssued(scattered=start_reduce_scatter_rows(partial, self.plan), num_tokens=d.num_tokens)

    def finish_combine(self, issued: ScatterIssued) -> fx.Proxy:
        return wait(issued.scattered).narrow(0, 0, issued.num_tokens)

    def _check_bound(self, hidden_TH: fx.Proxy, tokens, capacity: int) -> None:
        """A rank with T > C raises (naming the block) rather than drop rows when padding to C."""
        p = self.ep
        if isinstance(tokens, int):
            check_capacity(p.block, tokens, capacity, p.ep_rank, "allgather")
            return
        message = capacity_message(p.block, "more", capacity, p.ep_rank, "allgather")
        hidden_TH.tracer.create_proxy("call_function", torch.ops.aten._assert_scalar.default,
                                      (tokens <= capacity, message), {})

