"""Choosing the lowering for one MoE block.

The rule ("auto"), in order:

| condition                                              | strategy  | why                                    |
|--------------------------------------------------------|-----------|----------------------------------------|
| ep == 1                                                | local     | nothing to communicate                 |
| config.max_tokens_per_rank <= auto_allgather_max_tokens| allgather | latency-bound: no split-size exchange  |
| ep <= top_k * auto_allgather_ep_per_topk               | allgather | gathers no more rows than all-to-all   |
| otherwise                                              | all2allv  | least traffic for large token counts   |

``config.lowering_overrides`` forces a strategy per block: ``{"model.layers.0.*": "all2allv"}``
(fnmatch patterns over the experts' module path, first match wins), before ``config.lowering``.

Only values that are equal on every rank decide (ep, top-k, the configured token bound): the
local token count differs between ranks, and ranks that chose differently would deadlock.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

from moe_fx import config
from moe_fx.lowering.base import Strategy

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LoweringChoice:
    strategy: Strategy
    reason: str


def choose_lowering(*, block: str, ep_size: int, top_k: int, device_type: str = "cpu", num_experts: int = 0,
                    hidden_size: int = 0) -> LoweringChoice:
    forced, source = _requested(block)
    if ep_size == 1:
        choice = LoweringChoice(strategy=Strategy.LOCAL, reason="ep=1: no expert-parallel group")
    elif forced != "auto":
        choice = LoweringChoice(strategy=Strategy(forced), reason=f"forced by {source}")
    elif device_type == "npu":  # Ascend hook: vllm-ascend's rules, moe_fx/lowering/npu/select.py
        from moe_fx.lowering.npu.select import choose_npu_strategy, npu_soc

        strategy, reason = choose_npu_strategy(soc=npu_soc(), ep_size=ep_size, num_experts=num_experts, top_k=top_k,
                                               hidden_size=hidden_size, max_tokens_per_rank=config.max_tokens_per_rank)
        choice = LoweringChoice(strategy=strategy, reason=reason)
    else:
        choice = _auto(ep_size=ep_size, top_k=top_k)
    log.debug("moe_fx: block %s -> %s (%s)", block, choice.strategy.value, choice.reason)
    return choice


def _requested(block: str) -> tuple[str, str]:
    """The strategy asked for ``block``: the first matching per-block pattern, else config.lowering."""
    valid = {s.value for s in Strategy if s is not Strategy.LOCAL} | {"auto"}
    for pattern, value in config.lowering_overrides.items():
        if fnmatch.fnmatchcase(block, pattern):
            requested, source = value, f"config.lowering_overrides[{pattern!r}]"
            break
    else:
        requested, source = config.lowering, "config.lowering"
    if requested not in valid:
        raise ValueError(f"moe_fx.{source}={requested!r} is not one of {sorted(valid)}")
    return requested, source


def _auto(*, ep_size: int, top_k: int) -> LoweringChoice:
    bound = config.max_tokens_per_rank
    if bound is not None and bound <= config.auto_allgather_max_tokens:
        return LoweringChoice(
            strategy=Strategy.ALLGATHER,
            reason=f"auto: max_tokens_per_rank={bound} <= auto_allgather_max_tokens="
            f"{config.auto_allgather_max_tokens} (latency-bound: no split-size exchange)",
        )
    limit = top_k * config.auto_allgather_ep_per_topk
    if ep_size <= limit:
        return LoweringChoice(
            strategy=Strategy.ALLGATHER,
            reason=f"auto: ep={ep_size} <= top_k*{config.auto_allgather_ep_per_topk:g}={limit:g} "
            "(gathering all tokens moves no more rows than the all-to-all)",
        )
    return LoweringChoice(
        strategy=Strategy.ALL2ALLV,
        reason=f"auto: ep={ep_size} > top_k*{config.auto_allgather_ep_per_topk:g}={limit:g} "
        "(all-to-all moves fewer rows)",
    )
