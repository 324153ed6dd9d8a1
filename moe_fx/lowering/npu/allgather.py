"""AllGather on Ascend (vllm-ascend's AllGatherCommImpl without its DP padding context):

    gather_tokens (every rank's tokens and routing, padded to the largest T)
      -> npu_moe_init_routing_v2(active_expert_range = this rank's experts)
      -> npu_grouped_matmul (group_list_type 1) -> npu_swiglu -> npu_grouped_matmul
      -> npu_moe_token_unpermute (other ranks' entries weigh 0) -> reduce-scatter, keep [:T]

NOTE: gather_tokens reads the largest token count on the host (one scalar all-gather).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_fx.lowering.base import Strategy
from moe_fx.lowering.npu.base import NpuLocalLowering, RoutedTokens


@dataclass(frozen=True, kw_only=True)
class GatheredTokens(RoutedTokens):
    num_tokens: fx.Proxy  # T on this rank


class NpuAllGatherLowering(NpuLocalLowering):
    strategy = Strategy.ALLGATHER

    def dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> GatheredTokens:
        p = self.plan
        gathered = torch.ops.moe_fx.gather_tokens(hidden_TH, topk_ids_TK, topk_weights_TK, p.group_name)
        routed = self._route(gathered[0], gathered[1], gathered[2])
        return GatheredTokens(**vars(routed), num_tokens=hidden_TH.size(0))

    def combine(self, out_RH, dispatched, topk_weights_TK) -> fx.Proxy:
        assert isinstance(dispatched, GatheredTokens)
        partial_NH = self._unroute(out_RH, dispatched)
        return torch.ops.moe_fx.scatter_tokens(partial_NH, dispatched.num_tokens, self.plan.group_name)
