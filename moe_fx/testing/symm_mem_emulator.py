"""A gloo emulator of torch's symmetric-memory all-to-all ops (a TEST TOOL).

``torch.ops.symm_mem.all_to_all_vdev_2d`` needs NVSHMEM and one GPU per rank; this machine and CI
have neither (NVSHMEM refuses one-rank teams and several processes per GPU). ``install()`` makes
moe_fx's symmetric-memory MC2 transport (moe_fx/runtime/symm_mem.py) run over a gloo group on CPU
tensors, following the ops' contract as torch 2.11 implements it:

- dispatch: input rows rank-major by (destination rank, local expert); output expert-major, chunk
  (g, r) described at index g * ep + r of ``out_splits_offsets``; every expert takes at least one
  row (``major_align`` defaults to 1 and an empty expert is padded to it);
- combine (``_offset``): chunks read at the given offsets, written back packed rank-major;
- more than 16 experts per rank, or 16 ranks, is refused as the CUDA kernels refuse it.

Rows the ops leave undefined (padding, the tail of ``out``) are filled with NaN, so a lowering
that reads them shows it. Nothing in moe_fx imports this module.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx.runtime import symm_mem
from moe_fx.runtime.comm import all_gather_rows, resolve_group

_LIMIT = 16  # NUM_TILES of the CUDA kernels


class EmulatedTransport(symm_mem.Transport):
    def empty(self, shape, dtype, device, group_name):
        return torch.full(shape, float("nan"), dtype=dtype, device=device) if dtype.is_floating_point else \
            torch.full(shape, -1, dtype=dtype, device=device)

    def to_experts(self, inp, out, in_splits, out_splits_offsets, group_name, major_align: int = 1):
        group = resolve_group(group_name)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        per_rank = in_splits.numel() // world
        _check_limits(world, per_rank)
        splits = _all_gather(in_splits, group)  # [world, E]: rows each source sends to each expert
        starts = torch.cumsum(splits, 1) - splits  # where each chunk sits in its source's input
        inputs = _all_gather(inp, group)
        out.fill_(float("nan"))
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        chunk_splits = splits[:, mine].t()  # [g, r]
        chunk_sources = starts[:, mine].t()
        totals = chunk_splits.sum(1)
        padded = torch.clamp((totals + major_align - 1) // major_align * major_align, min=major_align)
        expert_start = torch.cumsum(padded, 0) - padded
        chunk_starts = expert_start[:, None] + torch.cumsum(chunk_splits, 1) - chunk_splits
        for g in range(per_rank):
            for r in range(world):
                n, src, dst = int(chunk_splits[g, r]), int(chunk_sources[g, r]), int(chunk_starts[g, r])
                out[dst : dst + n] = inputs[r, src : src + n]
        out_splits_offsets.copy_(torch.stack([chunk_splits.reshape(-1), chunk_starts.reshape(-1)]))

    def to_sources(self, inp, out, in_splits_offsets, out_splits_offsets, group_name):
        group = resolve_group(group_name)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        per_rank = in_splits_offsets.shape[1] // world
        _check_limits(world, per_rank)
        layouts = _all_gather(in_splits_offsets, group).view(world, 2, per_rank, world)  # [src, 2, g, dst]
        inputs = _all_gather(inp, group)
        out.fill_(float("nan"))
        chunk_splits = layouts[:, 0, :, rank]  # [source rank, its local expert g] rank-major
        chunk_starts = torch.cumsum(chunk_splits.reshape(-1), 0) - chunk_splits.reshape(-1)
        for p in range(world):
            for g in range(per_rank):
                n = int(chunk_splits[p, g])
                src, dst = int(layouts[p, 1, g, rank]), int(chunk_starts[p * per_rank + g])
                out[dst : dst + n] = inputs[p, src : src + n]
        out_splits_offsets.copy_(torch.stack([chunk_splits.reshape(-1), chunk_starts]))


def _check_limits(world: int, per_rank: int) -> None:
    if per_rank > _LIMIT or world > _LIMIT:
        raise RuntimeError(f"symm_mem emulator: {per_rank} experts per rank on {world} ranks exceeds the kernels' {_LIMIT}")


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """[...] on each rank -> [world, ...]."""
    return all_gather_rows(t.unsqueeze(0), group)


def install() -> None:
    """Route moe_fx's symmetric-memory transport through the emulator (idempotent)."""
    if symm_mem.transport_name() != "emulated":
        symm_mem.set_transport(EmulatedTransport("emulated"))


def uninstall() -> None:
    """Back to torch's NVSHMEM ops."""
    if symm_mem.transport_name() == "emulated":
        symm_mem.set_transport(symm_mem.Transport("nvshmem"))


__all__ = ["EmulatedTransport", "install", "uninstall"]
