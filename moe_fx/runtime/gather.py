"""Replicated (TP-style) token layout: each rank computes a slice, then all ranks gather the rows."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx.runtime.comm import all_gather_rows, resolve_group
from moe_fx.runtime.library import LIB


@torch.library.custom_op(f"{LIB}::gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """[n, ...] on each rank -> [ep * n, ...], rank-major (every rank passes the same n)."""
    return all_gather_rows(x, resolve_group(group_name))


@gather_rows.register_fake
def _(x, group_name):
    world = dist.get_world_size(resolve_group(group_name))
    return x.new_empty((world * x.shape[0], *x.shape[1:]))


def _gather_rows_setup(ctx, inputs, output):
    x, group_name = inputs
    ctx.rows, ctx.group_name = x.shape[0], group_name


def _gather_rows_backward(ctx, grad):
    # Every rank holds the same gathered output and its own gradient of it; this rank's slice of
    # the sum over ranks is what its rows contributed (the tensor-parallel convention).
    rank = dist.get_rank(resolve_group(ctx.group_name))
    return grad[rank * ctx.rows : (rank + 1) * ctx.rows], None


torch.library.register_autograd(f"{LIB}::gather_rows", _gather_rows_backward, setup_context=_gather_rows_setup)

