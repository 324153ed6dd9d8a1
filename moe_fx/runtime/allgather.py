"""AllGather ops: every rank gathers all tokens and routing (padded to the largest rank), computes
its local experts on the rows routed to them, and reduce-scatters weighted partial sums back."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx.runtime.comm import agree_on_token_counts, all_gather_rows, pad_rows, reduce_scatter_rows, resolve_group
from moe_fx.runtime.library import LIB, fake_rows
from moe_fx.runtime.permute import stable_sort


def select_local_rows(
    flat_ids: torch.Tensor, expert_start: int, num_local: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """flat_ids [S] -> (rows [R] into flat_ids, expert-major; their expert ids [R]; offsets [e] int32)."""
    local = (flat_ids >= expert_start) & (flat_ids < expert_start + num_local)
    rows = local.nonzero().squeeze(1)
    row_expert, order = stable_sort(flat_ids[rows])
    rows = rows[order]
    counts = torch.bincount(row_expert - expert_start, minlength=num_local)
    return rows, row_expert, torch.cumsum(counts, 0).to(torch.int32)


@torch.library.custom_op(f"{LIB}::allgather_dispatch", mutates_args=())
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
    tokens_per_rank, t_max = agree_on_token_counts(x, group)
    x_all = all_gather_rows(pad_rows(x, t_max), group)
    ids_all = all_gather_rows(pad_rows(topk_ids, t_max, -1), group).reshape(-1)  # -1: padding
    w_all = all_gather_rows(pad_rows(topk_weights, t_max), group).reshape(-1)
    rows, row_expert, offsets = select_local_rows(ids_all, expert_start, num_local_experts)
    return x_all[rows // k], row_expert, w_all[rows], rows, offsets, tokens_per_rank


@allgather_dispatch.register_fake
def _(x, topk_ids, topk_weights, expert_start, num_local_experts, group_name):
    r = fake_rows()
    return (
        x.new_empty((r, x.shape[1])),
        topk_ids.new_empty((r,)),
        topk_weights.new_empty((r,)),
        topk_ids.new_empty((r,), dtype=torch.int64),
        topk_ids.new_empty((num_local_experts,), dtype=torch.int32),
        topk_ids.new_empty((dist.get_world_size(resolve_group(group_name)),), dtype=torch.int64),
    )


@torch.library.custom_op(f"{LIB}::allgather_combine", mutates_args=())
def allgather_combine(
    partial: torch.Tensor,
    row_index: torch.Tensor,
    tokens_per_rank: torch.Tensor,
    top_k: int,
    num_tokens: int,
    group_name: str,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """partial [R, H] (already router-weighted) -> this rank's [T, H] sum over every rank's experts.
    Each rank sums its rows in partial's dtype, then the sums cross ranks in ``out_dtype`` (the
    model's: half the bytes of fp32 for bf16 models, one rounding more than on one device)."""
    group = resolve_group(group_name)
    world = dist.get_world_size(group)
    t_max = int(tokens_per_rank.max())
    summed = partial.new_zeros((world * t_max, partial.shape[1]))
    summed.index_add_(0, row_index // top_k, partial)
    return reduce_scatter_rows(summed.to(out_dtype or partial.dtype), group)[:num_tokens]


@allgather_combine.register_fake
def _(partial, row_index, tokens_per_rank, top_k, num_tokens, group_name, out_dtype=None):
    return partial.new_empty((num_tokens, partial.shape[1]), dtype=out_dtype or partial.dtype)


@torch.library.custom_op(f"{LIB}::allgather_scatter_grad", mutates_args=())
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
    f"{LIB}::allgather_dispatch", _allgather_dispatch_backward, setup_context=_allgather_dispatch_setup
)


@torch.library.custom_op(f"{LIB}::allgather_gather_grad", mutates_args=())
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
    partial, row_index, tokens_per_rank, top_k, _, group_name, _ = inputs
    ctx.save_for_backward(row_index, tokens_per_rank)
    ctx.top_k, ctx.group_name, ctx.partial_dtype = top_k, group_name, partial.dtype


def _allgather_combine_backward(ctx, grad):
    row_index, tokens_per_rank = ctx.saved_tensors
    grad_partial = torch.ops.moe_fx.allgather_gather_grad(
        grad, row_index // ctx.top_k, tokens_per_rank, ctx.group_name
    ).to(ctx.partial_dtype)
    return grad_partial, None, None, None, None, None, None


torch.library.register_autograd(
    f"{LIB}::allgather_combine", _allgather_combine_backward, setup_context=_allgather_combine_setup
)

