"""Recognizer for dense all-experts forms: every expert runs on every token, a [T, E] score
matrix that is zero outside each token's top-k decides what counts.

Llama 4 (router scores on the input)::

    scores_TE = sigmoid(full_like(logits, -inf).scatter_(1, ids, top_logits))   # or zeros.scatter(1, ids, w)
    rows = hidden.repeat(E, 1) * scores_TE.transpose(0, 1).reshape(-1, 1)      # [E*T, H]
    h = bmm(rows.view(E, -1, H), W_gate_up)                                     # W [E, H, N]
    y = bmm(act(h), W_down).view(-1, H)
    out = y.reshape(E, -1, H).sum(0)                                            # <- region output

Masked dense (scores on the output)::

    y_ETH = bmm(act(bmm(hidden.repeat(E, 1).view(E, -1, H), W_up)), W_down)
    out = (y_ETH * scores_TE.transpose(0, 1).unsqueeze(-1)).sum(0)             # <- region output

    # Qwen3-VL-MoE (transformers 4.x): batch and sequence kept apart, out [B, S, H]
    out = (y_ETH.reshape(E, B, -1, H) * scores_TE.transpose(0, 1).view(E, B, -1)[..., None]).sum(0)

Both equal the top-k sparse computation because the scores vanish outside top-k; with the scores
on the input this also needs every expert to map zero rows to zero (no biases, an activation
with act(0) * ... = 0), which is checked.
"""

from __future__ import annotations

import torch.fx as fx

from moe_fx.passes.graph_utils import arg, depends_on, fake, int_value, is_graph_input, is_op, nearest_downstream, op_name, owner_path, same_size, strip_casts
from moe_fx.passes.matching import blame, expect, row_functions
from moe_fx.passes.region import ExpertProjection, MoERegion, NoMatch

FORM = "dense_bmm"

# Ops that keep zero rows zero (a row of zeros in, a row of zeros out).
_ZERO_PRESERVING = frozenset(
    "chunk split getitem silu gelu relu tanh mul imul neg to float bfloat16 half type_as contiguous".split()
)


def _expert_rows(node: fx.Node) -> tuple[fx.Node, int, fx.Node | None] | None:
    """(hidden, E, scores on the input or None) of ``hidden.repeat(E, 1)[* s].view(E, -1, H)``."""
    if not is_op(node, "view", "reshape"):
        return None
    rows, scale = node.args[0], None
    if is_op(rows, "mul"):
        a, b = rows.args
        rows, scale = (a, b) if is_op(a, "repeat") else (b, a)
    if not is_op(rows, "repeat") or len(rows.args) != 3 or int_value(rows.args[2]) != 1:
        return None
    return rows.args[0], int_value(rows.args[1]), scale


def is_dense_bmm(node: fx.Node) -> bool:
    """``bmm(hidden.repeat(E, 1)....view(E, -1, H), W)`` with W a 3-D parameter."""
    return is_op(node, "bmm") and is_graph_input(node.args[1]) and _expert_rows(node.args[0]) is not None


def match_dense(up_bmm: fx.Node) -> MoERegion | NoMatch | None:
    """The region of a dense form, a near-miss, or None where one bmm over a 3-D parameter is all
    there is (per-head projections are spelled so too: no experts, nothing to report)."""
    if _down_bmm(up_bmm) is None:
        return None
    hidden, e, scale = _expert_rows(up_bmm.args[0])
    block = owner_path(up_bmm.args[1])
    with blame(block):
        return _region(up_bmm, hidden, e, scale, block)


def _sparse_scores(scores: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """topk ids of a [T, E] score matrix zero outside them: ``[cast] sigmoid([cast] full(-inf).scatter_(1, ids, v))``
    or ``zeros.scatter(1, ids, v)``; and the nodes in between."""
    chain, node = [], scores
    node = strip_casts(node)
    sigmoid = is_op(node, "sigmoid")
    if sigmoid:
        node = strip_casts(node.args[0])
    expect(is_op(node, "scatter", "scatter_") and arg(node, 1, "dim") in (1, -1),
            f"the [T, E] scores come from {op_name(node)}, not a scatter of the top-k values (nothing proves them zero elsewhere)")
    filled = node.args[0]
    fill = arg(filled, 1, "fill_value") if is_op(filled, "full_like") else (0 if is_op(filled, "zeros_like", "zeros", "new_zeros") else None)
    expect(fill == (float("-inf") if sigmoid else 0),
            "the [T, E] scores are not zero outside the top-k (scatter into zeros, or sigmoid of a scatter into -inf)")
    ids = arg(node, 2, "index")
    expect(fake(ids) is not None and fake(ids).dim() == 2, "scattered ids are not [T, K]")
    return ids, chain


def _scores_column(node: fx.Node, e: int) -> fx.Node:
    """scores_TE of ``scores_TE.transpose(0, 1).reshape(-1, 1)`` / ``.t().unsqueeze(-1)`` /
    ``.transpose(0, 1).view(E, B, -1)[..., None]``."""
    node = strip_casts(node)
    expect(_column_link(node), "experts' rows are scaled by something other than the [T, E] scores")
    chain = _column_nodes(node)
    expect(is_op(chain[-1], "transpose", "t", "permute"), "the [T, E] scores are not transposed to expert-major")
    scores = chain[-1].args[0]
    expect(fake(scores) is not None and fake(scores).dim() == 2 and same_size(fake(scores).shape[1], e),
            f"the scores are not [T, E={e}]")
    return scores


def _region(up_bmm: fx.Node, hidden: fx.Node, e: int, scale: fx.Node | None, block: str) -> MoERegion:
    up_w = up_bmm.args[1]
    expect(fake(up_w).shape[0] == e, f"the tokens are repeated {e} times for {fake(up_w).shape[0]} experts")
    down = _down_bmm(up_bmm)
    down_w = down.args[1]
    expect(fake(down_w).shape[0] == e, "the two expert weights hold different expert counts")
    # [E, T, H] -> [T, H]: a sum over the expert dim, with the scores applied on the way if not on the input
    total = nearest_downstream(down, lambda n: is_op(n, "sum") and arg(n, 1, "dim") in (0, (0,), [0]))
    expect(total is not None, "expert outputs are not summed over the experts")
    out_shape = fake(total).shape if fake(total) is not None else ()
    expect(len(out_shape) == 2 or all(isinstance(d, int) for d in out_shape),
           f"the experts' sum is {tuple(out_shape)} with symbolic sizes, not [T, H]")
    mul_out = [n for n in _between(down, total) if is_op(n, "mul")]
    if scale is not None:
        expect(not mul_out, "router scores applied both before and after the experts")
        scores = _scores_column(scale, e)
        weighted, y_end, post_consumer = None, _before(total, down), total
    else:
        expect(len(mul_out) == 1, "the expert outputs are not multiplied by the [T, E] scores")
        weighted = mul_out[0]
        columns = [a for a in weighted.args if _scores_column_node(a)]
        expect(len(columns) == 1, "the expert outputs are not multiplied by the transposed [T, E] scores")
        scores = _scores_column(columns[0], e)
        y_end = next(a for a in weighted.args if a is not columns[0])
        column = fake(columns[0])
        expect(column is not None and column.shape[-1] == 1 and fake(y_end) is not None
               and tuple(column.shape[:-1]) == tuple(fake(y_end).shape[:-1]),
               "the [T, E] scores are not laid out like the expert outputs they weight")
        y_end = _unviewed(y_end, down)  # Qwen3-VL's [E, B, S, H] view of [E, T, H]
        post_consumer = weighted
    ids, _ = _sparse_scores(scores)
    t, k = fake(ids).shape
    expect(same_size(fake(hidden).shape[0], t), "hidden rows do not match the routed tokens")
    act, post = row_functions(up=up_bmm, down_in=down.args[0], down=down, down_out=down, y=y_end,
                              weighting=post_consumer, row_ids=ids, block=block, form=FORM)
    if scale is not None:
        bad = [n for n in (*act.nodes, *post.nodes) if op_name(n) not in _ZERO_PRESERVING and not is_op(n, "view", "reshape")]
        expect(not bad, f"{op_name(bad[0]) if bad else ''}: with scores on the input, every expert must map zero rows "
                "to zero for the dense form to equal the top-k one")
    nodes = {up_bmm, down, total, *_between(down, total), *act.nodes, *post.nodes, *_rows_nodes(up_bmm.args[0])}
    if weighted is not None:
        nodes |= {n for a in weighted.args if _scores_column_node(a) for n in _column_nodes(a)}
    up = ExpertProjection(weight=up_w, layout="in_out")
    down_p = ExpertProjection(weight=down_w, layout="in_out")
    return MoERegion(
        block=block, form=FORM, hidden=hidden, topk_ids=ids, topk_weights=scores, up=up, activation=act, down=down_p,
        post=post if post.nodes else None, output=total, nodes=frozenset(nodes), num_experts=e, top_k=k,
        hidden_size=up.features()[0], intermediate_size=down_p.features()[0], dtype=up.dtype,
        weights_on_input=scale is not None, dense_scores=True,
    )


def _down_bmm(up_bmm: fx.Node) -> fx.Node | None:
    return nearest_downstream(up_bmm, lambda n: is_op(n, "bmm") and is_graph_input(n.args[1]))


def _scores_column_node(node) -> bool:
    """``scores.transpose(0, 1).reshape(-1, 1)``-like (through casts): views, an unsqueeze or a
    ``[..., None]`` over the transposed scores."""
    if not isinstance(node, fx.Node):
        return False
    node = strip_casts(node)
    return _column_link(node) and is_op(_column_nodes(node)[-1], "transpose", "t", "permute")


def _column_link(node: fx.Node) -> bool:
    """A step of the column: a view, reshape or unsqueeze, or ``[..., None]`` (a trailing new axis)."""
    if is_op(node, "reshape", "view", "unsqueeze"):
        return True
    return is_op(node, "getitem") and node.args[1] == (Ellipsis, None)


def _column_nodes(column: fx.Node) -> list[fx.Node]:
    """The column's steps, from ``column`` back to the transpose (included) or to where they stop."""
    out, node = [], column
    while isinstance(node, fx.Node) and _column_link(node):
        out.append(node)
        node = node.args[0]
    return [*out, node]


def _rows_nodes(view: fx.Node) -> list[fx.Node]:
    out, rows = [view], view.args[0]
    out.append(rows)
    if is_op(rows, "mul"):
        out.extend(a for a in rows.args if is_op(a, "repeat"))
        out.extend(n for a in rows.args if _scores_column_node(a) for n in _column_nodes(a))
    return out


def _before(total: fx.Node, down: fx.Node) -> fx.Node:
    """The last node before the [E, T, H] view that is summed: what the post-expert code ends with."""
    return _unviewed(total.args[0], down)


def _unviewed(node: fx.Node, down: fx.Node) -> fx.Node:
    """``node`` without the views and reshapes between it and ``down``'s rows."""
    while is_op(node, "view", "reshape") and node is not down:
        node = node.args[0]
    return node


def _between(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    out, stack, seen = [], [end], {end}
    while stack:
        node = stack.pop()
        for a in node.all_input_nodes:
            if a is start or a in seen:
                continue
            if depends_on(a, start):
                seen.add(a)
                out.append(a)
                stack.append(a)
    return out
