"""Recognizers for the transformers 5.x fused-experts forms (``@use_experts_implementation``).

grouped_mm (the default)::

    expert_ids = topk_ids.reshape(-1); sorted_ids, perm = torch.sort(expert_ids)
    xs = hidden[perm // K]; ws = topk_weights.reshape(-1)[perm]
    offs = cumsum(histc(sorted_ids.float(), bins=E, min=0, max=E-1), dtype=int32)
    h = grouped_mm(xs.to(dt), W_up.transpose(-2, -1), offs)     # or W_up [E, H, N]: no transpose
    a = activation(h [+ b_up[sorted_ids]])                        # chunk/silu/mul, GPT-OSS clamp...
    y = grouped_mm(a.to(dt), W_down.transpose(-2, -1), offs) [+ b_down[sorted_ids]]
    inv = empty_like(perm); inv[perm] = arange(S)
    out = (y * ws.unsqueeze(-1))[inv].view(T, K, H).sum(1)        # <- region output

grouped_mm is ``torch._grouped_mm``, ``F.grouped_mm`` or ``transformers.grouped_mm_fallback``
(non-bf16 weights under compile).

batched_mm::

    xs = hidden.repeat_interleave(K, dim=0); ids = topk_ids.reshape(-1); ws = topk_weights.reshape(-1)
    h = bmm(W_up[ids], xs.unsqueeze(-1)).squeeze(-1)   # or bmm(xs.unsqueeze(1), W_up[ids]).squeeze(1)
    a = activation(h [+ b_up[ids]]); y = bmm(W_down[ids], a.unsqueeze(-1)).squeeze(-1) [+ b_down[ids]]
    out = (y * ws.unsqueeze(-1)).view(T, K, H).sum(1)                                  # <- region output

Both become one ``MoERegion``: the router that made topk_ids / topk_weights stays as traced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from moe_fx.passes.graph_utils import (
    arg, chain, expert_shard_of, fake, int_value, is_graph_input, is_op, module_path, nearest_downstream, op_name, owner_path, same_shape, same_size, strip_casts,
)
from moe_fx.passes.matching import blame, counted_ids, expect, stacked_weight
from moe_fx.passes.region import ExpertProjection, MoERegion, NoMatch
from moe_fx.passes.rowwise import extract_row_fn, mutates

GROUPED_MM_OPS = ("_grouped_mm", "grouped_mm", "transformers.grouped_mm_fallback")
GROUPED_FORM = "hf_grouped_mm"
BATCHED_FORM = "hf_batched_mm"


@dataclass(frozen=True)
class _IdRange:
    """What the router's expert ids are compared with, to prove transformers' EP sentinel guards
    (5.17 always, later versions under their own EP) identities on a router's output: ids >= E
    mark tokens its own EP sent elsewhere, which a router never produces.

    ``ids``: the nodes holding expert ids (flat, sorted, clamped). ``local``: e when the block is
    a transformers experts module whose ``num_experts`` moe_fx.shard_experts set from E to e
    (``ExpertShard.local_count``): its traced guards read e where the model reads E. A bound equal
    to e in any other block, or below E otherwise, is a real mask and is kept."""

    experts: int
    local: int | None
    ids: frozenset

    def never_reached(self, bound) -> bool:
        """``ids >= bound`` is false for every id the router produces."""
        number = int_value(bound)
        return number is not None and (number >= self.experts or number == self.local)

    def is_mask(self, mask: fx.Node) -> bool:
        """``ids >= c`` (optionally unsqueezed) with c never reached."""
        while is_op(mask, "unsqueeze"):
            mask = mask.args[0]
        return is_op(mask, "ge") and mask.args[0] in self.ids and self.never_reached(mask.args[1])

    def is_clamp(self, node: fx.Node) -> bool:
        """``ids.clamp(0, c - 1)`` / ``ids.clamp_(max=c - 1)`` with c never reached: ids unchanged."""
        high = int_value(arg(node, 2, "max"))
        return (is_op(node, "clamp", "clamp_") and node.args[0] in self.ids and arg(node, 1, "min") in (None, 0)
                and high is not None and self.never_reached(high + 1))

    def is_fill(self, node: fx.Node) -> bool:
        """``rows.masked_fill(ids >= c, 0)`` (or in place) with c never reached: rows unchanged."""
        return (is_op(node, "masked_fill", "masked_fill_") and self.is_mask(node.args[1])
                and arg(node, 2, "value") == 0)

    def strip(self, node: fx.Node) -> fx.Node:
        """``node`` with the guards applied to it looked through."""
        while self.is_clamp(node) or self.is_fill(node):
            node = node.args[0]
        return node

    def chain(self, node: fx.Node, stripped: fx.Node) -> set[fx.Node]:
        """The guard nodes ``strip`` looked through from ``node`` to ``stripped``, masks included."""
        nodes = set()
        while node is not stripped:
            nodes.add(node)
            mask = node.args[1] if is_op(node, "masked_fill", "masked_fill_") else None
            while is_op(mask, "unsqueeze", "ge"):
                nodes.add(mask)
                mask = mask.args[0]
            node = node.args[0]
        return nodes

    def check_updates(self, node: fx.Node, what: str) -> set[fx.Node]:
        """The in-place updates of ``node``; each must be a guard (5.17 clamps the sorted ids and
        zeroes the gathered rows in place), or the rewrite, which drops them, would change results."""
        updates = {u for u in node.users if mutates(u) and u.args[0] is node}
        for u in updates:
            expect(self.is_clamp(u) or self.is_fill(u),
                    f"in-place {op_name(u)} ({u.name}) of {what} is not a guard of ids >= E={self.experts}")
        return updates | {m for u in updates if self.is_fill(u) for m in self.chain(u, node)}


def _clamped(ids: fx.Node) -> list[fx.Node]:
    """``ids`` and the nodes it was clamped from (``src.clamp(...)``): all hold expert ids."""
    chain = [ids]
    while is_op(chain[-1], "clamp") and isinstance(chain[-1].args[0], fx.Node):
        chain.append(chain[-1].args[0])
    return chain


def _id_range(weight: fx.Node, *ids: fx.Node) -> _IdRange:
    """E as the router sees it (the full count when the weight holds only this rank's block), and
    the local count a sharded transformers block's guards read instead."""
    shard = expert_shard_of(weight)
    if shard is None:
        return _IdRange(fake(weight).shape[0], None, frozenset(ids))
    return _IdRange(shard.num_experts, shard.num_local if shard.local_count else None, frozenset(ids))


def _flat_source(node: fx.Node, what: str, ids: _IdRange) -> fx.Node:
    """``src.reshape(-1)`` / ``src.view(-1)`` -> src, a [T, K] tensor."""
    node = ids.strip(node)
    expect(not (is_op(node, "clamp") and node in ids.ids), f"{what} are clamped ({node.name}) below the router's E={ids.experts}")
    expect(is_op(node, "reshape", "view", "flatten"), f"{what} is {op_name(node)}, not a reshape(-1) of [T, K]")
    src = node.args[0]
    expect(fake(src) is not None and fake(src).dim() == 2, f"{what} does not come from a [T, K] tensor")
    return src


def _weighting(y: fx.Node, ws_of, what: str) -> tuple[fx.Node, fx.Node]:
    """Find ``y_post * ws.unsqueeze(-1)`` downstream of ``y``; return (mul node, y_post)."""
    def y_times_weights(node: fx.Node) -> bool:
        return is_op(node, "mul") and len(node.args) == 2 and any(
            is_op(b, "unsqueeze") and ws_of(b.args[0]) for b in node.args)

    mul = nearest_downstream(y, y_times_weights)
    expect(mul is not None, f"no multiplication of the {what} outputs by the router weights")
    return mul, next(a for a, b in (mul.args, mul.args[::-1]) if is_op(b, "unsqueeze") and ws_of(b.args[0]))


def _sum_over_topk(weighted: fx.Node, t: int, k: int, h: int) -> fx.Node:
    """``weighted.view(T, K, H).sum(dim=1)`` -> the sum node."""
    expect(len(weighted.users) == 1, "weighted rows have several users")
    view = next(iter(weighted.users))
    expect(is_op(view, "view", "reshape"), f"weighted rows go to {op_name(view)}, not view(T, K, H)")
    shape = tuple(fake(view).shape) if fake(view) is not None else ()
    expect(same_shape(shape, (t, k, h)), f"weighted rows viewed as {list(shape)}, not [T={t}, K={k}, H={h}]")
    expect(len(view.users) == 1, "the [T, K, H] view has several users")
    total = next(iter(view.users))
    dim = arg(total, 1, "dim")
    expect(is_op(total, "sum") and dim in (1, -2, (1,), [1]), "the [T, K, H] rows are not summed over K")
    return total


def _projection(weight_arg: fx.Node) -> tuple[ExpertProjection, list[fx.Node]]:
    """(projection, helper nodes) of ``W`` ([E, K, N]) or ``W.transpose(-2, -1)`` (W [E, N, K],
    nn.Linear layout) of a grouped matmul; W may be a 2-D parameter viewed as [E, ...]."""
    helpers = []
    if is_op(weight_arg, "transpose") and sorted(weight_arg.args[1:3]) in ([-2, -1], [1, 2]):
        weight, layout = weight_arg.args[0], "out_in"
        helpers.append(weight_arg)
    else:
        weight, layout = weight_arg, "in_out"
    weight, view = stacked_weight(weight)
    return ExpertProjection(weight=weight, layout=layout), helpers + view


@dataclass
class _Parts:
    """What both forms share once their matmuls are understood."""

    hidden: fx.Node
    topk_ids: fx.Node
    topk_weights: fx.Node
    row_ids: fx.Node
    up_out: fx.Node
    down_in: fx.Node
    down_mm: fx.Node  # the down matmul (bmm for the batched form)
    down_out: fx.Node
    up: ExpertProjection
    down: ExpertProjection
    weighted: fx.Node
    y_post: fx.Node
    output: fx.Node
    nodes: set
    ids: _IdRange


def _region(parts: _Parts, *, form: str, block: str) -> MoERegion | NoMatch:
    # Sentinel guards between the matmuls (5.17 zeroes the gate_up rows of ids >= E) change no row:
    # replayed on rows of global ids they would zero every expert >= e of a sharded block.
    act = extract_row_fn(parts.up_out, parts.down_in, parts.down_mm, parts.row_ids, block=block, form=form,
                         part="activation", identity=parts.ids.is_fill)
    if not act:
        return act
    post = extract_row_fn(parts.down_out, parts.y_post, parts.weighted, parts.row_ids, block=block, form=form,
                          part="post-expert", identity=parts.ids.is_fill)
    if not post:
        return post
    t, k = fake(parts.topk_ids).shape
    e = fake(parts.up.weight).shape[0]
    h_in, n_up = parts.up.features()
    i_down, h_out = parts.down.features()
    if fake(parts.down.weight).shape[0] != e:
        return NoMatch(block, form, f"up and down weights hold {e} and {fake(parts.down.weight).shape[0]} experts")
    nodes = set(parts.nodes) | set(act.nodes) | set(post.nodes)
    nodes |= {n for fill in (*act.passthrough, *post.passthrough) for n in parts.ids.chain(fill, fill.args[0])}
    params = [parts.up.weight, parts.down.weight, *act.expert_params(), *post.expert_params()]
    shards = {expert_shard_of(p) for p in params}
    if len(shards) > 1:
        held = ", ".join(f"{module_path(p)}: {s.describe() if s else 'every expert'}"
                         for p, s in ((p, expert_shard_of(p)) for p in params))
        return NoMatch(block, form, f"expert parameters are sharded inconsistently ({held})")
    shard = shards.pop()
    return MoERegion(
        block=block,
        form=form,
        hidden=parts.hidden,
        topk_ids=parts.topk_ids,
        topk_weights=parts.topk_weights,
        up=parts.up,
        activation=act,
        down=parts.down,
        post=post if post.nodes else None,
        output=parts.output,
        nodes=frozenset(nodes),
        num_experts=shard.num_experts if shard else e,
        top_k=k,
        hidden_size=h_in,
        intermediate_size=i_down,
        dtype=fake(parts.up.weight).dtype,
        shard=shard,
    )


def match_grouped(up_mm: fx.Node) -> MoERegion | NoMatch | None:
    """Recognize the grouped_mm form anchored at its first grouped matmul; None if not a first one."""
    offs = arg(up_mm, 2, "offs")
    if not isinstance(offs, fx.Node):
        return None
    mms = sorted(u for u in offs.users if is_op(u, *GROUPED_MM_OPS))  # fx nodes sort by graph order
    if mms[0] is not up_mm:
        return None  # anchored at the first matmul of the block only
    if len(mms) == 3:
        return None  # separate w1, w3, w2: torchtitan's form (titan_experts.py)
    form = GROUPED_FORM
    up, up_helpers = _projection(up_mm.args[1])
    block = owner_path(up.weight)
    with blame(block):
        expect(len(mms) == 2, f"{len(mms)} grouped matmuls share one offsets tensor (expected gate_up and down)")
        down_mm = mms[1]
        down, down_helpers = _projection(down_mm.args[1])
        # rows: hidden[perm // K]
        x_sel = strip_casts(up_mm.args[0])
        expect(is_op(x_sel, "getitem"), "grouped matmul input is not hidden[perm // K]")
        hidden, index = x_sel.args
        expect(is_op(index, "floordiv"), "grouped matmul input rows are not perm // K")
        perm, k = index.args
        expect(is_op(perm, "getitem") and perm.args[1] == 1 and is_op(perm.args[0], "sort"), "rows are not ordered by torch.sort of the expert ids")
        sort = perm.args[0]
        expect(not arg(sort, 2, "descending", False), "expert ids sorted descending")
        flat_ids = sort.args[0]
        e = fake(up.weight).shape[0]  # weight groups: the local block when sharded
        row_ids = next((u for u in sort.users if is_op(u, "getitem") and u.args[1] == 0), None)
        expect(row_ids is not None, "sorted expert ids are unused")
        ids = _id_range(up.weight, row_ids, *_clamped(flat_ids))
        topk_ids = _flat_source(flat_ids, "sorted expert ids", ids)
        guards = ids.check_updates(row_ids, "the sorted expert ids") | ids.check_updates(x_sel, "the gathered hidden rows")
        t, kk = fake(topk_ids).shape
        expect(int_value(k) == kk, f"rows computed as perm // {k}, but top-k is {kk}")
        expect(fake(hidden) is not None and same_size(fake(hidden).shape[0], t), "hidden rows do not match the routed tokens")
        # offsets = cumsum(histc(sorted_ids, bins=E, min=0, max=E-1), int32)
        cumsum = strip_casts(offs)
        expect(is_op(cumsum, "cumsum"), "offsets are not a cumsum of expert counts")
        hist = strip_casts(cumsum.args[0])
        counted, count_nodes = counted_ids(hist, e, histc_max=(e - 1,))
        expect(counted in (row_ids, flat_ids, topk_ids), "the expert counts are not over the routed expert ids")
        # weighting and unpermute
        def is_sorted_weights(n):
            return is_op(n, "getitem") and n.args[1] is perm and fake(n.args[0]) is not None and fake(n.args[0]).dim() == 1

        weighted, masked_y = _weighting(down_mm, is_sorted_weights, "down projection")
        y_post = ids.strip(masked_y)
        ws_sorted = next(a for a in weighted.args if is_op(a, "unsqueeze")).args[0]
        topk_weights = _flat_source(ws_sorted.args[0], "router weights", ids)
        expect(len(weighted.users) == 1, "weighted rows have several users")
        unperm = next(iter(weighted.users))
        expect(is_op(unperm, "getitem") and is_op(unperm.args[1], "empty_like"), "weighted rows are not un-permuted by an inverse permutation")
        inv = unperm.args[1]
        expect(inv.args[0] is perm, "inverse permutation is not built from the sort permutation")
        setters = [u for u in inv.users if is_op(u, "setitem")]
        expect(len(setters) == 1 and setters[0].args[1] is perm and is_op(setters[0].args[2], "arange"), "inverse permutation is not inv[perm] = arange(S)")
        output = _sum_over_topk(unperm, t, kk, fake(down_mm).shape[1])
        nodes = {flat_ids, sort, perm, row_ids, index, x_sel, offs, hist, up_mm, down_mm, weighted,
                 ws_sorted, unperm, inv, setters[0], setters[0].args[2], output, *output.all_input_nodes,
                 next(a for a in weighted.args if is_op(a, "unsqueeze")), ws_sorted.args[0],
                 *ids.chain(masked_y, y_post), *guards}
        nodes |= {n for n in (up_mm.args[0], down_mm.args[0]) if isinstance(n, fx.Node) and not is_graph_input(n)}
        nodes |= count_nodes | set(up_helpers) | set(down_helpers) | set(chain(offs, cumsum)) | {cumsum} | set(chain(cumsum.args[0], hist))
        parts = _Parts(hidden=hidden, topk_ids=topk_ids, topk_weights=topk_weights, row_ids=row_ids,
                       up_out=up_mm, down_in=down_mm.args[0], down_mm=down_mm, down_out=down_mm, up=up, down=down,
                       weighted=weighted, y_post=y_post, output=output, nodes=nodes, ids=ids)
    return _region(parts, form=form, block=block)


def _bmm_weight_gather(bmm: fx.Node) -> tuple[fx.Node, fx.Node, str] | None:
    """(gathered ``W[ids]`` node, the other operand, layout) of an expert bmm, or None."""
    a, b = bmm.args[:2]
    if is_op(a, "getitem") and is_graph_input(a.args[0]) and is_op(b, "unsqueeze"):
        return a, b, "out_in"  # bmm(W[ids] [S, N, K], x.unsqueeze(-1))
    if is_op(b, "getitem") and is_graph_input(b.args[0]) and is_op(a, "unsqueeze"):
        return b, a, "in_out"  # bmm(x.unsqueeze(1), W[ids] [S, K, N])
    return None


def match_batched(up_bmm: fx.Node) -> MoERegion | NoMatch | None:
    """Recognize the batched_mm form anchored at its first bmm; None if ``up_bmm`` is not one."""
    gathered = _bmm_weight_gather(up_bmm)
    if gathered is None:
        return None
    w_gather, x_unsq, layout = gathered
    ids = w_gather.args[1]
    if not isinstance(ids, fx.Node):
        return None
    bmms = sorted(
        g
        for u in ids.users
        if is_op(u, "getitem") and is_graph_input(u.args[0]) and fake(u.args[0]) is not None and fake(u.args[0]).dim() == 3
        for g in u.users
        if is_op(g, "bmm")
    )
    if not bmms or bmms[0] is not up_bmm:
        return None
    form = BATCHED_FORM
    block = owner_path(w_gather.args[0])
    with blame(block):
        expect(len(bmms) == 2, f"{len(bmms)} expert bmms share one expert-id tensor (expected gate_up and down)")
        down_bmm = bmms[1]
        down_gather, down_unsq, down_layout = _bmm_weight_gather(down_bmm)
        expect(down_layout == layout, "gate_up and down weights use different layouts")
        up = ExpertProjection(weight=w_gather.args[0], layout=layout)
        down = ExpertProjection(weight=down_gather.args[0], layout=down_layout)
        id_range = _id_range(up.weight, *_clamped(ids))
        topk_ids = _flat_source(ids, "gathered expert ids", id_range)
        t, k = fake(topk_ids).shape
        x_rep = strip_casts(x_unsq.args[0])
        expect(is_op(x_rep, "repeat_interleave"), "bmm input is not hidden.repeat_interleave(K)")
        hidden = x_rep.args[0]
        expect(int_value(arg(x_rep, 1, "repeats")) == k and arg(x_rep, 2, "dim") in (0, -2), "tokens are not repeated K times along dim 0")
        up_out = _single_squeeze(up_bmm)
        down_out = _single_squeeze(down_bmm)
        expect(down_unsq.args[0] is not None, "down bmm input")
        down_in = down_unsq.args[0]

        def is_flat_weights(n):
            n = id_range.strip(n)
            return is_op(n, "reshape", "view") and fake(n) is not None and fake(n).dim() == 1 and n is not ids

        weighted, masked_y = _weighting(down_out, is_flat_weights, "down projection")
        y_post = id_range.strip(masked_y)
        ws = next(a for a in weighted.args if is_op(a, "unsqueeze"))
        topk_weights = _flat_source(ws.args[0], "router weights", id_range)
        output = _sum_over_topk(weighted, t, k, fake(down_out).shape[1])
        nodes = {ids, w_gather, x_unsq, x_rep, up_bmm, up_out, down_gather, down_unsq, down_bmm, down_out,
                 weighted, ws, ws.args[0], output, *output.all_input_nodes, *id_range.chain(masked_y, y_post),
                 *_clamped(ids)[1:], *id_range.chain(ws.args[0], id_range.strip(ws.args[0]))}
        if x_unsq.args[0] is not x_rep:
            nodes.add(x_unsq.args[0])
        parts = _Parts(hidden=hidden, topk_ids=topk_ids, topk_weights=topk_weights, row_ids=ids,
                       up_out=up_out, down_in=down_in, down_mm=down_bmm, down_out=down_out, up=up, down=down,
                       weighted=weighted, y_post=y_post, output=output, nodes=nodes, ids=id_range)
    return _region(parts, form=form, block=block)


def _single_squeeze(bmm: fx.Node) -> fx.Node:
    expect(len(bmm.users) == 1, "expert bmm output has several users")
    sq = next(iter(bmm.users))
    expect(is_op(sq, "squeeze"), "expert bmm output is not squeezed back to rows")
    return sq
