"""The rewritten region holds only ops.

Every node the rewrite inserts must call an op (``torch.ops.*``), a ``torch`` function, an
``operator`` function or a tensor method, with arguments the graph can hold as literals: nodes,
numbers, bools, strings, dtypes, devices, None, slices and lists or tuples of those. No Python
object of moe_fx may be a call target or an argument: the graph is then readable as it is
(``gm.code``), cacheable by AOTAutograd, and free of Python dispatch on the hot path.
"""

from __future__ import annotations

import operator
import types

import torch
import torch.fx as fx

_LITERALS = (int, float, bool, str, torch.dtype, torch.device, torch.memory_format, torch.layout, slice,
             types.EllipsisType, type(None))


def op_only_violation(node: fx.Node) -> str | None:
    """Why ``node`` is not a plain op call, or None."""
    if node.op == "call_method":
        bad_target = not isinstance(node.target, str)
    elif node.op == "call_function":
        bad_target = not _is_op_target(node.target)
    else:
        return f"{node.format_node()}: a {node.op} node"
    if bad_target:
        return f"{node.format_node()}: target {node.target!r} is not an op"
    bad = _non_literal((node.args, tuple(node.kwargs.values())))
    return None if bad is None else f"{node.format_node()}: argument {bad!r} ({type(bad).__name__}) is not a literal"


def check_only_ops(nodes: list[fx.Node], block: str) -> None:
    """Raise if any of ``nodes`` is not a plain op call (a moe_fx bug, never the user's)."""
    problems = [p for p in map(op_only_violation, nodes) if p is not None]
    if problems:
        raise AssertionError(f"moe_fx: the rewrite of {block!r} emitted non-op nodes:\n  " + "\n  ".join(problems))


def _is_op_target(target) -> bool:
    """torch.ops.*, a function of torch (torch.sort, torch.nn.functional.pad) or of operator."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return True
    if getattr(operator, getattr(target, "__name__", ""), None) is target:
        return True
    module = getattr(target, "__module__", None) or ""
    return module == "torch" or module.startswith("torch.")


def _non_literal(value):
    """The first value in ``value`` (nested lists/tuples) that is neither a node nor a literal."""
    if isinstance(value, (list, tuple)):
        for item in value:
            bad = _non_literal(item)
            if bad is not None:
                return bad
        return None
    if isinstance(value, fx.Node) or isinstance(value, _LITERALS):
        return None
    return value
