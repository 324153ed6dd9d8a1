"""Helpers the form recognizers share: bailing out with a reason, and the row-wise pieces of an
experts region (activation between the matmuls, post-expert code before the weighting)."""

from __future__ import annotations

from contextlib import contextmanager

import torch.fx as fx

from moe_fx.passes.graph_utils import arg, chain, fake, int_value, is_graph_input, is_op, op_name, strip_casts
from moe_fx.passes.region import RowFn
from moe_fx.passes.rowwise import extract_row_fn


# Constructors of an all-zero tensor: an accumulator that starts empty.
ZERO_CONSTRUCTORS = ("zeros", "zeros_like", "new_zeros")


class Miss(Exception):
    """Raised inside a recognizer to bail out with a reason. The finder (passes/find.py) turns it
    into the block's NoMatch, naming ``block`` (set by ``blame``) or else the anchor node."""

    def __init__(self, reason: str, block: str | None = None):
        super().__init__(reason)
        self.reason, self.block = reason, block


def expect(cond: bool, reason: str) -> None:
    if not cond:
        raise Miss(reason)


@contextmanager
def blame(block: str):
    """Misses raised inside name ``block``: once a recognizer knows which module holds the experts."""
    try:
        yield
    except Miss as miss:
        miss.block = miss.block or block
        raise


def row_functions(
    *, up: fx.Node, down_in: fx.Node, down: fx.Node, down_out: fx.Node, y: fx.Node, weighting: fx.Node,
    row_ids: fx.Node, block: str, form: str, side_ups: tuple[fx.Node, ...] = (),
) -> tuple[RowFn, RowFn]:
    """(activation: ``up`` [+ ``side_ups``] -> ``down_in``, read by the ``down`` matmul;
    post-expert: ``down_out`` -> ``y``, read by ``weighting``), or Miss with the reason."""
    act = extract_row_fn(up, down_in, down, row_ids, block=block, form=form, part="activation", side_starts=side_ups)
    if not act:
        raise Miss(act.reason)
    post = extract_row_fn(down_out, y, weighting, row_ids, block=block, form=form, part="post-expert")
    if not post:
        raise Miss(post.reason)
    return act, post


def counted_ids(counts: fx.Node, num_experts: int, *, histc_max: tuple[int, ...]) -> tuple[fx.Node, set[fx.Node]]:
    """(the ids counted, the counting nodes) when ``counts`` [E] is the number of routed rows per
    expert, however it is spelled: ``histc(ids, bins=E, min=0, max=M)`` (M in ``histc_max``),
    ``bincount(ids, minlength=E)``, or ``zeros(T, E).scatter(1, ids, 1).sum(0)`` (a [T, E]
    routing map, bool or numeric; it counts a token once per expert, which is its rows' count
    because top-k ids of a token are distinct). The ids are returned as the counting op reads
    them (through casts): the caller checks they are its routed ids."""
    e = num_experts
    if is_op(counts, "histc"):
        bins, lo, hi = arg(counts, 1, "bins"), arg(counts, 2, "min", 0), arg(counts, 3, "max", 0)
        expect(bins == e and lo == 0 and hi in histc_max, f"histogram bins={bins} min={lo} max={hi}, expected {e} experts")
        return strip_casts(counts.args[0]), {counts, *chain(counts.args[0])}
    if is_op(counts, "bincount"):
        expect(int_value(arg(counts, 2, "minlength", 0)) == e and arg(counts, 1, "weights") is None,
               f"bincount without minlength={e}: fewer than {e} counts when the last experts get no rows")
        return strip_casts(counts.args[0]), {counts, *chain(counts.args[0])}
    expect(is_op(counts, "sum") and arg(counts, 1, "dim") in (0, (0,), [0]),
           f"expert counts come from {op_name(counts)}, not histc, bincount or a routing map's sum over tokens")
    onehot = strip_casts(counts.args[0])
    expect(is_op(onehot, "scatter", "scatter_") and arg(onehot, 1, "dim") in (1, -1) and arg(onehot, 3, "value") == 1
           and is_op(onehot.args[0], *ZERO_CONSTRUCTORS),
           "expert counts sum something other than a routing map scattered from the expert ids into zeros")
    expect(fake(onehot) is not None and int_value(fake(onehot).shape[-1]) == e,
           f"the routing map has {fake(onehot).shape[-1] if fake(onehot) is not None else '?'} columns, not {e} experts")
    return arg(onehot, 2, "index"), {counts, onehot, onehot.args[0], *chain(counts.args[0])}




def stacked_weight(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """(the [E, ...] weight the experts read, helper nodes) of a 3-D parameter, or of a 2-D one
    viewed as 3-D (Megatron's legacy GroupedMLP: ``weight1.view(E, H, -1)``). Expert e reads
    slice e of the view whatever the storage order, so the view node itself is the weight the
    lowering slices; or Miss."""
    if is_graph_input(node) and fake(node) is not None and fake(node).dim() == 3:
        return node, []
    if (is_op(node, "view", "reshape") and is_graph_input(node.args[0]) and fake(node.args[0]) is not None
            and fake(node.args[0]).dim() == 2 and fake(node) is not None and fake(node).dim() == 3):
        return node, [node]
    raise Miss(f"expert weight {node.name} is not a 3-D parameter, nor a 2-D one viewed as [E, ...]")
