"""MC2's symmetric-memory transport (CUDA, NVSHMEM): the dispatch and combine move only the routed
rows, with split sizes that never leave the device.

torch's ``symm_mem::all_to_all_vdev_2d`` takes rows sorted by global expert (rank-major) and
delivers them expert-major on the owning ranks; ``all_to_all_vdev_2d_offset`` sends them back.
Their contract, as torch 2.11 implements it (torch/csrc/distributed/c10d/symm_mem/nvshmem_extension.cu):

- input, output and split tensors live in symmetric memory, the same shapes on every rank;
- ``out_splits_offsets`` [2, E]: row 0 the rows of chunk (local expert g, source rank r) at index
  g * ep + r, row 1 where the chunk starts in ``out``. An expert that receives nothing still takes
  one row (CUTLASS refuses empty groups), so the output holds up to ep * C * K + experts-per-rank rows;
- peers *pull* from the input buffer and *write* the split exchange into ``out_splits_offsets``:
  a buffer is reused only after a later collective of the same group, which every rank enters
  after finishing the earlier one. Dispatch and combine alternate, and each copies out what it
  returns, so one set of buffers per group and shape serves every block;
- at most 16 experts per rank and 16 ranks (one warp-scan tile each).

The transport is chosen by ``moe_fx.config.mc2_transport``. Its buffers are allocated at the first
call, outside any CUDA-graph capture (inductor's cudagraph trees warm up eagerly first). Only the
forward is implemented: a backward through it raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from moe_fx.runtime.comm import resolve_group
from moe_fx.runtime.library import LIB, check_capacity
from moe_fx.runtime.permute import stable_sort, unpermute

# Limits of torch's kernels (see the module docstring).
MAX_EXPERTS_PER_RANK = 16
MAX_RANKS = 16


@dataclass
class Transport:
    """The three calls the ops make; ``moe_fx.testing.symm_mem_emulator`` swaps in a gloo version."""

    name: str
    _backend_selected: bool = False

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, group_name: str):
        import torch.distributed._symmetric_memory as symm_mem

        if not self._backend_selected:  # once, before the first allocation
            symm_mem.set_backend("NVSHMEM")
            self._backend_selected = True
        buffer = symm_mem.empty(shape, dtype=dtype, device=device)
        symm_mem.rendezvous(buffer, group_name)
        return buffer

    def to_experts(self, inp, out, in_splits, out_splits_offsets, group_name: str) -> None:
        torch.ops.symm_mem.all_to_all_vdev_2d(inp, out, in_splits, out_splits_offsets, group_name)

    def to_sources(self, inp, out, in_splits_offsets, out_splits_offsets, group_name: str) -> None:
        torch.ops.symm_mem.all_to_all_vdev_2d_offset(inp, out, in_splits_offsets, out_splits_offsets, group_name)


_transport = Transport("nvshmem")
_buffers: dict[tuple, torch.Tensor] = {}


def set_transport(transport: Transport) -> None:
    """Replace the transport (the emulator, in tests); drops the buffers of the previous one."""
    global _transport
    _transport = transport
    _buffers.clear()


def release_buffers() -> None:
    """Drop the buffers moe_fx allocated (NVSHMEM frees are collective: every rank calls this at
    the same point, and no compiled graph may use them afterwards)."""
    _buffers.clear()


def transport_name() -> str:
    return _transport.name


def unavailable_reason(device_type: str) -> str | None:
    """Why the transport cannot serve a block on ``device_type``, or None."""
    if _transport.name != "nvshmem":
        return None
    if device_type != "cuda":
        return f"it needs CUDA tensors (the block runs on {device_type!r})"
    import torch.distributed._symmetric_memory as symm_mem

    if not symm_mem.is_nvshmem_available():
        return "torch reports NVSHMEM unavailable (torch.distributed._symmetric_memory.is_nvshmem_available())"
    return None


def _buffer(role: str, shape: tuple[int, ...], dtype: torch.dtype, device, group_name: str) -> torch.Tensor:
    key = (role, shape, dtype, str(device), group_name)
    if key not in _buffers:
        _buffers[key] = _transport.empty(shape, dtype, device, group_name)
    return _buffers[key]


def _rows_out(world: int, experts_per_rank: int, capacity_rows: int) -> int:
    return world * capacity_rows + experts_per_rank  # + one row per empty expert


@torch.library.custom_op(f"{LIB}::symm_mc2_dispatch", mutates_args=())
def symm_mc2_dispatch(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, capacity_tokens: int, group_name: str,
    block: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (tokens [ep*C*K + e, H] expert-major, row_expert, offsets [e] (end row of each local
    expert), order [S] (sorted position -> routed row t*K + k), splits_offsets [2, E] (the layout,
    for the combine)). Rows outside the chunks hold stale values; no consumer reads them back."""
    counters["moe_fx"]["ran_symm_mem"] += 1
    group = resolve_group(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    check_capacity(block, x.shape[0], capacity_tokens, rank)
    k, hidden = topk_ids.shape[1], x.shape[1]
    per_rank = num_experts // world
    capacity_rows = capacity_tokens * k
    sorted_ids, order = stable_sort(topk_ids.reshape(-1))
    send = _buffer("dispatch_in", (capacity_rows, hidden), x.dtype, x.device, group_name)
    send[: order.shape[0]].copy_(x[order // k])
    in_splits = _buffer("dispatch_splits", (num_experts,), torch.int64, x.device, group_name)
    in_splits.copy_(torch.bincount(sorted_ids, minlength=num_experts))
    received = _buffer("dispatch_out", (_rows_out(world, per_rank, capacity_rows), hidden), x.dtype, x.device,
                       group_name)
    layout = _buffer("dispatch_layout", (2, num_experts), torch.int64, x.device, group_name)
    _transport.to_experts(send, received, in_splits, layout, group_name)
    splits_offsets = layout.clone()  # peers write the next dispatch's layout into `layout`
    # Chunk (g, r) sits at index g * ep + r: expert g ends where its last source's chunk ends.
    last_chunk = splits_offsets.view(2, per_rank, world)[:, :, -1]
    offsets = (last_chunk[1] + last_chunk[0]).to(torch.int32)
    rows = torch.arange(received.shape[0], device=x.device, dtype=torch.int32)
    local = torch.searchsorted(offsets, rows, right=True).clamp(max=per_rank - 1)
    return received.clone(), local.long() + rank * per_rank, offsets, order, splits_offsets


@symm_mc2_dispatch.register_fake
def _(x, topk_ids, num_experts, capacity_tokens, group_name, block=""):
    world = dist.get_world_size(resolve_group(group_name))
    rows = _rows_out(world, num_experts // world, capacity_tokens * topk_ids.shape[1])
    return (
        x.new_empty((rows, x.shape[1])),
        topk_ids.new_empty((rows,), dtype=torch.int64),
        topk_ids.new_empty((num_experts // world,), dtype=torch.int32),
        topk_ids.new_empty((topk_ids.numel(),), dtype=torch.int64),
        topk_ids.new_empty((2, num_experts), dtype=torch.int64),
    )


@torch.library.custom_op(f"{LIB}::symm_mc2_combine", mutates_args=())
def symm_mc2_combine(
    y: torch.Tensor, order: torch.Tensor, splits_offsets: torch.Tensor, capacity_rows: int, group_name: str
) -> torch.Tensor:
    """y [ep*C*K + e, H] expert-major (dispatch's layout) -> [S, H] in (t, k) order on the sender."""
    send = _buffer("combine_in", tuple(y.shape), y.dtype, y.device, group_name)
    send.copy_(y)
    in_layout = _buffer("combine_in_layout", tuple(splits_offsets.shape), torch.int64, y.device, group_name)
    in_layout.copy_(splits_offsets)
    returned = _buffer("combine_out", (capacity_rows, y.shape[1]), y.dtype, y.device, group_name)
    out_layout = _buffer("combine_layout", tuple(splits_offsets.shape), torch.int64, y.device, group_name)
    _transport.to_sources(send, returned, in_layout, out_layout, group_name)
    # Rows come back rank-major, i.e. in the sorted order the dispatch sent them in.
    return unpermute(returned[: order.shape[0]], order)


@symm_mc2_combine.register_fake
def _(y, order, splits_offsets, capacity_rows, group_name):
    return y.new_empty((order.shape[0], y.shape[1]))


def _no_backward(ctx, *grads):
    raise NotImplementedError(
        "moe_fx: the symmetric-memory MC2 transport has no backward; train with "
        "moe_fx.config.mc2_transport='all_to_all' (the default)"
    )


for _op in ("symm_mc2_dispatch", "symm_mc2_combine"):
    torch.library.register_autograd(f"{LIB}::{_op}", _no_backward)
