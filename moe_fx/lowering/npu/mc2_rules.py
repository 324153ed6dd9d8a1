"""What the MC2 kernels accept (npu_moe_distribute_dispatch_v2 / combine_v2 and their v1), per SoC.

Checked when a block is lowered: a forced ``lowering="mc2"`` beyond these fails at compile time
naming the rule, and "auto" never picks MC2 there (moe_fx/lowering/npu/select.py).

Sources (the README's Ascend table lists them too):
  DISPATCH  Ascend/op-plugin docs/en/custom_APIs/torch_npu/torch_npu-npu_moe_distribute_dispatch_v2.md
            (branch 26.1.0; the zh page on master says the same unless noted)
  COMBINE   the same folder, torch_npu-npu_moe_distribute_combine_v2.md
  COMBINE_HOST  Ascend/op-plugin op_plugin/ops/opapi/MoeDistributeCombineKernelV2OpApi.cpp (517f2e7)

Only the algorithms moe_fx emits are covered: A2 "fullmesh" (passed explicitly to the v2 ops) and
A3's default comm_alg "" (fullmesh_v1), no TP domain, no shared-expert ranks, no quantization.
"""

from __future__ import annotations

import os

import torch

# DISPATCH "x": bfloat16 or float16; COMBINE "expand_x": bfloat16 (its host code also takes float16
# and int32 and refuses Float: "dtype of expand_x should be BFloat16, Float16 or Int").
MC2_DTYPES = (torch.bfloat16, torch.float16)
# DISPATCH "BS": 0 < BS <= 256 on A2 with "fullmesh", <= 512 on A3 with "" / "fullmesh_v1".
MC2_MAX_TOKENS = {"A2": 256, "A3": 512}
# DISPATCH "K": 0 < K <= 16, and <= 12 "when comm_alg is set to "" or "fullmesh_v2"" (en page; the
# zh page names fullmesh_v2 only: the stricter reading is kept). A2 gets comm_alg="fullmesh".
MC2_MAX_TOP_K = {"A2": 16, "A3": 12}
# DISPATCH "ep_world_size" on A2 with "fullmesh".
A2_EP_SIZES = frozenset((*range(2, 9), 16, 32, 64, 128, 256))
# DISPATCH "HCCL communication domain buffer size": MB, "200 MB if not configured".
HCCL_BUFFSIZE_ENV = "HCCL_BUFFSIZE"
HCCL_BUFFSIZE_DEFAULT_MB = 200
_MB = 1024 * 1024
# dispatch's shared_expert_num, left at its default 1 (with shared_expert_rank_num 0): A3's buffer
# formula counts it.
_SHARED_EXPERT_NUM = 1


def hccl_buffsize_mb() -> int:
    """The HCCL buffer size every communicator gets, in MB (HCCL reads it when a group is created)."""
    value = os.environ.get(HCCL_BUFFSIZE_ENV)
    if value is None:
        return HCCL_BUFFSIZE_DEFAULT_MB
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable {HCCL_BUFFSIZE_ENV}={value!r} is not a whole number of MB") from None


def _align(x: int, to: int) -> int:
    return (x + to - 1) // to * to


def hccl_buffsize_needed_mb(*, soc: str, tokens_per_rank: int, ep_size: int, num_experts: int, top_k: int,
                            hidden_size: int) -> int:
    """DISPATCH's minimum buffer for these sizes (bf16/fp16 tokens: 2 bytes), rounded up to MB.
    global_bs = 0, so max_bs is every rank's BS = tokens_per_rank."""
    bs, ep, k, h = tokens_per_rank, ep_size, top_k, hidden_size
    local = num_experts // ep
    if soc == "A2":  # "fullmesh": 2 * (BS * ep * min(L, K) * H * sizeof(uint16) + 2MB)
        need = 2 * (bs * ep * min(local, k) * h * 2 + 2 * _MB)
    else:  # A3, "" / "fullmesh_v1": 2 * (L*max_bs*ep*Align512(Align32(2H) + 64) + (K + shared)*max_bs*Align512(2H))
        need = 2 * (local * bs * ep * _align(_align(2 * h, 32) + 64, 512)
                    + (k + _SHARED_EXPERT_NUM) * bs * _align(2 * h, 512))
    return -(-need // _MB)


def mc2_limit(*, soc: str | None, ep_size: int, num_experts: int, top_k: int, hidden_size: int,
              tokens_per_rank: int | None, dtype: torch.dtype) -> str | None:
    """Why the MC2 kernels cannot run this block, or None when they can."""
    if soc not in MC2_MAX_TOKENS:
        return f"the MC2 limits are known for SoC A2 and A3, not {soc!r} (set moe_fx.config.npu.soc)"
    if tokens_per_rank is None:
        return "MC2 needs a static token bound: set moe_fx.config.max_tokens_per_rank"
    max_k = MC2_MAX_TOP_K[soc]
    checks = [
        # Not cast to bf16: that would silently give the model bf16 accuracy in its MoE blocks,
        # while the other Ascend lowerings' ops (init_routing_v2, grouped_matmul, swiglu) take float32.
        (dtype in MC2_DTYPES, f"the MC2 ops take bfloat16/float16 tokens, not {dtype} (torch_npu doc of "
                              "npu_moe_distribute_dispatch_v2; combine_v2 refuses Float), allgather/all2allv run it"),
        (0 < tokens_per_rank <= MC2_MAX_TOKENS[soc],
         f"max_tokens_per_rank={tokens_per_rank} not in 1..{MC2_MAX_TOKENS[soc]} on {soc}"),
        (top_k <= max_k, f"top_k={top_k} > {max_k}" + (" on A3 with the default comm_alg" if soc == "A3" else "")),
        (num_experts <= 1024, f"{num_experts} experts > 1024"),
        (num_experts % ep_size == 0, f"{num_experts} experts not divisible by ep={ep_size}"),
    ]
    if soc == "A2":
        checks += [
            (ep_size in A2_EP_SIZES, f"ep={ep_size} not in {{2..8, 16, 32, 64, 128, 256}} on A2"),
            (hidden_size <= 7168 and hidden_size % 32 == 0, f"hidden size {hidden_size} not a multiple of 32 <= 7168 on A2"),
        ]
    else:
        checks += [
            (2 <= ep_size <= 768, f"ep={ep_size} not in 2..768 on A3"),
            (1024 <= hidden_size <= 8192, f"hidden size {hidden_size} not in 1024..8192 on A3"),
        ]
    failed = [why for ok, why in checks if not ok]
    if not failed:  # the buffer formula assumes sizes within the limits above
        need = hccl_buffsize_needed_mb(soc=soc, tokens_per_rank=tokens_per_rank, ep_size=ep_size,
                                       num_experts=num_experts, top_k=top_k, hidden_size=hidden_size)
        have = hccl_buffsize_mb()
        if have < need:
            failed.append(
                f"{HCCL_BUFFSIZE_ENV}={have} MB < the {need} MB the torch_npu doc requires on {soc} for "
                f"max_tokens_per_rank={tokens_per_rank}, ep={ep_size}, {num_experts // ep_size} experts/rank, "
                f"top_k={top_k}, hidden size {hidden_size}: set the environment variable {HCCL_BUFFSIZE_ENV}={need} "
                "on every rank before its process groups are created, or lower max_tokens_per_rank"
            )
    return "; ".join(failed) or None
