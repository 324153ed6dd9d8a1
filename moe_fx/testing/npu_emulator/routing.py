"""Routing ops: npu_moe_init_routing_v2, npu_moe_token_permute / npu_moe_token_unpermute.

Index convention shared by all three: entry f = t*K + k of the flattened [N, K] expert ids;
"destination row" of an entry is its row in the expert-sorted output.

Refused (ContractError): dtypes outside the docs' lists (Ascend/op-plugin docs/en/custom_APIs/
torch_npu/torch_npu-npu_moe_init_routing_v2.md); permute / unpermute on 0 rows, which
vllm-ascend never issues (it guards ``shape[0] > 0``, vllm_ascend/ops/fused_moe/token_dispatcher.py).
"""

from __future__ import annotations

import torch

from moe_fx.testing.npu_emulator.common import check_dtype, check_rows, define, fill_past, unsupported

_INT32_MAX = torch.iinfo(torch.int32).max
_INIT_ROUTING_DOC = "torch_npu doc of npu_moe_init_routing_v2"
_PERMUTE_SOURCE = "vllm-ascend token_dispatcher.py guards shape[0] > 0"


# ---------------------------------------------------------------------------------------------
# npu_moe_init_routing_v2 (numpy reference MoeInitRoutingV2CPU in the torch_npu doc)
# ---------------------------------------------------------------------------------------------

INIT_ROUTING_V2 = (
    "npu_moe_init_routing_v2(Tensor x, Tensor expert_idx, *, Tensor? scale=None, Tensor? offset=None, "
    "int active_num=-1, int expert_capacity=-1, int expert_num=-1, int drop_pad_mode=0, "
    "int expert_tokens_num_type=0, bool expert_tokens_num_flag=False, int quant_mode=-1, "
    "int[] active_expert_range=[], int row_idx_type=0) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _expert_range(active_expert_range, expert_num: int) -> tuple[int, int]:
    if len(active_expert_range) == 0:
        return 0, expert_num
    start, end = active_expert_range
    return start, end


def init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                    expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0,
                    expert_tokens_num_flag=False, quant_mode=-1, active_expert_range=(), row_idx_type=0):
    """Returns (expanded_x [N*K, H], expanded_row_idx [N*K] int32, counts, expanded_scale [N*K])."""
    op = "npu_moe_init_routing_v2"
    _check_init_routing(x, expert_idx)
    if drop_pad_mode != 0:
        raise unsupported(op, f"drop_pad_mode={drop_pad_mode}")
    if quant_mode != -1:
        raise unsupported(op, f"quant_mode={quant_mode}")
    n, k = expert_idx.shape
    start, end = _expert_range(active_expert_range, expert_num)
    flat = expert_idx.reshape(-1).to(torch.int64)
    # Ids below start become INT32_MAX, so a stable sort puts in-range entries first,
    # ordered by (expert, f); ids at or past end follow them and are not counted.
    key = torch.where(flat < start, _INT32_MAX, flat)
    sorted_ids, sorted_f = torch.sort(key, stable=True)
    in_range = (sorted_ids >= start) & (sorted_ids < end)
    n_valid = int(in_range.sum())
    if row_idx_type == 0:  # destination row of each entry, -1 when out of range
        row_idx = torch.full((n * k,), -1, dtype=torch.int32)
        row_idx[sorted_f[:n_valid]] = torch.arange(n_valid, dtype=torch.int32)
    elif row_idx_type == 1:  # source entry of each row
        row_idx = sorted_f.to(torch.int32)
    else:
        raise unsupported(op, f"row_idx_type={row_idx_type}")
    expanded_x = fill_past(x[sorted_f // k], n_valid)
    counts = torch.bincount(flat[(flat >= start) & (flat < end)] - start, minlength=end - start)
    if expert_tokens_num_type == 1:
        tokens_num = counts
    elif expert_tokens_num_type == 0:
        tokens_num = torch.cumsum(counts, 0)
    elif expert_tokens_num_type == 2:  # [expert_num, 2] (id, count) pairs, non-zero first
        tokens_num = torch.zeros((expert_num, 2), dtype=torch.int64)
        ids = counts.nonzero().squeeze(1)
        tokens_num[: ids.numel(), 0] = ids + start
        tokens_num[: ids.numel(), 1] = counts[ids]
    else:
        raise unsupported(op, f"expert_tokens_num_type={expert_tokens_num_type}")
    expanded_scale = torch.full((n * k,), float("nan"), dtype=torch.float32)  # no quantization
    return expanded_x, row_idx, tokens_num.to(torch.int64), expanded_scale


def _check_init_routing(x, expert_idx) -> None:
    op = "npu_moe_init_routing_v2"
    check_dtype(op, "x", x, (torch.float16, torch.bfloat16, torch.float32, torch.int8), _INIT_ROUTING_DOC)
    check_dtype(op, "expert_idx", expert_idx, (torch.int32,), _INIT_ROUTING_DOC)


def _init_routing_v2_fake(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                          expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0,
                          expert_tokens_num_flag=False, quant_mode=-1, active_expert_range=(), row_idx_type=0):
    _check_init_routing(x, expert_idx)
    n, k = expert_idx.shape
    start, end = _expert_range(active_expert_range, expert_num)
    counts_shape = (expert_num, 2) if expert_tokens_num_type == 2 else (end - start,)
    return (
        x.new_empty((n * k, x.shape[1])),
        expert_idx.new_empty((n * k,), dtype=torch.int32),
        expert_idx.new_empty(counts_shape, dtype=torch.int64),
        x.new_empty((n * k,), dtype=torch.float32),
    )


# ---------------------------------------------------------------------------------------------
# npu_moe_token_permute / npu_moe_token_unpermute (aclnnMoeTokenPermute / Unpermute)
# ---------------------------------------------------------------------------------------------

TOKEN_PERMUTE = (
    "npu_moe_token_permute(Tensor tokens, Tensor indices, int? num_out_tokens=None, "
    "bool padded_mode=False) -> (Tensor, Tensor)"
)
TOKEN_UNPERMUTE = (
    "npu_moe_token_unpermute(Tensor permuted_tokens, Tensor sorted_indices, Tensor? probs=None, "
    "bool padded_mode=False, int[]? restore_shape=None) -> Tensor"
)


def _top_k(indices: torch.Tensor) -> int:
    return 1 if indices.dim() == 1 else indices.shape[1]


def token_permute(tokens, indices, num_out_tokens=None, padded_mode=False):
    """Returns (permuted [M, H], sorted_indices [N*K] int32): the destination row of each entry."""
    if padded_mode:
        raise unsupported("npu_moe_token_permute", "padded_mode=True")
    check_rows("npu_moe_token_permute", "tokens", tokens, _PERMUTE_SOURCE)
    k = _top_k(indices)
    s1 = torch.sort(indices.reshape(-1), stable=True).indices
    rows = s1.numel() if num_out_tokens is None or num_out_tokens <= 0 else num_out_tokens
    sorted_indices = torch.argsort(s1, stable=True).to(torch.int32)
    return tokens[s1[:rows] // k], sorted_indices


def _token_permute_fake(tokens, indices, num_out_tokens=None, padded_mode=False):
    s = indices.numel()
    rows = s if num_out_tokens is None or num_out_tokens <= 0 else num_out_tokens
    return tokens.new_empty((rows, tokens.shape[1])), indices.new_empty((s,), dtype=torch.int32)


def token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    """out[t] = sum_k probs[t, k] * permuted[sorted_indices[t*K + k]]; an index of -1 contributes 0."""
    if padded_mode:
        raise unsupported("npu_moe_token_unpermute", "padded_mode=True")
    check_rows("npu_moe_token_unpermute", "permuted_tokens", permuted_tokens, _PERMUTE_SOURCE)
    k = 1 if probs is None else probs.shape[1]
    n = sorted_indices.numel() // k
    idx = sorted_indices.to(torch.int64)
    if bool(((idx < -1) | (idx >= permuted_tokens.shape[0])).any()):
        raise IndexError(
            f"npu_moe_token_unpermute: sorted_indices outside [-1, {permuted_tokens.shape[0]}): "
            f"{idx.min().item()}..{idx.max().item()}"
        )
    valid = idx >= 0
    rows = permuted_tokens[idx.clamp(min=0)].float()
    rows = torch.where(valid.unsqueeze(1), rows, 0.0)
    if probs is not None:
        rows = rows * probs.reshape(-1, 1).float()
    return rows.view(n, k, -1).sum(1).to(permuted_tokens.dtype)


def _token_unpermute_fake(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    k = 1 if probs is None else probs.shape[1]
    return permuted_tokens.new_empty((sorted_indices.shape[0] // k, permuted_tokens.shape[1]))


def register() -> None:
    define(INIT_ROUTING_V2, init_routing_v2, _init_routing_v2_fake)
    define(TOKEN_PERMUTE, token_permute, _token_permute_fake)
    define(TOKEN_UNPERMUTE, token_unpermute, _token_unpermute_fake)
