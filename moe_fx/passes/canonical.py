"""Exact rewrites of experts spellings into the ones the recognizers know, run before them.

Each rewrite computes the same products and sums as the code it replaces, only spelled otherwise
(the dense combine's sum over experts may round in another order), so a block no recognizer then
claims still computes what the user wrote:

    W[ids, ...]                                  -> W[ids]                       (gpt-oss reference)
    einsum("beck,bk->bec", W[ids], x)            -> einsum("bk,beck->bec", x, W[ids])
    einsum("ti,taoi->tao", x, chunk(W[ids], 2, dim=2)[j])
                                                 -> chunk(einsum("ti,taoi->tao", x, W[ids]), 2, dim=2)[j]
                                                    (SGLang's fused w13; one einsum for both halves)
    einsum("th,ehf->etf", x, W)                  -> bmm(x.repeat(E, 1).view(E, -1, H), W)   (dense)
    einsum("eti,eih->eth", h, W)                 -> bmm(h, W)
    einsum("eth,te->th", y, scores)              -> (y * scores.transpose(0, 1).unsqueeze(-1)).sum(0)
                                                    (only for y computed by such a bmm)

Letters are read by their roles (which operand is a parameter, which letters are contracted),
never by name. W is a graph input (a parameter) with a leading expert dim; ids an integer tensor.

A respelling stays only where a recognizer then claims it (``keep_claimed``): elsewhere the user's
spelling comes back, so a graph with no MoE block, or a block left as traced, is not touched (the
dense respelling would hold E copies of x where the einsum held none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_fx.passes.emit import EmittingTracer
from moe_fx.passes.graph_utils import depends_on, einsum_parts, fake, is_graph_input, is_op


@dataclass(frozen=True)
class Respelling:
    """One rewrite applied: the nodes it emitted (or edited), and how to put the user's back."""

    nodes: tuple[fx.Node, ...]
    undo: Callable[[], None]


def canonicalize(graph: fx.Graph) -> list[Respelling]:
    """Apply the rewrites above in place, in graph order."""
    tracer = EmittingTracer(graph)
    done: list[Respelling] = []
    dense_bmms: list[fx.Node] = []
    for node in list(graph.nodes):
        if node.graph is None:  # erased by an earlier rewrite
            continue
        if _is_ellipsis_gather(node):
            done.append(_drop_ellipsis(node))
        elif (parts := einsum_parts(node)) is not None and len(parts[2]) == 2:
            new = _weight_second(node, parts, tracer) or _chunk_after(node, parts, tracer) \
                or _dense(node, parts, tracer, dense_bmms)
            if new is not None:
                done.append(new)
    return done


def keep_claimed(respellings: list[Respelling], claimed: set[fx.Node]) -> None:
    """Undo every respelling none of whose nodes a rewritten region holds (latest first: a later
    rewrite may read an earlier one's nodes)."""
    for respelling in reversed(respellings):
        if claimed.isdisjoint(respelling.nodes):
            respelling.undo()


def _drop_ellipsis(node: fx.Node) -> Respelling:
    before = node.args
    node.args = (before[0], before[1][0])

    def undo():
        node.args = before

    return Respelling(nodes=(node,), undo=undo)


def _gathered(node) -> bool:
    """``W[ids]``: a parameter with a leading expert dim indexed by an integer tensor."""
    return (is_op(node, "getitem") and is_graph_input(node.args[0]) and isinstance(node.args[1], fx.Node)
            and fake(node.args[1]) is not None and not fake(node.args[1]).is_floating_point()
            and fake(node.args[0]) is not None and fake(node.args[0]).dim() >= 2)


def _is_ellipsis_gather(node: fx.Node) -> bool:
    index = node.args[1] if is_op(node, "getitem") else None
    return (isinstance(index, tuple) and len(index) == 2 and index[1] is Ellipsis and is_graph_input(node.args[0])
            and isinstance(index[0], fx.Node) and fake(index[0]) is not None and not fake(index[0]).is_floating_point())


def _replace(node: fx.Node, tracer: EmittingTracer, build) -> Respelling:
    """Emit ``build(proxy)`` before ``node``, move its uses there and erase it."""
    graph, previous = node.graph, node.prev
    with graph.inserting_before(node):
        new = build(tracer.proxy).node
    emitted = []
    cursor = previous.next
    while cursor is not node:
        emitted.append(cursor)
        cursor = cursor.next
    op, target, args, kwargs, meta, name = node.op, node.target, node.args, node.kwargs, dict(node.meta), node.name
    node.replace_all_uses_with(new)
    graph.erase_node(node)

    def undo():
        with graph.inserting_before(new):
            original = graph.create_node(op, target, args, kwargs, name=name)
        original.meta.update(meta)
        new.replace_all_uses_with(original)
        for emitted_node in reversed(emitted):
            if not emitted_node.users:
                graph.erase_node(emitted_node)

    return Respelling(nodes=tuple(emitted), undo=undo)


def _weight_second(node: fx.Node, parts, tracer) -> Respelling | None:
    (a_subs, b_subs), out, (a, b) = parts
    if not _gathered(a) or _gathered(b):
        return None
    return _replace(node, tracer, lambda p: torch.einsum(f"{b_subs},{a_subs}->{out}", p(b), p(a)))


def _chunk_after(node: fx.Node, parts, tracer) -> Respelling | None:
    """``einsum(eq, x, chunk(W[ids], n, d)[j])`` with d a kept letter -> a chunk of the einsum on W[ids]."""
    (rows_subs, w_subs), out, (rows, piece) = parts
    chunk = piece.args[0] if is_op(piece, "getitem") and isinstance(piece.args[1], int) else None
    if not is_op(chunk, "chunk") or not _gathered(chunk.args[0]):
        return None
    n = chunk.args[1] if len(chunk.args) > 1 else chunk.kwargs.get("chunks")
    dim = chunk.args[2] if len(chunk.args) > 2 else chunk.kwargs.get("dim", 0)
    if not isinstance(n, int) or not isinstance(dim, int) or len(w_subs) != fake(chunk.args[0]).dim():
        return None
    letter = w_subs[dim]
    if letter not in out or letter in rows_subs:
        return None
    gathered, j, eq = chunk.args[0], piece.args[1], node.args[0].replace(" ", "")
    # the halves' einsums become one: reuse it when the other half made it already
    full = next((u for u in gathered.users if is_op(u, "einsum") and u.args[0] == eq and tuple(u.args[1:]) == (rows, gathered)), None)
    if full is not None:
        return _replace(node, tracer, lambda p: p(full).chunk(n, dim=out.index(letter) - len(out))[j])
    return _replace(node, tracer, lambda p: torch.einsum(eq, p(rows), p(gathered)).chunk(n, dim=out.index(letter) - len(out))[j])


def _dense(node: fx.Node, parts, tracer, dense_bmms: list[fx.Node]) -> Respelling | None:
    """Dense all-experts einsums -> the bmm spelling of passes/dense_experts.py."""
    (a_subs, b_subs), out, (a, b) = parts
    fa, fb = fake(a), fake(b)
    if fa is None or fb is None:
        return None
    if len(a_subs) == 2 and len(b_subs) == 3 and is_graph_input(b) and len(out) == 3:
        t, h = a_subs  # "th,ehf->etf": every token through every expert
        e, h2, f = b_subs
        if h2 == h and out == e + t + f and len({t, h, e, f}) == 4:
            experts, hidden = fb.shape[0], fa.shape[1]
            new = _replace(node, tracer, lambda p: torch.bmm(p(a).repeat(experts, 1).view(experts, -1, hidden), p(b)))
            dense_bmms.append(new.nodes[-1])
            return new
    if len(a_subs) == 3 and len(b_subs) == 3 and is_graph_input(b) and not is_graph_input(a):
        e, t, i = a_subs  # "eti,eih->eth"
        e2, i2, h = b_subs
        if e2 == e and i2 == i and out == e + t + h and len({e, t, i, h}) == 4:
            new = _replace(node, tracer, lambda p: torch.bmm(p(a), p(b)))
            dense_bmms.append(new.nodes[-1])
            return new
    if len(a_subs) == 3 and len(b_subs) == 2 and any(depends_on(a, m) for m in dense_bmms):
        e, t, h = a_subs  # "eth,te->th": the experts' outputs weighted by [T, E] scores
        if b_subs == t + e and out == t + h and len({e, t, h}) == 3:
            return _replace(node, tracer, lambda p: (p(a) * p(b).transpose(0, 1).unsqueeze(-1)).sum(0))
    return None

