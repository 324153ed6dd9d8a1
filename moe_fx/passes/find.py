"""Finding MoE experts regions in a dynamo graph: every recognizer, anchored on its matmuls."""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx

from moe_fx.passes.capacity_gate import is_capacity_cumsum, match_capacity
from moe_fx.passes.dense_experts import is_dense_bmm, match_dense
from moe_fx.passes.expert_loop import is_loop_accumulator, match_expert_loop
from moe_fx.passes.graph_utils import is_op
from moe_fx.passes.hf_experts import GROUPED_MM_OPS, match_batched, match_grouped
from moe_fx.passes.region import MoERegion, NoMatch
from moe_fx.passes.split_experts import is_expert_cat, match_split
from moe_fx.passes.titan_experts import match_titan
from moe_fx.passes.weight_gather import is_weight_gather_einsum, match_weight_gather

# (anchor predicate, recognizer). A recognizer returns None when the anchor is not the start of
# its form (a second matmul of a block already seen, or a plain bmm).
_RECOGNIZERS: tuple[tuple[Callable[[fx.Node], bool], Callable[[fx.Node], MoERegion | NoMatch | None]], ...] = (
    (lambda n: is_op(n, *GROUPED_MM_OPS), match_grouped),
    (lambda n: is_op(n, *GROUPED_MM_OPS), match_titan),
    (lambda n: is_op(n, "bmm"), match_batched),
    (is_loop_accumulator, match_expert_loop),
    (is_weight_gather_einsum, match_weight_gather),
    (is_dense_bmm, match_dense),
    (is_expert_cat, match_split),
    (is_capacity_cumsum, match_capacity),
)


def find_moe_regions(graph: fx.Graph) -> tuple[list[MoERegion], list[NoMatch]]:
    """Every rewritable experts region of ``graph``, and every near-miss with its reason."""
    regions: list[MoERegion] = []
    misses: list[tuple[fx.Node, NoMatch]] = []
    for node in graph.nodes:
        for is_anchor, recognize in _RECOGNIZERS:
            if not is_anchor(node):
                continue
            found = recognize(node)
            if isinstance(found, MoERegion):
                regions.append(found)
            elif isinstance(found, NoMatch):
                misses.append((node, found))
    # An anchor inside a region another recognizer matched is no near-miss (torchtitan's three
    # grouped matmuls are not transformers' two).
    claimed = set().union(*(r.nodes for r in regions)) if regions else set()
    return regions, [miss for anchor, miss in misses if anchor not in claimed]
