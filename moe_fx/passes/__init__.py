"""The moe_fx graph pass: find every MoE experts region, choose its lowering, rewrite it.

find (passes/find.py) -> plan (passes/plan.py) -> rewrite (passes/rewrite.py). Invariants every step
keeps are in README.md beside this file.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch.fx as fx
from torch._dynamo.utils import counters

from moe_fx import config
from moe_fx.config_check import check_config, warn_unmatched_overrides
from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering import EPPlan, LoweringChoice, choose_lowering
from moe_fx.passes.find import find_moe_regions
from moe_fx.passes.graph_utils import expert_shard_of, module_path
from moe_fx.passes.plan import block_facts, ep_plan, guard_plan, lowering_plan, make_lowering
from moe_fx.passes.region import MoERegion, NoMatch
from moe_fx.passes.render import render_region
from moe_fx.passes.rewrite import rewrite_region
from moe_fx.passes.verify import check_only_ops

log = logging.getLogger(__name__)

__all__ = ["BlockDecision", "PassReport", "analyze_graph", "block_facts", "moe_ep_pass"]


@dataclass(frozen=True, kw_only=True)
class BlockDecision:
    """One MoE block found in a graph and what moe_fx does with it."""

    region: MoERegion
    plan: EPPlan
    choice: LoweringChoice
    rendering: str = ""  # the rewritten region (empty when only analyzed)
    output: fx.Node | None = None  # the rewritten region's result in the graph (None when only analyzed)


@dataclass(kw_only=True)
class PassReport:
    blocks: list[BlockDecision] = field(default_factory=list)
    misses: list[NoMatch] = field(default_factory=list)


def analyze_graph(graph: fx.Graph) -> PassReport:
    """Find the regions and decide their lowering without touching the graph."""
    check_config()
    regions, misses = find_moe_regions(graph)
    report = PassReport(misses=misses)
    for region in regions:
        plan = ep_plan(region)
        _check_shard(region, plan)
        choice = choose_lowering(block_facts(region, plan))
        report.blocks.append(BlockDecision(region=region, plan=plan, choice=choice))
    return report


def moe_ep_pass(gm: fx.GraphModule) -> PassReport:
    """Rewrite every MoE experts region of ``gm`` in place into its EP lowering."""
    analysis = analyze_graph(gm.graph)
    warn_unmatched_overrides([d.region.block for d in analysis.blocks])
    _report_misses(analysis.misses)
    report = PassReport(misses=analysis.misses)
    new_nodes: set[fx.Node] = set()
    for decision in analysis.blocks:
        if decision.plan.ep_size == 1 and not config.rewrite_without_ep:
            continue
        plan = lowering_plan(decision.region, decision.plan, decision.choice)
        lowering = make_lowering(decision.region, plan)
        guard = guard_plan(decision.region, plan, decision.choice)
        region_nodes = rewrite_region(gm.graph, decision.region, lowering, guard=guard)
        check_only_ops(region_nodes, decision.region.block)
        new_nodes.update(region_nodes)
        report.blocks.append(dataclasses.replace(decision, rendering=render_region(decision.region, region_nodes),
                                                 output=region_nodes[-1]))
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


def _report_misses(misses: list[NoMatch]) -> None:
    if config.on_unmatched not in ("warn", "raise"):
        raise ValueError(f"moe_fx.config.on_unmatched={config.on_unmatched!r} is not one of ['raise', 'warn']")
    for miss in misses:
        counters["moe_fx"]["near_misses"] += 1
        message = f"moe_fx: MoE block {miss.block!r} ({miss.form}) left as traced: {miss.reason}"
        if config.on_unmatched == "raise":
            raise UnsupportedMoEError(message)
        log.warning(message)
