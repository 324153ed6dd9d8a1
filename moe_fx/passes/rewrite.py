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

There is one emitter: it calls the lowering's methods on fx Proxies (moe_fx/lowering/base.py), so
the graph holds only the ops they compute, with example values (passes/emit.py). With weights
sharded by ``moe_fx.shard_experts`` (already this rank's block) ``W`` is used as it is and biases
are read as ``b[row_expert - start]``. The dead traced experts code is erased; the router and
everything else stay as traced.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering.base import LocalLowering, size
from moe_fx.lowering.guard import GuardPlan, emit_guard
from moe_fx.passes.emit import EmittingTracer
from moe_fx.passes.region import MoERegion, RowFn
from moe_fx.passes.rowwise import mutates as _mutates


def rewrite_region(graph: fx.Graph, region: MoERegion, lowering: LocalLowering,
                   guard: GuardPlan | None = None) -> list[fx.Node]:
    """Rewrite ``region`` in place; returns the new nodes in order. ``guard``: the agreement check
    emitted first (moe_fx/lowering/guard.py)."""
    if unsupported := lowering.unsupported(region):
        raise UnsupportedMoEError(f"MoE block {region.block!r} ({region.form}): {unsupported}")
    # An accumulator updated in place is replaced after its last update, the rest before the output.
    insert_before = region.last_update.next if region.last_update is not None else region.output
    first_new = insert_before.prev
    model_cast = _single_cast_user(region) if lowering.folds_out_dtype else None
    with graph.inserting_before(insert_before):
        out = _emit(EmittingTracer(graph), region, lowering, cast_to=model_cast[1] if model_cast else None,
                    guard=guard)
    new_nodes = _nodes_between(first_new, insert_before)
    created = set(new_nodes)
    region.output.replace_all_uses_with(out, delete_user_cb=lambda u: u not in created and u not in region.nodes)
    if model_cast is not None and _dtype(out) == model_cast[1]:  # the emitted combine casts already
        model_cast[0].replace_all_uses_with(out)
        graph.erase_node(model_cast[0])
    _erase_dead(region.nodes | {region.output})
    # Outputs of an op nobody reads (the handle fields a strategy does not use).
    unused = [n for n in new_nodes if n.target is operator.getitem and not n.users]
    for node in unused:
        graph.erase_node(node)
    return [n for n in new_nodes if n not in set(unused)]


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


def _emit(tracer: EmittingTracer, region: MoERegion, lowering: LocalLowering, *,
          cast_to: torch.dtype | None = None, guard: GuardPlan | None = None) -> fx.Node:
    """The region's replacement, emitted at the graph's insertion point. ``cast_to``: the dtype
    the model casts the result to next, for a combine that can produce it."""
    graph, proxy = tracer.graph, tracer.proxy
    hidden, topk_ids, topk_weights = proxy(region.hidden), proxy(region.topk_ids), proxy(region.topk_weights)
    if guard is not None:
        topk_ids = emit_guard(guard, topk_ids)
    if region.dense_scores:
        topk_weights = topk_weights.gather(1, topk_ids)
    if region.weights_on_input:
        hidden, topk_ids, topk_weights = _routed_rows_scaled(hidden, topk_ids, topk_weights)
    dispatched = lowering.dispatch(hidden, topk_ids, topk_weights)

    # Biases and replayed code read the rows' expert ids; computed once, and only if read.
    ids: dict[str, fx.Node] = {}

    def row_expert() -> fx.Node:
        if "global" not in ids:
            ids["global"] = lowering.row_expert(dispatched).node
        return ids["global"]

    def block_row_expert() -> fx.Node:
        """Sharded parameters already are this rank's block: biases are indexed by the expert id
        relative to the block (row_expert stays global)."""
        if region.shard is None:
            return row_expert()
        if "block" not in ids:
            ids["block"] = (proxy(row_expert()) - region.shard.start).node
        return ids["block"]

    def project(x: fx.Proxy, projection) -> fx.Proxy:
        weight = projection.weight
        weight = tuple(map(proxy, weight)) if isinstance(weight, tuple) else proxy(weight)
        if region.shard is not None:  # already this rank's block
            weight = torch.stack(list(weight)) if isinstance(weight, tuple) else weight
        else:
            weight = lowering.local_weights(weight)
        rows = lowering.expert_matmul(x, weight, dispatched, layout=projection.layout)
        if projection.bias is None:
            return rows
        bias = projection.bias
        bias = torch.stack([proxy(b) for b in bias]) if isinstance(bias, tuple) else proxy(bias)
        return rows + bias[proxy(block_row_expert())]

    def replay(fn: RowFn, x: fx.Proxy, sides: tuple[fx.Node, ...] = ()) -> fx.Proxy:
        reads_ids = any(u in fn.nodes for u in fn.row_ids.users)
        new_ids = row_expert() if reads_ids else fn.row_ids
        block_ids = block_row_expert() if reads_ids and region.shard is not None else None
        out = fn.replay(graph, x.node, new_ids, sides, block_row_ids=block_ids, on_copy=tracer.propagate)
        return proxy(out)

    h = project(dispatched.tokens, region.up)
    sides = tuple(project(dispatched.tokens, p).node for p in region.side_up)
    fused = lowering.swiglu(h) if region.activation.plain_swiglu and not sides else None
    a = fused if fused is not None else replay(region.activation, h, sides)
    y = project(a, region.down)
    if region.post is not None:
        y = replay(region.post, y)

    dtype, combined = _dtype(region.output), _dtype_of_combine(region)
    cast = dtype is not None and dtype != combined
    # A combine that returns the final dtype itself saves a pass over [T, H]: the region's own
    # cast, or else the model's cast right after the region.
    target = dtype if cast else (cast_to if cast_to != combined else None)
    fold = target is not None and lowering.folds_out_dtype and not region.weights_on_input and region.base is None
    out = lowering.combine(y, dispatched, topk_weights, **({"out_dtype": target} if fold else {}))
    if region.weights_on_input:
        out = _sum_over_slots(out, proxy(region.topk_ids))
    if region.base is not None:
        out = proxy(region.base) + out
    if cast and not fold:
        out = out.to(dtype)
    return out.node


def _routed_rows_scaled(hidden_TH: fx.Proxy, topk_ids_TK: fx.Proxy, topk_weights_TK: fx.Proxy):
    """Router weights applied to the experts' input: every (token, slot) row, scaled by its weight
    (in the promoted dtype, cast back, as the traced code did), becomes a token routed to one
    expert with weight 1: rows [S, H], ids [S, 1], ones [S, 1]."""
    rows_dtype, weights_dtype = _dtype(hidden_TH.node), _dtype(topk_weights_TK.node)
    rows_SH = hidden_TH.repeat_interleave(size(topk_ids_TK, 1), dim=0)
    weights_S1 = topk_weights_TK.reshape(-1, 1)
    scaled_SH = (rows_SH.to(torch.promote_types(rows_dtype, weights_dtype)) * weights_S1).to(rows_dtype)
    return scaled_SH, topk_ids_TK.reshape(-1, 1), torch.ones_like(weights_S1)


def _sum_over_slots(out_SH: fx.Proxy, topk_ids_TK: fx.Proxy) -> fx.Proxy:
    """[S, H] rows in (token, slot) order -> [T, H]."""
    return out_SH.view(size(topk_ids_TK, 0), size(topk_ids_TK, 1), size(out_SH, 1)).sum(dim=1)


def _dtype(node: fx.Node) -> torch.dtype | None:
    value = node.meta.get("example_value")
    return value.dtype if isinstance(value, torch.Tensor) else None


def _dtype_of_combine(region: MoERegion) -> torch.dtype | None:
    """The dtype ``combine`` returns: expert rows (the down weight's dtype, or what the post-expert
    code made of them) times router weights, promoted."""
    weights = _dtype(region.topk_weights)
    rows = _dtype(region.post.output) if region.post is not None else region.down.dtype
    if weights is None or rows is None:
        return None
    out = torch.promote_types(rows, weights)
    base = _dtype(region.base) if region.base is not None else None
    return torch.promote_types(out, base) if base is not None else out


def _nodes_between(after: fx.Node, before: fx.Node) -> list[fx.Node]:
    out, node = [], after.next
    while node is not before:
        out.append(node)
        node = node.next
    return out


def _erase_dead(candidates: frozenset[fx.Node] | set[fx.Node]) -> None:
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