"""Recognizer for torchtitan's grouped experts (separate w1, w3, w2; three grouped matmuls).

    counts = histc(ids.view(-1), bins=E, min=0, max=E)         # max E or E-1; or bincount(minlength=E),
                                                               # or zeros(T, E).scatter_(1, ids, True).sum(0)
    order = argsort(ids.view(-1), stable=True)                 # or sort(...)[1]
    scores_sorted = scores.view(-1)[order]
    token_idx = (order // K).reshape(-1, 1).expand(-1, H)
    rows = gather(x, 0, token_idx)                              # or x[order // K]
    [rows = (rows.float() * scores_sorted.reshape(-1, 1)).to(x.dtype)]     # score_before_experts
    offs = cumsum(counts, dtype=int32)
    h = silu(grouped_mm(rows, w1.transpose(-2, -1), offs)) * grouped_mm(rows, w3.transpose(-2, -1), offs)
    y = grouped_mm(h, w2.transpose(-2, -1), offs)
    [y = (y.float() * scores_sorted.reshape(-1, 1)).to(x.dtype)]            # otherwise
    out = zeros_like(x).scatter_add(0, token_idx, y)             # or a shared expert's output; the index
                                                               # may be a second expand of order // K
"""

from __future__ import annotations

import torch.fx as fx

from moe_fx.passes.graph_utils import arg, chain, depends_on, fake, int_value, is_graph_input, is_op, op_name, owner_path, same_size, strip_casts
from moe_fx.passes.hf_experts import GROUPED_MM_OPS
from moe_fx.passes.matching import ZERO_CONSTRUCTORS, Miss, blame, counted_ids, expect, row_functions, stacked_weight
from moe_fx.passes.region import ExpertProjection, MoERegion, NoMatch

FORM = "titan_grouped_mm"



def match_titan(first_mm: fx.Node) -> MoERegion | NoMatch | None:
    """Recognize the form anchored at its first grouped matmul; None unless three share one offsets."""
    offs = arg(first_mm, 2, "offs")
    if not isinstance(offs, fx.Node):
        return None
    mms = sorted(u for u in offs.users if is_op(u, *GROUPED_MM_OPS))
    if mms[0] is not first_mm or len(mms) != 3:
        return None  # two grouped matmuls: transformers' form (hf_experts.py)
    weights = [_weight(mm.args[1]) for mm in mms]
    block = owner_path(weights[0][0])
    with blame(block):
        return _region(mms, weights, offs, block)


def _weight(node: fx.Node) -> tuple[fx.Node, str, list[fx.Node]]:
    """([E, ...] weight, layout, helper nodes) of ``w.transpose(-2, -1)`` / ``w``, through casts that keep its dtype."""
    helpers, layout = [], "in_out"
    if is_op(node, "transpose") and sorted(node.args[1:3]) in ([-2, -1], [1, 2]):
        helpers.append(node)
        node, layout = node.args[0], "out_in"
    while not is_graph_input(node) and strip_casts(node) is not node:
        expect(fake(node).dtype == fake(strip_casts(node)).dtype,
                f"expert weight {strip_casts(node).name} is cast to {fake(node).dtype} inside the experts")
        helpers.append(node)
        node = node.args[0]
    node, view = stacked_weight(node)
    return node, layout, helpers + view


def _region(mms: list[fx.Node], weights: list, offs: fx.Node, block: str) -> MoERegion:
    reads = [strip_casts(mm.args[0]) for mm in mms]
    ups = [i for i in range(3) if not any(depends_on(reads[i], mms[j]) for j in range(3) if j != i)]
    expect(len(ups) == 2 and reads[ups[0]] is reads[ups[1]], "the three grouped matmuls are not w1 and w3 on the same rows, then w2")
    (down_i,) = set(range(3)) - set(ups)
    down = mms[down_i]
    rows = reads[ups[0]]
    hidden, token_idx, order, top_k, scale = _routed_rows(rows)
    ids, flat_ids = _sorted_ids(order)
    t, k = fake(ids).shape
    expect(top_k == k, f"rows computed as order // {top_k}, but top-k is {k}")
    expect(same_size(fake(hidden).shape[0], t), "hidden rows do not match the routed tokens")
    e = fake(weights[0][0]).shape[0]
    cumsum = strip_casts(offs)
    expect(is_op(cumsum, "cumsum"), "offsets are not a cumsum of expert counts")
    counted, count_nodes = counted_ids(strip_casts(cumsum.args[0]), e, histc_max=(e - 1, e))
    expect(counted is ids or (fake(counted) is not None and fake(counted).dim() == 1 and _flat_of(counted) is ids),
           "the expert counts are not over the routed expert ids")
    # the scatter_add that puts the rows back (its index built from order // K, maybe apart from
    # the rows' own), and the router weights before or after the experts
    indices = _token_indices(order, top_k)
    scatters = [u for i in indices for u in i.users if is_op(u, "scatter_add", "scatter_add_") and arg(u, 2, "index") is i]
    expect(len(scatters) == 1 and arg(scatters[0], 1, "dim") == 0, "expert rows are not put back with scatter_add(0, token_idx, rows)")
    scatter = scatters[0]
    src = arg(scatter, 3, "src")
    nodes = {scatter, *chain(src, down), offs, cumsum, *_casts_of(offs), *_casts_of(cumsum.args[0]), *count_nodes, *chain(counted, ids), order,
             flat_ids, *_routed_nodes(rows, hidden), *indices, *(m for m in mms), *(h for w in weights for h in w[2]),
             *(mm.args[0] for mm in mms)}
    if scale is None:
        mul, scores_sorted, y_post = _output_scaling(src, down)
        weights_node = _scores(scores_sorted, order)
        nodes |= {mul, scores_sorted, scores_sorted.args[0], *mul.all_input_nodes}
        post_end, post_consumer = y_post, mul
    else:
        scores_sorted = scale
        weights_node = _scores(scores_sorted, order)
        nodes |= {scores_sorted, scores_sorted.args[0]}
        post_end, post_consumer = src, scatter
    expect(tuple(fake(weights_node).shape) == (t, k), "router weights are not [T, K]")
    act, post = row_functions(up=mms[ups[0]], down_in=down.args[0], down=down, down_out=down, y=post_end,
                              weighting=post_consumer, row_ids=order, block=block, form=FORM, side_ups=(mms[ups[1]],))
    acc = arg(scatter, 0, "self")
    base = None if is_op(acc, *ZERO_CONSTRUCTORS) else acc
    if base is None:
        nodes.add(acc)
    up = ExpertProjection(weight=weights[ups[0]][0], layout=weights[ups[0]][1])
    side = ExpertProjection(weight=weights[ups[1]][0], layout=weights[ups[1]][1])
    down_p = ExpertProjection(weight=weights[down_i][0], layout=weights[down_i][1])
    return MoERegion(
        block=block, form=FORM, hidden=hidden, topk_ids=ids, topk_weights=weights_node, up=up, activation=act,
        down=down_p, post=post if post.nodes else None, output=scatter, nodes=frozenset(nodes | set(act.nodes) | set(post.nodes)),
        num_experts=e, top_k=k, hidden_size=up.features()[0], intermediate_size=down_p.features()[0], dtype=up.dtype,
        side_up=(side,), base=base, weights_on_input=scale is not None,
    )


def _token_indices(order: fx.Node, k: int) -> list[fx.Node]:
    """Every spelling of the rows' token index in the graph: each ``order // K`` and each
    ``(order // K).reshape(-1, 1).expand(-1, H)`` made of one (torchtitan builds one for the gather
    or ``x[order // K]``, another for the scatter_add; dynamo keeps both)."""
    divs = [d for d in order.users if is_op(d, "floordiv") and d.args[0] is order and int_value(d.args[1]) == k]
    flats = [v for d in divs for v in d.users if is_op(v, "reshape", "view")]
    return [*divs, *flats, *(x for v in flats for x in v.users if is_op(x, "expand"))]


def _casts_of(node: fx.Node) -> list[fx.Node]:
    return chain(node, strip_casts(node))


def _routed_rows(rows: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, int, fx.Node | None]:
    """(hidden, token index, sort order, K, sorted scores if applied here) of the experts' input rows."""
    scale = None
    if is_op(rows, "mul"):
        a, b = rows.args
        sa, sb = _scores_column(a), _scores_column(b)
        expect((sa is None) != (sb is None), "experts' input rows are multiplied by something other than the sorted router weights")
        scale, rows = (sa, strip_casts(b)) if sa is not None else (sb, strip_casts(a))
    if is_op(rows, "gather"):
        hidden, dim, index = rows.args[0], arg(rows, 1, "dim"), arg(rows, 2, "index")
        expect(dim == 0 and is_op(index, "expand"), "experts' input rows are not gather(x, 0, token_idx)")
        token_idx = index
        flat = index.args[0]
        expect(is_op(flat, "reshape", "view"), "token index is not (order // K).reshape(-1, 1).expand(-1, H)")
        div = flat.args[0]
    elif is_op(rows, "getitem"):
        hidden, div = rows.args
        token_idx = div
    else:
        raise Miss(f"experts' input rows come from {op_name(rows)}, not a gather of the hidden states")
    expect(is_op(div, "floordiv") and int_value(div.args[1]) is not None, "rows are not order // K")
    expect(fake(hidden) is not None and fake(hidden).dim() == 2, "experts read rows of a tensor that is not [T, H]")
    return hidden, token_idx, div.args[0], int_value(div.args[1]), scale


def _routed_nodes(rows: fx.Node, hidden: fx.Node) -> set[fx.Node]:
    """Every node from the experts' input rows back to (not including) ``hidden``."""
    out, stack = set(), [rows]
    while stack:
        node = stack.pop()
        if node in out or node is hidden or is_graph_input(node):
            continue
        if is_op(node, "mul", "gather", "getitem", "to", "float", "floordiv", "reshape", "view", "expand", "bfloat16", "type_as"):
            out.add(node)
            stack.extend(n for n in node.all_input_nodes if not is_op(n, "argsort", "sort"))
    return out


def _scores_column(node: fx.Node) -> fx.Node | None:
    """``scores_sorted.reshape(-1, 1)`` / ``.unsqueeze(-1)`` -> scores_sorted (``scores.view(-1)[order]``)."""
    node = strip_casts(node)
    if is_op(node, "reshape", "view", "unsqueeze") and is_op(node.args[0], "getitem"):
        inner = node.args[0]
        if isinstance(inner.args[1], fx.Node) and fake(inner.args[0]) is not None and fake(inner.args[0]).dim() == 1:
            return inner
    return None


def _output_scaling(src: fx.Node, down: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(mul, sorted scores, expert output before the mul) of ``(y.float() * scores_sorted.reshape(-1, 1)).to(dt)``."""
    mul = strip_casts(src)
    expect(is_op(mul, "mul"), "no multiplication of the expert outputs by the router weights (before or after)")
    for y, s in (mul.args, mul.args[::-1]):
        scores = _scores_column(s) if isinstance(s, fx.Node) else None
        if scores is not None:
            return mul, scores, strip_casts(y)
    raise Miss("the expert outputs are multiplied by something other than the sorted router weights")


def _scores(scores_sorted: fx.Node, order: fx.Node) -> fx.Node:
    expect(scores_sorted.args[1] is order, "router weights are not sorted by the same order as the rows")
    flat = scores_sorted.args[0]
    return _flat_of(flat)


def _flat_of(node: fx.Node) -> fx.Node:
    expect(is_op(node, "view", "reshape", "flatten") and fake(node.args[0]) is not None and fake(node.args[0]).dim() == 2,
            f"{node.name} is not a flat view of a [T, K] tensor")
    return node.args[0]


def _sorted_ids(order: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(ids [T, K], flat ids) of ``argsort(ids.view(-1))`` or ``sort(ids.view(-1))[1]``."""
    if is_op(order, "argsort"):
        flat = order.args[0]
        expect(not arg(order, 2, "descending", False), "expert ids sorted descending")
    elif is_op(order, "getitem") and order.args[1] == 1 and is_op(order.args[0], "sort"):
        flat = order.args[0].args[0]
    else:
        raise Miss(f"rows are ordered by {op_name(order)}, not argsort of the expert ids")
    return _flat_of(flat), flat
