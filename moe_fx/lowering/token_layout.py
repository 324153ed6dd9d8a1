"""Token layouts (vllm-ascend's prepare/finalize): what the ranks' inputs to a block hold.

``per_rank`` (default): every rank has its own tokens; the strategies handle them as they are.
``replicated`` (tensor-parallel style): every rank has the same T tokens. Each rank takes its
slice of ceil(T/ep) rows (padded at the end), runs the strategy on the slice, and the ranks gather
the slices' outputs back into all T rows. Padding rows route to expert 0 with weight 0 and are cut
off after the gather, so they never reach the output.
"""

from __future__ import annotations

import torch

import moe_fx.runtime  # noqa: F401  (registers torch.ops.moe_fx)
from moe_fx.lowering.base import Dispatched, LocalLowering


class ReplicatedTokens:
    """Wraps a strategy: prepare = this rank's slice, finalize = gather every rank's slice."""

    inline_stages = False

    def __init__(self, inner: LocalLowering):
        self.inner = inner
        self.plan = inner.plan
        self.strategy = inner.strategy
        self.render_name = inner.render_name

    def __repr__(self) -> str:
        return f"replicated({self.inner!r})"

    def local_weights(self, weight: torch.Tensor) -> torch.Tensor:
        return self.inner.local_weights(weight)

    def dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> Dispatched:
        return self.inner.dispatch(
            self._my_rows(hidden_TH), self._my_rows(topk_ids_TK), self._my_rows(topk_weights_TK)
        )

    def combine(self, out_RH, dispatched: Dispatched, topk_weights_TK) -> torch.Tensor:
        mine = self.inner.combine(out_RH, dispatched, self._my_rows(topk_weights_TK))
        gathered = torch.ops.moe_fx.gather_rows(mine, self.plan.group_name)
        return gathered[: topk_weights_TK.shape[0]]

    def _my_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's ceil(T/ep) rows of ``t``, zero-padded past T (fewer tokens than ranks too)."""
        p = self.plan
        chunk = -(-t.shape[0] // p.ep_size)
        padded = torch.cat([t, t.new_zeros((chunk * p.ep_size - t.shape[0], *t.shape[1:]))])
        return padded[p.ep_rank * chunk : (p.ep_rank + 1) * chunk]
