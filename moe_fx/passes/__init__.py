"""The moe_fx graph pass: find every MoE experts region, choose its lowering, rewrite it.

respell (passes/canonical.py) -> find (passes/find.py) -> plan (passes/plan.py) -> rewrite
(passes/rewrite.py). Invariants every step keeps are in README.md beside this file.
"""

from __future__ import annotations

import dataclasses
import logging

import torch.fx as fx
from torch._dynamo.utils import counters

from moe_fx import config
from moe_fx.config_check import check_config, warn_unmatched_overrides
from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering import choose_lowering
from moe_fx.passes.canonical import canonicalize, keep_claimed
from moe_fx.passes.find import find_moe_regions
from moe_fx.passes.plan import block_facts, ep_plan, guard_plan, lowering_plan, make_lowering
from moe_fx.passes.probe import ProbeResult, RegionEvaluator, concrete_inputs, prove_region, refusal
from moe_fx.passes.region import MoERegion, NoMatch
from moe_fx.passes.render import render_region
from moe_fx.passes.report import BlockDecision, PassReport
from moe_fx.passes.rewrite import rewrite_region
from moe_fx.passes.shard_checks import check_shard_matches_group, check_sharded_params_rewritten
from moe_fx.passes.verify import check_only_ops

log = logging.getLogger(__name__)

__all__ = ["BlockDecision", "PassReport", "analyze_graph", "block_facts", "moe_ep_pass"]


def analyze_graph(graph: fx.Graph) -> PassReport:
    """Find the regions and decide their lowering. The graph changes only by the exact respellings
    of passes/canonical.py (listed in ``respelled``)."""
    check_config()
    respelled = canonicalize(graph)
    regions, misses = find_moe_regions(graph)
    report = PassReport(misses=misses, respelled=respelled)
    for region in regions:
        plan = ep_plan(region)
        check_shard_matches_group(region, plan)
        choice = choose_lowering(block_facts(region, plan))
        report.blocks.append(BlockDecision(region=region, plan=plan, choice=choice))
    return report


def moe_ep_pass(gm: fx.GraphModule, example_inputs: list | None = None) -> PassReport:
    """Rewrite every MoE experts region of ``gm`` in place into its EP lowering. With the graph's
    real ``example_inputs`` (the backend's), each region is first proven on probe inputs
    (passes/probe.py, ``config.probe_check``)."""
    analysis = analyze_graph(gm.graph)
    warn_unmatched_overrides([d.region.block for d in analysis.blocks])
    chosen = [d for d in analysis.blocks if d.plan.ep_size > 1 or config.rewrite_without_ep]
    if config.probe_check and example_inputs is not None:
        chosen = _proven(gm, chosen, example_inputs, analysis.misses)
    _report_misses(analysis.misses)
    report = PassReport(misses=analysis.misses)
    # the user's spelling comes back wherever no rewritten region holds a respelling
    keep_claimed(analysis.respelled, set().union(*(d.region.nodes for d in chosen)))
    new_nodes: set[fx.Node] = set()
    for decision in chosen:
        plan = lowering_plan(decision.region, decision.plan, decision.choice)
        lowering = make_lowering(decision.region, plan)
        guard = guard_plan(decision.region, plan, decision.choice)
        region_nodes = rewrite_region(gm.graph, decision.region, lowering, guard=guard)
        check_only_ops(region_nodes, decision.region.block)
        new_nodes.update(region_nodes)
        report.blocks.append(dataclasses.replace(decision, rendering=render_region(decision.region, region_nodes),
                                                 output=region_nodes[-1], overlap_chunks=lowering.overlap_chunks))
        counters["moe_fx"]["regions_rewritten"] += 1
        counters["moe_fx"][f"lowering_{decision.choice.strategy.value}"] += 1
        log.info("moe_fx: rewrote %s (%s) with %s", decision.region.block, decision.region.form, lowering)
    check_sharded_params_rewritten(gm.graph, report.misses, new_nodes)
    if report.blocks or analysis.respelled:  # respelled and undone: recompiled all the same
        gm.graph.lint()
        gm.recompile()
    return report


def _proven(gm: fx.GraphModule, decisions: list[BlockDecision], example_inputs: list,
            misses: list[NoMatch]) -> list[BlockDecision]:
    """The decisions whose region agrees with its traced code on probe inputs; a near-miss in
    ``misses`` for each other one."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = concrete_inputs(example_inputs)
    if not decisions or values is None or len(placeholders) != len(values):
        return decisions
    evaluator = RegionEvaluator(gm, dict(zip(placeholders, values)))
    results = [_probe(evaluator, d.region) for d in decisions]
    kept = []
    for decision, result in zip(decisions, results):
        if result.agreed is False:
            misses.append(refusal(decision.region, result))
            counters["moe_fx"]["probe_refused"] += 1
            continue
        if result.agreed is None:
            log.debug("moe_fx: %s rewritten without its probe check: %s", decision.region.block, result.note)
        else:
            log.debug("moe_fx: %s agrees with its traced code on probe inputs (%.2g of its largest value)",
                      decision.region.block, result.worst)
        kept.append(decision)
    return kept


def _probe(evaluator: RegionEvaluator, region: MoERegion) -> ProbeResult:
    try:
        return prove_region(evaluator, region)
    except Exception as exc:  # noqa: BLE001 - an evaluation the probe cannot run proves nothing either way
        return ProbeResult(None, note=f"the probe could not run ({type(exc).__name__}: {exc})")


def _report_misses(misses: list[NoMatch]) -> None:
    if config.on_unmatched not in ("warn", "raise"):
        raise ValueError(f"moe_fx.config.on_unmatched={config.on_unmatched!r} is not one of ['raise', 'warn']")
    for miss in misses:
        counters["moe_fx"]["near_misses"] += 1
        message = f"moe_fx: MoE block {miss.block!r} ({miss.form}) left as traced: {miss.reason}"
        if config.on_unmatched == "raise":
            raise UnsupportedMoEError(message)
        log.warning(message)
