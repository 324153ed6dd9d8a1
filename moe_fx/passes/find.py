"""Finding MoE experts regions in a dynamo graph: every recognizer, anchored on its matmuls."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch.fx as fx

from moe_fx.passes import capacity_gate, dense_experts, expert_loop, hf_experts, split_experts, titan_experts
from moe_fx.passes import weight_gather
from moe_fx.passes.graph_utils import is_op
from moe_fx.passes.matching import Miss
from moe_fx.passes.region import MoERegion, NoMatch
from moe_fx.passes.unclaimed import unclaimed_routers

# (form, anchor predicate, recognizer). A recognizer returns None when the anchor is not the start
# of its form (a second matmul of a block already seen, or a plain bmm), and bails out by raising
# Miss; that becomes the form's NoMatch here, and only here.
_RECOGNIZERS: tuple[tuple[str, Callable[[fx.Node], bool], Callable[[fx.Node], MoERegion | NoMatch | None]], ...] = (
    (hf_experts.GROUPED_FORM, lambda n: is_op(n, *hf_experts.GROUPED_MM_OPS), hf_experts.match_grouped),
    (titan_experts.FORM, lambda n: is_op(n, *hf_experts.GROUPED_MM_OPS), titan_experts.match_titan),
    (hf_experts.BATCHED_FORM, lambda n: is_op(n, "bmm"), hf_experts.match_batched),
    (expert_loop.FORM, expert_loop.is_loop_accumulator, expert_loop.match_expert_loop),
    (weight_gather.FORM, weight_gather.is_weight_gather_einsum, weight_gather.match_weight_gather),
    (dense_experts.FORM, dense_experts.is_dense_bmm, dense_experts.match_dense),
    (split_experts.FORM, split_experts.is_expert_cat, split_experts.match_split),
    (split_experts.FORM, split_experts.is_expert_mlp_cat, split_experts.match_split_mlps),
    (capacity_gate.FORM, capacity_gate.is_capacity_cumsum, capacity_gate.match_capacity),
)


def find_moe_regions(graph: fx.Graph) -> tuple[list[MoERegion], list[NoMatch]]:
    """Every rewritable experts region of ``graph``, and every near-miss with its reason (on a
    graph passes/canonical.py has put in the recognizers' spellings)."""
    regions: list[MoERegion] = []
    misses: list[tuple[fx.Node, NoMatch]] = []
    for node in graph.nodes:
        for form, is_anchor, recognize in _RECOGNIZERS:
            if not is_anchor(node):
                continue
            try:
                found = recognize(node)
            except Miss as miss:
                found = NoMatch(miss.block or node.name, form, miss.reason)
            if isinstance(found, MoERegion):
                regions.append(found)
            elif isinstance(found, NoMatch):
                misses.append((node, found))
    # An anchor inside a region another recognizer matched is no near-miss (torchtitan's three
    # grouped matmuls are not transformers' two).
    claimed = set().union(*(r.nodes for r in regions)) if regions else set()
    near_misses = [dataclasses.replace(miss, anchor=anchor) for anchor, miss in misses if anchor not in claimed]
    return regions, near_misses + unclaimed_routers(graph, regions, near_misses)
