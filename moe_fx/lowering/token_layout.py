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
import torch.fx as fx

from moe_fx.lowering.base import Dispatched, LocalLowering, pad_rows_to, size


@dataclass(frozen=True, kw_only=True)
class TokenGroup:
    """The ranks that hold the same tokens, and this rank's place among them."""

    size: int
    rank: int
    group_name: str | None


class ReplicatedTokens:
    """Wraps a strategy: prepare = this rank's slice, finalize = gather every rank's slice."""

    def __init__(self, inner: LocalLowering, tokens: TokenGroup):
        self.inner = inner
        self.plan = inner.plan
        self.strategy = inner.strategy
        self.render_name = inner.render_name
        self.folds_out_dtype = inner.folds_out_dtype
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"replicated(tp {self.tokens.rank}/{self.tokens.size}, {self.inner!r})"

    def __getattr__(self, name):  # the experts stage is the inner strategy's
        return getattr(self.inner, name)

    def dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> Dispatched:
        return self.inner.dispatch(
            self._my_rows(hidden_TH), self._my_rows(topk_ids_TK), self._my_rows(topk_weights_TK)
        )

    def combine(self, out_RH, dispatched: Dispatched, topk_weights_TK, out_dtype=None) -> fx.Proxy:
        mine = self.inner.combine(out_RH, dispatched, self._my_rows(topk_weights_TK), out_dtype)
        if self.tokens.size == 1:
            return mine
        gathered = torch.ops.moe_fx.gather_rows(mine, self.tokens.group_name)
        return gathered.narrow(0, 0, size(topk_weights_TK, 0))

    def _my_rows(self, t: fx.Proxy) -> fx.Proxy:
        """This rank's ceil(T/tp) rows of 2-D ``t``, zero-padded past T (fewer tokens than ranks too)."""
        g = self.tokens
        rows = size(t, 0)
        chunk = (rows + (g.size - 1)) // g.size
        padded = pad_rows_to(t, chunk * g.size)
        return padded.narrow(0, chunk * g.rank, chunk)
