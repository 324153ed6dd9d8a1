"""Predicates and accessors over dynamo FX graphs (torch-level IR: call_function and call_method
nodes side by side, ``example_value`` metadata)."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int, statically_known_true

from moe_fx.shard import ExpertShard, expert_shard

_OPERATOR_NAMES = {
    getattr(operator, n): n
    for n in (
        "getitem", "setitem", "add", "sub", "mul", "truediv", "floordiv", "neg", "pow",
        "iadd", "isub", "imul", "itruediv", "matmul",
    )
}


# Python's operator methods under the names the graph also records them by (``ids == e`` is
# ``operator.eq`` from torch 2.13's dynamo, ``Tensor.__eq__`` from torch 2.11's on Python 3.12).
_DUNDER_NAMES = {f"__{n}__": n for n in ("eq", "ne", "lt", "le", "gt", "ge", "add", "sub", "mul", "truediv",
                                         "floordiv", "mod", "neg", "pow", "matmul", "getitem", "setitem")}
_DUNDER_NAMES.update({"__and__": "and_", "__or__": "or_", "__invert__": "invert"})


def op_name(node: fx.Node) -> str:
    """A torch-version-stable name for what ``node`` computes: ``"sort"`` for both ``torch.sort``
    and ``x.sort()``, ``"eq"`` for ``operator.eq`` and ``Tensor.__eq__``,
    ``"transformers.grouped_mm_fallback"`` for a custom op."""
    if node.op == "call_method":
        return _DUNDER_NAMES.get(str(node.target), str(node.target))
    if node.op != "call_function":
        return node.op
    target = node.target
    if target in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[target]
    if isinstance(target, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        name = target._qualified_op_name if hasattr(target, "_qualified_op_name") else str(target)
        return name.replace("::", ".")
    name = getattr(target, "__name__", str(target))
    return _DUNDER_NAMES.get(name, name)


def is_op(node: Any, *names: str) -> bool:
    return isinstance(node, fx.Node) and op_name(node) in names


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (positional, after self for methods) or keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def fake(node: Any) -> torch.Tensor | None:
    """The fake tensor dynamo recorded for ``node``, if it is a tensor."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def real_value(node: fx.Node) -> Any:
    """The real object dynamo lifted into placeholder ``node`` (a module parameter, an input), or
    None when the graph kept no reference to it (a graph built by hand, a freed input)."""
    grapharg = node.meta.get("grapharg") if node.op == "placeholder" else None
    try:
        return grapharg.example if grapharg is not None else None
    except AssertionError:  # the weak reference died
        return None


def expert_shard_of(node: Any) -> ExpertShard | None:
    """The ``moe_fx.shard_experts`` record of the parameter behind ``node``, if it was sharded."""
    return expert_shard(real_value(node)) if is_graph_input(node) else None


def is_graph_input(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr")


def is_state_input(node: fx.Node, value: Any = None) -> bool:
    """A graph input holding the model's state (a parameter or buffer) or a size, not its data:
    by dynamo's placeholder name, or by ``value`` (the real input) when given, else its example."""
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    if "_parameters_" in node.name or "_buffers_" in node.name:
        return True
    value = value if value is not None else fake(node)
    return not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter)


def is_expert_gather(node: Any, row_ids: fx.Node) -> bool:
    """``param[row_ids]``: a per-expert parameter (a bias) picked per row by the row's expert id."""
    return is_op(node, "getitem") and node.args[1] is row_ids and is_graph_input(node.args[0])


def strip_casts(node: fx.Node) -> fx.Node:
    """Follow ``x.to(dtype)`` / ``x.float()`` style casts back to the uncast value."""
    while is_op(node, "to", "float", "bfloat16", "half", "int", "long", "type_as", "type"):
        node = node.args[0]
    return node


def chain(top: fx.Node, bottom: fx.Node | None = None) -> list[fx.Node]:
    """The nodes from ``top`` back to ``bottom`` (exclusive) through first arguments: the casts
    ``strip_casts`` skips when ``bottom`` is None, else single-input steps (casts, views)."""
    bottom = strip_casts(top) if bottom is None else bottom
    out, node = [], top
    while isinstance(node, fx.Node) and node is not bottom:
        out.append(node)
        node = node.args[0] if node.args else None
    return out


def int_value(value: Any) -> int | None:
    """A Python int for a literal or a constant SymInt; None otherwise. Never guards: reading a
    symbolic size as an int would specialize the graph on it (a recompile per token count)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt) and is_concrete_int(value):
        return int(value)
    if isinstance(value, fx.Node):
        return int_value(value.meta.get("example_value"))
    return None


def same_size(a: Any, b: Any) -> bool:
    """``a == b`` for sizes that may be symbolic, true only when provable (adds no guard)."""
    return bool(statically_known_true(a == b))


def same_shape(shape: Any, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(same_size(a, b) for a, b in zip(shape, expected))


_SOURCE_KEY = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]|\.([A-Za-z_]\w*)")


def module_path(param: fx.Node) -> str:
    """``model.layers.0.mlp.experts.gate_up_proj`` for the placeholder dynamo made of that parameter."""
    if param.op == "get_attr":
        return str(param.target)
    grapharg = param.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is not None:
        parts = [a or b for a, b in _SOURCE_KEY.findall(source.name)]
        parts = [p for p in parts if p not in ("self", "_modules", "_parameters", "_buffers")]
        if parts:
            return ".".join(parts)
    # Fallback: dynamo's placeholder name, "l_self_modules_layers_modules_0_..._parameters_w_".
    name = re.sub(r"^l_[a-z0-9]+?_(?=(modules|parameters|buffers)_)", "", param.name.rstrip("_"), flags=re.I)
    return re.sub(r"_?(modules|parameters|buffers)_", ".", name).strip(".")


def owner_path(param: fx.Node) -> str:
    """The module that holds ``param``: ``model.layers.0.mlp.experts``."""
    path = module_path(param)
    return path.rsplit(".", 1)[0] if "." in path else "<root module>"


def upstream(node: fx.Node, limit: int) -> set[fx.Node]:
    """``node`` and what it is computed from, at most ``limit`` nodes (for messages only: a
    recognizer that decides on dependencies uses ``depends_on``, which has no limit)."""
    seen, stack = {node}, [node]
    while stack and len(seen) < limit:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def depends_on(node: fx.Node, ancestor: fx.Node) -> bool:
    """Whether ``node`` is computed from ``ancestor``. Exact: the walk skips every node placed
    before ``ancestor`` (an fx graph is in topological order, so none of them can read it)."""
    seen, stack = {node}, [node]
    while stack:
        current = stack.pop()
        if current is ancestor:
            return True
        for a in current.all_input_nodes:
            if a not in seen and not a < ancestor:
                seen.add(a)
                stack.append(a)
    return False


def nearest_downstream(node: fx.Node, wanted: Callable[[fx.Node], bool]) -> fx.Node | None:
    """The first node computed from ``node`` (breadth first: nearest first) for which ``wanted``
    holds, or None. No limit: the walk ends at the first hit, so only a miss reads the rest of the
    graph; a later block's node is never nearer than this block's own."""
    seen, frontier = {node}, [node]
    while frontier:
        frontier = [u for n in frontier for u in n.users if u not in seen and not seen.add(u)]
        hit = next((u for u in frontier if wanted(u)), None)
        if hit is not None:
            return hit
    return None


def size_guards(source: fx.Node) -> set[fx.Node]:
    """dynamo's checks on the unbacked sizes ``source`` produces (``_assert_scalar(u0 >= 0)`` after a
    where() or an ``.item()``), dead with it."""
    out, frontier = set(), [source]
    while frontier:
        node = frontier.pop()
        for u in node.users:
            if u not in out and (is_op(u, "getitem", "ge", "le", "gt", "lt", "eq", "sym_sum")
                                 or "sym_size" in op_name(u) or "assert" in op_name(u)):
                out.add(u)
                frontier.append(u)
    return out


def einsum_parts(node: fx.Node) -> tuple[list[str], str, list] | None:
    """(input subscripts, output subscripts, operands) of an einsum node."""
    if not is_op(node, "einsum") or not isinstance(node.args[0], str):
        return None
    operands = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
    equation = node.args[0].replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    inputs, output = equation.split("->")
    return inputs.split(","), output, operands
