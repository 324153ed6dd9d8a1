"""What a value is computed from, for evaluating or copying one block's code: the nodes a result
needs (with the in-place writes into them), and the tensor a value is a view of."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from moe_fx.passes.graph_utils import is_graph_input, op_name
from moe_fx.passes.rowwise import mutates

_VIEWS = ("view", "reshape", "getitem", "narrow", "select", "expand", "permute", "transpose", "unsqueeze",
          "squeeze", "flatten", "t", "as_strided", "contiguous", "slice", "split", "chunk", "unbind", "to", "type",
          "float")


def needed(targets: list[fx.Node], stop: dict[fx.Node, Any], replaced: frozenset[fx.Node] = frozenset()) -> set[fx.Node]:
    """``targets`` and everything they read, not looking past ``stop`` or the graph's inputs, with
    the in-place ops that write into any of these before the last target (``out.index_add_(...)``,
    ``rows[idx] = ...``: nothing reads their results, but the targets read what they wrote), except
    those of the ``replaced`` code (the traced experts code, for the rewrite: it accumulates into
    the shared expert's output, which the rewrite reads before)."""
    last = max(targets)
    seen: set[fx.Node] = set()
    stack = list(targets)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(u for u in node.users
                     if u < last and u not in replaced and mutates(u) and u.args and u.args[0] is node)
        if node not in stop and not is_graph_input(node):
            stack.extend(node.all_input_nodes)
    return seen


def view_source(node: fx.Node) -> fx.Node:
    """The node ``node`` views (through reshapes, slices, casts), or ``node`` itself. Indexing by a
    tensor (``x[perm]``) copies: it ends the walk."""
    while not is_graph_input(node) and op_name(node) in _VIEWS and node.args \
            and isinstance(node.args[0], fx.Node) and not _indexes_by_tensor(node):
        node = node.args[0]
    return node


def _indexes_by_tensor(node: fx.Node) -> bool:
    if op_name(node) != "getitem" or len(node.args) < 2:
        return False
    index = node.args[1]
    return any(isinstance(i, fx.Node) for i in (index if isinstance(index, (tuple, list)) else (index,)))


def router_topk(ids: fx.Node) -> fx.Node | None:
    """The ``topk`` whose indices the region's ids are (through getitem, casts and views)."""
    node = ids
    for _ in range(8):
        if op_name(node) == "topk":
            return node
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None
