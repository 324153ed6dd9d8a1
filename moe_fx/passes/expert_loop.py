"""Recognizer for static expert loops (Mixtral in transformers 4.x, mistral-inference, research code).

    out = zeros_like(x)                                    # or a shared expert's output
    mask = one_hot(ids, E).permute(2, 1, 0)                # [E, K, T]; or ids == e in the loop
    for e in range(E):                                     # unrolled by dynamo: E copies
        slot, tok = torch.where(mask[e])                   # (tok, slot) = torch.where(ids == e)
        y = expert_e(x[tok]) * weights[tok, slot, None]    # expert_e: nn.Linear modules or W[e]
        out.index_add_(0, tok, y)                          # or out[tok] += y, out.index_put_(..., accumulate=True)

Two more spellings of the same loop:

    # makeMoE: a token-only mask, weights from a [T, E] gate matrix (softmax of sparse logits)
    tok = torch.where((ids == e).any(-1))[0]
    out.index_add_(0, tok, expert_e(x[tok]) * gates_TE[tok, e].unsqueeze(1))

    # masked assignment (DeepSeek's HF remote code, DeepSeek-MoE, MiniMind; vLLM's torch_moe)
    x_rep = x.repeat_interleave(K, dim=0)                  # or x.view(T, -1, H).repeat(1, K, 1).reshape(-1, H)
    y = torch.empty_like(x_rep)
    for e in range(E):
        y[ids.view(-1) == e] = expert_e(x_rep[ids.view(-1) == e])
    out = (y.view(T, K, H) * weights.unsqueeze(-1)).sum(1)   # <- region output

``torch.where`` and boolean-mask indexing have a data-dependent size: dynamo captures it only with
``capture_dynamic_output_shape_ops`` (which ``fullgraph=True`` turns on from torch 2.10).

Every unrolled copy must compute the same function: the same row-wise activation (compared node
by node), the same projection layouts, and parameters of its own only inside the projections
(an nn.Linear weight and bias, or ``W[e]``). The first copy's activation is replayed for all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_fx.passes.graph_utils import (
    arg, chain, fake, int_value, is_graph_input, is_op, op_name, same_size, size_guards, strip_casts, upstream,
)
from moe_fx.passes.expert_params import ExpertFn, ExpertLinear, expert_matmuls, experts_owner, stack_experts
from moe_fx.passes.matching import ZERO_CONSTRUCTORS, Miss, blame, expect, row_functions
from moe_fx.passes.region import MoERegion, NoMatch, RowFn

FORM = "expert_loop"
REQUIRES = "fullgraph=True (or torch._dynamo.config.capture_dynamic_output_shape_ops=True) to capture torch.where"
MASKED_REQUIRES = ("fullgraph=True (or torch._dynamo.config.capture_dynamic_output_shape_ops=True) to capture "
                   "boolean-mask indexing")



@dataclass(frozen=True)
class _Update:
    """One ``out.index_add_(0, tok, contribution)`` (or its setitem / index_put_ spelling)."""

    node: fx.Node  # the in-place update of the accumulator
    tok: fx.Node
    contribution: fx.Node
    nodes: tuple[fx.Node, ...]  # helper nodes of the spelling (out[tok], iadd)
    assign: bool = False  # ``y[ids.view(-1) == e] = ...``: rows of (token, slot) pairs, each written once


@dataclass(frozen=True)
class _Expert:
    """One unrolled loop iteration."""

    expert: int
    ids: fx.Node
    weights: fx.Node
    hidden: fx.Node
    ups: tuple[ExpertLinear, ...]
    down: ExpertLinear
    activation: RowFn
    post: RowFn
    update: _Update
    nodes: frozenset[fx.Node]
    dense: bool = False  # weights read as gates_TE[tok, e] of a [T, E] matrix (makeMoE)


def is_loop_accumulator(node: fx.Node) -> bool:
    """A tensor updated in place on selected rows at least twice (the anchor of this form)."""
    return fake(node) is not None and fake(node).dim() == 2 and sum(_as_update(u, node) is not None for u in node.users) >= 2


def _as_update(node: fx.Node, acc: fx.Node) -> _Update | None:
    if is_op(node, "index_add_") and node.args[0] is acc and arg(node, 1, "dim") in (0, -2):
        return _Update(node, arg(node, 2, "index"), arg(node, 3, "source"), ())
    if is_op(node, "index_put_") and node.args[0] is acc and arg(node, 3, "accumulate", False):
        indices = arg(node, 1, "indices")
        if isinstance(indices, (tuple, list)) and len(indices) == 1:
            return _Update(node, indices[0], arg(node, 2, "values"), ())
    if is_op(node, "setitem") and node.args[0] is acc and _is_bool(node.args[1]) and isinstance(node.args[2], fx.Node):
        return _Update(node, node.args[1], node.args[2], (), assign=True)
    if is_op(node, "setitem") and node.args[0] is acc and isinstance(node.args[1], fx.Node):
        tok, value = node.args[1], node.args[2]
        if is_op(value, "iadd", "add") and is_op(value.args[0], "getitem"):
            read = value.args[0]
            if read.args[0] is acc and read.args[1] is tok:
                return _Update(node, tok, value.args[1], (value, read))
    return None


def _is_bool(node) -> bool:
    return fake(node) is not None and fake(node).dtype == torch.bool


def match_expert_loop(acc: fx.Node) -> MoERegion | NoMatch | None:
    """Recognize a static expert loop accumulating into ``acc``; None if ``acc`` is no accumulator."""
    updates = [update for u in sorted(acc.users) if (update := _as_update(u, acc)) is not None]
    if len(updates) < 2:
        return None
    block = _block_guess(updates)
    with blame(block):
        if any(u.assign for u in updates):
            expect(all(u.assign for u in updates), "the loop both assigns and accumulates rows of one tensor")
            return _masked_region(acc, [_masked_iteration(update, block) for update in updates])
        return _region(acc, [_iteration(update, block) for update in updates])


# How far back the block's name is looked for. It names the block in messages only (a longer
# walk would reach earlier layers' parameters too); no match depends on it.
_NAMING_WALK = 400


def _block_guess(updates: list[_Update]) -> str:
    """The experts' module path, from the matrices the loop body reads (for messages)."""
    def matrices(node: fx.Node) -> set[fx.Node]:
        return {n for n in upstream(node, _NAMING_WALK) if is_graph_input(n) and fake(n) is not None and fake(n).dim() >= 2}

    # The rows' index depends on the router only: what the updates read besides belongs to the experts.
    params = set().union(*(matrices(u.node) - matrices(u.tok) for u in updates))
    return experts_owner(sorted(params)) if params else "<expert loop>"


def _iteration(update: _Update, block: str) -> _Expert:
    tok = update.tok
    expect(is_op(tok, "getitem") and isinstance(tok.args[1], int), "rows are not selected with torch.where(mask)")
    where = tok.args[0]
    expect(is_op(where, "where", "nonzero") and len(where.args) == 1, f"rows come from {op_name(where)}, not torch.where(mask)")
    expert, ids, tok_position = _mask(where.args[0])
    expect(tok.args[1] == tok_position, "the accumulated rows are the top-k slots, not the tokens (where() outputs swapped)")
    dense = is_op(where.args[0], "any")
    if dense:  # a token-only mask: its weight is gates_TE[tok, e]
        weight_rows, y, mul = _gate_weighting(update.contribution, tok, expert)
        weights, slots = weight_rows.args[0], []
        expect(fake(weights) is not None and fake(weights).dim() == 2 and same_size(fake(weights).shape[0], fake(ids).shape[0]),
               "router gates are not a [T, E] matrix")
    else:
        weight_rows, y, mul = _weighting(update.contribution, tok, where, 1 - tok_position)
        weights, slots = weight_rows.args[0], [weight_rows.args[1][1]]
        expect(fake(weights) is not None and tuple(fake(weights).shape) == tuple(fake(ids).shape),
               "router weights and expert ids differ in shape")
    ups, down = expert_matmuls(tok, y, expert)
    hidden, gather_nodes = _gathered_rows(ups[0].input, tok)
    act, post = row_functions(up=ups[0].node, down_in=down.input, down=down.node, down_out=down.node, y=y,
                              weighting=mul, row_ids=tok, block=block, form=FORM, side_ups=tuple(p.node for p in ups[1:]))
    nodes = {update.node, *update.nodes, update.contribution, mul, weight_rows, *_casts_between(update.contribution, mul),
             *_weight_row_nodes(weight_rows), where, tok, *slots, *size_guards(where), *gather_nodes, ups[0].input,
             *(n for p in (*ups, down) for n in (p.node, *p.nodes)), *act.nodes, *post.nodes, *_mask_nodes(where.args[0])}
    return _Expert(expert=expert, ids=ids, weights=weights, hidden=hidden, ups=ups, down=down, activation=act,
                   post=post, update=update, nodes=frozenset(nodes), dense=dense)


def _gate_weighting(contribution: fx.Node, tok: fx.Node, expert: int) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(``gates[tok, e]`` node, expert output, the mul) of ``expert_out * gates[tok, e].unsqueeze(1)``."""
    mul = strip_casts(contribution)
    expect(is_op(mul, "mul") and len(mul.args) == 2, f"the accumulated rows are {op_name(mul)}, not expert output * gate")
    for y, w in (mul.args, mul.args[::-1]):
        w = strip_casts(w) if isinstance(w, fx.Node) else w
        if is_op(w, "unsqueeze") and arg(w, 1, "dim") in (-1, 1):
            w = w.args[0]
        if is_op(w, "getitem") and isinstance(w.args[1], tuple) and len(w.args[1]) == 2:
            rows, column = w.args[1]
            expect(rows is tok and int_value(column) == expert,
                   f"expert {expert} reads the gates at [{getattr(rows, 'name', rows)}, {column}], not [tok, {expert}]")
            return w, y, mul
    raise Miss("the expert output is not multiplied by gates[tok, e] (router weights applied elsewhere)")


# ------------------------------------------------------------------------------------------
# Masked assignment (DeepSeek's HF remote code, DeepSeek-MoE, MiniMind, vLLM's torch_moe)
# ------------------------------------------------------------------------------------------


def _masked_iteration(update: _Update, block: str) -> _Expert:
    """One ``y[flat_ids == e] = expert_e(x_rep[flat_ids == e])``: the (token, slot) rows of expert e."""
    mask = update.tok
    expect(is_op(mask, "eq") and int_value(mask.args[1]) is not None,
           f"rows are written at {op_name(mask)}, not at flat_ids == e")
    flat, expert = mask.args[0], int_value(mask.args[1])
    ids = _flat_ids(flat)
    # the rows read: x_rep[m] for a mask m equal to this one (dynamo keeps each ``flat_ids == e``)
    same = [m for m in flat.users if is_op(m, "eq") and int_value(m.args[1]) == expert]
    reads = [g for m in same for g in m.users if is_op(g, "getitem") and g.args[1] is m and g.args[0] is not update.node.args[0]]
    expect(len(reads) == 1, f"expert {expert} reads {len(reads)} row sets at flat_ids == {expert} (expected one: x_rep[mask])")
    rows = reads[0]
    y = update.contribution
    ups, down = expert_matmuls(rows, y, expert)
    expect(ups[0].input is rows, f"expert {expert}: its input matmuls do not read x_rep[flat_ids == {expert}]")
    hidden, repeat_nodes = _repeated_rows(rows.args[0], fake(ids).shape[1])
    act, post = row_functions(up=ups[0].node, down_in=down.input, down=down.node, down_out=down.node, y=y,
                              weighting=update.node, row_ids=mask, block=block, form=FORM,
                              side_ups=tuple(p.node for p in ups[1:]))
    nodes = {update.node, *same, rows, *size_guards(rows), *repeat_nodes, y,
             *(n for p in (*ups, down) for n in (p.node, *p.nodes)), *act.nodes, *post.nodes}
    return _Expert(expert=expert, ids=ids, weights=None, hidden=hidden, ups=ups, down=down, activation=act,
                   post=post, update=update, nodes=frozenset(nodes))


def _flat_ids(flat: fx.Node) -> fx.Node:
    """ids [T, K] of ``ids.view(-1)``."""
    expect(is_op(flat, "view", "reshape", "flatten") and fake(flat.args[0]) is not None and fake(flat.args[0]).dim() == 2
           and fake(flat) is not None and fake(flat).dim() == 1, "the masks do not compare the flattened [T, K] expert ids")
    return flat.args[0]


def _repeated_rows(x_rep: fx.Node, k: int) -> tuple[fx.Node, list[fx.Node]]:
    """(hidden [T, H], nodes) of ``hidden.repeat_interleave(K, dim=0)`` or
    ``hidden.view(T, -1, H).repeat(1, K, 1).reshape(-1, H)``: token t's K rows side by side."""
    if is_op(x_rep, "repeat_interleave"):
        expect(int_value(arg(x_rep, 1, "repeats")) == k and arg(x_rep, 2, "dim") in (0, -2),
               f"tokens are not repeated K={k} times along dim 0")
        return x_rep.args[0], [x_rep]
    expect(is_op(x_rep, "reshape", "view") and is_op(x_rep.args[0], "repeat"),
           f"the experts read rows of {op_name(x_rep)}, not the tokens repeated K times")
    repeat = x_rep.args[0]
    reps = tuple(repeat.args[1:]) if not isinstance(repeat.args[1], (tuple, list)) else tuple(repeat.args[1])
    view = repeat.args[0]
    expect(tuple(int_value(r) for r in reps) == (1, k, 1) and is_op(view, "view", "reshape") and fake(view).dim() == 3
           and int_value(fake(view).shape[1]) == 1, f"tokens are not repeated K={k} times with view(T, 1, H).repeat(1, K, 1)")
    return view.args[0], [x_rep, repeat, view]


def _weighted_topk_sum(acc: fx.Node, last: fx.Node, t, k: int) -> tuple[fx.Node, fx.Node, set[fx.Node]]:
    """(router weights [T, K], sum node, nodes) of ``(y.view(T, K, H) * w.unsqueeze(-1)).sum(1)``
    read from the accumulator after its last write."""
    views = [u for u in acc.users if u > last and is_op(u, "view", "reshape")]
    expect(len(views) == 1 and len(views[0].users) == 1, "the written rows are not read back once as view(T, K, H)")
    view = views[0]
    expect(fake(view).dim() == 3 and same_size(fake(view).shape[0], t) and int_value(fake(view).shape[1]) == k,
           f"the written rows are viewed as {list(fake(view).shape)}, not [T, K={k}, H]")
    mul = next(iter(view.users))
    expect(is_op(mul, "mul", "mul_") and len(mul.args) == 2 and len(mul.users) == 1,
           "the [T, K, H] rows are not multiplied by the router weights")
    column = next(a for a in mul.args if a is not view)
    w, nodes = _weights_column(column, t, k)
    total = next(iter(mul.users))
    expect(is_op(total, "sum") and arg(total, 1, "dim") in (1, -2, (1,), [1]), "the weighted rows are not summed over K")
    return w, total, {view, mul, total, *nodes}


def _weights_column(column: fx.Node, t, k: int) -> tuple[fx.Node, list[fx.Node]]:
    """w [T, K] of ``w.unsqueeze(-1)`` or ``w.view(-1).view(T, -1, 1)`` (through casts)."""
    nodes, node = chain(column), strip_casts(column)
    if is_op(node, "unsqueeze") and arg(node, 1, "dim") in (-1, 2):
        w = node.args[0]
    else:
        expect(is_op(node, "view", "reshape") and fake(node).dim() == 3 and int_value(fake(node).shape[-1]) == 1,
               "the [T, K, H] rows are multiplied by something other than the [T, K] router weights")
        w = node.args[0]
        if fake(w).dim() == 1:
            nodes.append(w)
            w = _flat_ids(w)
    nodes.append(node)
    expect(fake(w) is not None and fake(w).dim() == 2 and same_size(fake(w).shape[0], t) and int_value(fake(w).shape[1]) == k,
           "the router weights are not [T, K]")
    return w, nodes


def _masked_region(acc: fx.Node, experts: list[_Expert]) -> MoERegion:
    region = _region(acc, experts)
    expect(is_op(acc, "empty_like", "empty", "new_empty", *ZERO_CONSTRUCTORS),
           f"the written rows start as {op_name(acc)}, not an empty tensor")
    t, k = fake(region.topk_ids).shape
    weights, total, nodes = _weighted_topk_sum(acc, region.last_update, t, k)
    return dataclasses.replace(region, topk_weights=weights, output=total, last_update=None, base=None,
                               nodes=region.nodes | nodes | {acc}, requires=MASKED_REQUIRES)


def _mask(mask: fx.Node) -> tuple[int, fx.Node, int]:
    """(expert e, ids [T, K], which where() output is the token) of ``ids == e``,
    ``one_hot(ids).permute(...)[e]`` or the token-only ``(ids == e).any(-1)``."""
    if is_op(mask, "any") and arg(mask, 1, "dim") in (-1, 1) and is_op(mask.args[0], "eq"):
        expert, ids, _ = _mask(mask.args[0])
        return expert, ids, 0
    if is_op(mask, "eq") and int_value(mask.args[1]) is not None:
        ids = mask.args[0]
        expect(fake(ids) is not None and fake(ids).dim() == 2, "the expert mask does not compare a [T, K] id tensor")
        return int_value(mask.args[1]), ids, 0
    if is_op(mask, "getitem") and isinstance(mask.args[1], int) and is_op(mask.args[0], "permute"):
        permute = mask.args[0]
        dims = tuple(permute.args[1]) if isinstance(permute.args[1], (tuple, list)) else tuple(permute.args[1:])
        one_hot = permute.args[0]
        expect(is_op(one_hot, "one_hot") and dims[0] in (2, -1), "the expert mask is not one_hot(ids, E) with experts first")
        ids = one_hot.args[0]
        expect(fake(ids) is not None and fake(ids).dim() == 2, "one_hot is not over a [T, K] id tensor")
        return mask.args[1], ids, (0 if tuple(dims[1:]) == (0, 1) else 1)
    raise Miss(f"the rows of an expert are picked by {op_name(mask)}, not ids == e or one_hot(ids, E)[e]; "
                "a loop over a data-dependent expert set cannot be captured")


def _mask_nodes(mask: fx.Node) -> list[fx.Node]:
    if is_op(mask, "eq"):
        return [mask]
    if is_op(mask, "any"):
        return [mask, mask.args[0]]
    return [mask, mask.args[0], mask.args[0].args[0]]


def _weighting(contribution: fx.Node, tok: fx.Node, where: fx.Node, slot_position: int) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(``weights[tok, slot]`` node, expert output, the mul) of ``expert_out * weights[tok, slot, None]``."""
    mul = strip_casts(contribution)
    expect(is_op(mul, "mul") and len(mul.args) == 2, f"the accumulated rows are {op_name(mul)}, not expert output * router weight")
    for y, w in (mul.args, mul.args[::-1]):
        rows = _weight_rows(w)
        if rows is not None:
            index = rows.args[1]
            slot = index[1]
            expect(index[0] is tok and is_op(slot, "getitem") and slot.args == (where, slot_position),
                    "router weights are not read at [tok, slot] of the same where()")
            return rows, y, mul
    raise Miss("the expert output is not multiplied by weights[tok, slot] (router weights applied elsewhere)")


def _weight_rows(w: fx.Node) -> fx.Node | None:
    """``weights[tok, slot, None]`` or ``weights[tok, slot].unsqueeze(-1)`` -> the indexing node."""
    w = strip_casts(w) if isinstance(w, fx.Node) else w
    if is_op(w, "unsqueeze") and arg(w, 1, "dim") in (-1, 1):
        w = w.args[0]
    if is_op(w, "getitem") and isinstance(w.args[1], tuple) and len(w.args[1]) in (2, 3):
        index = w.args[1]
        if all(isinstance(i, fx.Node) for i in index[:2]) and (len(index) == 2 or index[2] is None):
            return w
    return None


def _weight_row_nodes(rows: fx.Node) -> list[fx.Node]:
    out = []
    for u in rows.users:
        if is_op(u, "unsqueeze", "to", "float", "type_as"):
            out.append(u)
    return out


def _casts_between(top: fx.Node, bottom: fx.Node) -> list[fx.Node]:
    out = []
    while top is not bottom and is_op(top, "to", "float", "bfloat16", "half", "type_as", "type"):
        out.append(top)
        top = top.args[0]
    return out


def _gathered_rows(x_rows: fx.Node, tok: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """hidden of ``hidden[tok]`` / ``hidden[None, tok].reshape(-1, H)``, and the nodes in between."""
    nodes, node = [], x_rows
    while is_op(node, "reshape", "view", "squeeze"):
        nodes.append(node)
        node = node.args[0]
    expect(is_op(node, "getitem"), "expert input rows are not hidden[tok]")
    nodes.append(node)
    hidden, index = node.args
    expect(index is tok or (isinstance(index, tuple) and len(index) == 2 and index[0] is None and index[1] is tok),
            "expert input rows are not hidden[tok] for the where() of the same expert")
    expect(fake(hidden) is not None and fake(hidden).dim() == 2, "experts read rows of a tensor that is not [T, H]")
    return hidden, nodes


# ------------------------------------------------------------------------------------------
# All iterations -> one region
# ------------------------------------------------------------------------------------------


def _region(acc: fx.Node, experts: list[_Expert]) -> MoERegion:
    experts = sorted(experts, key=lambda x: x.expert)
    e = len(experts)
    first = experts[0]
    for x in experts[1:]:
        expect(x.dense == first.dense, f"expert {x.expert} reads its router weight otherwise than expert 0")
        expect(x.ids is first.ids and x.weights is first.weights and x.hidden is first.hidden,
                f"expert {x.expert} reads other expert ids, router weights or hidden states than expert 0")
    up, side_up, down, block = stack_experts([ExpertFn(x.expert, x.ups, x.down, x.activation, x.post) for x in experts])
    ids = first.ids
    t, k = fake(ids).shape
    num_classes = [arg(n, 1, "num_classes") for n in first.nodes if is_op(n, "one_hot")]
    expect(all(c == e for c in num_classes), f"one_hot over {num_classes[0] if num_classes else '?'} classes, loop over {e} experts")
    router_width = _scored_experts(ids)
    expect(router_width in (None, e), f"the loop covers {e} experts but the router picks among {router_width}")
    gates_width = int_value(fake(first.weights).shape[1]) if first.dense else e
    expect(gates_width == e, f"the loop covers {e} experts but the gates hold {gates_width}")
    expect(same_size(fake(first.hidden).shape[0], t), "hidden rows do not match the routed tokens")
    last = max(x.update.node for x in experts)
    stray = [u for u in acc.users if u > acc and u < last and not any(u in x.nodes for x in experts)]
    expect(not stray, f"the accumulator is read inside the loop ({stray[0].name if stray else ''})")
    nodes = set().union(*(x.nodes for x in experts))
    base = None if is_op(acc, *ZERO_CONSTRUCTORS) else acc
    if base is None:
        nodes.add(acc)
    h_in, _ = up.features()
    i_down, _ = down.features()
    return MoERegion(
        block=block, form=FORM, hidden=first.hidden, topk_ids=ids, topk_weights=first.weights, up=up,
        activation=first.activation, down=down, post=first.post if first.post.nodes else None, output=acc,
        nodes=frozenset(nodes), num_experts=e, top_k=k, hidden_size=h_in, intermediate_size=i_down,
        dtype=up.dtype, side_up=side_up, base=base, last_update=last, requires=REQUIRES, dense_scores=first.dense,
    )


def _scored_experts(ids: fx.Node) -> int | None:
    """How many experts the router chose among, when ids are ``topk(scores)[1]``."""
    if is_op(ids, "getitem") and ids.args[1] == 1 and is_op(ids.args[0], "topk"):
        scores = fake(ids.args[0].args[0])
        return int_value(scores.shape[-1]) if scores is not None else None
    return None
