"""No silent miss: a top-k router whose expert ids reach per-expert code that no recognizer
claimed becomes a near-miss of its own, naming the router and what its ids reach.

A router here is ``topk`` over the last dim of scores computed (through elementwise steps:
softmax, sigmoid, bias, casts, masking) from a matmul with a 2-D parameter of E rows or columns,
E >= 2 the scores' width. Its ids count as reaching experts when code computed from them reads a
parameter of E stacked experts ([E, ...]), one-hot encodes them over E classes, or compares them
with an expert index; they leave the graph when the graph returns something computed from them
(dynamo broke the graph after the router: explain() lists the break). Attention with a top-k, or
a mixture-of-depths router (top-k over tokens, one score per token), has no such router.
"""

from __future__ import annotations

import torch.fx as fx

from moe_fx.passes.dataflow import router_topk
from moe_fx.passes.graph_utils import (
    arg, depends_on, fake, int_value, is_graph_input, is_op, owner_path,
)
from moe_fx.passes.region import MoERegion, NoMatch

FORM = "unrecognized"
ROOT = "<root module>"
LEAVES_GRAPH = "leave this graph"  # in the reason of a router whose ids leave the graph (explain() reads it)

# Steps between a router's matmul and its top-k that keep one score per (token, expert).
_SCORE_STEPS = ("softmax", "log_softmax", "sigmoid", "tanh", "to", "float", "type", "contiguous", "view", "reshape",
                "add", "sub", "mul", "div", "masked_fill", "where", "clone")


def unclaimed_routers(graph: fx.Graph, regions: list[MoERegion], misses: list[NoMatch]) -> list[NoMatch]:
    """A near-miss for every router whose ids reach experts or leave the graph, unless a region
    reads its ids or a near-miss already names its block."""
    found = []
    for node in graph.nodes:
        router = find_router(node)
        if router is None:
            continue
        weight, num_experts = router
        block = router_block(weight)
        parent = "" if block == ROOT else block
        if read_by_regions(node, regions) or any(m.block.startswith(parent) for m in misses):
            continue
        if reason := where_ids_go(node, num_experts, owner_path(weight)):
            found.append(NoMatch(block, FORM, reason, anchor=node))
    return found


def router_block(router_weight: fx.Node) -> str:
    """The module holding the router (and its experts), or ``ROOT``."""
    path = owner_path(router_weight)
    return path.rsplit(".", 1)[0] if "." in path else ROOT


def read_by_regions(topk: fx.Node, regions: list[MoERegion]) -> bool:
    """Whether a region reads this router's ids: its ids' own ``topk`` (a few steps up), or for a
    region whose ids come from further away, anything computed from ``topk``."""
    above = [router_topk(r.topk_ids) for r in regions]
    return topk in above or any(t is None and depends_on(r.topk_ids, topk) for r, t in zip(regions, above))


def find_router(topk: fx.Node) -> tuple[fx.Node, int] | None:
    """(router weight, E) of a ``topk`` over a router's scores, or None."""
    if not is_op(topk, "topk"):
        return None
    scores = fake(topk.args[0])
    if scores is None or scores.dim() < 2 or int_value(scores.shape[-1]) is None:
        return None
    # over the last dim, however spelled (Aria: dim=1 of [T, E] scores)
    if arg(topk, 2, "dim", -1) not in (-1, None, scores.dim() - 1):
        return None
    num_experts = int_value(scores.shape[-1])
    node = _router_matmul(topk)
    if node is None:
        return None
    weight = node.args[1]
    while is_op(weight, "t", "transpose", "permute") or (is_op(weight, "getattr") and weight.args[1] in ("T", "mT")):
        weight = weight.args[0]
    shape = fake(weight).shape if is_graph_input(weight) and fake(weight) is not None else ()
    if len(shape) != 2 or num_experts < 2 or num_experts not in (int_value(shape[0]), int_value(shape[1])):
        return None
    return weight, num_experts


def router_input(topk: fx.Node) -> fx.Node | None:
    """What a router's matmul reads (the hidden states), for a ``topk`` that ``find_router`` takes."""
    matmul = _router_matmul(topk)
    return matmul.args[0] if matmul is not None and isinstance(matmul.args[0], fx.Node) else None


def _router_matmul(topk: fx.Node) -> fx.Node | None:
    """The matmul whose scores ``topk`` ranks, through elementwise score steps."""
    node = topk.args[0]
    while isinstance(node, fx.Node) and not is_op(node, "linear", "matmul", "mm"):
        if not is_op(node, *_SCORE_STEPS) or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return node if isinstance(node, fx.Node) else None


def where_ids_go(topk: fx.Node, num_experts: int, router: str) -> str | None:
    """Why this router's block is a near-miss, or None when its ids reach no experts."""
    ids = next((u for u in topk.users if is_op(u, "getitem") and u.args[1] == 1), None)
    if ids is None:
        return None
    seen, frontier, reaches = {ids}, [ids], None
    while frontier and reaches is None:
        frontier = [u for n in frontier for u in n.users if u not in seen and not seen.add(u)]
        for node in frontier:
            if node.op == "output" and _returns_routing(node, seen, ids):
                return (f"the expert ids of the router {router} (top-{_k(topk)} of {num_experts}) {LEAVES_GRAPH}: "
                        "dynamo broke the graph after the router (see the graph breaks), so the experts code is "
                        "not in one graph moe_fx can rewrite")
            reaches = reaches or _expert_read(node, num_experts)
    if reaches is None:
        return None
    return (f"the expert ids of the router {router} (top-{_k(topk)} of {num_experts}) reach per-expert code "
            f"({reaches}) that none of moe_fx's recognizers matched (README: \"Supported MoE forms\"); "
            "the block runs as traced, without expert parallelism")


def _returns_routing(output: fx.Node, seen: set[fx.Node], ids: fx.Node) -> bool:
    """The graph returns the ids, or a value shaped like them (the router weights), computed from
    the ids: the graph ends between the router and the experts. (A whole block's output is
    computed from the ids too, but it is the hidden states.)"""
    values = [v for v in output.all_input_nodes if v in seen and fake(v) is not None]
    shape = tuple(fake(ids).shape)
    return any(not v.is_floating_point() or tuple(v.shape) == shape for v in map(fake, values))


def _expert_read(node: fx.Node, num_experts: int) -> str | None:
    """What makes ``node`` per-expert code: a stacked [E, ...] parameter, a one-hot over E, or a
    comparison with an expert index."""
    for a in node.all_input_nodes:
        # the parameter itself, or one expert's slice of it (Aria's `weight[e]` in a loop over range(E))
        if (is_op(a, "getitem") and isinstance(a.args[1], int)) or (is_op(a, "select") and a.args[1] == 0):
            a = a.args[0]
        meta = fake(a) if is_graph_input(a) else None
        if meta is not None and meta.dim() >= 2 and int_value(meta.shape[0]) == num_experts:
            return f"{node.name} reads an [{num_experts}, ...] parameter"
    if is_op(node, "one_hot") and int_value(arg(node, 1, "num_classes", -1)) == num_experts:
        return f"{node.name} one-hot encodes the ids over {num_experts} experts"
    if is_op(node, "eq") and any(isinstance(a, int) for a in node.args[1:]):
        return f"{node.name} compares the ids with an expert index"
    value = fake(node)
    if is_op(node, "scatter", "scatter_") and value is not None and value.dim() == 2 and int_value(value.shape[-1]) == num_experts:
        return f"{node.name} scatters the ids into a [T, {num_experts}] routing map"
    return None


def _k(topk: fx.Node) -> int | str:
    k = int_value(arg(topk, 1, "k"))
    return k if k is not None else "k"
