"""Helpers the form recognizers share: bailing out with a reason, and the row-wise pieces of an
experts region (activation between the matmuls, post-expert code before the weighting)."""

from __future__ import annotations

import torch.fx as fx

from moe_fx.passes.region import RowFn
from moe_fx.passes.rowwise import extract_row_fn


class Miss(Exception):
    """Raised inside a recognizer to bail out with a reason (turned into a NoMatch)."""


def expect(cond: bool, reason: str) -> None:
    if not cond:
        raise Miss(reason)


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
