"""The Ascend lowering: the same strategies, emitted as torch_npu ops (torch.ops.npu.*).

Chosen for a block whose tensors are on an "npu" device, or everywhere with
``moe_fx.config.npu.force`` (tests run it on CPU against moe_fx.testing.npu_emulator).
"""

from __future__ import annotations

import torch

from moe_fx import config
from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering.base import EPPlan, Strategy
from moe_fx.lowering.npu.all2allv import NpuAll2AllVLowering
from moe_fx.lowering.npu.allgather import NpuAllGatherLowering
from moe_fx.lowering.npu.base import BlockShape, NpuLocalLowering
from moe_fx.lowering.npu.mc2 import NpuMc2Lowering
from moe_fx.lowering.npu.select import choose_npu_strategy, npu_soc
from moe_fx.lowering.select import DEVICE_RULES, BlockFacts, LoweringChoice

NPU_LOWERINGS: dict[Strategy, type[NpuLocalLowering]] = {
    Strategy.LOCAL: NpuLocalLowering,
    Strategy.ALLGATHER: NpuAllGatherLowering,
    Strategy.ALL2ALLV: NpuAll2AllVLowering,
    Strategy.MC2: NpuMc2Lowering,
}


# The dtypes every op of the non-MC2 strategies documents (torch_npu docs of npu_grouped_matmul,
# npu_swiglu, npu_moe_init_routing_v2); MC2 narrows them to bf16/fp16 (mc2_rules.py).
NPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def is_npu_target(device: torch.device) -> bool:
    return device.type == "npu" or bool(config.npu.force)


def make_npu_lowering(strategy: Strategy, plan: EPPlan, shape: BlockShape, device: torch.device) -> NpuLocalLowering:
    if config.tokens != "per_rank":
        raise UnsupportedMoEError(
            f"MoE block {plan.block!r}: the Ascend lowering supports tokens='per_rank' only, "
            f"not moe_fx.config.tokens={config.tokens!r}"
        )
    if strategy not in NPU_LOWERINGS:
        raise UnsupportedMoEError(
            f"MoE block {plan.block!r}: lowering {strategy.value!r} has no Ascend form; use one of "
            f"{sorted(s.value for s in NPU_LOWERINGS if s is not Strategy.LOCAL)}"
        )
    if shape.dtype not in NPU_DTYPES:
        raise UnsupportedMoEError(
            f"MoE block {plan.block!r}: the Ascend lowering's ops (npu_grouped_matmul, npu_swiglu, "
            f"npu_moe_init_routing_v2) take {', '.join(str(d) for d in NPU_DTYPES)}, not {shape.dtype}; "
            "cast the model, or compile without moe_fx.config.npu.force"
        )
    if strategy is Strategy.MC2:
        return NpuMc2Lowering(plan, shape, soc=npu_soc(), device=device)
    return NPU_LOWERINGS[strategy](plan, shape)


__all__ = ["BlockShape", "NPU_LOWERINGS", "choose_npu_strategy", "is_npu_target", "make_npu_lowering", "npu_soc"]


def _npu_rule(facts: BlockFacts) -> LoweringChoice:
    """"auto" for blocks on Ascend: vllm-ascend's rules (moe_fx/lowering/npu/select.py)."""
    strategy, reason = choose_npu_strategy(soc=facts.soc, ep_size=facts.ep_size, num_experts=facts.num_experts,
                                           top_k=facts.top_k, hidden_size=facts.hidden_size,
                                           max_tokens_per_rank=facts.token_bound, dtype=facts.dtype)
    return LoweringChoice(strategy=strategy, reason=reason,
                          capacity_tokens=facts.token_bound if strategy is Strategy.MC2 else None)


DEVICE_RULES["npu"] = _npu_rule
