"""The new region, emitted on fx Proxies: dispatch -> per-expert projections and the traced
activation replayed on the dispatched rows -> combine, one call of the lowering's methods each
(moe_fx/lowering/base.py). The graph gets only the ops those calls compute.

With weights sharded by ``moe_fx.shard_experts`` (already this rank's block) ``W`` is used as it
is and biases are read as ``b[row_expert - start]``.
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx

from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering.base import LocalLowering, size
from moe_fx.lowering.guard import GuardPlan, emit_guard
from moe_fx.passes.emit import EmittingTracer
from moe_fx.passes.region import MoERegion, RowFn


def emit_region(tracer: EmittingTracer, region: MoERegion, lowering: LocalLowering, *,
                cast_to: torch.dtype | None = None, guard: GuardPlan | None = None) -> fx.Node:
    """The region's replacement, emitted at the graph's insertion point. ``cast_to``: the dtype
    the model casts the result to next, for a combine that can produce it. ``guard``: the agreement
    check emitted first (moe_fx/lowering/guard.py)."""
    proxy = tracer.proxy
    hidden, topk_ids, topk_weights = proxy(region.hidden), proxy(region.topk_ids), proxy(region.topk_weights)
    if guard is not None:  # first: every later op reads ids the ranks agreed are good
        topk_ids = emit_guard(guard, topk_ids)
    if region.dense_scores:
        topk_weights = topk_weights.gather(1, topk_ids)
    if region.weights_on_input:
        hidden, topk_ids, topk_weights = _routed_rows_scaled(hidden, topk_ids, topk_weights)

    experts = functools.partial(_experts, tracer, region, lowering)

    dtype, combined = dtype_of(region.output), dtype_of_combine(region)
    cast = dtype is not None and dtype != combined
    # A combine that returns the final dtype itself saves a pass over [T, H]: the region's own
    # cast, or else the model's cast right after the region.
    target = dtype if cast else (cast_to if cast_to != combined else None)
    fold = target is not None and lowering.folds_out_dtype and not region.weights_on_input and region.base is None
    out_dtype = {"out_dtype": target} if fold else {}
    if lowering.overlap_chunks > 1:
        out = _overlapped(lowering, hidden, topk_ids, topk_weights, experts, out_dtype)
    else:
        dispatched = lowering.dispatch(hidden, topk_ids, topk_weights)
        out = lowering.combine(experts(dispatched), dispatched, topk_weights, **out_dtype)
    if region.weights_on_input:
        out = _sum_over_slots(out, proxy(region.topk_ids))
    if region.base is not None:
        out = proxy(region.base) + out
    if cast and not fold:
        out = out.to(dtype)
    traced = region.output.meta.get("example_value")
    if isinstance(traced, torch.Tensor) and traced.dim() != 2:  # a [B, S, H] sum (Qwen3-VL's dense experts)
        if not all(isinstance(d, int) for d in traced.shape):
            raise UnsupportedMoEError(f"MoE block {region.block!r} ({region.form}): the experts' result is "
                                      f"{tuple(traced.shape)} with symbolic sizes; moe_fx rewrites only a [T, H] "
                                      "result or one of static shape")
        out = out.view(tuple(traced.shape))
    return out.node


def _experts(tracer: EmittingTracer, region: MoERegion, lowering: LocalLowering, dispatched) -> fx.Proxy:
    """The per-expert projections and the traced activation replayed, on the dispatched rows."""
    graph, proxy = tracer.graph, tracer.proxy
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
    return replay(region.post, y) if region.post is not None else y


def _overlapped(lowering: LocalLowering, hidden_TH: fx.Proxy, topk_ids_TK: fx.Proxy, topk_weights_TK: fx.Proxy,
                experts, out_dtype: dict) -> fx.Proxy:
    """dispatch -> experts -> combine over chunks of the tokens, in the order that lets the exchanges
    run beside the experts: every chunk's dispatch is issued before the first chunk's experts, and
    every chunk's combine is awaited after the last chunk's experts. A collective waits for the ops
    issued before it on this rank, so chunk i+1's all-gather must come before chunk i's experts in
    the graph; chunk i's reduce-scatter then runs beside chunk i+1's experts. (Lowerings with
    ``overlap_chunks > 1``: the bounded AllGather.)"""
    chunks = lowering.split_tokens(hidden_TH, topk_ids_TK, topk_weights_TK)
    issued = [lowering.start_dispatch(*chunk) for chunk in chunks]
    combines = []
    for chunk, handle in zip(chunks, issued):
        dispatched = lowering.finish_dispatch(handle)
        combines.append(lowering.start_combine(experts(dispatched), dispatched, chunk[2], **out_dtype))
    return lowering.join_tokens([lowering.finish_combine(c) for c in combines], size(hidden_TH, 0))


def _routed_rows_scaled(hidden_TH: fx.Proxy, topk_ids_TK: fx.Proxy, topk_weights_TK: fx.Proxy):
    """Router weights applied to the experts' input: every (token, slot) row, scaled by its weight
    (in the promoted dtype, cast back, as the traced code did), becomes a token routed to one
    expert with weight 1: rows [S, H], ids [S, 1], ones [S, 1]."""
    rows_dtype, weights_dtype = dtype_of(hidden_TH.node), dtype_of(topk_weights_TK.node)
    rows_SH = hidden_TH.repeat_interleave(size(topk_ids_TK, 1), dim=0)
    weights_S1 = topk_weights_TK.reshape(-1, 1)
    scaled_SH = (rows_SH.to(torch.promote_types(rows_dtype, weights_dtype)) * weights_S1).to(rows_dtype)
    return scaled_SH, topk_ids_TK.reshape(-1, 1), torch.ones_like(weights_S1)


def _sum_over_slots(out_SH: fx.Proxy, topk_ids_TK: fx.Proxy) -> fx.Proxy:
    """[S, H] rows in (token, slot) order -> [T, H]."""
    return out_SH.view(size(topk_ids_TK, 0), size(topk_ids_TK, 1), size(out_SH, 1)).sum(dim=1)


def dtype_of(node: fx.Node) -> torch.dtype | None:
    value = node.meta.get("example_value")
    return value.dtype if isinstance(value, torch.Tensor) else None


def dtype_of_combine(region: MoERegion) -> torch.dtype | None:
    """The dtype ``combine`` returns: expert rows (the down weight's dtype, or what the post-expert
    code made of them) times router weights, promoted."""
    weights = dtype_of(region.topk_weights)
    rows = dtype_of(region.post.output) if region.post is not None else region.down.dtype
    if weights is None or rows is None:
        return None
    out = torch.promote_types(rows, weights)
    base = dtype_of(region.base) if region.base is not None else None
    return torch.promote_types(out, base) if base is not None else out
