"""Recognizer for gpt-fast's weight gather: index the expert weights by each token's expert ids.

    w1_TKIH = w1[ids]; w3_TKIH = w3[ids]; w2_TKHI = w2[ids]         # ids [T, K]; w1, w3 [E, I, H], w2 [E, H, I]
    h = silu(einsum("ti,taoi->tao", x, w1_TKIH)) * einsum("ti,taoi->tao", x, w3_TKIH)
    y = einsum("tao,taio->tai", h, w2_TKHI)
    out = einsum("tai,ta->ti", y, weights)                             # <- region output

A fused gate_up (one up einsum and a row-wise chunk) matches too. The einsum letters may be any;
what is checked is their roles: tokens and slots kept, the weight's in-dimension contracted.
"""

from __future__ import annotations

import torch.fx as fx

from moe_fx.passes.graph_utils import einsum_parts, fake, is_graph_input, is_op, nearest_downstream, owner_path
from moe_fx.passes.matching import blame, expect, row_functions
from moe_fx.passes.region import ExpertProjection, MoERegion, NoMatch

FORM = "weight_gather_einsum"


def _gathered_weight(node) -> tuple[fx.Node, fx.Node] | None:
    """(3-D parameter, ids) of ``W[ids]`` with ids [T, K]."""
    if is_op(node, "getitem") and is_graph_input(node.args[0]) and isinstance(node.args[1], fx.Node):
        weight, ids = node.args
        if fake(weight) is not None and fake(weight).dim() == 3 and fake(ids) is not None and fake(ids).dim() == 2:
            return weight, ids
    return None


def is_weight_gather_einsum(node: fx.Node) -> bool:
    parsed = einsum_parts(node)
    return parsed is not None and len(parsed[2]) == 2 and _gathered_weight(parsed[2][1]) is not None


def match_weight_gather(anchor: fx.Node) -> MoERegion | NoMatch | None:
    """Recognize the form anchored at its first expert einsum; None if ``anchor`` is a later one."""
    weight, ids = _gathered_weight(einsum_parts(anchor)[2][1])
    einsums = sorted(e for g in ids.users if _gathered_weight(g) is not None for e in g.users if is_weight_gather_einsum(e))
    if einsums[0] is not anchor:
        return None
    block = owner_path(weight)
    with blame(block):
        return _region(einsums, ids, block)


def _projection(einsum: fx.Node, rows_rank: int) -> tuple[fx.Node, ExpertProjection]:
    """(row operand, projection) of ``einsum("<rows>,<t a p q>-><t a out>", rows, W[ids])``: the row
    operand is [T, H] (``ti``) or [T, K, I] (``tai``); its last letter must be contracted."""
    (rows_subs, w_subs), out_subs, (rows, gathered) = einsum_parts(einsum)
    weight, _ = _gathered_weight(gathered)
    expect(len(w_subs) == 4 and len(rows_subs) == rows_rank and len(out_subs) == 3,
            f"{einsum.name}: einsum {rows_subs},{w_subs}->{out_subs} is not rows x W[ids]")
    t, a, p, q = w_subs
    contracted = rows_subs[-1]
    expect(rows_subs[0] == t and (rows_rank == 2 or rows_subs[1] == a) and contracted in (p, q) and contracted not in out_subs,
            f"{einsum.name}: einsum {rows_subs},{w_subs}->{out_subs} does not contract the rows with the weight's in-dimension")
    other = p if contracted == q else q
    expect(out_subs == t + a + other, f"{einsum.name}: einsum output {out_subs} is not [tokens, slots, out]")
    return rows, ExpertProjection(weight=weight, layout="out_in" if contracted == q else "in_out")


def _region(einsums: list[fx.Node], ids: fx.Node, block: str) -> MoERegion:
    expect(len(einsums) in (2, 3), f"{len(einsums)} einsums read weights gathered by one id tensor (expected w1 [w3] w2)")
    reads = {e: einsum_parts(e)[2][0] for e in einsums}
    ups = [e for e in einsums if fake(reads[e]).dim() == 2]
    downs = [e for e in einsums if fake(reads[e]).dim() == 3]
    expect(len(downs) == 1 and len(ups) == len(einsums) - 1, "expected input einsums on [T, H] rows and one output einsum on [T, K, I]")
    down = downs[0]
    hidden, up = _projection(ups[0], 2)
    side = tuple(_projection(e, 2) for e in ups[1:])
    expect(all(rows is hidden for rows, _ in side), "the input einsums read different hidden states")
    down_in, down_p = _projection(down, 3)
    t, k = fake(ids).shape
    # the combine: einsum("tai,ta->ti", y, weights)
    output = nearest_downstream(down, lambda u: einsum_parts(u) is not None and len(einsum_parts(u)[2]) == 2
                                and fake(einsum_parts(u)[2][1]) is not None and fake(einsum_parts(u)[2][1]).dim() == 2)
    expect(output is not None, "no einsum weighting the expert outputs by [T, K] router weights")
    (y_subs, w_subs), out_subs, (y, weights) = einsum_parts(output)
    expect(len(y_subs) == 3 and w_subs == y_subs[:2] and out_subs == y_subs[0] + y_subs[2],
            f"combine einsum {y_subs},{w_subs}->{out_subs} is not a weighted sum over the slots")
    expect(tuple(fake(weights).shape) == (t, k), "router weights are not [T, K]")
    act, post = row_functions(up=ups[0], down_in=down_in, down=down, down_out=down, y=y, weighting=output,
                              row_ids=ids, block=block, form=FORM, side_ups=tuple(ups[1:]))
    gathers = {e.args[-1] if not isinstance(e.args[1], (list, tuple)) else e.args[1][1] for e in einsums}
    nodes = {*einsums, *gathers, output, *act.nodes, *post.nodes}
    return MoERegion(
        block=block, form=FORM, hidden=hidden, topk_ids=ids, topk_weights=weights, up=up, activation=act,
        down=down_p, post=post if post.nodes else None, output=output, nodes=frozenset(nodes),
        num_experts=fake(up.weight).shape[0], top_k=k, hidden_size=up.features()[0],
        intermediate_size=down_p.features()[0], dtype=up.dtype, side_up=tuple(p for _, p in side),
    )
