"""The moe_fx graph pass: find every MoE experts region, choose its lowering, rewrite it.

respell (passes/canonical.py) -> find (passes/find.py) -> plan (passes/plan.py) -> rewrite
(passes/rewrite.py). Invariants every step keeps are in README.md beside this file.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch.fx as fx
from torch._dynamo.utils import counters

from moe_fx import config
from moe_fx.config_check import check_config, warn_unmatched_overrides
from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering import LoweringChoice, choose_lowering
from moe_fx.lowering.base import LoweringPlan
from moe_fx.passes.canonical import canonicalize, keep_claimed
from moe_fx.passes import capacity_gate
from moe_fx.passes.find import find_moe_regions
from moe_fx.passes.generic import GenericRegion, find_generic, generic_blocker, plan_generic, rewrite_generic
from moe_fx.passes.plan import block_facts, ep_plan, guard_plan, lowering_plan, make_lowering
from moe_fx.passes.probe import (
    ProbeResult, RegionEvaluator, concrete_inputs, generic_refusal, prove_generic, prove_region, refusal,
)
from moe_fx.passes.region import NoMatch
from moe_fx.passes.unclaimed import FORM as UNCLAIMED, ROOT
from moe_fx.passes.render import render_nodes, render_region
from moe_fx.passes.report import BlockDecision, PassReport
from moe_fx.passes.rewrite import rewrite_region
from moe_fx.passes.shard_checks import check_shard_matches_group, check_sharded_params_rewritten
from moe_fx.passes.verify import check_only_ops

log = logging.getLogger(__name__)

__all__ = ["BlockDecision", "PassReport", "analyze_graph", "block_facts", "moe_ep_pass", "probe_refusals"]


def analyze_graph(graph: fx.Graph) -> PassReport:
    """Find the regions and decide their lowering. The graph changes only by the exact respellings
    of passes/canonical.py (listed in ``respelled``)."""
    check_config()
    respelled = canonicalize(graph)
    regions, misses = find_moe_regions(graph)
    # a capacity gate's drops depend on each token's place in its expert's queue: left as traced
    # (passes/capacity_gate.py), never replayed on other ranks' rows
    gates = {m.anchor for m in misses if m.form == capacity_gate.FORM}
    delimited = [g for g in find_generic(graph, regions) if not (isinstance(g, GenericRegion) and gates & set(g.nodes))]
    generic = [g for g in delimited if isinstance(g, GenericRegion)]
    # a router the generic path looked at is described by it, not by the unrecognized-router line
    looked_at = {g.topk if isinstance(g, GenericRegion) else g.anchor for g in delimited}
    misses = [m for m in misses if not (m.form == UNCLAIMED and m.anchor in looked_at)]
    # a block a recognizer already explained (the router inside it, or it inside the router's module)
    # keeps that reason; the generic path's is added where none did (a block it delimited still goes
    # to it: tried at compile time)
    misses += [g for g in delimited if isinstance(g, NoMatch)
               and not any(_related(m.block, g.block) for m in misses)]
    report = PassReport(misses=misses, respelled=respelled, generic=generic)
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
    evaluator = _evaluator(gm, example_inputs) if config.probe_check and example_inputs is not None else None
    if evaluator is not None:
        chosen = _proven(evaluator, chosen, analysis.misses)
    generic = _proven_generic(evaluator, analysis.generic, analysis.misses)
    _report_misses(analysis.misses)
    report = PassReport(misses=analysis.misses)
    # the user's spelling comes back wherever no rewritten region holds a respelling
    claimed = set().union(*(d.region.nodes for d in chosen), *(g.region.nodes for g in generic))
    keep_claimed(analysis.respelled, claimed)
    new_nodes: set[fx.Node] = set()
    for decision in generic:
        region = decision.region
        guard = guard_plan(region, decision.plan, decision.choice)
        region_nodes = rewrite_generic(gm.graph, region, decision.plan, guard)
        check_only_ops(region_nodes, region.block)
        new_nodes.update(region_nodes)
        report.blocks.append(BlockDecision(region=region, plan=decision.plan.ep, choice=decision.choice,
                                           rendering=render_nodes(region_nodes), output=region_nodes[-1]))
        counters["moe_fx"]["regions_rewritten"] += 1
        counters["moe_fx"]["lowering_generic"] += 1
        log.info("moe_fx: rewrote %s (generic: no recognizer matched; proven on probe inputs) with AllGather",
                 region.block)
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


def probe_refusals(gm: fx.GraphModule, example_inputs: list) -> tuple[list[NoMatch], set[str]] | None:
    """What the backend's probe check would say of ``gm``'s blocks, with no rewrite and no
    collective (for explain()): the near-misses of the recognized blocks and generic candidates it
    refuses, and the generic candidates it proves (each rank of the EP group simulated; without
    one, 2 ranks: what the block would meet under expert parallelism). None where the graph's
    inputs are fake or the check is off."""
    evaluator = _evaluator(gm, example_inputs) if config.probe_check else None
    if evaluator is None:
        return None
    analysis = analyze_graph(gm.graph)
    misses, proven = [], set()
    for decision in analysis.blocks:
        result = _probe(lambda: prove_region(evaluator, decision.region))
        if result.agreed is False:
            misses.append(refusal(decision.region, result))
    for region in analysis.generic:
        capacity = max(config.max_tokens_per_rank or 0, region.num_tokens)
        if reason := generic_blocker(region):
            result = ProbeResult(None, note=reason)
        else:
            result = _probe(lambda: prove_generic(evaluator, region, max(ep_plan(region).ep_size, 2), capacity))
        if result.agreed:
            proven.add(region.block)
        else:
            misses.append(generic_refusal(region, result))
    return misses, proven


def _evaluator(gm: fx.GraphModule, example_inputs: list) -> RegionEvaluator | None:
    """The probe's evaluator of ``gm`` on its real inputs; None on fake ones."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = concrete_inputs(example_inputs)
    if values is None or len(placeholders) != len(values):
        return None
    return RegionEvaluator(gm, dict(zip(placeholders, values)))


def _proven(evaluator: RegionEvaluator, decisions: list[BlockDecision], misses: list[NoMatch]) -> list[BlockDecision]:
    """The decisions whose region agrees with its traced code on probe inputs; a near-miss in
    ``misses`` for each other one."""
    results = [_probe(lambda: prove_region(evaluator, d.region)) for d in decisions]
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


@dataclasses.dataclass(frozen=True)
class _GenericDecision:
    region: GenericRegion
    plan: LoweringPlan
    choice: LoweringChoice


def _proven_generic(evaluator: RegionEvaluator | None, candidates: list[GenericRegion],
                    misses: list[NoMatch]) -> list[_GenericDecision]:
    """The generic candidates to rewrite: planned under an EP group and proven on probe inputs.
    Each other one gets a near-miss saying why; the near-misses found in a rewritten block's code go."""
    kept = []
    for region in candidates:
        ep = ep_plan(region)
        planned = plan_generic(region, ep) if ep.ep_size > 1 else (
            "ep = 1: nothing to distribute, the block stays as traced (under an expert-parallel group it is "
            "rewritten with AllGather once its probe check passes)")
        if isinstance(planned, str):
            misses.append(generic_refusal(region, ProbeResult(None, note=planned)))
            continue
        plan, choice = planned
        if evaluator is None:
            result = ProbeResult(None, note="the generic path rewrites only blocks its probe check proves, and it "
                                            "cannot run here (moe_fx.config.probe_check is off, or the graph's "
                                            "inputs are fake)")
        else:
            result = _probe(lambda: prove_generic(evaluator, region, ep.ep_size, plan.capacity_tokens))
        if not result.agreed:
            misses.append(generic_refusal(region, result))
            counters["moe_fx"]["probe_refused"] += result.agreed is False
            continue
        # the recognizers' near-misses found inside the code it replaces are answered
        replaced = {*region.nodes, region.topk}
        misses[:] = [m for m in misses if m.anchor not in replaced]
        kept.append(_GenericDecision(region, plan, choice))
    return kept


def _related(a: str, b: str) -> bool:
    """One module holds the other (a router inside a missed block's module, or around it)."""
    return _inside(a, b) or _inside(b, a)


def _inside(block: str, outer: str) -> bool:
    """Whether module ``block`` is ``outer`` or inside it (every module is inside the root)."""
    return outer == ROOT or block == outer or block.startswith(outer + ".")


def _probe(prove: Callable[[], ProbeResult]) -> ProbeResult:
    try:
        return prove()
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
