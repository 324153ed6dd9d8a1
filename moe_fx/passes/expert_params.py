"""Per-expert parameters read one expert at a time: the matmuls of one expert (``linear(x, W, b)``,
``x @ W.T``, W a 2-D parameter or ``P[e]`` of a stacked one), the module that holds them, and the
[E, ...] projection a set of them makes. Shared by the recognizers of unrolled expert loops and
of per-expert splits."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from moe_fx.passes.graph_utils import arg, depends_on, fake, is_graph_input, is_op, module_path, op_name, owner_path
from moe_fx.passes.matching import Miss, expect, stacked_weight
from moe_fx.passes.region import ExpertProjection, RowFn

_TRANSPOSES = ("t", "T", "mT")


@dataclass(frozen=True)
class ExpertLinear:
    """A matmul of one expert: ``linear(x, W, b)`` or ``x @ W.T``; W is a parameter or ``P[e]``."""

    node: fx.Node
    input: fx.Node
    source: fx.Node  # the 2-D parameter, or the 3-D one indexed by the expert
    expert_index: int | None  # e of ``P[e]``
    layout: str
    bias: fx.Node | None
    bias_index: int | None
    nodes: tuple[fx.Node, ...]  # weight indexing / transposes


def experts_owner(params: list[fx.Node]) -> str:
    """The module holding all ``params``: ``layers.0.moe.experts`` for a ModuleList of experts."""
    if len(params) == 1:
        return owner_path(params[0])
    parts = [module_path(p).split(".")[:-1] for p in params]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common) or "<root module>"


def expert_linear(node: fx.Node) -> ExpertLinear | None:
    """One expert's matmul: ``linear(x, W[, b])`` or ``x @ W.T``, W a 2-D parameter or ``P[e]``."""
    if is_op(node, "linear"):
        weight, bias = node.args[1], arg(node, 2, "bias")
        base = "out_in"
    elif is_op(node, "matmul", "mm"):
        weight, bias, base = node.args[1], None, "in_out"
    else:
        return None
    helpers = []
    flipped = False
    while is_op(weight, "getattr", "t", "transpose", "permute") and _is_transpose(weight):
        helpers.append(weight)
        flipped = not flipped
        weight = weight.args[0]
    source, index = _expert_param(weight)
    if source is None:
        return None
    if index is not None:
        helpers.append(weight)
    layout = base if not flipped else ("in_out" if base == "out_in" else "out_in")
    bias_source, bias_index = _expert_param(bias) if isinstance(bias, fx.Node) else (None, None)
    if isinstance(bias, fx.Node):
        if bias_source is None:
            return None
        if bias_index is not None:
            helpers.append(bias)
    return ExpertLinear(node=node, input=node.args[0], source=source, expert_index=index, layout=layout,
                 bias=bias_source, bias_index=bias_index, nodes=tuple(helpers))


def _is_transpose(node: fx.Node) -> bool:
    if is_op(node, "getattr"):
        return node.args[1] in _TRANSPOSES
    if is_op(node, "t"):
        return True
    if is_op(node, "transpose"):
        return sorted(node.args[1:3]) in ([0, 1], [-2, -1], [-1, 0])
    dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
    return tuple(dims) == (1, 0)


def _expert_param(node: fx.Node) -> tuple[fx.Node | None, int | None]:
    """(parameter, None) for a parameter; (P, e) for ``P[e]`` of a stacked one, P a 3-D parameter or
    a 2-D one viewed as [E, ...] (DBRX's ``w1.view(E, I, H)``; the view is the weight the lowering
    slices); (None, None) otherwise."""
    if is_graph_input(node):
        return node, None
    if not (is_op(node, "getitem") and isinstance(node.args[1], int) and isinstance(node.args[0], fx.Node)):
        return None, None
    if is_graph_input(node.args[0]):  # a stacked weight [E, ...] or bias [E, N]
        return node.args[0], node.args[1]
    try:
        stacked, _ = stacked_weight(node.args[0])
    except Miss:
        return None, None
    return stacked, node.args[1]


def stacked_projection(projs: list[ExpertLinear], what: str) -> ExpertProjection:
    layouts = {p.layout for p in projs}
    expect(len(layouts) == 1, f"the experts' {what} matmuls use different layouts")
    weight = _per_expert([(p.source, p.expert_index) for p in projs], f"{what} weight")
    has_bias = {p.bias is not None for p in projs}
    expect(len(has_bias) == 1, f"some experts' {what} has a bias and some not")
    bias = _per_expert([(p.bias, p.bias_index) for p in projs], f"{what} bias") if projs[0].bias is not None else None
    return ExpertProjection(weight=weight, layout=layouts.pop(), bias=bias)


def _per_expert(sources: list[tuple[fx.Node, int | None]], what: str) -> fx.Node | tuple[fx.Node, ...]:
    """One stacked parameter indexed 0..E-1 in order, or E distinct parameters of one shape."""
    nodes = {s for s, _ in sources}
    if len(nodes) == 1:
        (source,) = nodes
        indices = [i for _, i in sources]
        expect(indices == list(range(len(sources))) and fake(source).shape[0] == len(sources),
                f"expert e does not read {what} [{len(sources)}, ...][e]")
        return source
    expect(len(nodes) == len(sources) and all(i is None for _, i in sources), f"experts share a {what}")
    shapes = {tuple(fake(s).shape) for s, _ in sources}
    expect(len(shapes) == 1, f"the experts' {what}s differ in shape: {sorted(shapes)}")
    return tuple(s for s, _ in sources)


@dataclass(frozen=True)
class ExpertFn:
    """One expert's computation on its rows, as traced: input matmuls (w1 [, w3]), the row-wise
    activation, the output matmul, the row-wise code after it."""

    expert: int
    ups: tuple[ExpertLinear, ...]
    down: ExpertLinear
    activation: RowFn
    post: RowFn


def stack_experts(fns: list[ExpertFn]) -> tuple[ExpertProjection, tuple[ExpertProjection, ...], ExpertProjection, str]:
    """(first input, further inputs, output projection, owner) of E experts traced one by one,
    once each covers 0..E-1 exactly and all compute the same row-wise function (compared node by
    node); or Miss. The first expert's activation and post-expert code are replayed for all."""
    fns = sorted(fns, key=lambda f: f.expert)
    e = len(fns)
    expect([f.expert for f in fns] == list(range(e)),
           f"the experts run are {[f.expert for f in fns]}, not each of 0..{e - 1} once; tokens routed elsewhere would be lost")
    first = fns[0]
    for f in fns[1:]:
        expect(len(f.ups) == len(first.ups), f"expert {f.expert} has {len(f.ups)} input matmuls, expert 0 {len(first.ups)}")
        for part in ("activation", "post"):
            expect(_signature(getattr(f, part)) == _signature(getattr(first, part)),
                   f"expert {f.expert} computes a different {part} than expert 0 (or reads parameters of its own there)")
    up = stacked_projection([f.ups[0] for f in fns], "first input")
    side_up = tuple(stacked_projection([f.ups[i] for f in fns], "second input") for i in range(1, len(first.ups)))
    down = stacked_projection([f.down for f in fns], "output")
    sources = [w for p in (up, *side_up, down) for w in (p.weight if isinstance(p.weight, tuple) else (p.weight,))]
    return up, side_up, down, experts_owner(sources)


def _signature(fn: RowFn) -> tuple:
    """What a row function computes, with node identities replaced by positions (parameters kept)."""
    position = {fn.input: "in", **{s: f"side{i}" for i, s in enumerate(fn.side_inputs)}}
    position.update({n: i for i, n in enumerate(fn.nodes)})

    def norm(value):
        if isinstance(value, fx.Node):
            return position.get(value, value)  # a parameter read whole must be the same node
        if isinstance(value, (tuple, list)):
            return tuple(norm(v) for v in value)
        return value

    return tuple((op_name(n), norm(n.args), norm(dict(n.kwargs))) for n in fn.nodes)


def expert_matmuls(rows: fx.Node, y: fx.Node, expert: int) -> tuple[tuple[ExpertLinear, ...], ExpertLinear]:
    """(input matmuls, output matmul) of one expert on the path from its selected ``rows`` (or
    their index) to its output ``y``."""
    projections = [p for n in rows_path(rows, y) if (p := expert_linear(n)) is not None]
    expect(projections, "no expert matmul between the selected rows and the expert output")
    downs = [p for p in projections if any(depends_on(p.input, q.node) for q in projections if q is not p)]
    ups = tuple(sorted((p for p in projections if p not in downs), key=lambda p: p.node))
    expect(len(downs) == 1 and 1 <= len(ups) <= 2,
            f"expert {expert}: {len(ups)} input and {len(downs)} output matmuls (expected w1 [and w3], then w2)")
    expect(all(p.input is ups[0].input for p in ups), f"expert {expert}: its input matmuls read different rows")
    return ups, downs[0]


def rows_path(tok: fx.Node, y: fx.Node) -> list[fx.Node]:
    """Nodes on a path from the selected rows' index to the expert output, in graph order."""
    after = {tok}
    for node in _graph_range(tok, y):
        if any(a in after for a in node.all_input_nodes):
            after.add(node)
    before, stack = {y}, [y]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in after and a not in before:
                before.add(a)
                stack.append(a)
    return sorted(before)


def _graph_range(first: fx.Node, last: fx.Node):
    node = first.next
    while node is not last.next:
        yield node
        node = node.next
