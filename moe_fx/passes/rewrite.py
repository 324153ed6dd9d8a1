"""Replacing one matched experts region with a lowering's dispatch -> experts -> combine.

Before (any recognized form)::

    ... router ... -> topk_ids, topk_weights
    <traced experts code: sort / gather / grouped_mm or bmm / activation / unsort>
    out = weighted.view(T, K, H).sum(1)

After (``gm.code`` of a local block; EP strategies put their ops in place of the sort/unsort)::

    sort = torch.sort(topk_ids.reshape(-1).to(torch.int16), stable=True)
    tokens = hidden.index_select(0, sort[1] // K)
    h = torch._grouped_mm(tokens, W_up.transpose(-2, -1), offs=offsets)   # or moe_fx::grouped_mm
    a = <the traced activation, replayed on h; biases read as b[row_expert]>
    y = torch._grouped_mm(a, W_down.transpose(-2, -1), offs=offsets)
    out = torch.ops.moe_fx.unsort_weighted_sum(y, position, topk_weights, out_dtype)

This module does the graph surgery: where the new region goes, which uses move to it, the model's
output cast it absorbs, and erasing the dead traced experts code (the router and everything else
stay as traced). What the new region computes is passes/pipeline.py; passes/emit.py gives each
emitted node its example value.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering.base import LocalLowering
from moe_fx.lowering.guard import GuardPlan
from moe_fx.passes.emit import EmittingTracer
from moe_fx.passes.pipeline import dtype_of, emit_region
from moe_fx.passes.region import MoERegion
from moe_fx.passes.rowwise import mutates as _mutates


def rewrite_region(graph: fx.Graph, region: MoERegion, lowering: LocalLowering,
                   guard: GuardPlan | None = None) -> list[fx.Node]:
    """Rewrite ``region`` in place; returns the new nodes in order. ``guard``: the agreement check
    emitted first (moe_fx/lowering/guard.py)."""
    if unsupported := lowering.unsupported(region):
        raise UnsupportedMoEError(f"MoE block {region.block!r} ({region.form}): {unsupported}")
    model_cast = _single_cast_user(region) if lowering.folds_out_dtype else None
    out, new_nodes = emit_beside(graph, region, lowering, cast_to=model_cast[1] if model_cast else None, guard=guard)
    created = set(new_nodes)
    region.output.replace_all_uses_with(out, delete_user_cb=lambda u: u not in created and u not in region.nodes)
    if model_cast is not None and dtype_of(out) == model_cast[1]:  # the emitted combine casts already
        model_cast[0].replace_all_uses_with(out)
        graph.erase_node(model_cast[0])
    erase_dead(region.nodes | {region.output})
    # Outputs of an op nobody reads (the handle fields a strategy does not use).
    unused = [n for n in new_nodes if n.target is operator.getitem and not n.users]
    for node in unused:
        graph.erase_node(node)
    return [n for n in new_nodes if n not in set(unused)]


def emit_beside(graph: fx.Graph, region: MoERegion, lowering: LocalLowering, *, cast_to: torch.dtype | None = None,
                guard: GuardPlan | None = None) -> tuple[fx.Node, list[fx.Node]]:
    """``region``'s replacement emitted where the rewrite puts it, beside the traced code (no use
    moves to it): (its output, its nodes in order). An accumulator updated in place is replaced
    after its last update, the rest before the output."""
    insert_before = region.last_update.next if region.last_update is not None else region.output
    first_new = insert_before.prev
    try:
        with graph.inserting_before(insert_before):
            out = emit_region(EmittingTracer(graph), region, lowering, cast_to=cast_to, guard=guard)
    except BaseException:  # no half-emitted region stays behind
        for node in reversed(nodes_between(first_new, insert_before)):
            graph.erase_node(node)
        raise
    return out, nodes_between(first_new, insert_before)


def _single_cast_user(region: MoERegion) -> tuple[fx.Node, torch.dtype] | None:
    """The model's ``.to(dtype)`` of the experts' output and its dtype, when that cast is the
    output's only use (the traced code's ``final_hidden_states.to(hidden_states.dtype)``)."""
    users = [u for u in region.output.users if u not in region.nodes]
    if len(users) != 1 or region.last_update is not None:
        return None
    user = users[0]
    if user.op != "call_method" or user.target != "to" or user.args[0] is not region.output:
        return None
    rest = (*user.args[1:], *user.kwargs.values())
    if len(rest) != 1 or not isinstance(rest[0], torch.dtype) or not rest[0].is_floating_point:
        return None
    if user.kwargs and "dtype" not in user.kwargs:
        return None
    return user, rest[0]


def nodes_between(after: fx.Node, before: fx.Node) -> list[fx.Node]:
    out, node = [], after.next
    while node is not before:
        out.append(node)
        node = node.next
    return out


def erase_dead(candidates: frozenset[fx.Node] | set[fx.Node]) -> None:
    """Erase the candidates nothing reads any more (mutations of dead values included)."""
    alive = set(candidates)
    if not alive:
        return
    graph = next(iter(alive)).graph
    # In-place updates of dead values (``rows.masked_fill_(mask, 0)``) die with them.
    alive |= {u for n in candidates for u in n.users if _mutates(u) and u.args[0] is n and not u.users}
    changed = True
    while changed:
        changed = False
        for node in sorted(alive, reverse=True):  # fx nodes sort in graph order
            if not node.users:
                graph.erase_node(node)
                alive.discard(node)
                changed = True