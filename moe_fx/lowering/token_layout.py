"""Token layouts (vllm-ascend's prepare/finalize): what the ranks' inputs to a block hold.

``per_rank`` (default): every rank has its own tokens; the strategies handle them as they are.
``replicated`` (tensor-parallel style): every rank of a token group has the same T tokens. The
token group is ``config.tp_group`` when set, else the EP group. Each rank takes its slice of
ceil(T/tp) rows (padded at the end), runs the strategy on the slice over the EP group, and the
token group gathers the slices' outputs back into all T rows. Padding rows route to expert 0 with
weight 0 and are cut off after the gather, so they never reach the output.

With separate groups (e.g. 4 ranks as 2 TP x 2 EP, or EP over all 4 ranks with TP pairs), tokens are
split over TP and experts over EP; any EP group works as long as it holds every expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import moe_fx.runtime  # noqa: F401  (registers torch.ops.moe_fx)
from moe_fx import config
from moe_fx.lowering.base import Dispatched, EPPlan, LocalLowering
from moe_fx.runtime.comm import resolve_group


@dataclass(frozen=True, kw_only=True)
class TokenGroup:
    """The ranks that hold the same tokens, and this rank's place among them."""

    size: int
    rank: int
    group_name: str | None


def token_group(plan: EPPlan) -> TokenGroup:
    """``config.tp_group`` when set, else the EP group of ``plan``."""
    if config.tp_group is None:
        return TokenGroup(size=plan.ep_size, rank=plan.ep_rank, group_name=plan.group_name)
    group = resolve_group(config.tp_group)
    return TokenGroup(size=group.size(), rank=group.rank(), group_name=group.group_name)


class ReplicatedTokens:
    """Wraps a strategy: prepare = this rank's slice, finalize = gather every rank's slice."""

    inline_stages = False

    def __init__(self, inner: LocalLowering):
        self.inner = inner
        self.plan = inner.plan
        self.strategy = inner.strategy
        self.render_name = inner.render_name
        self.tokens = token_group(inner.plan)

    def __repr__(self) -> str:
        return f"replicated(tp {self.tokens.rank}/{self.tokens.size}, {self.inner!r})"

    def local_weights(self, weight: torch.Tensor) -> torch.Tensor:
        return self.inner.local_weights(weight)

    def dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> Dispatched:
        return self.inner.dispatch(
            self._my_rows(hidden_TH), self._my_rows(topk_ids_TK), self._my_rows(topk_weights_TK)
        )

    def combine(self, out_RH, dispatched: Dispatched, topk_weights_TK) -> torch.Tensor:
        mine = self.inner.combine(out_RH, dispatched, self._my_rows(topk_weights_TK))
        if self.tokens.size == 1:
            return mine
        gathered = torch.ops.moe_fx.gather_rows(mine, self.tokens.group_name)
        return gathered[: topk_weights_TK.shape[0]]

    def _my_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's ceil(T/tp) rows of ``t``, zero-padded past T (fewer tokens than ranks too)."""
        g = self.tokens
        chunk = -(-t.shape[0] // g.size)
        padded = torch.cat([t, t.new_zeros((chunk * g.size - t.shape[0], *t.shape[1:]))])
        return padded[g.rank * chunk : (g.rank + 1) * chunk]
