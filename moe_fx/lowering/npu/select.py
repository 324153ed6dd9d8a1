""""auto" on Ascend: vllm-ascend's comm-method rules (ascend_forward_context.select_moe_comm_method),
restated over what moe_fx knows at compile time.

| SoC | condition                                                                  | strategy  |
|-----|----------------------------------------------------------------------------|-----------|
| any | ep == 1                                                                    | local     |
| A2  | ep >= 16, E/ep <= 24, max_tokens_per_rank <= 512, within the MC2 limits    | mc2       |
| A2  | otherwise                                                                  | allgather |
| A3  | max_tokens_per_rank <= 512, within the MC2 limits                          | mc2       |
| A3  | otherwise                                                                  | all2allv  |
| ?   | SoC unknown (not A2/A3)                                                    | allgather |

"Within the MC2 limits" (mc2_rules.mc2_limit) includes the dtype: the MC2 ops take bf16/fp16 only,
so a float32 block gets allgather (A2) or all2allv (A3), whose ops document float32.

vllm-ascend's token count is the largest batch across DP ranks; moe_fx's is the configured
``max_tokens_per_rank`` (equal on every rank; unknown means "may be large"). Its capacity caps at
512 tokens per rank; the MC2 kernels' own limits (``mc2_limit``: 256 tokens on A2 fullmesh, hidden
sizes, ep sizes, top-k, expert count) are checked too, so "auto" never picks an MC2 that would fail.
FUSED_MC2 (dispatch_ffn_combine, quantized only) is not emitted.
"""

from __future__ import annotations

import torch

from moe_fx import config
from moe_fx.lowering.base import Strategy
from moe_fx.lowering.npu.mc2_rules import mc2_limit

MC2_CAPACITY_TOKENS = 512  # vllm-ascend: min(ceil(max_num_tokens / tp), 512) per rank
A2_MC2_MIN_EP = 16
A2_MC2_MAX_EXPERTS_PER_RANK = 24

# (strategy, reason); select.py wraps it in its choice record.
NpuChoice = tuple[Strategy, str]


def choose_npu_strategy(*, soc: str | None, ep_size: int, num_experts: int, top_k: int, hidden_size: int,
                        max_tokens_per_rank: int | None, dtype: torch.dtype) -> NpuChoice:
    if ep_size == 1:
        return Strategy.LOCAL, "ep=1: no expert-parallel group"
    tokens = max_tokens_per_rank
    fits = tokens is not None and tokens <= MC2_CAPACITY_TOKENS
    limit = mc2_limit(soc=soc, ep_size=ep_size, num_experts=num_experts, top_k=top_k,
                      hidden_size=hidden_size, tokens_per_rank=tokens, dtype=dtype)
    capacity = f"max_tokens_per_rank={tokens} {'<=' if fits else 'not <='} {MC2_CAPACITY_TOKENS}"
    if soc == "A2":
        per_rank = num_experts / ep_size
        if ep_size >= A2_MC2_MIN_EP and per_rank <= A2_MC2_MAX_EXPERTS_PER_RANK and fits and not limit:
            return Strategy.MC2, f"auto (A2): ep={ep_size} >= 16, {per_rank:g} experts/rank <= 24, {capacity}"
        why = limit if fits and ep_size >= A2_MC2_MIN_EP and per_rank <= A2_MC2_MAX_EXPERTS_PER_RANK else (
            f"ep={ep_size}, {per_rank:g} experts/rank, {capacity}")
        return Strategy.ALLGATHER, f"auto (A2): not mc2 ({why})"
    if soc == "A3":
        if fits and not limit:
            return Strategy.MC2, f"auto (A3): {capacity}, within the MC2 limits"
        return Strategy.ALL2ALLV, f"auto (A3): not mc2 ({limit if fits else capacity})"
    return Strategy.ALLGATHER, f"auto: SoC {soc!r} is not A2/A3 (set moe_fx.config.npu.soc)"


def npu_soc() -> str | None:
    """config.npu.soc, else the family torch_npu reports (A2: SoC ids 220-225, A3: 250-255)."""
    if config.npu.soc is not None:
        if config.npu.soc not in ("A2", "A3"):
            raise ValueError(f"moe_fx.config.npu.soc={config.npu.soc!r} is not one of ['A2', 'A3', None]")
        return config.npu.soc
    try:
        import torch_npu  # noqa: F401
        from torch_npu.npu import get_soc_version
    except ImportError:
        return None
    version = get_soc_version()
    if 220 <= version <= 225:
        return "A2"
    if 250 <= version <= 255:
        return "A3"
    return None
