"""The MC2 ops' argument rules, per emulated SoC: the emulator refuses what real torch_npu / CANN
would refuse, or what their documentation forbids, so a lowering that breaks a rule fails here
as it would on hardware. Only the configurations the emulator computes are accepted (A2
"fullmesh", A3 "" / "fullmesh_v1"; no TP domain, shared experts or quantization).

Sources (each rule names its own):
  DISPATCH_DOC  Ascend/op-plugin docs/en/custom_APIs/torch_npu/torch_npu-npu_moe_distribute_dispatch_v2.md (26.1.0)
  COMBINE_DOC   the same folder, torch_npu-npu_moe_distribute_combine_v2.md
  DISPATCH_HOST Ascend/op-plugin op_plugin/ops/opapi/MoeDistributeDispatchV2KernelOpApi.cpp (master 517f2e7)
  COMBINE_HOST  Ascend/op-plugin op_plugin/ops/opapi/MoeDistributeCombineKernelV2OpApi.cpp
  TILING_A3     hicann/ops-transformer mc2/moe_distribute_dispatch_v2/op_host/op_tiling/
                moe_distribute_dispatch_v2_tiling.cpp (c29bc10): the A3 checks
  TILING_A2     the same folder, arch22/moe_distribute_dispatch_v2_tiling_arch22.cpp: the A2 checks
  COMBINE_TILING hicann/ops-transformer mc2/moe_distribute_combine_v2/op_host/op_tiling/
                moe_distribute_combine_v2_tiling.cpp (c29bc10)
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from moe_fx.testing.npu_emulator.common import CANN_NAMES, TORCH_NAMES, ContractError, soc, unsupported

DISPATCH_DOC = "torch_npu doc of npu_moe_distribute_dispatch_v2"
COMBINE_DOC = "torch_npu doc of npu_moe_distribute_combine_v2"
DISPATCH_HOST = "op-plugin MoeDistributeDispatchV2KernelOpApi.cpp"
COMBINE_HOST = "op-plugin MoeDistributeCombineKernelV2OpApi.cpp"
TILING_A3 = "CANN moe_distribute_dispatch_v2_tiling.cpp"
TILING_A2 = "CANN moe_distribute_dispatch_v2_tiling_arch22.cpp"
COMBINE_TILING = "CANN moe_distribute_combine_v2_tiling.cpp"

_MB = 1024 * 1024
_A2_EP_SIZES = frozenset((*range(2, 9), 16, 32, 64, 128, 256))


# ---------------------------------------------------------------------------------------------
# arguments (static: checked by the fake implementations too)
# ---------------------------------------------------------------------------------------------


def _check_domain(op: str, group_ep: str, *, group_tp: str, tp_world_size: int, tp_rank_id: int,
                  expert_shard_type: int, shared_expert_num: int, shared_expert_rank_num: int, comm_alg: str) -> None:
    """The TP domain, shared-expert and algorithm arguments both ops share."""
    doc = DISPATCH_DOC
    if soc() == "A2":
        # DISPATCH_DOC, A2: "TP domain communication is not supported. Use the default value 0";
        # group_tp: default in eager mode, equal to group_ep in graph mode; shared experts: "Retain
        # the default value".
        if tp_world_size != 0 or tp_rank_id != 0:
            raise ContractError(op, f"tp_world_size={tp_world_size}, tp_rank_id={tp_rank_id}: A2 has no TP "
                                    "domain, leave the defaults 0", doc)
        if group_tp not in ("", group_ep):
            raise ContractError(op, f"group_tp={group_tp!r} on A2 must be \"\" (eager) or group_ep (graph mode)", doc)
        if (expert_shard_type, shared_expert_num, shared_expert_rank_num) != (0, 1, 0):
            raise ContractError(op, f"expert_shard_type={expert_shard_type}, shared_expert_num={shared_expert_num}, "
                                    f"shared_expert_rank_num={shared_expert_rank_num}: not supported on A2, leave "
                                    "the defaults (0, 1, 0)", doc)
        if comm_alg == "hierarchy" or (comm_alg == "" and _a2_hierarchy_env()):
            raise unsupported(op, "the A2 hierarchy algorithm")
        if comm_alg not in ("", "fullmesh"):
            raise ContractError(op, "commAlg is not support", TILING_A2)
        return
    if group_tp == group_ep:  # DISPATCH_DOC, A3 "group_tp": "must differ from group_ep"
        raise ContractError(op, f"group_tp={group_tp!r} equals group_ep; on A3 they must differ (\"\" without a "
                                "TP domain)", doc)
    if tp_world_size > 1 or shared_expert_rank_num:
        raise unsupported(op, f"tp_world_size={tp_world_size}, shared_expert_rank_num={shared_expert_rank_num}")
    if tp_rank_id != 0:
        raise ContractError(op, f"tpRankId is invalid, NoTp mode only support 0, but got tpRankId={tp_rank_id}.",
                            TILING_A3)
    if comm_alg in ("fullmesh_v2", "hierarchy"):
        raise unsupported(op, f"comm_alg={comm_alg!r}")
    if comm_alg not in ("", "fullmesh_v1"):
        raise ContractError(op, "Attr commAlg is invalid, current only support fullmesh_v1 and fullmesh_v2, but got "
                                f"commAlg = {comm_alg}.", TILING_A3)


def _a2_hierarchy_env() -> bool:
    """comm_alg "" on A2 picks "hierarchy" when HCCL_INTRA_PCIE_ENABLE=1 and HCCL_INTRA_ROCE_ENABLE=0."""
    return os.environ.get("HCCL_INTRA_PCIE_ENABLE") == "1" and os.environ.get("HCCL_INTRA_ROCE_ENABLE") == "0"


def check_dispatch(op: str, x, expert_ids, group_ep: str, ep_world_size: int, ep_rank_id: int, moe_expert_num: int,
                   *, x_active_mask, expert_scales, expert_token_nums_type: int, comm_alg: str, **domain) -> None:
    if x.dim() != 2 or expert_ids.dim() != 2:
        raise ContractError(op, "The x and expert_ids should be 2D", DISPATCH_HOST)
    if not 0 <= ep_rank_id < ep_world_size:
        raise ContractError(op, f"ep_rank_id should be in [0, ep_world_size), but got ep_world_size: {ep_world_size}, "
                                f"ep_rank_id: {ep_rank_id}. ", DISPATCH_HOST)
    if expert_token_nums_type not in (0, 1):
        raise ContractError(op, "The expert_token_nums_type should be 0 or 1.", DISPATCH_HOST)
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ContractError(op, "x dataType is invalid, dataType should be bf16 or float16, but is "
                                f"{CANN_NAMES.get(x.dtype, x.dtype)}.", TILING_A3)
    if expert_ids.dtype != torch.int32:
        raise ContractError(op, "expertId dataType is invalid, dataType should be int32, but is "
                                f"{CANN_NAMES.get(expert_ids.dtype, expert_ids.dtype)}.", TILING_A3)
    _check_domain(op, group_ep, comm_alg=comm_alg, **domain)
    bs, h = x.shape
    k = expert_ids.shape[1]
    local = moe_expert_num // ep_world_size
    if soc() == "A3" and expert_scales is not None:
        raise ContractError(op, "expert_scales is not supported on A3 with comm_alg \"\"/\"fullmesh_v1\"; leave the "
                                "default None", DISPATCH_DOC)
    if expert_scales is not None and (expert_scales.dtype != torch.float32 or tuple(expert_scales.shape) != (bs, k)):
        raise ContractError(op, f"expert_scales must be float32 ({bs}, {k}), got {expert_scales.dtype} "
                                f"{tuple(expert_scales.shape)}", DISPATCH_DOC)
    if x_active_mask is not None and (x_active_mask.dtype != torch.bool or tuple(x_active_mask.shape) != (bs,)):
        raise ContractError(op, f"x_active_mask must be bool ({bs},), got {x_active_mask.dtype} "
                                f"{tuple(x_active_mask.shape)}", DISPATCH_DOC)
    # DISPATCH_DOC "Constraints": BS, H, K, ep_world_size, moe_expert_num per SoC and algorithm.
    a2 = soc() == "A2"
    limits = [
        (0 < bs <= (256 if a2 else 512), f"BS={bs} not in (0, {256 if a2 else 512}]"),
        (0 < h <= 7168 and h % 32 == 0 if a2 else 1024 <= h <= 8192,
         f"H={h} not " + ("a multiple of 32 in (0, 7168]" if a2 else "in [1024, 8192]")),
        (0 < k <= min(16 if a2 or comm_alg == "fullmesh_v1" else 12, moe_expert_num),
         f"K={k} not in (0, min({16 if a2 or comm_alg == 'fullmesh_v1' else 12}, moe_expert_num={moe_expert_num})]"),
        (ep_world_size in _A2_EP_SIZES if a2 else 2 <= ep_world_size <= 768, f"ep_world_size={ep_world_size}"),
        (0 < moe_expert_num <= 1024 and moe_expert_num % ep_world_size == 0, f"moe_expert_num={moe_expert_num}"),
        (a2 or local * ep_world_size <= 2048, f"local_expert_num * ep_world_size = {local * ep_world_size} > 2048"),
    ]
    failed = [why for ok, why in limits if not ok]
    if failed:
        raise ContractError(op, "; ".join(failed) + f" on {soc()}", DISPATCH_DOC)
    _check_buffer(op, x, k=k, ep=ep_world_size, local=local, shared_expert_num=domain["shared_expert_num"])


def _check_buffer(op: str, x, *, k: int, ep: int, local: int, shared_expert_num: int) -> None:
    """The HCCL window the dispatch needs (global_bs 0: max_bs = BS), as CANN's tiling computes it.
    CANN only logs a warning for it on A2; DISPATCH_DOC states it as a requirement on both."""
    have_mb = int(os.environ.get("HCCL_BUFFSIZE", "200"))
    bs, h = x.shape
    if soc() == "A2":
        dtype_bytes = x.element_size()
        need = 2 * (bs * ep * min(local, k) * h * dtype_bytes + 2 * _MB)
        if need > have_mb * _MB:
            raise ContractError(op, "HCCL_BUFFSIZE is too small, min required HCCL_BUFFSIZE (2 * (maxBs * epWorldSize * "
                                    "min(localMoeExpertNum, k) * (h * dtypeBytes + scalePayloadBytes) / 1MB + 2MB)) = "
                                    f"{-(-need // _MB)}MB, actual HCCL_BUFFSIZE = {have_mb}MB, maxBs = {bs}, "
                                    f"epWorldSize = {ep}, localMoeExpertNum = {local}, k = {k}, h = {h}, dtypeBytes = "
                                    f"{dtype_bytes}, scalePayloadBytes = 0. Please increase the HCCL_BUFFSIZE "
                                    "environment variable or provide an HcclCommConfig with a larger hcclBufferSize "
                                    "when creating the communication domain.", TILING_A2)
        return
    combine = (h * 2 + 511) // 512 * 512
    dispatch = ((h * 2 + 31) // 32 * 32 + 44 + 511) // 512 * 512
    need = (bs * dispatch * ep * local + bs * combine * (k + shared_expert_num)) * 2
    if need > have_mb * _MB:
        raise ContractError(op, f"HCCL_BUFFSIZE is too SMALL, maxBs = {bs}, h = {h}, epWorldSize = {ep}, "
                                f"localMoeExpertNum = {local}, sharedExpertNum = {shared_expert_num}, "
                                f"tokenNeedSizeDispatch = {dispatch}, tokenNeedSizeCombine = {combine}, k = {k}, "
                                "NEEDED_HCCL_BUFFSIZE(((maxBs * tokenNeedSizeDispatch * ep_worldsize * "
                                "localMoeExpertNum) + (maxBs * tokenNeedSizeCombine * (k + sharedExpertNum))) * 2) = "
                                f"{need // _MB + 1}MB, HCCL_BUFFSIZE={have_mb}MB.", TILING_A3)


def check_combine(op: str, expand_x, expert_ids, expert_scales, group_ep: str, *, tp_send_counts, expand_scales,
                  tp_world_size: int, comm_alg: str, **domain) -> None:
    if expand_x.dim() != 2 or expert_ids.dim() != 2:
        raise ContractError(op, "The x and expert_ids should be 2D", COMBINE_HOST)
    if expand_x.dtype not in (torch.bfloat16, torch.float16, torch.int32):
        raise ContractError(op, "dtype of expand_x should be BFloat16, Float16 or Int, but got "
                                f"{TORCH_NAMES.get(expand_x.dtype, expand_x.dtype)}", COMBINE_HOST)
    if expert_ids.dtype != torch.int32:
        raise ContractError(op, f"dtype of expert_ids should be Int, but got "
                                f"{TORCH_NAMES.get(expert_ids.dtype, expert_ids.dtype)}", COMBINE_HOST)
    if expert_scales.dtype != torch.float32:
        raise ContractError(op, "expertScales dataType is invalid, dataType should be float, but is "
                                f"{CANN_NAMES.get(expert_scales.dtype, expert_scales.dtype)}", COMBINE_TILING)
    _check_domain(op, group_ep, tp_world_size=tp_world_size, comm_alg=comm_alg, **domain)
    if soc() == "A2":
        if expand_scales is None:  # COMBINE_DOC "expand_scales", A2: "Required"
            raise ContractError(op, "expand_scales is required on A2 (pass dispatch's expand_scales output)",
                                COMBINE_DOC)
        if expand_scales.dtype != torch.float32 or tuple(expand_scales.shape) != (expand_x.shape[0],):
            raise ContractError(op, f"expand_scales must be float32 ({expand_x.shape[0]},), got "
                                    f"{expand_scales.dtype} {tuple(expand_scales.shape)}", COMBINE_DOC)
        if tp_send_counts is not None:  # COMBINE_DOC "tp_send_counts", A2: "Use the default value"
            raise ContractError(op, "tp_send_counts is reserved on A2 (no TP domain): leave the default None",
                                COMBINE_DOC)
        return
    if expand_scales is not None:  # COMBINE_DOC, A3 with comm_alg "": "not supported. Use the default value"
        raise ContractError(op, "expand_scales is not supported on A3 with comm_alg \"\"; leave the default None",
                            COMBINE_DOC)
    if tp_send_counts is None:
        raise ContractError(op, "tpSendCounts is null.", COMBINE_TILING)
    if tp_send_counts.shape[0] != tp_world_size:
        raise ContractError(op, "tpSendCount's dim0 not equal to tpWorldSize, tpSendCount's dim0 is "
                                f"{tp_send_counts.shape[0]}, tpWorldSize is {tp_world_size}.", COMBINE_TILING)


# ---------------------------------------------------------------------------------------------
# values (the real implementations only)
# ---------------------------------------------------------------------------------------------


def value_error(op: str, expert_ids: torch.Tensor, moe_expert_num: int, x_active_mask) -> ContractError | None:
    """What the values break, if anything: expert ids in [0, moe_expert_num) and distinct within a
    row (DISPATCH_DOC / COMBINE_DOC "expert_ids", masked rows included); a 1-D x_active_mask with
    every True before every False (DISPATCH_DOC "x_active_mask")."""
    ids = expert_ids.to(torch.int64)
    if bool(((ids < 0) | (ids >= moe_expert_num)).any()):
        return ContractError(op, f"expert_ids outside [0, {moe_expert_num}): {ids.min().item()}..{ids.max().item()}",
                             DISPATCH_DOC)
    ordered = ids.sort(dim=1).values
    repeats = (ordered[:, 1:] == ordered[:, :-1]).any(1).nonzero().squeeze(1)
    if repeats.numel():
        row = repeats[0].item()
        return ContractError(op, f"expert_ids row {row} repeats an expert {ids[row].tolist()}: the top-K values "
                                 f"within the same row must be unique ({repeats.numel()} such rows)", DISPATCH_DOC)
    if x_active_mask is not None:
        mask = x_active_mask.to(torch.int8)
        if bool((mask[1:] > mask[:-1]).any()):
            return ContractError(op, "x_active_mask has a True after a False; all True values must precede any "
                                     "False values", DISPATCH_DOC)
    return None


# ---------------------------------------------------------------------------------------------
# the communication domain carries MC2 only
# ---------------------------------------------------------------------------------------------

# group name -> the group's collective count after its last MC2 op (c10d's per-group sequence number)
_SEQ_AFTER_MC2: dict[str, int] = {}


@contextmanager
def exclusive_domain(op: str, group: dist.ProcessGroup, group_ep: str):
    """DISPATCH_DOC / COMBINE_DOC "Communication domain usage constraints": dispatch and combine's
    EP domain "must not include other operators". Any collective on the group since its last MC2
    op (or before its first) shows in c10d's sequence number, which MC2's own steps here advance."""
    seq = group._get_sequence_number_for_group()
    expected = _SEQ_AFTER_MC2.get(group.group_name, 0)
    if seq != expected:
        _SEQ_AFTER_MC2[group.group_name] = seq  # refused once per offence
        raise ContractError(op, f"the communication domain group_ep={group_ep!r} carried {seq - expected} other "
                                "collective(s) since its last MC2 op; it must not include other operators (give "
                                "MC2 a process group of its own)", DISPATCH_DOC)
    try:
        yield
    finally:
        _SEQ_AFTER_MC2[group.group_name] = group._get_sequence_number_for_group()
