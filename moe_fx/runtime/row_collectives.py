"""Row collectives for lowerings that do their routing with device ops of their own (the Ascend
lowering): gather every rank's tokens, reduce-scatter them back, exchange per-expert counts, and
move rows with host-side split sizes. No autograd: these serve the inference lowerings."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx.runtime.comm import (
    agree_on_token_counts, all_gather_rows, exchange_rows, pad_rows, rank_splits, reduce_scatter_rows, resolve_group,
)
from moe_fx.runtime.library import LIB, fake_rows


@torch.library.custom_op(f"{LIB}::gather_tokens", mutates_args=())
def gather_tokens(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, group_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's tokens and routing, each rank's block padded to the largest T (T_max):
    (x [ep*T_max, H], topk_ids [ep*T_max, K], topk_weights [ep*T_max, K], tokens_per_rank [ep]).
    Padding rows route to expert 0 with weight 0; their outputs land in padding rows."""
    group = resolve_group(group_name)
    tokens_per_rank, t_max = agree_on_token_counts(x, group)
    return (
        all_gather_rows(pad_rows(x, t_max), group),
        all_gather_rows(pad_rows(topk_ids, t_max), group),
        all_gather_rows(pad_rows(topk_weights, t_max), group),
        tokens_per_rank,
    )


@gather_tokens.register_fake
def _(x, topk_ids, topk_weights, group_name):
    world = dist.get_world_size(resolve_group(group_name))
    rows = world * fake_rows()
    return (
        x.new_empty((rows, x.shape[1])),
        topk_ids.new_empty((rows, topk_ids.shape[1])),
        topk_weights.new_empty((rows, topk_weights.shape[1])),
        topk_ids.new_empty((world,), dtype=torch.int64),
    )


@torch.library.custom_op(f"{LIB}::scatter_tokens", mutates_args=())
def scatter_tokens(partial: torch.Tensor, num_tokens: int, group_name: str) -> torch.Tensor:
    """partial [ep*T_max, H] (this rank's contribution to every rank's tokens) -> this rank's
    [T, H] sum over ranks: the inverse of gather_tokens."""
    return reduce_scatter_rows(partial, resolve_group(group_name))[:num_tokens]


@scatter_tokens.register_fake
def _(partial, num_tokens, group_name):
    return partial.new_empty((num_tokens, partial.shape[1]))


@torch.library.custom_op(f"{LIB}::exchange_counts", mutates_args=())
def exchange_counts(counts: torch.Tensor, group_name: str) -> torch.Tensor:
    """counts [ep*e] rows this rank sends to each (rank, local expert) -> [ep*e] rows it receives
    from each (source rank, own local expert). Equal splits: no host read."""
    return exchange_rows(counts, resolve_group(group_name))


@exchange_counts.register_fake
def _(counts, group_name):
    return torch.empty_like(counts)


@torch.library.custom_op(f"{LIB}::all_to_all_rows", mutates_args=())
def all_to_all_rows(
    rows: torch.Tensor, send_counts: torch.Tensor, recv_counts: torch.Tensor, group_name: str
) -> torch.Tensor:
    """rows [S, H] grouped by destination -> received rows [R, H] grouped by source; the counts are
    [ep*e] per (rank, expert) and summed per rank."""
    group = resolve_group(group_name)
    world = dist.get_world_size(group)
    return exchange_rows(rows, group, rank_splits(send_counts, world), rank_splits(recv_counts, world))


@all_to_all_rows.register_fake
def _(rows, send_counts, recv_counts, group_name):
    return rows.new_empty((fake_rows(), rows.shape[1]))
