"""Replacing one matched experts region with a lowering's dispatch -> experts -> combine.

Before (any recognized form)::

    ... router ... -> topk_ids, topk_weights
    <traced experts code: sort / gather / grouped_mm or bmm / activation / unsort>
    out = weighted.view(T, K, H).sum(1)

After::

    dispatched = <strategy>.dispatch(hidden, topk_ids, topk_weights)
    tokens, offsets, row_expert = dispatched.tokens, .offsets, .row_expert
    h = expert_matmul(tokens, <strategy>.local_weights(W_up), offsets, layout=...)
    a = <the traced activation, replayed on h; biases read as b[row_expert]>
    y = expert_matmul(a, <strategy>.local_weights(W_down), offsets, layout=...)
    out = <strategy>.combine(y, dispatched, topk_weights)

With weights sharded by ``moe_fx.shard_experts`` (already this rank's block) ``W`` is used as it
is and biases are read as ``b[row_expert - start]``.

The dead traced experts code is erased; the router and everything else stay as traced.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx

from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering.base import LocalLowering
from moe_fx.lowering.experts import add_expert_bias, expert_matmul
from moe_fx.lowering.token_layout import ReplicatedTokens
from moe_fx.passes.graph_utils import module_path, op_name
from moe_fx.passes.rowwise import mutates as _mutates
from moe_fx.passes.region import MoERegion, RowFn


def rewrite_region(graph: fx.Graph, region: MoERegion, lowering: LocalLowering | ReplicatedTokens) -> list[fx.Node]:
    """Rewrite ``region`` in place; returns the new nodes in order."""
    if lowering.inline_stages and (unsupported := _not_inline(region)):
        raise UnsupportedMoEError(
            f"MoE block {region.block!r} ({region.form}): {unsupported} is not supported by the Ascend (NPU) "
            "lowering yet"
        )
    # An accumulator updated in place is replaced after its last update, the rest before the output.
    insert_before = region.last_update.next if region.last_update is not None else region.output
    first_new = insert_before.prev
    model_cast = None if lowering.inline_stages else _single_cast_user(region)
    with graph.inserting_before(insert_before):
        if lowering.inline_stages:
            out = _emit_traced(graph, region, lowering)
        else:
            out = _emit_calls(graph, region, lowering, cast_to=model_cast[1] if model_cast else None)
    new_nodes = _nodes_between(first_new, insert_before)
    created = set(new_nodes)
    region.output.replace_all_uses_with(out, delete_user_cb=lambda u: u not in created and u not in region.nodes)
    if model_cast is not None and out.kwargs.get("out_dtype") == model_cast[1]:  # the combine cast already
        model_cast[0].replace_all_uses_with(out)
        graph.erase_node(model_cast[0])
    _erase_dead(region.nodes | {region.output})
    return new_nodes


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


def _not_inline(region: MoERegion) -> str:
    """What the traced-stages (Ascend) emission does not handle yet, or "" when it handles all."""
    if region.shard is not None:
        return "weights sharded by moe_fx.shard_experts"
    if region.side_up or region.up.bias is not None or region.down.bias is not None:
        return "separate w1/w3 projections or nn.Linear biases"
    if region.base is not None or region.last_update is not None:
        return "an expert loop accumulating in place"
    if region.weights_on_input or region.dense_scores:
        return "router weights on the experts' input or a dense score matrix"
    return ""


def _emit_calls(graph: fx.Graph, region: MoERegion, lowering: LocalLowering | ReplicatedTokens, *,
                cast_to: torch.dtype | None = None) -> fx.Node:
    """Each stage is one call of the lowering's method, run as Python when the graph runs.
    ``cast_to``: the dtype the model casts the result to next, for a combine that can produce it."""
    hidden, topk_ids, topk_weights = region.hidden, region.topk_ids, region.topk_weights
    if region.dense_scores:
        topk_weights = graph.call_method("gather", (topk_weights, 1, topk_ids))
    if region.weights_on_input:
        routed = graph.call_function(routed_rows_scaled, (hidden, topk_ids, topk_weights))
        hidden, topk_ids, topk_weights = (graph.call_function(operator.getitem, (routed, i)) for i in range(3))
    dispatched = graph.call_function(lowering.dispatch, (hidden, topk_ids, topk_weights))
    tokens = graph.call_function(getattr, (dispatched, "tokens"))
    offsets = graph.call_function(getattr, (dispatched, "offsets"))
    row_expert = graph.call_function(getattr, (dispatched, "row_expert"))

    # Sharded parameters already are this rank's block: no slicing, and biases are indexed by
    # the expert id relative to the block (row_expert stays global).
    block_ids = None
    if region.shard is not None:
        block_ids = graph.call_function(operator.sub, (row_expert, region.shard.start))

    def project(x: fx.Node, projection) -> fx.Node:
        weight = projection.weight
        if region.shard is None:
            weight = graph.call_function(lowering.local_weights, (weight,))
        rows = graph.call_function(expert_matmul, (x, weight, offsets), {"layout": projection.layout})
        if projection.bias is None:
            return rows
        return graph.call_function(add_expert_bias, (rows, projection.bias, row_expert if block_ids is None else block_ids))

    h = project(tokens, region.up)
    sides = tuple(project(tokens, p) for p in region.side_up)
    a = region.activation.replay(graph, h, row_expert, sides, block_row_ids=block_ids)
    y = project(a, region.down)
    if region.post is not None:
        y = region.post.replay(graph, y, row_expert, block_row_ids=block_ids)
    dtype, combined = _dtype(region.output), _dtype_of_combine(region)
    cast = dtype is not None and dtype != combined
    # A combine that returns the final dtype itself saves a pass over [T, H]: the region's own
    # cast, or else the model's cast right after the region.
    target = dtype if cast else (cast_to if cast_to != combined else None)
    fold = (target is not None and not region.weights_on_input and region.base is None
            and "out_dtype" in inspect.signature(lowering.combine).parameters)
    out = graph.call_function(lowering.combine, (y, dispatched, topk_weights), {"out_dtype": target} if fold else {})
    if region.weights_on_input:
        out = graph.call_function(sum_over_slots, (out, region.topk_ids))
    if region.base is not None:
        out = graph.call_function(operator.add, (region.base, out))
    if cast and not fold:
        out = graph.call_method("to", (out, dtype))
    return out


def _emit_traced(graph: fx.Graph, region: MoERegion, lowering: LocalLowering) -> fx.Node:
    """The stages' own ops traced into the graph (the Ascend lowering: torch.ops.npu calls), with
    the lowering's grouped matmul, and its fused SwiGLU when the traced activation is plain SwiGLU.

    After::

        dispatched = <strategy>.dispatch(hidden, topk_ids, topk_weights)     # traced ops
        h = <strategy>.expert_matmul(dispatched.tokens, W_up, dispatched)
        a = <strategy>.swiglu(h)   or   <the traced activation, replayed on h>
        y = <strategy>.expert_matmul(a, W_down, dispatched)
        out = <strategy>.combine(y, dispatched, topk_weights)
    """
    tracer = fx.proxy.GraphAppendingTracer(graph)

    def proxy(node: fx.Node) -> fx.Proxy:
        return fx.Proxy(node, tracer)

    dispatched = lowering.dispatch(proxy(region.hidden), proxy(region.topk_ids), proxy(region.topk_weights))
    row_expert: list[fx.Node] = []  # computed once, and only when a replayed piece reads it

    def replay(fn: RowFn, x: fx.Proxy) -> fx.Proxy:
        if not row_expert and any(u in fn.nodes for u in fn.row_ids.users):
            row_expert.append(lowering.row_expert(dispatched).node)
        return proxy(fn.replay(graph, x.node, row_expert[0] if row_expert else fn.row_ids))

    def project(x: fx.Proxy, projection) -> fx.Proxy:
        return lowering.expert_matmul(x, proxy(projection.weight), dispatched, layout=projection.layout)

    h = project(dispatched.tokens, region.up)
    a = lowering.swiglu(h) if region.activation.plain_swiglu else replay(region.activation, h)
    y = project(a, region.down)
    if region.post is not None:
        y = replay(region.post, y)
    return lowering.combine(y, dispatched, proxy(region.topk_weights)).node


def routed_rows_scaled(
    hidden_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router weights applied to the experts' input: every (token, slot) row, scaled by its weight
    (in the promoted dtype, cast back, as the traced code did), becomes a token routed to one
    expert with weight 1: rows [S, H], ids [S, 1], ones [S, 1]."""
    rows_SH = hidden_TH.repeat_interleave(topk_ids_TK.shape[1], dim=0)
    weights_S1 = topk_weights_TK.reshape(-1, 1)
    scaled_SH = (rows_SH.to(torch.promote_types(rows_SH.dtype, weights_S1.dtype)) * weights_S1).to(rows_SH.dtype)
    return scaled_SH, topk_ids_TK.reshape(-1, 1), torch.ones_like(weights_S1)


def sum_over_slots(out_SH: torch.Tensor, topk_ids_TK: torch.Tensor) -> torch.Tensor:
    """[S, H] rows in (token, slot) order -> [T, H]."""
    t, k = topk_ids_TK.shape
    return out_SH.view(t, k, out_SH.shape[-1]).sum(dim=1)


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



# ------------------------------------------------------------------------------------------
# A torch-version-stable rendering of the rewritten region, for tests and explain().
# ------------------------------------------------------------------------------------------


def render_region(region: MoERegion, lowering: LocalLowering, new_nodes: list[fx.Node]) -> str:
    names: dict[fx.Node, str] = {
        region.hidden: "hidden",
        region.topk_ids: "topk_ids",
        region.topk_weights: "topk_weights",
    }
    strategy = lowering.render_name
    lines = []
    for i, node in enumerate(new_nodes):
        names[node] = f"v{i}"
        lines.append(f"v{i} = {_target_name(node, strategy)}({_format_args(node, names)})")
    return "\n".join(lines)


def _target_name(node: fx.Node, strategy: str) -> str:
    target = node.target
    if hasattr(getattr(target, "__self__", None), "strategy"):  # a lowering's bound method
        return f"{strategy}.{target.__name__}"
    if target in (expert_matmul, add_expert_bias, routed_rows_scaled, sum_over_slots):
        return target.__name__
    return op_name(node)


def _format_args(node: fx.Node, names: dict[fx.Node, str]) -> str:
    def fmt(value) -> str:
        if isinstance(value, fx.Node):
            if value not in names:
                names[value] = module_path(value).split(".")[-1] if value.op in ("placeholder", "get_attr") else value.name
            return names[value]
        if isinstance(value, (tuple, list)):
            inner = ", ".join(fmt(v) for v in value)
            return f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, slice):
            return ":".join("" if v is None else fmt(v) for v in (value.start, value.stop, value.step)).rstrip(":") or ":"
        if value is Ellipsis:
            return "..."
        if isinstance(value, torch.dtype):
            return str(value).replace("torch.", "")
        return repr(value)

    parts = [fmt(a) for a in node.args] + [f"{k}={fmt(v)}" for k, v in node.kwargs.items()]
    return ", ".join(parts)
