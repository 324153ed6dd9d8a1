"""Process-group helpers shared by the runtime ops and the lowering."""

from __future__ import annotations

import gc
import os
from datetime import timedelta

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


def agree_on_token_counts(x: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, int]:
    """Every rank's token count [ep] and the largest of them, which every rank then pads to.
    NOTE: one scalar all-gather and a device-to-host read: the ops take the padded size as a
    Python int. A static token bound (mc2, AllGather's static form) avoids both."""
    counts = all_gather_rows(torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64), group)
    return counts, int(counts.max())


def rank_splits(counts: torch.Tensor, world: int) -> list[int]:
    """Rows per rank, as the Python ints ``all_to_all_single`` takes, from counts per rank (or per
    (rank, local expert), rank-major). NOTE: a device-to-host read."""
    return counts.view(world, -1).sum(1).tolist()


def exchange_rows(
    rows: torch.Tensor, group: dist.ProcessGroup, send_splits: list[int] | None = None,
    recv_splits: list[int] | None = None,
) -> torch.Tensor:
    """Move rows by split sizes: ``rows`` grouped by destination rank -> the rows every rank sent
    here, grouped by source rank. ``None`` splits: equal blocks both ways (no host read)."""
    num_recv = rows.shape[0] if recv_splits is None else sum(recv_splits)
    received = rows.new_empty((num_recv, *rows.shape[1:]))
    dist.all_to_all_single(received, rows.contiguous(), recv_splits, send_splits, group=group)
    return received


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


_own_groups: dict[tuple[str, str | None, int], dist.ProcessGroup] = {}


def timed_sibling(group: dist.ProcessGroup, timeout_s: float, protocol: str | None = None) -> dist.ProcessGroup:
    """A communicator of moe_fx's own over ``group``'s ranks, on its backend, whose collectives
    fail after ``timeout_s`` rather than the user's group's timeout, and (NCCL) run with
    ``protocol`` ("Simple", "LL128", "LL"; None: NCCL's own choice). Created once per (group,
    protocol, timeout).

    NCCL reads NCCL_PROTO when a communicator starts, so the variable is set only while this one
    starts (a one-element all-reduce on the current device) and the process's other
    communicators keep their own choice. Every rank of ``group`` must call it at the same point
    (moe_fx does: when it compiles the first block that needs it, which every rank does alike); a
    rank whose peers never come raises after ``timeout_s``."""
    backend = dist.get_backend(group)
    nccl = "nccl" in backend
    key = (group.group_name, protocol if nccl else None, round(timeout_s * 1000))
    if key not in _own_groups:
        before = os.environ.get("NCCL_PROTO")
        if nccl and protocol is not None:
            os.environ["NCCL_PROTO"] = protocol
        try:
            sibling = dist.new_group(dist.get_process_group_ranks(group), backend=backend,
                                     timeout=timedelta(seconds=timeout_s), use_local_synchronization=True)
            if nccl:
                dist.all_reduce(torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device())),
                                group=sibling)
        finally:
            if before is None:
                os.environ.pop("NCCL_PROTO", None)
            else:
                os.environ["NCCL_PROTO"] = before
        _own_groups[key] = sibling
    return _own_groups[key]


def own_group_parents() -> dict[str, str]:
    """The group name of each communicator ``timed_sibling`` created -> its parent group's name."""
    return {group.group_name: parent for (parent, _, _), group in _own_groups.items()}


def destroy_process_group() -> None:
    """``dist.destroy_process_group()`` after releasing, on every rank at the same point, what
    compiled MoE blocks hold on the devices: dynamo's compiled graphs (with their CUDA graphs,
    which captured collectives of the groups about to be shut down) and moe_fx's symmetric-memory
    buffers. Call it where every rank has finished its compiled calls."""
    from moe_fx.runtime import symm_mem  # here: symm_mem imports this module

    torch._dynamo.reset()
    symm_mem.release_buffers()
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    dist.destroy_process_group()
