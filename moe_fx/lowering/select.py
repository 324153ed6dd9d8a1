"""Choosing the lowering for one MoE block.

``choose_lowering(facts)`` reads one ``BlockFacts`` record and returns the strategy and the reason
explain() prints. ``config.lowering_overrides`` forces a strategy per block
(``{"model.layers.0.*": "all2allv"}``: fnmatch patterns over the experts' module path, first match
wins), before ``config.lowering``. Otherwise "auto" applies the rule of the block's device type
(``DEVICE_RULES``, e.g. "npu"), or the generic rule, in order:

| condition                                               | strategy     | why                                 |
|---------------------------------------------------------|--------------|-------------------------------------|
| ep == 1                                                 | local        | nothing to communicate              |
| ep <= top_k * auto_allgather_ep_per_topk                | allgather    | moves no more rows than all-to-all; with a token bound static (no host sync) |
| token bound known and <= auto_mc2_max_tokens            | mc2          | fixed shapes: no host sync, CUDA-graph capturable |
| token bound unknown (and auto_runtime_switch)           | mc2|all2allv | decided per call from the largest rank's count |
| otherwise                                               | all2allv     | least traffic for large token counts |

Only values that are equal on every rank decide (ep, top-k, the token bound, config): each rank
compiles its own graph, and ranks that chose differently would issue mismatched collectives and
deadlock. The local token count, and whether it is symbolic, differ between ranks, so neither
decides; the run-time switch agrees on the largest count with one scalar all-gather instead.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_fx import config
from moe_fx.lowering.base import Strategy

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BlockFacts:
    """What the choice may read for one MoE block; every field is the same on every rank."""

    block: str  # module path of the experts, for overrides and messages
    ep_size: int
    num_experts: int
    top_k: int
    hidden_size: int
    dtype: torch.dtype  # expert weight dtype
    device_type: str  # of the block's hidden states: "cpu", "cuda", "npu", ...
    soc: str | None  # the accelerator's SoC version where rules depend on it (Ascend); else None
    token_bound: int | None  # most tokens any rank feeds the block's dispatch; None: unknown
    token_bound_source: str = ""  # where token_bound comes from, for the reason

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep_size


@dataclass(frozen=True, kw_only=True)
class LoweringChoice:
    strategy: Strategy
    reason: str
    # mc2 and allgather: the token bound their static buffers hold (allgather without one reads the
    # largest count at run time); mc2|all2allv: the switch point
    capacity_tokens: int | None = None


# Device-specific "auto" rules, by device type. A device without an entry uses _generic_rule.
DEVICE_RULES: dict[str, Callable[[BlockFacts], LoweringChoice]] = {}


def choose_lowering(facts: BlockFacts) -> LoweringChoice:
    forced, source = _requested(facts.block)
    if facts.ep_size == 1:
        choice = LoweringChoice(strategy=Strategy.LOCAL, reason="ep=1: no expert-parallel group")
    elif forced != "auto":
        strategy = Strategy(forced)
        choice = LoweringChoice(strategy=strategy, reason=f"forced by {source}",
                                capacity_tokens=_forced_capacity(strategy, facts))
    else:
        choice = DEVICE_RULES.get(facts.device_type, _generic_rule)(facts)
    if choice.strategy is Strategy.MC2 and config.mc2_transport != "all_to_all" and facts.device_type != "npu":
        choice = dataclasses.replace(choice, reason=f"{choice.reason}; rows move over mc2_transport={config.mc2_transport!r}")
    log.debug("moe_fx: block %s -> %s (%s)", facts.block, choice.strategy.value, choice.reason)
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


def _forced_capacity(strategy: Strategy, facts: BlockFacts) -> int | None:
    if strategy in (Strategy.MC2, Strategy.ALLGATHER):
        return facts.token_bound  # None: mc2 raises and says what to set; allgather reads counts at run time
    if strategy is Strategy.TOKEN_SWITCH:
        return config.auto_mc2_max_tokens
    return None


def _generic_rule(f: BlockFacts) -> LoweringChoice:
    factor = config.auto_allgather_ep_per_topk
    limit = f.top_k * factor
    if f.ep_size <= limit:
        # Measured on 2 H200s (README, "Multi-GPU benchmark"): with a bound, AllGather's
        # static form beat MC2 and All2AllV in every row timed (symm_mem tied it once: 2014 vs 2017 µs).
        bounded = (f"bounded by {f.token_bound} tokens per rank ({f.token_bound_source}): static shapes, "
                   "no host sync, CUDA-graph capturable" if f.token_bound is not None
                   else "no token bound: the largest count is read at run time")
        return LoweringChoice(
            strategy=Strategy.ALLGATHER,
            capacity_tokens=f.token_bound,
            reason=f"auto: ep={f.ep_size} <= top_k*{factor:g}={limit:g} (gathering all tokens moves no "
            f"more rows than the all-to-all); {bounded}",
        )
    small = config.auto_mc2_max_tokens
    if f.token_bound is not None and f.token_bound <= small:
        return LoweringChoice(
            strategy=Strategy.MC2,
            capacity_tokens=f.token_bound,
            reason=f"auto: at most {f.token_bound} tokens per rank ({f.token_bound_source}) <= "
            f"auto_mc2_max_tokens={small} (fixed-size buffers: no host sync, CUDA-graph capturable)",
        )
    if f.token_bound is None and config.auto_runtime_switch:
        return LoweringChoice(
            strategy=Strategy.TOKEN_SWITCH,
            capacity_tokens=small,
            reason=f"auto: ep={f.ep_size} > top_k*{factor:g}={limit:g} and no token bound: per call, mc2 while "
            f"the largest rank's token count (one all-gather) <= auto_mc2_max_tokens={small}, else all2allv",
        )
    bound = "no token bound" if f.token_bound is None else f"bound {f.token_bound} > auto_mc2_max_tokens={small}"
    return LoweringChoice(
        strategy=Strategy.ALL2ALLV,
        reason=f"auto: ep={f.ep_size} > top_k*{factor:g}={limit:g}, {bound} (all-to-all moves fewer rows)",
    )
