"""MC2 on Ascend: npu_moe_distribute_dispatch_v2 -> grouped matmuls -> npu_moe_distribute_combine_v2
(the v1 ops when torch_npu has no v2), as vllm-ascend's TokenDispatcherWithMC2 calls them.

    pad tokens to C = config.max_tokens_per_rank (every rank the same BS; global_bs = 0),
    x_active_mask = the real rows
      -> dispatch_v2 (expert_token_nums_type 0: cumulative) -> npu_grouped_matmul (group_list_type 0)
      -> npu_swiglu -> npu_grouped_matmul -> combine_v2 (router weights, sum over top-k) -> [:T]

Static shapes, no host sync: graph-capturable. The kernels have hard limits (``mc2_limit``); they
are checked when the block is lowered, so a forced mc2 fails at compile time with the rule, and
"auto" never picks a configuration beyond them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx as fx

from moe_fx import config
from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering.base import EPPlan, Strategy
from moe_fx.lowering.npu.base import BlockShape, NpuDispatched, NpuLocalLowering, arange, npu_ops
from moe_fx.runtime.comm import resolve_group

# torch_npu doc of npu_moe_distribute_dispatch_v2 (A2 with the fullmesh algorithm; A3 default).
_A2_EP_SIZES = frozenset((*range(2, 9), 16, 32, 64, 128, 256))
MC2_MAX_TOKENS = {"A2": 256, "A3": 512}


def mc2_limit(*, soc: str | None, ep_size: int, num_experts: int, top_k: int, hidden_size: int,
              tokens_per_rank: int | None) -> str | None:
    """Why the MC2 kernels cannot run this block, or None when they can."""
    if soc not in MC2_MAX_TOKENS:
        return f"the MC2 limits are known for SoC A2 and A3, not {soc!r} (set moe_fx.config.npu.soc)"
    if tokens_per_rank is None:
        return "MC2 needs a static token bound: set moe_fx.config.max_tokens_per_rank"
    checks = [
        (tokens_per_rank <= MC2_MAX_TOKENS[soc], f"max_tokens_per_rank={tokens_per_rank} > {MC2_MAX_TOKENS[soc]} on {soc}"),
        (top_k <= 16, f"top_k={top_k} > 16"),
        (num_experts <= 1024, f"{num_experts} experts > 1024"),
        (num_experts % ep_size == 0, f"{num_experts} experts not divisible by ep={ep_size}"),
    ]
    if soc == "A2":
        checks += [
            (ep_size in _A2_EP_SIZES, f"ep={ep_size} not in {{2..8, 16, 32, 64, 128, 256}} on A2"),
            (hidden_size <= 7168 and hidden_size % 32 == 0, f"hidden size {hidden_size} not a multiple of 32 <= 7168 on A2"),
        ]
    else:
        checks += [
            (2 <= ep_size <= 768, f"ep={ep_size} not in 2..768 on A3"),
            (1024 <= hidden_size <= 8192, f"hidden size {hidden_size} not in 1024..8192 on A3"),
        ]
    failed = [why for ok, why in checks if not ok]
    return "; ".join(failed) or None


def hccl_comm_name(group_name: str, device: torch.device) -> str:
    """The HCCL communicator name of a c10d group (MC2's ``group_ep``), from its backend."""
    group = resolve_group(group_name)
    backend = group._get_backend(device)
    get_name = getattr(backend, "get_hccl_comm_name", None)
    if get_name is None:
        raise UnsupportedMoEError(
            f"moe_fx: MC2 on Ascend needs an HCCL expert-parallel group; group {group_name!r} has a "
            f"{type(backend).__name__} backend for {device} (init torch.distributed with backend='hccl')"
        )
    return get_name(dist.get_rank())


@dataclass(frozen=True, kw_only=True)
class Mc2Tokens(NpuDispatched):
    padded_ids: fx.Proxy  # [C, K] int32
    padded_weights: fx.Proxy  # [C, K] fp32
    active: fx.Proxy  # [C] bool, the real rows
    handle: fx.Proxy  # assist_info_for_combine (v2) or expand_idx (v1)
    ep_recv_counts: fx.Proxy
    tp_recv_counts: fx.Proxy
    num_tokens: fx.Proxy


class NpuMc2Lowering(NpuLocalLowering):
    strategy = Strategy.MC2

    def __init__(self, plan: EPPlan, shape: BlockShape, *, soc: str | None, device: torch.device):
        super().__init__(plan, shape)
        capacity = config.max_tokens_per_rank
        why = mc2_limit(soc=soc, ep_size=plan.ep_size, num_experts=plan.num_experts, top_k=shape.top_k,
                        hidden_size=shape.hidden_size, tokens_per_rank=capacity)
        if why:
            raise UnsupportedMoEError(
                f"MoE block {plan.block!r}: lowering='mc2' on Ascend is beyond the MC2 kernels' limits: {why}. "
                "Use lowering='auto' (it falls back to allgather/all2allv) or change the setting."
            )
        self.capacity_tokens = capacity
        self.group_ep = hccl_comm_name(plan.group_name, device)
        self.v2 = _use_v2()

    def _attrs(self) -> tuple:
        p = self.plan
        return (self.group_ep, p.ep_size, p.ep_rank, p.num_experts)

    def dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> Mc2Tokens:
        npu, c = npu_ops(), self.capacity_tokens
        t = hidden_TH.size(0)
        torch.ops.aten._assert_scalar.default(
            t <= c, f"MoE block {self.plan.block!r}: more tokens than the mc2 capacity "
            f"moe_fx.config.max_tokens_per_rank={c}",
        )
        pad = (0, 0, 0, c - t)
        ids = torch.nn.functional.pad(topk_ids_TK.to(torch.int32), pad)
        active = arange(hidden_TH, c) < t
        dispatch = npu.npu_moe_distribute_dispatch_v2 if self.v2 else npu.npu_moe_distribute_dispatch
        out = dispatch(torch.nn.functional.pad(hidden_TH, pad), ids, *self._attrs(),
                       x_active_mask=active, expert_token_nums_type=0)
        return Mc2Tokens(
            tokens=out[0], group_list=out[3], group_list_type=0, padded_ids=ids,
            padded_weights=torch.nn.functional.pad(topk_weights_TK.float(), pad), active=active,
            handle=out[2], ep_recv_counts=out[4], tp_recv_counts=out[5], num_tokens=t,
        )

    def combine(self, out_RH, dispatched, topk_weights_TK) -> fx.Proxy:
        assert isinstance(dispatched, Mc2Tokens)
        npu, d = npu_ops(), dispatched
        combine = npu.npu_moe_distribute_combine_v2 if self.v2 else npu.npu_moe_distribute_combine
        out = combine(out_RH, d.padded_ids, d.handle, d.ep_recv_counts, d.padded_weights, *self._attrs(),
                      tp_send_counts=d.tp_recv_counts, x_active_mask=d.active)
        return out[: d.num_tokens]


def _use_v2() -> bool:
    """dispatch_v2/combine_v2 whenever torch_npu has them (vllm-ascend's rule), unless configured."""
    version = config.npu.mc2_version
    if version not in ("auto", "v1", "v2"):
        raise ValueError(f"moe_fx.config.npu.mc2_version={version!r} is not one of ['auto', 'v1', 'v2']")
    has_v2 = hasattr(torch.ops.npu, "npu_moe_distribute_dispatch_v2")
    if version == "v2" and not has_v2:
        raise UnsupportedMoEError("moe_fx.config.npu.mc2_version='v2' but torch_npu has no npu_moe_distribute_dispatch_v2")
    return has_v2 if version == "auto" else version == "v2"
