"""Custom ops behind the lowerings (namespace ``moe_fx``).

Shape legend: T tokens on this rank, K top-k, S = T*K routed rows, H hidden, N output features,
E experts, e local experts, ep group size, R rows routed to this rank's experts (data-dependent).

Row order conventions, used by every op here:
- "expert-major": rows grouped by expert, ascending; ``offsets[j]`` is the end of expert j's rows.
- "(t, k) order": row t*K + k is token t's k-th routing choice, as ``topk_ids.reshape(-1)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx.runtime.comm import all_gather_rows, pad_rows, reduce_scatter_rows, resolve_group

_LIB = "moe_fx"


# ---------------------------------------------------------------------------------------------
# Grouped matmul for the dtypes and shapes torch._grouped_mm cannot compile (fp32 / fp16 before
# torch 2.14, unaligned sizes). One mm per group: offsets are read on the host.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, K] expert-major, w [G, K, N], offsets [G] int32 -> [M, N]; rows past offsets[-1] are 0."""
    out = x.new_zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
        start = end
    return out


@grouped_mm.register_fake
def _(x, w, offsets):
    torch._check(x.shape[1] == w.shape[1], lambda: f"grouped_mm: x {x.shape} vs w {w.shape}")
    return x.new_empty((x.shape[0], w.shape[2]))


# ---------------------------------------------------------------------------------------------
# Local selection, shared by every strategy: rows routed to experts [start, start + e), sorted.
# ---------------------------------------------------------------------------------------------


def select_local_rows(
    flat_ids: torch.Tensor, expert_start: int, num_local: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """flat_ids [S] -> (rows [R] into flat_ids, expert-major; their expert ids [R]; offsets [e] int32)."""
    local = (flat_ids >= expert_start) & (flat_ids < expert_start + num_local)
    rows = local.nonzero().squeeze(1)
    row_expert, order = torch.sort(flat_ids[rows], stable=True)
    rows = rows[order]
    counts = torch.bincount(row_expert - expert_start, minlength=num_local)
    return rows, row_expert, torch.cumsum(counts, 0).to(torch.int32)


def _fake_rows() -> int:
    """A fresh unbacked size for the data-dependent number of rows routed to this rank."""
    return torch.library.get_ctx().new_dynamic_size()


# ---------------------------------------------------------------------------------------------
# AllGather: every rank gathers all tokens and routing (padded to the largest rank), computes its
# local experts on the rows routed to them, and reduce-scatters weighted partial sums back.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::allgather_dispatch", mutates_args=())
def allgather_dispatch(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_start: int,
    num_local_experts: int,
    group_name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (tokens [R, H], row_expert [R], row_weight [R], row_index [R], offsets [e],
    tokens_per_rank [ep]); row_index is the row's (t, k) index in the gathered, padded space
    [ep * T_max * K], rank-major."""
    group = resolve_group(group_name)
    k = topk_ids.shape[1]
    # NOTE: one scalar all-gather per block: ranks may hold different token counts.
    tokens_per_rank = all_gather_rows(torch.tensor([x.shape[0]], device=x.device), group)
    t_max = int(tokens_per_rank.max())
    x_all = all_gather_rows(pad_rows(x, t_max), group)
    ids_all = all_gather_rows(pad_rows(topk_ids, t_max, -1), group).reshape(-1)  # -1: padding
    w_all = all_gather_rows(pad_rows(topk_weights, t_max), group).reshape(-1)
    rows, row_expert, offsets = select_local_rows(ids_all, expert_start, num_local_experts)
    return x_all[rows // k], row_expert, w_all[rows], rows, offsets, tokens_per_rank


@allgather_dispatch.register_fake
def _(x, topk_ids, topk_weights, expert_start, num_local_experts, group_name):
    r = _fake_rows()
    return (
        x.new_empty((r, x.shape[1])),
        topk_ids.new_empty((r,)),
        topk_weights.new_empty((r,)),
        topk_ids.new_empty((r,), dtype=torch.int64),
        topk_ids.new_empty((num_local_experts,), dtype=torch.int32),
        topk_ids.new_empty((dist.get_world_size(resolve_group(group_name)),), dtype=torch.int64),
    )


@torch.library.custom_op(f"{_LIB}::allgather_combine", mutates_args=())
def allgather_combine(
    partial: torch.Tensor,
    row_index: torch.Tensor,
    tokens_per_rank: torch.Tensor,
    top_k: int,
    num_tokens: int,
    group_name: str,
) -> torch.Tensor:
    """partial [R, H] (already router-weighted) -> this rank's [T, H] sum over every rank's experts."""
    group = resolve_group(group_name)
    world = dist.get_world_size(group)
    t_max = int(tokens_per_rank.max())
    summed = partial.new_zeros((world * t_max, partial.shape[1]))
    summed.index_add_(0, row_index // top_k, partial)
    return reduce_scatter_rows(summed, group)[:num_tokens]


@allgather_combine.register_fake
def _(partial, row_index, tokens_per_rank, top_k, num_tokens, group_name):
    return partial.new_empty((num_tokens, partial.shape[1]))


# ---------------------------------------------------------------------------------------------
# All2AllV: each routed row goes exactly to the rank owning its expert. Split sizes are exchanged
# first and read on the host (a device-to-host sync), then the rows move with one all_to_all_single.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::all2allv_dispatch", mutates_args=())
def all2allv_dispatch(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, group_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (tokens [R, H] expert-major, row_expert [R], offsets [e],
    send_order [S], send_splits [ep], recv_splits [ep], regroup [R])."""
    group = resolve_group(group_name)
    world = dist.get_world_size(group)
    k = topk_ids.shape[1]
    e = num_experts // world
    flat_ids = topk_ids.reshape(-1)
    # Sorted by expert, the rows are also grouped by destination rank (contiguous expert blocks).
    sorted_ids, send_order = torch.sort(flat_ids, stable=True)
    send_counts = torch.bincount(sorted_ids, minlength=num_experts)  # [E] = [ep, e] rank-major
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)  # [ep src, e]
    # NOTE: host sync: all_to_all_single takes split sizes as Python ints.
    send_splits = send_counts.view(world, e).sum(1)
    recv_splits = recv_counts.view(world, e).sum(1)
    received = x.new_empty((int(recv_splits.sum()), x.shape[1]))
    dist.all_to_all_single(
        received, x[send_order // k], recv_splits.tolist(), send_splits.tolist(), group=group
    )
    # Received rows are (source rank, local expert)-major; regroup them expert-major.
    rank = dist.get_rank(group)
    local_ids = torch.arange(e, device=x.device).repeat(world) + rank * e
    received_expert = torch.repeat_interleave(local_ids, recv_counts)
    row_expert, regroup = torch.sort(received_expert, stable=True)
    offsets = torch.cumsum(recv_counts.view(world, e).sum(0), 0).to(torch.int32)
    return received[regroup], row_expert, offsets, send_order, send_splits, recv_splits, regroup


@all2allv_dispatch.register_fake
def _(x, topk_ids, num_experts, group_name):
    world = dist.get_world_size(resolve_group(group_name))
    r = _fake_rows()
    s = topk_ids.numel()
    i64 = dict(dtype=torch.int64)
    return (
        x.new_empty((r, x.shape[1])),
        topk_ids.new_empty((r,), **i64),
        topk_ids.new_empty((num_experts // world,), dtype=torch.int32),
        topk_ids.new_empty((s,), **i64),
        topk_ids.new_empty((world,), **i64),
        topk_ids.new_empty((world,), **i64),
        topk_ids.new_empty((r,), **i64),
    )


@torch.library.custom_op(f"{_LIB}::all2allv_combine", mutates_args=())
def all2allv_combine(
    y: torch.Tensor,
    send_order: torch.Tensor,
    send_splits: torch.Tensor,
    recv_splits: torch.Tensor,
    regroup: torch.Tensor,
    group_name: str,
) -> torch.Tensor:
    """y [R, H] expert-major -> [S, H] in (t, k) order on the rank that sent the rows."""
    group = resolve_group(group_name)
    rank_major = torch.empty_like(y).index_copy_(0, regroup, y)
    returned = y.new_empty((send_order.shape[0], y.shape[1]))
    dist.all_to_all_single(
        returned, rank_major, send_splits.tolist(), recv_splits.tolist(), group=group
    )
    return torch.empty_like(returned).index_copy_(0, send_order, returned)


@all2allv_combine.register_fake
def _(y, send_order, send_splits, recv_splits, regroup, group_name):
    return y.new_empty((send_order.shape[0], y.shape[1]))


# ---------------------------------------------------------------------------------------------
# Autograd: each op's backward moves gradients along the inverse path, with the sibling op or
# its collective mirror, so a compiled training step stays expert-parallel.
# ---------------------------------------------------------------------------------------------


def _grouped_mm_setup(ctx, inputs, output):
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _grouped_mm_backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.moe_fx.grouped_mm(grad, w.transpose(-2, -1), offsets)
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.moe_fx.grouped_mm_weight_grad(x, grad, offsets)
    return grad_x, grad_w, None


@torch.library.custom_op(f"{_LIB}::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, K], grad [M, N] expert-major -> [G, K, N]: per-group x_g.T @ grad_g."""
    out = x.new_zeros((offsets.shape[0], x.shape[1], grad.shape[1]))
    start = 0
    for g, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end].t(), grad[start:end], out=out[g])
        start = end
    return out


@grouped_mm_weight_grad.register_fake
def _(x, grad, offsets):
    return x.new_empty((offsets.shape[0], x.shape[1], grad.shape[1]))


torch.library.register_autograd(f"{_LIB}::grouped_mm", _grouped_mm_backward, setup_context=_grouped_mm_setup)


@torch.library.custom_op(f"{_LIB}::allgather_scatter_grad", mutates_args=())
def allgather_scatter_grad(
    grad_rows: torch.Tensor, rows: torch.Tensor, tokens_per_rank: torch.Tensor, rows_per_token: int,
    num_tokens: int, group_name: str,
) -> torch.Tensor:
    """Gradient of gathering ``rows`` out of the padded all-gathered [ep*T_max*rows_per_token, ...]
    space: scatter-add, reduce-scatter, keep this rank's first num_tokens*rows_per_token rows."""
    group = resolve_group(group_name)
    width = rows_per_token * int(tokens_per_rank.max())
    tail = grad_rows.shape[1:]
    full = grad_rows.new_zeros((dist.get_world_size(group) * width, *tail)).index_add_(0, rows, grad_rows)
    return reduce_scatter_rows(full, group)[: num_tokens * rows_per_token]


@allgather_scatter_grad.register_fake
def _(grad_rows, rows, tokens_per_rank, rows_per_token, num_tokens, group_name):
    return grad_rows.new_empty((num_tokens * rows_per_token, *grad_rows.shape[1:]))


def _allgather_dispatch_setup(ctx, inputs, output):
    x, topk_ids, _, _, _, group_name = inputs
    _, _, _, row_index, _, tokens_per_rank = output
    ctx.save_for_backward(row_index, tokens_per_rank)
    ctx.shape = (x.shape[0], topk_ids.shape[1], group_name)


def _allgather_dispatch_backward(ctx, g_tokens, g_expert, g_weight, g_index, g_offsets, g_counts):
    row_index, tokens_per_rank = ctx.saved_tensors
    t, k, group_name = ctx.shape
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.moe_fx.allgather_scatter_grad(
            g_tokens, row_index // k, tokens_per_rank, 1, t, group_name
        )
    if ctx.needs_input_grad[2]:
        grad_w = torch.ops.moe_fx.allgather_scatter_grad(
            g_weight, row_index, tokens_per_rank, k, t, group_name
        ).view(t, k)
    return grad_x, None, grad_w, None, None, None


torch.library.register_autograd(
    f"{_LIB}::allgather_dispatch", _allgather_dispatch_backward, setup_context=_allgather_dispatch_setup
)


@torch.library.custom_op(f"{_LIB}::allgather_gather_grad", mutates_args=())
def allgather_gather_grad(
    grad_out: torch.Tensor, row_token: torch.Tensor, tokens_per_rank: torch.Tensor, group_name: str
) -> torch.Tensor:
    """Gradient of allgather_combine: all-gather the [T, H] gradient (padded), pick each row's token."""
    group = resolve_group(group_name)
    gathered = all_gather_rows(pad_rows(grad_out, int(tokens_per_rank.max())), group)
    return gathered[row_token]


@allgather_gather_grad.register_fake
def _(grad_out, row_token, tokens_per_rank, group_name):
    return grad_out.new_empty((row_token.shape[0], grad_out.shape[1]))


def _allgather_combine_setup(ctx, inputs, output):
    _, row_index, tokens_per_rank, top_k, _, group_name = inputs
    ctx.save_for_backward(row_index, tokens_per_rank)
    ctx.top_k, ctx.group_name = top_k, group_name


def _allgather_combine_backward(ctx, grad):
    row_index, tokens_per_rank = ctx.saved_tensors
    grad_partial = torch.ops.moe_fx.allgather_gather_grad(
        grad, row_index // ctx.top_k, tokens_per_rank, ctx.group_name
    )
    return grad_partial, None, None, None, None, None


torch.library.register_autograd(
    f"{_LIB}::allgather_combine", _allgather_combine_backward, setup_context=_allgather_combine_setup
)


def _all2allv_dispatch_setup(ctx, inputs, output):
    x, topk_ids, _, group_name = inputs
    _, _, _, send_order, send_splits, recv_splits, regroup = output
    ctx.save_for_backward(send_order, send_splits, recv_splits, regroup)
    ctx.shape = (x.shape[0], topk_ids.shape[1], group_name)


def _all2allv_dispatch_backward(ctx, g_tokens, *unused):
    send_order, send_splits, recv_splits, regroup = ctx.saved_tensors
    t, k, group_name = ctx.shape
    rows = torch.ops.moe_fx.all2allv_combine(g_tokens, send_order, send_splits, recv_splits, regroup, group_name)
    return rows.view(t, k, -1).sum(1), None, None, None


torch.library.register_autograd(
    f"{_LIB}::all2allv_dispatch", _all2allv_dispatch_backward, setup_context=_all2allv_dispatch_setup
)


@torch.library.custom_op(f"{_LIB}::all2allv_return_grad", mutates_args=())
def all2allv_return_grad(
    grad_rows: torch.Tensor, send_order: torch.Tensor, send_splits: torch.Tensor,
    recv_splits: torch.Tensor, regroup: torch.Tensor, group_name: str,
) -> torch.Tensor:
    """Gradient of all2allv_combine: [S, H] in (t, k) order -> expert-major [R, H] on the expert ranks."""
    group = resolve_group(group_name)
    received = grad_rows.new_empty((regroup.shape[0], grad_rows.shape[1]))
    dist.all_to_all_single(
        received, grad_rows[send_order].contiguous(), recv_splits.tolist(), send_splits.tolist(), group=group
    )
    return received[regroup]


@all2allv_return_grad.register_fake
def _(grad_rows, send_order, send_splits, recv_splits, regroup, group_name):
    return grad_rows.new_empty((regroup.shape[0], grad_rows.shape[1]))


def _all2allv_combine_setup(ctx, inputs, output):
    _, send_order, send_splits, recv_splits, regroup, group_name = inputs
    ctx.save_for_backward(send_order, send_splits, recv_splits, regroup)
    ctx.group_name = group_name


def _all2allv_combine_backward(ctx, grad):
    send_order, send_splits, recv_splits, regroup = ctx.saved_tensors
    grad_y = torch.ops.moe_fx.all2allv_return_grad(grad, send_order, send_splits, recv_splits, regroup, ctx.group_name)
    return grad_y, None, None, None, None, None


torch.library.register_autograd(
    f"{_LIB}::all2allv_combine", _all2allv_combine_backward, setup_context=_all2allv_combine_setup
)


# ---------------------------------------------------------------------------------------------
# MC2 (static capacity, off Ascend): every rank sends every rank a buffer of fixed size
# C*K rows (C = the configured token bound), so shapes never depend on the routing and no value
# is read on the host: the path can be captured in a CUDA graph. Rows are placed by device-side
# arithmetic only (sort, searchsorted, index_copy).
# ---------------------------------------------------------------------------------------------


def _mc2_slots(topk_ids: torch.Tensor, num_experts: int, world: int, rows_per_rank: int) -> torch.Tensor:
    """[S] slot of each (t, k) row in the [ep * rows_per_rank] send buffer: destination-major,
    rows of one destination packed in expert order."""
    flat = topk_ids.reshape(-1)
    per_rank = num_experts // world
    sorted_ids, order = torch.sort(flat, stable=True)
    dest = sorted_ids // per_rank
    ranks = torch.arange(world, device=flat.device, dtype=dest.dtype)
    first = torch.searchsorted(dest, ranks)  # first sorted row of each destination
    position = torch.arange(flat.numel(), device=flat.device) - first[dest]
    slots_sorted = dest * rows_per_rank + position
    return torch.empty_like(slots_sorted).index_copy_(0, order, slots_sorted)


def _mc2_move(rows: torch.Tensor, send_slot: torch.Tensor, recv_order: torch.Tensor, group) -> torch.Tensor:
    """(t, k)-ordered rows -> the receiving ranks' expert-sorted rows (dispatch direction)."""
    send = rows.new_zeros((recv_order.shape[0], *rows.shape[1:])).index_copy_(0, send_slot, rows)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)  # equal splits: no host sync
    return received[recv_order]


def _mc2_move_back(rows: torch.Tensor, send_slot: torch.Tensor, recv_order: torch.Tensor, group) -> torch.Tensor:
    """Expert-sorted rows -> (t, k)-ordered rows on the sending rank (combine direction)."""
    back = torch.empty_like(rows).index_copy_(0, recv_order, rows)
    returned = torch.empty_like(back)
    dist.all_to_all_single(returned, back, group=group)
    return returned[send_slot]


@torch.library.custom_op(f"{_LIB}::mc2_dispatch", mutates_args=())
def mc2_dispatch(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, capacity_tokens: int, group_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (tokens [ep*C*K, H] expert-sorted, row_expert [ep*C*K], offsets [e],
    send_slot [S], recv_order [ep*C*K]). Rows past offsets[-1] are padding."""
    group = resolve_group(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    k = topk_ids.shape[1]
    rows_per_rank = capacity_tokens * k
    per_rank = num_experts // world
    send_slot = _mc2_slots(topk_ids, num_experts, world, rows_per_rank)
    ids = topk_ids.new_full((world * rows_per_rank,), -1).index_copy_(0, send_slot, topk_ids.reshape(-1))
    received_ids = torch.empty_like(ids)
    dist.all_to_all_single(received_ids, ids, group=group)
    # Padding (-1) sorts after every local expert; it is excluded from the offsets.
    sort_key = torch.where(received_ids < 0, num_experts, received_ids)
    sorted_ids, recv_order = torch.sort(sort_key, stable=True)
    local = torch.arange(rank * per_rank, (rank + 1) * per_rank, device=x.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, local, right=True).to(torch.int32)
    tokens = _mc2_move(x.repeat_interleave(k, dim=0), send_slot, recv_order, group)
    row_expert = sorted_ids.clamp(max=rank * per_rank + per_rank - 1)  # padding reads a valid bias
    return tokens, row_expert, offsets, send_slot, recv_order


@mc2_dispatch.register_fake
def _(x, topk_ids, num_experts, capacity_tokens, group_name):
    world = dist.get_world_size(resolve_group(group_name))
    rows = world * capacity_tokens * topk_ids.shape[1]
    return (
        x.new_empty((rows, x.shape[1])),
        topk_ids.new_empty((rows,), dtype=torch.int64),
        topk_ids.new_empty((num_experts // world,), dtype=torch.int32),
        topk_ids.new_empty((topk_ids.numel(),), dtype=torch.int64),
        topk_ids.new_empty((rows,), dtype=torch.int64),
    )


@torch.library.custom_op(f"{_LIB}::mc2_combine", mutates_args=())
def mc2_combine(
    y: torch.Tensor, send_slot: torch.Tensor, recv_order: torch.Tensor, group_name: str
) -> torch.Tensor:
    """y [ep*C*K, H] expert-sorted -> [S, H] in (t, k) order on the rank that sent the rows."""
    return _mc2_move_back(y, send_slot, recv_order, resolve_group(group_name))


@mc2_combine.register_fake
def _(y, send_slot, recv_order, group_name):
    return y.new_empty((send_slot.shape[0], y.shape[1]))


@torch.library.custom_op(f"{_LIB}::mc2_return_grad", mutates_args=())
def mc2_return_grad(
    grad_rows: torch.Tensor, send_slot: torch.Tensor, recv_order: torch.Tensor, group_name: str
) -> torch.Tensor:
    """Gradient of mc2_combine: (t, k)-ordered row gradients back to the expert ranks."""
    return _mc2_move(grad_rows, send_slot, recv_order, resolve_group(group_name))


@mc2_return_grad.register_fake
def _(grad_rows, send_slot, recv_order, group_name):
    return grad_rows.new_empty((recv_order.shape[0], grad_rows.shape[1]))


def _mc2_dispatch_setup(ctx, inputs, output):
    x, topk_ids, _, _, group_name = inputs
    _, _, _, send_slot, recv_order = output
    ctx.save_for_backward(send_slot, recv_order)
    ctx.shape = (x.shape[0], topk_ids.shape[1], group_name)


def _mc2_dispatch_backward(ctx, g_tokens, *unused):
    send_slot, recv_order = ctx.saved_tensors
    t, k, group_name = ctx.shape
    rows = torch.ops.moe_fx.mc2_combine(g_tokens, send_slot, recv_order, group_name)
    return rows.view(t, k, -1).sum(1), None, None, None, None


torch.library.register_autograd(f"{_LIB}::mc2_dispatch", _mc2_dispatch_backward, setup_context=_mc2_dispatch_setup)


def _mc2_combine_setup(ctx, inputs, output):
    _, send_slot, recv_order, group_name = inputs
    ctx.save_for_backward(send_slot, recv_order)
    ctx.group_name = group_name


def _mc2_combine_backward(ctx, grad):
    send_slot, recv_order = ctx.saved_tensors
    return torch.ops.moe_fx.mc2_return_grad(grad, send_slot, recv_order, ctx.group_name), None, None, None


torch.library.register_autograd(f"{_LIB}::mc2_combine", _mc2_combine_backward, setup_context=_mc2_combine_setup)


# ---------------------------------------------------------------------------------------------
# Replicated (TP-style) token layout: each rank computes a slice, then all ranks gather the rows.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::gather_rows", mutates_args=())
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


torch.library.register_autograd(f"{_LIB}::gather_rows", _gather_rows_backward, setup_context=_gather_rows_setup)
