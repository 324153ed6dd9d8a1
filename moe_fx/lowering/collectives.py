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
    return wait(start_all_gather_rows(x, plan))


def reduce_scatter_rows(x: fx.Proxy, plan: LoweringPlan) -> fx.Proxy:
    """[ep * N, ...] on each rank -> this rank's [N, ...] block of the sum over ranks."""
    return wait(start_reduce_scatter_rows(x, plan))


def start_all_gather_rows(x: fx.Proxy, plan: LoweringPlan) -> fx.Proxy:
    """all_gather_rows, issued: its result may be read only through ``wait``. The ops between the
    two run beside the exchange (it runs on the communicator's stream)."""
    ops = torch.ops._c10d_functional_autograd if plan.training else torch.ops._c10d_functional
    return ops.all_gather_into_tensor(x.contiguous(), plan.ep.ep_size, plan.ep.group_name)


def start_reduce_scatter_rows(x: fx.Proxy, plan: LoweringPlan) -> fx.Proxy:
    """reduce_scatter_rows, issued (see start_all_gather_rows)."""
    ops = torch.ops._c10d_functional_autograd if plan.training else torch.ops._c10d_functional
    return ops.reduce_scatter_tensor(x.contiguous(), "sum", plan.ep.ep_size, plan.ep.group_name)


def wait(issued: fx.Proxy) -> fx.Proxy:
    """The result of an issued collective; this rank's later ops are ordered after it."""
    return torch.ops._c10d_functional.wait_tensor(issued)
