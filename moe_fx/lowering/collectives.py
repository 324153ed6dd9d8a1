"""c10d functional collectives, emitted into the graph.

Native ops (``torch.ops._c10d_functional*``): no Python on the hot path, no host read, visible
to inductor, capturable in CUDA graphs. Training graphs take the ``_autograd`` variants, whose
backward is the mirror collective (all-gather <-> reduce-scatter).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from moe_fx.lowering.base import LoweringPlan


def all_gather_rows(x: fx.Proxy, plan: LoweringPlan) -> fx.Proxy:
    """[N, ...] on each rank -> [ep * N, ...], rank-major (every rank passes the same N)."""
    ops = torch.ops._c10d_functional_autograd if plan.training else torch.ops._c10d_functional
    gathered = ops.all_gather_into_tensor(x.contiguous(), plan.ep.ep_size, plan.ep.group_name)
    return torch.ops._c10d_functional.wait_tensor(gathered)


def reduce_scatter_rows(x: fx.Proxy, plan: LoweringPlan) -> fx.Proxy:
    """[ep * N, ...] on each rank -> this rank's [N, ...] block of the sum over ranks."""
    ops = torch.ops._c10d_functional_autograd if plan.training else torch.ops._c10d_functional
    scattered = ops.reduce_scatter_tensor(x.contiguous(), "sum", plan.ep.ep_size, plan.ep.group_name)
    return torch.ops._c10d_functional.wait_tensor(scattered)
