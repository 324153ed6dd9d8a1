"""MC2 on Ascend: npu_moe_distribute_dispatch_v2 -> grouped matmuls -> npu_moe_distribute_combine_v2
(the v1 ops when torch_npu has no v2), as vllm-ascend's TokenDispatcherWithMC2 calls them
(vllm_ascend/ops/fused_moe/token_dispatcher.py).

    pad tokens to C = config.max_tokens_per_rank (every rank the same BS; global_bs = 0),
    x_active_mask = the real rows, padding rows routed to experts 0..K-1 (distinct ids per row)
      -> dispatch_v2 (expert_token_nums_type 0: cumulative) -> npu_grouped_matmul (group_list_type 0)
      -> npu_swiglu -> npu_grouped_matmul -> combine_v2 (router weights, sum over top-k) -> [:T]

Static shapes, no host sync: graph-capturable. The kernels' limits (mc2_rules.py: sizes, bf16/fp16
only, HCCL_BUFFSIZE) are checked when the block is lowered. The ops run on MC2's own process group
(mc2_group.py). Arguments per SoC (DISPATCH / COMBINE = the torch_npu docs named in mc2_rules.py):

| argument                        | A2 (910B)                                  | A3 (910_93)                        |
|---------------------------------|--------------------------------------------|------------------------------------|
| dispatch expert_scales          | router weights, fp32 [C, K]                | default (unsupported with "")      |
| combine expand_scales           | dispatch's expand_scales (COMBINE: required) | default (unsupported with "")    |
| combine tp_send_counts          | default (COMBINE: reserved on A2)          | dispatch's tp_recv_counts          |
| group_tp                        | group_ep in GE graph mode, else default    | default "" (no TP domain)          |
| tp_world_size, tp_rank_id       | defaults 0, 0                              | defaults 0, 0 (no TP domain)       |
| comm_alg (v2 only)              | "fullmesh" (the doc discourages "")        | default "" (fullmesh_v1)           |

vllm-ascend passes expert_scales on A2 only with its hierarchical algorithm, and expand_scales to
combine always; on A3 it passes group_tp = group_ep with tp_world_size 1, which DISPATCH forbids
("must differ from group_ep"): moe_fx follows the doc.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx as fx

from moe_fx import config
from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering.base import EPPlan, Strategy
from moe_fx.lowering.base import arange
from moe_fx.lowering.npu.base import BlockShape, NpuDispatched, NpuLocalLowering, npu_ops
from moe_fx.lowering.npu.mc2_group import hccl_comm_name, mc2_group
from moe_fx.lowering.npu.mc2_rules import mc2_limit


@dataclass(frozen=True, kw_only=True)
class Mc2Tokens(NpuDispatched):
    padded_ids: fx.Proxy  # [C, K] int32
    padded_weights: fx.Proxy  # [C, K] fp32
    active: fx.Proxy  # [C] bool, the real rows
    handle: fx.Proxy  # assist_info_for_combine (v2) or expand_idx (v1)
    ep_recv_counts: fx.Proxy
    tp_recv_counts: fx.Proxy | None  # A3 only
    expand_scales: fx.Proxy | None  # A2 only
    num_tokens: fx.Proxy


class NpuMc2Lowering(NpuLocalLowering):
    strategy = Strategy.MC2

    def __init__(self, plan: EPPlan, shape: BlockShape, *, soc: str | None, device: torch.device):
        super().__init__(plan, shape)
        capacity = config.max_tokens_per_rank
        why = mc2_limit(soc=soc, ep_size=plan.ep_size, num_experts=plan.num_experts, top_k=shape.top_k,
                        hidden_size=shape.hidden_size, tokens_per_rank=capacity, dtype=shape.dtype)
        if why:
            raise UnsupportedMoEError(
                f"MoE block {plan.block!r}: lowering='mc2' on Ascend is beyond the MC2 kernels' limits: {why}. "
                "Use lowering='auto' (it falls back to allgather/all2allv) or change the setting."
            )
        self.capacity_tokens = capacity
        self.soc = soc
        self.v2 = _use_v2()
        group = mc2_group(plan)
        self.group_ep = hccl_comm_name(group, device)
        self.mc2_rank = dist.get_rank(group)

    def _attrs(self) -> tuple:
        p = self.plan
        return (self.group_ep, p.ep_size, self.mc2_rank, p.num_experts)

    def _shared_kwargs(self) -> dict:
        """The arguments dispatch and combine must agree on (DISPATCH: "must match")."""
        kw = {}
        if self.soc == "A2" and _ge_graph_mode():
            kw["group_tp"] = self.group_ep  # DISPATCH "group_tp", A2: in graph mode, equal to group_ep
        if self.soc == "A2" and self.v2:
            kw["comm_alg"] = "fullmesh"  # the algorithm mc2_rules checks; "" would read HCCL_INTRA_* variables
        return kw

    def dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> Mc2Tokens:
        npu, c, k = npu_ops(), self.capacity_tokens, self.shape.top_k
        t = hidden_TH.size(0)
        torch.ops.aten._assert_scalar.default(
            t <= c, f"MoE block {self.plan.block!r}: more tokens than the mc2 capacity "
            f"moe_fx.config.max_tokens_per_rank={c}",
        )
        padding = c - t
        pad = (0, 0, 0, padding)
        # Padding rows go to experts 0..K-1: the K ids of a row must be distinct (DISPATCH "expert_ids");
        # x_active_mask keeps them out of the exchange.
        pad_ids = arange(hidden_TH, k).to(torch.int32).expand(padding, k)
        ids = torch.cat([topk_ids_TK.to(torch.int32), pad_ids])
        active = arange(hidden_TH, c) < t
        weights = torch.nn.functional.pad(topk_weights_TK.float(), pad)
        kw = dict(x_active_mask=active, expert_token_nums_type=0, **self._shared_kwargs())
        if self.soc == "A2":
            kw["expert_scales"] = weights  # travels with the rows; COMBINE wants the result (expand_scales)
        dispatch = npu.npu_moe_distribute_dispatch_v2 if self.v2 else npu.npu_moe_distribute_dispatch
        out = dispatch(torch.nn.functional.pad(hidden_TH, pad), ids, *self._attrs(), **kw)
        return Mc2Tokens(
            tokens=out[0], group_list=out[3], group_list_type=0, padded_ids=ids, padded_weights=weights,
            active=active, handle=out[2], ep_recv_counts=out[4], num_tokens=t,
            tp_recv_counts=None if self.soc == "A2" else out[5], expand_scales=out[6] if self.soc == "A2" else None,
        )

    def combine(self, out_RH, dispatched, topk_weights_TK) -> fx.Proxy:
        assert isinstance(dispatched, Mc2Tokens)
        npu, d = npu_ops(), dispatched
        kw = dict(x_active_mask=d.active, **self._shared_kwargs())
        if self.soc == "A2":
            kw["expand_scales"] = d.expand_scales  # COMBINE "expand_scales", A2: required; tp_send_counts reserved
        else:
            kw["tp_send_counts"] = d.tp_recv_counts  # A3: the TP counts, shape (tp_world_size,)
        combine = npu.npu_moe_distribute_combine_v2 if self.v2 else npu.npu_moe_distribute_combine
        out = combine(out_RH, d.padded_ids, d.handle, d.ep_recv_counts, d.padded_weights, *self._attrs(), **kw)
        return out[: d.num_tokens]


def _ge_graph_mode() -> bool:
    """Whether the ops run in torchair's GE graph mode: inner_backend="torchair" in any mode but
    "reduce-overhead" (aclgraph, op by op); torchair's default mode is "max-autotune" (GE)."""
    if config.inner_backend != "torchair":
        return False
    return getattr(config.npu.compiler_config, "mode", "max-autotune") != "reduce-overhead"


def _use_v2() -> bool:
    """dispatch_v2/combine_v2 whenever torch_npu has them (vllm-ascend's rule), unless configured."""
    version = config.npu.mc2_version
    if version not in ("auto", "v1", "v2"):
        raise ValueError(f"moe_fx.config.npu.mc2_version={version!r} is not one of ['auto', 'v1', 'v2']")
    has_v2 = hasattr(torch.ops.npu, "npu_moe_distribute_dispatch_v2")
    if version == "v2" and not has_v2:
        raise UnsupportedMoEError("moe_fx.config.npu.mc2_version='v2' but torch_npu has no npu_moe_distribute_dispatch_v2")
    return has_v2 if version == "auto" else version == "v2"
