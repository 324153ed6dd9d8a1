"""Recognizer for split-per-expert experts: sorted rows, per-expert counts read on the host,
``split``, one linear per expert, ``cat`` (JetMoE); or one whole expert MLP per part behind a
routing-map permutation (Megatron-LM's SequentialMLP, below).

    counts = zeros(T, E).scatter(1, ids, 1).long().sum(0).tolist()   # [E] host ints
    _, perm = ids.flatten().sort(0); tok = perm.div(K, rounding_mode="trunc")
    rows = x[tok]
    h = cat([linear(part, W_up[e]) for e, part in enumerate(rows.split(counts))])
    a = activation(h)                                                  # chunk / silu / mul, row-wise
    y = cat([linear(part, W_down[e]) for e, part in enumerate(a.split(counts))])
    out = zeros(T, H).index_add(0, tok, y * weights.flatten()[perm][:, None])   # <- region output

dynamo captures ``.tolist()`` only with ``capture_scalar_outputs`` (fullgraph=True turns it on
from torch 2.10); the rewrite drops that host sync.
"""

from __future__ import annotations

import torch.fx as fx

from moe_fx.passes.expert_params import (
    ExpertFn, expert_linear, expert_matmuls, experts_owner, rows_path, stack_experts,
    stacked_projection,
)
from moe_fx.passes.graph_utils import arg, chain, fake, int_value, is_op, op_name, same_size, size_guards, strip_casts
from moe_fx.passes.matching import ZERO_CONSTRUCTORS, Miss, blame, counted_ids, expect, row_functions
from moe_fx.passes.region import MoERegion, NoMatch
from moe_fx.passes.rowwise import ELEMENTWISE

FORM = "split_experts"
REQUIRES = "fullgraph=True (or torch._dynamo.config.capture_scalar_outputs=True) to capture .tolist()"
MLP_REQUIRES = ("fullgraph=True (or torch._dynamo.config.capture_scalar_outputs=True and "
                "capture_dynamic_output_shape_ops=True) to capture .tolist() and masked_select")



def _parts(cat: fx.Node) -> tuple[fx.Node, list] | None:
    """(split node, per-expert linears) of ``cat([linear(split(x, sizes)[e], W_e) for e])``."""
    pieces = cat.args[0] if cat.args else None
    if not isinstance(pieces, (list, tuple)) or len(pieces) < 2 or arg(cat, 1, "dim", 0) not in (0, -2):
        return None
    projections = [expert_linear(p) if isinstance(p, fx.Node) else None for p in pieces]
    if any(p is None for p in projections):
        return None
    inputs = [p.input for p in projections]
    if not all(is_op(i, "getitem") and i.args[1] == e for e, i in enumerate(inputs)):
        return None
    split = inputs[0].args[0]
    if not is_op(split, "split") or any(i.args[0] is not split for i in inputs):
        return None
    return split, projections


def is_expert_cat(node: fx.Node) -> bool:
    return is_op(node, "cat") and _parts(node) is not None


def match_split(up_cat: fx.Node) -> MoERegion | NoMatch | None:
    """Recognize the form anchored at its first expert cat; None if ``up_cat`` is the second."""
    split, ups = _parts(up_cat)
    sizes = arg(split, 1, "split_size_or_sections")
    if not isinstance(sizes, (list, tuple)):
        return None
    if not any(isinstance(s, fx.Node) for s in sizes):
        return None  # constant sizes: the counts were read before a graph break, not in this graph
    cats = sorted(c for s in _splits_sharing(sizes) for g in s.users for lin in g.users for c in lin.users if is_expert_cat(c))
    if cats[0] is not up_cat:
        return None
    block = experts_owner(sorted({p.source for c in set(cats) for p in _parts(c)[1]}))
    with blame(block):
        expect(len(set(cats)) == 2, f"{len(set(cats))} per-expert cats share one split (expected up and down)")
        return _region(up_cat, sorted(set(cats))[1], block)


def _splits_sharing(sizes) -> list[fx.Node]:
    first = next(s for s in sizes if isinstance(s, fx.Node))
    return [u for u in first.users if is_op(u, "split") and list(arg(u, 1, "split_size_or_sections")) == list(sizes)]


def _region(up_cat: fx.Node, down_cat: fx.Node, block: str) -> MoERegion:
    up_split, ups = _parts(up_cat)
    down_split, downs = _parts(down_cat)
    e = len(ups)
    expect(len(downs) == e, f"{e} up and {len(downs)} down experts")
    counts, count_nodes = _counts(arg(up_split, 1, "split_size_or_sections"), e)
    ids = _counted_ids(counts, e)
    t, k = fake(ids).shape
    rows = up_split.args[0]
    expect(is_op(rows, "getitem"), "the split rows are not hidden[token index]")
    hidden, tok = rows.args
    perm, top_k = _token_of_sorted(tok)
    expect(top_k == k, f"rows computed as perm // {top_k}, but top-k is {k}")
    expect(is_op(perm, "getitem") and perm.args[1] == 1 and is_op(perm.args[0], "sort"), "rows are not ordered by sorting the expert ids")
    sort = perm.args[0]
    expect(not arg(sort, 2, "descending", False), "expert ids sorted descending")
    flat = sort.args[0]
    expect(is_op(flat, "flatten", "view", "reshape") and flat.args[0] is ids, "the sorted ids are not the counted ones")
    expect(fake(hidden) is not None and same_size(fake(hidden).shape[0], t), "hidden rows do not match the routed tokens")
    # the weighting and the scatter back
    adds = [u for u in tok.users if is_op(u, "index_add", "index_add_") and arg(u, 1, "dim") in (0, -2) and arg(u, 2, "index") is tok]
    expect(len(adds) == 1, "expert rows are not put back with index_add(0, token index, rows)")
    output = adds[0]
    mul = strip_casts(arg(output, 3, "source"))
    expect(is_op(mul, "mul"), "the expert outputs are not multiplied by the router weights")
    y, column = _split_weighting(mul, perm)
    gates = _flat_source(column_source := _column_of(column))
    expect(tuple(fake(gates).shape) == (t, k), "router weights are not [T, K]")
    act, post = row_functions(up=up_cat, down_in=down_split.args[0], down=down_split, down_out=down_cat, y=y,
                              weighting=mul, row_ids=perm, block=block, form=FORM)
    acc = output.args[0]
    base = None if is_op(acc, *ZERO_CONSTRUCTORS) else acc
    up = stacked_projection(ups, "input")
    down = stacked_projection(downs, "output")
    nodes = {up_cat, down_cat, up_split, down_split, *count_nodes, sort, perm, flat, tok, rows, output, mul,
             *chain(arg(output, 3, "source"), mul), column, column_source, column_source.args[0],
             *act.nodes, *post.nodes}
    for split, projections in ((up_split, ups), (down_split, downs)):
        nodes |= {p.node for p in projections} | {n for p in projections for n in p.nodes} | {p.input for p in projections}
    if base is None:
        nodes.add(acc)
    return MoERegion(
        block=block, form=FORM, hidden=hidden, topk_ids=ids, topk_weights=gates, up=up, activation=act, down=down,
        post=post if post.nodes else None, output=output, nodes=frozenset(nodes), num_experts=e, top_k=k,
        hidden_size=up.features()[0], intermediate_size=down.features()[0], dtype=up.dtype, base=base, requires=REQUIRES,
    )


def _counts(sizes, e: int) -> tuple[fx.Node, set[fx.Node]]:
    """The [E] count tensor of ``sizes = [counts[0].item(), ..., counts[E-1].item()]``, and those nodes."""
    expect(len(sizes) == e, f"split into {len(sizes)} parts for {e} experts")
    nodes, source = set(), None
    for i, size in enumerate(sizes):
        expect(is_op(size, "item") and is_op(size.args[0], "getitem") and size.args[0].args[1] == i,
                "split sizes are not the per-expert counts read with .tolist()")
        counts = size.args[0].args[0]
        expect(source in (None, counts), "split sizes come from different count tensors")
        source = counts
        nodes |= {size, size.args[0], *size_guards(size)}
    return source, nodes


def _counted_ids(counts: fx.Node, e: int) -> fx.Node:
    """ids [T, K] of ``zeros(T, E).scatter(1, ids, 1).long().sum(0)``."""
    expect(is_op(counts, "sum") and arg(counts, 1, "dim") in (0, (0,), [0]), f"counts come from {op_name(counts)}, not a sum over tokens")
    onehot = strip_casts(counts.args[0])
    expect(is_op(onehot, "scatter", "scatter_") and arg(onehot, 1, "dim") in (1, -1) and arg(onehot, 3, "value") == 1
            and is_op(onehot.args[0], *ZERO_CONSTRUCTORS), "counts are not a sum of a one-hot scatter of the expert ids")
    expect(fake(onehot).shape[-1] == e, f"counts over {fake(onehot).shape[-1]} experts, split into {e}")
    return arg(onehot, 2, "index")


def _token_of_sorted(tok: fx.Node) -> tuple[fx.Node, int | None]:
    if is_op(tok, "div") and arg(tok, 2, "rounding_mode") in ("trunc", "floor"):
        return tok.args[0], int_value(tok.args[1])
    if is_op(tok, "floordiv"):
        return tok.args[0], int_value(tok.args[1])
    raise Miss(f"token index is {op_name(tok)}, not sorted position // K")


def _split_weighting(mul: fx.Node, perm: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(expert output, ``gates_sorted[:, None]``) of the weighting multiply."""
    for y, w in (mul.args, mul.args[::-1]):
        column = strip_casts(w) if isinstance(w, fx.Node) else None
        if column is not None and _column_of(column) is not None:
            expect(_column_of(column).args[1] is perm, "router weights are not sorted like the rows")
            return y, column
    raise Miss("the expert outputs are not multiplied by the sorted router weights")


def _column_of(column: fx.Node) -> fx.Node | None:
    """``g[perm]`` of ``g[perm][:, None]`` / ``g[perm].unsqueeze(-1)``."""
    if is_op(column, "getitem") and column.args[1] == (slice(None), None):
        inner = column.args[0]
    elif is_op(column, "unsqueeze") and arg(column, 1, "dim") in (-1, 1):
        inner = column.args[0]
    else:
        return None
    return inner if is_op(inner, "getitem") and isinstance(inner.args[1], fx.Node) else None


def _flat_source(sorted_gates: fx.Node) -> fx.Node:
    flat = sorted_gates.args[0]
    expect(is_op(flat, "flatten", "view", "reshape") and fake(flat.args[0]) is not None and fake(flat.args[0]).dim() == 2,
            "router weights are not a flattened [T, K] tensor")
    return flat.args[0]


# ------------------------------------------------------------------------------------------
# Whole expert MLPs per part behind a routing-map permutation (Megatron-LM's SequentialMLP)
# ------------------------------------------------------------------------------------------
#
#     routing_map = zeros(T, E, bool).scatter(1, ids, True); probs = zeros(T, E).scatter(1, ids, w)
#     map_ET = routing_map.T.contiguous()
#     tok = arange(T).unsqueeze(0).expand(E, -1).masked_select(map_ET)      # expert-major token index
#     rows = x.index_select(0, tok)                                          # or x[tok]
#     y = cat([expert_e(part) for e, part in enumerate(rows.split(routing_map.sum(0).tolist()))])
#     y = y * probs.T.contiguous().masked_select(map_ET).unsqueeze(-1)
#     out = zeros_like(x).scatter_add(0, tok.unsqueeze(1).expand(-1, H), y)  # <- region output


def _mlp_parts(cat: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(split node, the parts) of ``cat([expert_e(split(rows, sizes)[e]) for e])``, each piece a
    whole expert (matmuls and activation) on its own part."""
    pieces = cat.args[0] if cat.args else None
    if not isinstance(pieces, (list, tuple)) or len(pieces) < 2 or arg(cat, 1, "dim", 0) not in (0, -2):
        return None
    parts = [_part_of(p) if isinstance(p, fx.Node) else None for p in pieces]
    if any(p is None for p in parts) or not all(p.args[1] == e for e, p in enumerate(parts)):
        return None
    split = parts[0].args[0]
    return (split, parts) if all(p.args[0] is split for p in parts) else None


# What an expert's body is made of between its part and its output: the walk up from a piece
# crosses only these (and expert matmuls), so it stays inside one expert whatever else is cat'ed.
_BODY = ELEMENTWISE | {"chunk", "split", "getitem", "view", "reshape", "contiguous"}


def _part_of(piece: fx.Node) -> fx.Node | None:
    """The nearest ``split(...)[e]`` above ``piece``, through at least one expert matmul."""
    seen, frontier, through_matmul = {piece}, [piece], False
    while frontier:
        through_matmul = through_matmul or any(expert_linear(n) is not None for n in frontier)
        frontier = [a for n in frontier if expert_linear(n) is not None or op_name(n) in _BODY
                    for a in n.all_input_nodes if a not in seen and not seen.add(a)]
        for node in frontier:
            if is_op(node, "getitem") and is_op(node.args[0], "split") and isinstance(node.args[1], int):
                return node if through_matmul or expert_linear(piece) is not None else None
    return None


def is_expert_mlp_cat(node: fx.Node) -> bool:
    return is_op(node, "cat") and _parts(node) is None and _mlp_parts(node) is not None


def match_split_mlps(cat: fx.Node) -> MoERegion | NoMatch | None:
    split, parts = _mlp_parts(cat)
    pieces = list(cat.args[0])
    block = experts_owner(sorted({p.source for part, piece in zip(parts, pieces) for n in rows_path(part, piece)
                                  if (p := expert_linear(n)) is not None}))
    fns, nodes = [], set()
    with blame(block):
        for e, (part, piece) in enumerate(zip(parts, pieces)):
            ups, down = expert_matmuls(part, piece, e)
            act, post = row_functions(up=ups[0].node, down_in=down.input, down=down.node, down_out=down.node, y=piece,
                                      weighting=cat, row_ids=split, block=block, form=FORM,
                                      side_ups=tuple(p.node for p in ups[1:]))
            fns.append(ExpertFn(e, ups, down, act, post))
            nodes |= {part, piece, *(n for p in (*ups, down) for n in (p.node, *p.nodes)), *act.nodes, *post.nodes}
        up, side_up, down, block = stack_experts(fns)
        return _mlp_region(cat, split, fns, up, side_up, down, block, nodes)


def _mlp_region(cat, split, fns, up, side_up, down, block, nodes) -> MoERegion:
    e = len(fns)
    counts, count_nodes = _counts(arg(split, 1, "split_size_or_sections"), e)
    ids, counted = counted_ids(counts, e, histc_max=())
    routing_map = strip_casts(counts.args[0]) if is_op(counts, "sum") else None
    expect(routing_map is not None, "the split sizes are not a [T, E] routing map's sum over tokens")
    t, k = fake(ids).shape
    rows = split.args[0]
    if is_op(rows, "index_select"):
        expect(arg(rows, 1, "dim") in (0, -2), "rows are not selected along the tokens")
        hidden, tok = rows.args[0], arg(rows, 2, "index")
    else:
        expect(is_op(rows, "getitem") and isinstance(rows.args[1], fx.Node), "the split rows are not hidden[token index]")
        hidden, tok = rows.args
    tok_nodes = _expert_major(tok, routing_map, t)
    expect(fake(hidden) is not None and same_size(fake(hidden).shape[0], t), "hidden rows do not match the routed tokens")
    # the probabilities, permuted like the rows, scale the outputs; scatter_add puts them back
    expect(len(cat.users) == 1, "the experts' outputs are read more than once")
    mul = strip_casts(next(iter(cat.users)))
    expect(is_op(mul, "mul") and len(mul.args) == 2, "the experts' outputs are not multiplied by the routing probabilities")
    column = next((a for a in mul.args if a is not cat and strip_casts(a) is not cat), None)
    weights, prob_nodes = _permuted_probs(column, ids, routing_map, t)
    scatters = [s for u in tok.users if is_op(u, "unsqueeze") for x in u.users if is_op(x, "expand")
                for s in x.users if is_op(s, "scatter_add", "scatter_add_") and arg(s, 2, "index") is x]
    expect(len(scatters) == 1 and arg(scatters[0], 1, "dim") == 0 and strip_casts(arg(scatters[0], 3, "src")) is mul,
           "the weighted rows are not put back with scatter_add(0, tok.unsqueeze(1).expand(-1, H), rows)")
    output = scatters[0]
    acc = output.args[0]
    base = None if is_op(acc, *ZERO_CONSTRUCTORS) else acc
    nodes |= {cat, split, *count_nodes, *counted, rows, *tok_nodes, mul, *prob_nodes, output,
              *output.all_input_nodes, *chain(arg(output, 3, "src"), mul)}
    if base is None:
        nodes.add(acc)
    first = fns[0]
    return MoERegion(
        block=block, form=FORM, hidden=hidden, topk_ids=ids, topk_weights=weights, up=up, activation=first.activation,
        down=down, post=first.post if first.post.nodes else None, output=output, nodes=frozenset(nodes - {hidden}),
        num_experts=e, top_k=k, hidden_size=up.features()[0], intermediate_size=down.features()[0], dtype=up.dtype,
        side_up=side_up, base=base, requires=MLP_REQUIRES,
    )


def _transposed_map(node: fx.Node) -> fx.Node | None:
    """M of ``M.T.contiguous()`` / ``M.t()`` / ``M.transpose(0, 1)``."""
    while is_op(node, "contiguous"):
        node = node.args[0]
    if is_op(node, "t") or (is_op(node, "transpose") and sorted(node.args[1:3]) in ([0, 1], [-2, -1], [-1, 0])):
        return node.args[0]
    if is_op(node, "getattr") and node.args[1] in ("T", "mT"):
        return node.args[0]
    return None


def _expert_major(tok: fx.Node, routing_map: fx.Node, t) -> list[fx.Node]:
    """Checks ``tok = arange(T).unsqueeze(0).expand(E, -1).masked_select(routing_map.T)``: every
    routed (token, expert) pair once, expert-major. Returns its nodes."""
    expect(is_op(tok, "masked_select"), f"the rows' token index is {op_name(tok)}, not a masked_select over the routing map")
    source, mask = tok.args[0], arg(tok, 1, "mask")
    expect(_same_map(_transposed_map(mask), routing_map), "the token index is not selected by the counted routing map")
    steps = [source]
    while is_op(steps[-1], "expand", "unsqueeze", "view", "reshape"):
        steps.append(steps[-1].args[0])
    expect(is_op(steps[-1], "arange") and len(steps[-1].args) == 1 and same_size(steps[-1].args[0], t),
           "the masked token index is not arange(T) over the experts")
    return [tok, mask, *_map_chain(mask), *steps]


def _same_map(a: fx.Node | None, b: fx.Node) -> bool:
    """The same routing map, or another scatter of the same ids into a [T, E] tensor of zeros."""
    if a is None:
        return False
    if a is b:
        return True
    return (is_op(a, "scatter", "scatter_") and is_op(b, "scatter", "scatter_") and arg(a, 2, "index") is arg(b, 2, "index")
            and arg(a, 3, "value") == arg(b, 3, "value") == 1 and is_op(a.args[0], *ZERO_CONSTRUCTORS))


def _map_chain(mask: fx.Node) -> list[fx.Node]:
    out, node = [], mask
    while node is not None and not is_op(node, "scatter", "scatter_"):
        out.append(node)
        node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    return out


def _permuted_probs(column: fx.Node | None, ids: fx.Node, routing_map: fx.Node, t) -> tuple[fx.Node, list[fx.Node]]:
    """(w [T, K], nodes) of ``zeros(T, E).scatter(1, ids, w).T.contiguous().masked_select(map).unsqueeze(-1)``:
    each routed row's probability, in the rows' order."""
    expect(column is not None, "the experts' outputs are not multiplied by the routing probabilities")
    nodes, node = [column], strip_casts(column)
    nodes += chain(column, node)
    expect(is_op(node, "unsqueeze") and arg(node, 1, "dim") in (-1, 1), "the probabilities are not a column of the rows")
    selected = node.args[0]
    expect(is_op(selected, "masked_select") and _same_map(_transposed_map(arg(selected, 1, "mask")), routing_map),
           "the probabilities are not permuted by the same routing map as the rows")
    probs = _transposed_map(selected.args[0])
    expect(is_op(probs, "scatter", "scatter_") and arg(probs, 2, "index") is ids and is_op(probs.args[0], *ZERO_CONSTRUCTORS)
           and arg(probs, 1, "dim") in (1, -1), "the probabilities are not the router weights scattered at the ids into zeros")
    weights = arg(probs, 3, "src")
    expect(isinstance(weights, fx.Node) and tuple(fake(weights).shape) == tuple(fake(ids).shape), "router weights are not [T, K]")
    return weights, [*nodes, node, selected, *_map_chain(selected.args[0]), probs, probs.args[0]]
