"""The moe_fx graph pass: find every MoE experts region, choose its lowering, rewrite it.

Invariants every step keeps are in README.md beside this file.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from moe_fx import config
from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering import BlockFacts, EPPlan, LocalLowering, LoweringChoice, build_lowering, choose_lowering
from moe_fx.lowering.npu import BlockShape, is_npu_target, make_npu_lowering, npu_soc
from moe_fx.lowering.token_layout import ReplicatedTokens, token_group
from moe_fx.passes.find import find_moe_regions
from moe_fx.passes.graph_utils import expert_shard_of, fake, module_path
from moe_fx.passes.region import MoERegion, NoMatch
from moe_fx.passes.rewrite import render_region, rewrite_region

log = logging.getLogger(__name__)

__all__ = ["BlockDecision", "PassReport", "analyze_graph", "block_facts", "moe_ep_pass"]


@dataclass(frozen=True, kw_only=True)
class BlockDecision:
    """One MoE block found in a graph and what moe_fx does with it."""

    region: MoERegion
    plan: EPPlan
    choice: LoweringChoice
    rendering: str = ""  # the rewritten region (empty when only analyzed)


@dataclass(kw_only=True)
class PassReport:
    blocks: list[BlockDecision] = field(default_factory=list)
    misses: list[NoMatch] = field(default_factory=list)


def analyze_graph(graph: fx.Graph) -> PassReport:
    """Find the regions and decide their lowering without touching the graph."""
    regions, misses = find_moe_regions(graph)
    report = PassReport(misses=misses)
    for region in regions:
        plan = EPPlan.for_block(region.block, region.num_experts)
        _check_shard(region, plan)
        choice = choose_lowering(block_facts(region, plan))
        report.blocks.append(BlockDecision(region=region, plan=plan, choice=choice))
    return report


def moe_ep_pass(gm: fx.GraphModule) -> PassReport:
    """Rewrite every MoE experts region of ``gm`` in place into its EP lowering."""
    analysis = analyze_graph(gm.graph)
    _report_misses(analysis.misses)
    report = PassReport(misses=analysis.misses)
    new_nodes: set[fx.Node] = set()
    for decision in analysis.blocks:
        if decision.plan.ep_size == 1 and not config.rewrite_without_ep:
            continue
        lowering = _make_lowering(decision)
        if decision.plan.ep_size > 1 and _token_layout() == "replicated":
            lowering = ReplicatedTokens(lowering)
        region_nodes = rewrite_region(gm.graph, decision.region, lowering)
        new_nodes.update(region_nodes)
        rendering = render_region(decision.region, lowering, region_nodes)
        report.blocks.append(
            BlockDecision(region=decision.region, plan=decision.plan, choice=decision.choice, rendering=rendering)
        )
        counters["moe_fx"]["regions_rewritten"] += 1
        counters["moe_fx"][f"lowering_{decision.choice.strategy.value}"] += 1
        log.info("moe_fx: rewrote %s (%s) with %s", decision.region.block, decision.region.form, lowering)
    _check_sharded_params_rewritten(gm.graph, report, new_nodes)
    if report.blocks:
        gm.graph.lint()
        gm.recompile()
    return report


def _check_shard(region: MoERegion, plan: EPPlan) -> None:
    """Sharded weights must be exactly the block the compile-time EP group gives this rank."""
    shard = region.shard
    if shard is None or (shard.start, shard.num_local) == (plan.expert_start, plan.num_local_experts):
        return
    raise UnsupportedMoEError(
        f"MoE block {region.block!r}: this rank holds {shard.describe()} (moe_fx.shard_experts over "
        f"{shard.ep_size} ranks), but the expert-parallel group it is compiled with ({plan.ep_size} "
        f"ranks) assigns it experts {plan.expert_start}..{plan.expert_start + plan.num_local_experts - 1}. "
        "Compile with the group the model was sharded with (moe_fx.config.ep_group)."
    )


def _check_sharded_params_rewritten(graph: fx.Graph, report: PassReport, new_nodes: set[fx.Node]) -> None:
    """A sharded parameter read by code left as traced would index experts this rank does not hold."""
    for node in graph.nodes:
        shard = expert_shard_of(node) if node.op == "placeholder" else None
        if shard is None or all(user in new_nodes for user in node.users):
            continue
        reasons = "; ".join(m.reason for m in report.misses if m.block == shard.block) or "no experts region was matched"
        raise UnsupportedMoEError(
            f"MoE block {shard.block!r}: its parameter {module_path(node)} holds only {shard.describe()} "
            f"(moe_fx.shard_experts), but moe_fx did not rewrite the code that reads it ({reasons}). "
            "Without the rewrite it would index experts this rank does not hold; load the full model instead."
        )


def _device(region: MoERegion) -> torch.device:
    return fake(region.hidden).device


def _make_lowering(decision: BlockDecision) -> LocalLowering:
    region, strategy = decision.region, decision.choice.strategy
    if is_npu_target(_device(region)):
        shape = BlockShape(top_k=region.top_k, hidden_size=region.hidden_size, dtype=region.dtype)
        return make_npu_lowering(strategy, decision.plan, shape, _device(region))
    choice = decision.choice
    if region.weights_on_input and choice.capacity_tokens is not None:
        # Each (token, slot) row is dispatched as a token of its own: K rows per token.
        choice = dataclasses.replace(choice, capacity_tokens=choice.capacity_tokens * region.top_k)
    return build_lowering(decision.plan, choice)


def block_facts(region: MoERegion, plan: EPPlan) -> BlockFacts:
    """The rank-invariant facts the lowering choice reads for ``region``."""
    device_type = "npu" if is_npu_target(_device(region)) else _device(region).type
    bound, source = _token_bound(region, plan)
    return BlockFacts(
        block=region.block,
        ep_size=plan.ep_size,
        num_experts=region.num_experts,
        top_k=region.top_k,
        hidden_size=region.hidden_size,
        dtype=region.dtype,
        device_type=device_type,
        soc=npu_soc() if device_type == "npu" else None,
        token_bound=bound,
        token_bound_source=source,
    )


def _token_bound(region: MoERegion, plan: EPPlan) -> tuple[int | None, str]:
    """Most tokens any rank feeds the block's dispatch, if known on every rank alike: the configured
    bound, or ceil(T/tp) for replicated tokens with a static T (every rank holds the same T)."""
    bound, source = config.max_tokens_per_rank, "config.max_tokens_per_rank"
    tokens = region.num_tokens
    if plan.ep_size > 1 and _token_layout() == "replicated" and isinstance(tokens, int):
        tp = token_group(plan).size
        per_rank = -(-tokens // tp)
        if bound is None or per_rank < bound:
            bound, source = per_rank, f"tokens='replicated': ceil({tokens}/{tp})"
    return bound, source


def _token_layout() -> str:
    if config.tokens not in ("per_rank", "replicated"):
        raise ValueError(f"moe_fx.config.tokens={config.tokens!r} is not one of ['per_rank', 'replicated']")
    if config.tp_group is not None and config.tokens != "replicated":
        raise ValueError(f"moe_fx.config.tp_group={config.tp_group!r} names the ranks that hold the same tokens; "
                         "it needs moe_fx.config.tokens='replicated'")
    return config.tokens


def _report_misses(misses: list[NoMatch]) -> None:
    if config.on_unmatched not in ("warn", "raise"):
        raise ValueError(f"moe_fx.config.on_unmatched={config.on_unmatched!r} is not one of ['raise', 'warn']")
    for miss in misses:
        counters["moe_fx"]["near_misses"] += 1
        message = f"moe_fx: MoE block {miss.block!r} ({miss.form}) left as traced: {miss.reason}"
        if config.on_unmatched == "raise":
            raise UnsupportedMoEError(message)
        log.warning(message)
