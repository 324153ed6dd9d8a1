"""Emitting ops into a dynamo graph with their example values.

The rewrite builds the new region by calling the lowering's methods on ``fx.Proxy`` values: every
tensor method or torch function they call becomes a node at the graph's insertion point. Each new
node also gets ``meta["example_value"]``, computed under dynamo's fake mode, like the nodes dynamo
traced: lowerings read dtypes and devices from it while they emit, and AOTAutograd's cache accepts
a tensor method call only on a node that has one.
"""

from __future__ import annotations

import contextlib
import logging

import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

log = logging.getLogger(__name__)


class EmittingTracer(fx.proxy.GraphAppendingTracer):
    """Appends to ``graph`` (at its insertion point) and sets each new node's example value."""

    def __init__(self, graph: fx.Graph):
        super().__init__(graph)
        self.fake_mode = _graph_fake_mode(graph)

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        self.propagate(node)
        return node

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return fx.Proxy(node, self)

    def propagate(self, node: fx.Node) -> None:
        """Compute ``node``'s example value from its inputs' (no value when an input has none)."""
        node.meta.pop("example_value", None)
        if self.fake_mode is None or node.op not in ("call_function", "call_method"):
            return
        missing = []

        def value(n: fx.Node):
            if "example_value" not in n.meta:
                missing.append(n)
            return n.meta.get("example_value")

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if missing:
            return
        try:
            with self.fake_mode, _ignoring_fresh_unbacked(self.fake_mode):
                if node.op == "call_method":
                    result = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    result = node.target(*args, **kwargs)
        except GuardOnDataDependentSymNode as exc:
            # An op whose meta must decide on a data-dependent size (padding a routed-row count):
            # no example value here; AOTAutograd traces the node with its own unbacked symbols.
            log.debug("moe_fx: no example value for %s: %s", node.format_node(), exc)
            return
        node.meta["example_value"] = result


def _graph_fake_mode(graph: fx.Graph):
    """The fake mode of the graph's own example values (not the tracing context's: the values
    must mix with them)."""
    for node in graph.nodes:
        mode = getattr(node.meta.get("example_value"), "fake_mode", None)
        if mode is not None:
            return mode
    return None


def _ignoring_fresh_unbacked(fake_mode):
    """Data-dependent sizes (rows routed here) are fresh unbacked symbols; they describe this
    example value only and are bound again when AOTAutograd traces the graph."""
    shape_env = getattr(fake_mode, "shape_env", None)
    if shape_env is None:
        return contextlib.nullcontext()
    return shape_env.ignore_fresh_unbacked_symbols()
