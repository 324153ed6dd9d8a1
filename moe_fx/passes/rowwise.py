"""Extracting the row-wise parts of traced experts code (activation, biases, post-expert norm).

The rewrite keeps the model's own activation: the nodes between the two expert matmuls are copied
into the rewritten graph and applied to the dispatched rows. That is only correct if every node
treats rows independently, so each node must be on an allow-list (elementwise math, last-dim
splits and reductions, column slices) and may read only: the matmul output, per-expert parameters
gathered by the row's expert id (``bias[row_ids]``), whole parameters, and scalars.
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

from moe_fx.passes.graph_utils import arg, fake, is_expert_gather, is_graph_input, is_op, op_name, strip_casts
from moe_fx.passes.region import NoMatch, RowFn

# Row-independent whatever their arguments (scalars and broadcasts only touch columns).
ELEMENTWISE = frozenset(
    """add sub mul truediv floordiv neg pow iadd isub imul itruediv add_ sub_ mul_ div div_ clamp
    clamp_ clip clip_ sigmoid sigmoid_ silu silu_ gelu relu relu_ tanh tanh_ exp exp_ erf rsqrt sqrt
    abs square log reciprocal softplus mish leaky_relu elu selu hardswish hardsigmoid to float
    bfloat16 half int long type_as contiguous masked_fill masked_fill_ minimum maximum where ge gt le lt
    eq ne logical_not logical_and logical_or invert and_ or_""".split()
)
# Row-independent when they act on the last dimension.
_LAST_DIM = {"chunk": (1, "dim"), "split": (1, "dim"), "unbind": (0, "dim"), "mean": (0, "dim"),
             "sum": (0, "dim"), "amax": (0, "dim"), "softmax": (0, "dim")}
_ACTIVATIONS = ("silu", "gelu", "relu", "sigmoid", "tanh", "clamp", "softplus", "mish", "elu")


def mutates(node: fx.Node) -> bool:
    """In-place ops: ``x.add_(y)``, ``x[i] = y``."""
    name = op_name(node)
    if name in ("and_", "or_"):  # operator.and_ / Tensor.__and__ are not in-place, whatever their names
        return False
    return name == "setitem" or (name.endswith("_") and not name.endswith("__"))


def _is_last_dim(node: fx.Node, rank: int) -> bool:
    index, key = _LAST_DIM[op_name(node)]
    dim = arg(node, index + 1, key, 0 if op_name(node) == "unbind" else None)
    return isinstance(dim, int) and dim in (-1, rank - 1)


def _is_column_slice(index) -> bool:
    """``x[..., ::2]`` or ``x[:, a:b]``: rows untouched."""
    if not isinstance(index, tuple) or not index:
        return False
    head = index[0]
    return head is Ellipsis or head == slice(None, None, None)


def _row_safe(node: fx.Node, rows_rank: int) -> bool:
    name = op_name(node)
    if name in ELEMENTWISE:
        return True
    if name in _LAST_DIM:
        return _is_last_dim(node, rows_rank)
    if name == "unsqueeze":  # a per-row scalar becomes a column: x[:, None]
        dim = arg(node, 1, "dim")
        return isinstance(dim, int) and dim in (-1, fake(node).dim() - 1) and dim != 0
    if name == "getitem":
        source, index = node.args
        if fake(source) is None:  # indexing the tuple of a chunk / split
            return isinstance(index, int)
        return _is_column_slice(index)
    return False


def _is_param(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    grapharg = node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", "")
    where = source or node.name
    return node.op == "placeholder" and ("_parameters" in where or "_buffers" in where)


def _describe(nodes: list[fx.Node], two_inputs: bool = False) -> str:
    names = [op_name(n) for n in nodes]
    acts = sorted({n.rstrip("_") for n in names if n.rstrip("_") in _ACTIVATIONS})
    gated = two_inputs or any(n in ("chunk", "split") for n in names) or any(
        is_op(n, "getitem") and fake(n.args[0]) is not None for n in nodes
    )
    biased = any(is_op(n, "add_", "add") and any(is_op(a, "getitem") and is_graph_input(a.args[0]) for a in n.all_input_nodes) for n in nodes)
    label = "+".join(acts) if acts else "identity"
    return f"{'gated ' if gated else ''}{label}{' +bias' if biased else ''}"


def _nodes_after(first: fx.Node, stop: fx.Node):
    """The nodes strictly between ``first`` and ``stop``, in graph order."""
    node = first.next
    while node is not stop and node.op != "root":
        yield node
        node = node.next


def extract_row_fn(
    start: fx.Node, end: fx.Node, consumer: fx.Node, row_ids: fx.Node, *, block: str, form: str, part: str,
    side_starts: tuple[fx.Node, ...] = (), identity: Callable[[fx.Node], bool] | None = None,
) -> RowFn | NoMatch:
    """The row-wise nodes computing ``end`` from ``start`` (``end is start``: only in-place
    updates), as read by ``consumer``: mutations of those values up to ``consumer`` count.
    ``side_starts`` are further inputs of the same rows (a separate w3 matmul beside w1).
    ``identity(node)``: the recognizer proved ``node`` returns its first argument unchanged on every
    row (a sentinel guard); it is replayed as that argument (``RowFn.passthrough``)."""
    # Only the nodes between the region's pieces are walked (never the whole graph: the pass stays
    # linear in the number of blocks).
    starts = {start, *side_starts}
    first = min(starts)
    # Everything computed from `start` before `end`.
    downstream = set(starts)
    for node in _nodes_after(first, consumer):
        if any(a in downstream for a in node.all_input_nodes):
            downstream.add(node)
    # Per-row values computed from the expert ids alone (transformers' EP sentinel masks).
    from_rows = {row_ids}
    for node in _nodes_after(row_ids, consumer):
        inputs = [a for a in node.all_input_nodes if fake(a) is not None]
        if any(a in from_rows for a in inputs) and all(a in from_rows or _is_param(a) for a in inputs):
            from_rows.add(node)
    from_rows.discard(row_ids)

    included: set[fx.Node] = set()
    passthrough: set[fx.Node] = set()

    def include(node: fx.Node) -> NoMatch | None:
        stack = [node]
        while stack:
            n = stack.pop()
            if n in included or n in passthrough or n in starts:
                continue
            if identity is not None and n in downstream and identity(n):
                passthrough.add(n)
                stack.append(n.args[0])
            elif n in downstream or n in from_rows or is_expert_gather(n, row_ids):
                included.add(n)
                # x.type_as(other) reads only other's dtype
                inputs = n.args[:1] if is_op(n, "type_as") else n.all_input_nodes
                stack.extend(a for a in inputs if isinstance(a, fx.Node) and a is not row_ids)
            elif n is row_ids:
                return NoMatch(block, form, f"{part}: reads the expert ids directly ({n.name})")
            elif fake(n) is not None and not _is_param(n):
                return NoMatch(
                    block, form,
                    lambda n=n: f"{part}: reads {n.name} ({op_name(n)}), computed outside the experts; "
                    "its rows would not follow the dispatched tokens",
                )
        return None

    if end is not start:
        if (miss := include(end)) is not None:
            return miss
    # In-place updates of included values (``out.add_(bias)``) are part of the computation.
    for node in _nodes_after(first, consumer):
        if node not in included and mutates(node) and (node.args[0] in included or node.args[0] in starts):
            if (miss := include(node)) is not None:
                return miss

    ordered = sorted(included)  # fx nodes sort in graph order
    rows_rank = fake(start).dim() if fake(start) is not None else 2
    for node in ordered:
        if is_expert_gather(node, row_ids):
            continue
        if not _row_safe(node, rows_rank):
            return NoMatch(
                block, form,
                lambda node=node: f"{part}: {op_name(node)} ({node.name}) is not known to be row-wise; "
                "moe_fx only replays elementwise ops, last-dim splits/reductions and column slices",
            )
        outside = [u for u in node.users if u not in included and u not in passthrough and u is not end and node is not end]
        if node is not end and outside and node not in from_rows:  # from_rows nodes are recomputed
            return NoMatch(
                block, form,
                lambda node=node, outside=outside: f"{part}: {node.name} is also used by {outside[0].name}, outside the experts",
            )
    return RowFn(
        input=start, output=end, row_ids=row_ids, nodes=tuple(ordered), label=_describe(ordered, bool(side_starts)),
        plain_swiglu=not side_starts and _is_plain_swiglu(start, strip_casts(end), ordered, passthrough),
        side_inputs=tuple(side_starts), passthrough=tuple(sorted(passthrough)),
    )


def _is_plain_swiglu(start: fx.Node, end: fx.Node, nodes: list[fx.Node], passthrough: set[fx.Node]) -> bool:
    """``a, b = x.chunk(2, -1); silu(a) * b`` and dtype-preserving casts, nothing else: what a
    fused SwiGLU kernel (torch_npu's npu_swiglu) computes. Pass-through guards count as their input."""
    if not is_op(end, "mul") or len(end.args) != 2 or fake(end) is None or fake(start) is None:
        return False
    gate_act, up = end.args if is_op(end.args[0], "silu") else end.args[::-1]
    if not is_op(gate_act, "silu") or not all(is_op(n, "getitem") for n in (gate_act.args[0], up)):
        return False
    gate = gate_act.args[0]
    split = gate.args[0]
    source = split.args[0]
    while source in passthrough:
        source = source.args[0]
    halves = is_op(split, "chunk") and source is start and arg(split, 1, "chunks") == 2
    last_dim = arg(split, 2, "dim", 0) in (-1, fake(start).dim() - 1)
    casts_only = all(n in (split, gate, up, gate_act, end) or strip_casts(n) is end for n in nodes)
    return (halves and last_dim and up.args[0] is split and (gate.args[1], up.args[1]) == (0, 1)
            and casts_only and fake(nodes[-1]).dtype == fake(start).dtype)
