"""A torch-version-stable rendering of a rewritten region, for tests and explain().

Each new node is one line, ``vN = <op>(<args>)``, with the op named by ``op_name`` (``sort`` for
``torch.sort`` and ``x.sort()``, ``moe_fx.mc2_dispatch`` for a custom op) and the region's inputs
and parameters by their roles and module names: what ``gm.code`` says, without dynamo's names.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from moe_fx.passes.graph_utils import module_path, op_name
from moe_fx.passes.region import MoERegion


def render_region(region: MoERegion, new_nodes: list[fx.Node]) -> str:
    return render_nodes(new_nodes, {region.hidden: "hidden", region.topk_ids: "topk_ids",
                                    region.topk_weights: "topk_weights"})


def render_nodes(new_nodes: list[fx.Node], names: dict[fx.Node, str] | None = None) -> str:
    """``new_nodes`` one per line; ``names``: the region's inputs by role."""
    names = dict(names or {})
    lines = []
    for i, node in enumerate(new_nodes):
        names[node] = f"v{i}"
        lines.append(f"v{i} = {op_name(node)}({_format_args(node, names)})")
    return "\n".join(lines)


def _format_args(node: fx.Node, names: dict[fx.Node, str]) -> str:
    def fmt(value) -> str:
        if isinstance(value, fx.Node):
            if value not in names:
                names[value] = module_path(value).split(".")[-1] if value.op in ("placeholder", "get_attr") else value.name
            return names[value]
        if isinstance(value, (tuple, list)):
            inner = ", ".join(fmt(v) for v in value)
            return f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, slice):
            return ":".join("" if v is None else fmt(v) for v in (value.start, value.stop, value.step)).rstrip(":") or ":"
        if value is Ellipsis:
            return "..."
        if isinstance(value, torch.dtype):
            return str(value).replace("torch.", "")
        return repr(value)

    parts = [fmt(a) for a in node.args] + [f"{k}={fmt(v)}" for k, v in node.kwargs.items()]
    return ", ".join(parts)
