"""Near-miss recognizer for capacity-dropping gates (GShard, Switch, DeepSpeed top-k with capacity).

    mask = one_hot(argmax(scores), E)                       # or top-k one-hots
    position = cumsum(mask, dim=0)                           # each token's place in its expert's queue
    mask = mask * (position < capacity)                      # tokens past capacity C are dropped
    ... einsum("sec,sm->ecm", dispatch, x) ... einsum("sec,ecm->sm", combine, y)

moe_fx does not rewrite these: which tokens are dropped depends on every token's position in its
expert's queue, and the experts run on [E, C, H] capacity buffers rather than routed rows. The
block is reported (explain(), the near-miss log) and left exactly as traced, drops included.
"""

from __future__ import annotations

import torch.fx as fx

from moe_fx.passes.graph_utils import arg, fake, is_graph_input, is_op, owner_path
from moe_fx.passes.region import NoMatch

FORM = "capacity_gate"
REASON = (
    "capacity-dropping gate: tokens past an expert's capacity are dropped by their queue position; "
    "left as traced so the drops stay exact (top-k routing without capacity is rewritten)"
)
_COMPARISONS = ("lt", "le", "gt", "ge")


def _from_one_hot(node: fx.Node, depth: int = 3) -> bool:
    if depth < 0 or not isinstance(node, fx.Node):
        return False
    return is_op(node, "one_hot") or any(_from_one_hot(a, depth - 1) for a in node.all_input_nodes)


def is_capacity_cumsum(node: fx.Node) -> bool:
    """``cumsum(<one-hot mask>, dim=0)`` whose result (or ``- 1`` of it) is compared with a capacity."""
    if not is_op(node, "cumsum") or arg(node, 1, "dim") not in (0, -2) or not _from_one_hot(node.args[0]):
        return False
    near = [*node.users, *(u for n in node.users for u in n.users)]
    return any(is_op(u, *_COMPARISONS) and not isinstance(u.args[1], fx.Node) for u in near)


def match_capacity(cumsum: fx.Node) -> NoMatch:
    return NoMatch(_block(cumsum), FORM, REASON)


def _block(node: fx.Node) -> str:
    """The module whose router made the mask (the owner of the nearest 2-D parameter upstream)."""
    seen, frontier = {node}, [node]
    while frontier:
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if is_graph_input(a) and fake(a) is not None and fake(a).dim() == 2:
                    path = owner_path(a)
                    return path.rsplit(".", 1)[0] if "." in path else path
                if a not in seen:
                    seen.add(a)
                    nxt.append(a)
        frontier = nxt
    return node.name
