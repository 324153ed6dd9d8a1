"""Process-group helpers shared by the runtime ops and the lowering."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group


def resolve_group(group_name: str) -> dist.ProcessGroup:
    """The c10d group registered under ``group_name`` (ops take names: groups are not op arguments)."""
    return _resolve_process_group(group_name)


# torch 2.13 renamed the tensor collectives to *_single; 2.11 (the GPU machines) has the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[N, ...] on each rank -> [ws * N, ...], rank-major. Every rank must pass the same N."""
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather(out, x.contiguous(), group=group)
    return out


def reduce_scatter_rows(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[ws * N, ...] on each rank -> this rank's [N, ...] block of the sum over ranks."""
    out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
    _reduce_scatter(out, x.contiguous(), group=group)
    return out


def pad_rows(x: torch.Tensor, rows: int, value: float | int = 0) -> torch.Tensor:
    """Pad ``x`` along dim 0 to ``rows`` rows with ``value``."""
    if x.shape[0] == rows:
        return x
    pad = x.new_full((rows - x.shape[0], *x.shape[1:]), value)
    return torch.cat([x, pad])


def current_ep_group() -> dist.ProcessGroup | None:
    """The expert-parallel group: ``config.ep_group`` by name, else the default group if any."""
    from moe_fx import config

    if config.ep_group is not None:
        return resolve_group(config.ep_group)
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None
