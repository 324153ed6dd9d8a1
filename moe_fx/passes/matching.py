"""Helpers the form recognizers share: bailing out with a reason, and the row-wise pieces of an
experts region (activation between the matmuls, post-expert code before the weighting)."""

from __future__ import annotations

from contextlib import contextmanager

import torch.fx as fx

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
