"""MC2 ops over a gloo group: npu_moe_distribute_dispatch(_v2) and npu_moe_distribute_combine(_v2).

``group_ep`` is an HCCL communicator name. The emulator gives every c10d group one
(``emulate_hccl_comm_names``: ``backend.get_hccl_comm_name(rank)``, as torch_npu's HCCL backend
has) and resolves it back to the gloo group.

Contract (torch_npu doc, golden test): entry (t, k) of an active token goes to rank e // L as
local expert e % L; each rank's received rows are packed expert-major, described by
expert_token_nums; rows past the total are undefined (NaN here). Row order within an expert and
the combine handles are internal; this emulator orders by (source rank, t, k) and encodes:
  v2 assist_info_for_combine[i] = global entry (src_rank*BS + t)*K + k of received row i, -1 past;
  v1 expand_idx[t*K + k] = the row of entry (t, k) in its destination's expand_x, -1 if inactive.
With global_bs == 0 every rank must pass the same BS (padded, with x_active_mask): checked.
Every argument rule of the emulated SoC (mc2_rules.py) is checked first, the static ones by the
fake implementations too; a rank whose values break a rule makes every rank of the group refuse
(one flag exchange), so no rank is left waiting in a collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx.runtime.comm import all_gather_rows, reduce_scatter_rows, resolve_group
from moe_fx.testing.npu_emulator import mc2_rules
from moe_fx.testing.npu_emulator.common import ContractError, define, fill_past, soc, unsupported

_COMM_PREFIX = "emulated_hccl:"

_DISPATCH_COMMON = (
    "Tensor x, Tensor expert_ids, str group_ep, int ep_world_size, int ep_rank_id, int moe_expert_num, *, "
    "Tensor? scales=None, Tensor? x_active_mask=None, Tensor? expert_scales=None, {extra_tensors}"
    "str group_tp=\"\", int tp_world_size=0, int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1, "
    "int shared_expert_rank_num=0, int quant_mode=0, int global_bs=0, int expert_token_nums_type=1{extra_ints}"
    ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
DISPATCH_V2 = "npu_moe_distribute_dispatch_v2(" + _DISPATCH_COMMON.format(
    extra_tensors="Tensor? elastic_info=None, Tensor? performance_info=None, ",
    extra_ints=", str comm_alg=\"\", int zero_expert_num=0, int copy_expert_num=0, int const_expert_num=0",
)
DISPATCH_V1 = "npu_moe_distribute_dispatch(" + _DISPATCH_COMMON.format(extra_tensors="", extra_ints="")
_COMBINE_COMMON = (
    "Tensor expand_x, Tensor expert_ids, Tensor {handle}, Tensor ep_send_counts, Tensor expert_scales, "
    "str group_ep, int ep_world_size, int ep_rank_id, int moe_expert_num, *, Tensor? tp_send_counts=None, "
    "Tensor? x_active_mask=None, Tensor? expand_scales=None, Tensor? shared_expert_x=None, str group_tp=\"\", "
    "int tp_world_size=0, int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1, "
    "int shared_expert_rank_num=0, int global_bs=0, int comm_quant_mode=0{extra}) -> Tensor"
)
COMBINE_V2 = "npu_moe_distribute_combine_v2(" + _COMBINE_COMMON.format(
    handle="assist_info_for_combine", extra=", str comm_alg=\"\"")
COMBINE_V1 = "npu_moe_distribute_combine(" + _COMBINE_COMMON.format(handle="expand_idx", extra="")


def emulate_hccl_comm_names() -> None:
    """Give gloo process groups torch_npu's ``get_hccl_comm_name(rank)``."""
    dist.ProcessGroupGloo.get_hccl_comm_name = _gloo_comm_name


def _gloo_comm_name(backend, rank: int) -> str:
    for group in _all_groups():
        if group._get_backend(torch.device("cpu")) is backend:
            return _COMM_PREFIX + group.group_name
    raise RuntimeError("npu_emulator: this gloo backend belongs to no known process group")


def _all_groups() -> list[dist.ProcessGroup]:
    return list(dist.distributed_c10d._world.pg_names.keys())


def _group(group_ep: str) -> dist.ProcessGroup:
    if not group_ep.startswith(_COMM_PREFIX):
        raise ValueError(f"npu_emulator: group_ep={group_ep!r} is not an emulated HCCL communicator name")
    return resolve_group(group_ep[len(_COMM_PREFIX):])


def _a_rows(bs: int, ep: int, local: int, k: int, global_bs: int) -> int:
    """A = gbs * min(L, K): the static row bound of expand_x."""
    return (global_bs or bs * ep) * min(local, k)


def _recv_counts_len(bs: int, ep: int, local: int, k: int, global_bs: int, expert_scales) -> int:
    """ep_recv_counts' length (op-plugin's dispatch host code): ep * L, plus on A2 with
    expert_scales 2 * gbs * K * (ep / 8) entries for the hierarchical combine."""
    if soc() == "A2" and expert_scales is not None:
        return ep * local + 2 * (global_bs or bs * ep) * k * (ep // 8)
    return ep * local


def _check_args(op, x, expert_ids, group, ep_world_size, ep_rank_id, moe_expert_num, *, quant_mode, global_bs,
                refusal: ContractError | None):
    if quant_mode:
        raise unsupported(op, f"quant_mode={quant_mode}")
    if global_bs:
        raise unsupported(op, f"global_bs={global_bs}")
    if (dist.get_world_size(group), dist.get_rank(group)) != (ep_world_size, ep_rank_id):
        raise ValueError(f"{op}: ep_world_size/ep_rank_id {ep_world_size}/{ep_rank_id} do not match group_ep "
                         f"({dist.get_world_size(group)}/{dist.get_rank(group)})")
    # One exchange carries each rank's BS and whether its values broke a rule.
    mine = torch.tensor([x.shape[0], refusal is not None])
    sizes, refused = all_gather_rows(mine.view(1, 2), group).unbind(1)
    if refusal is not None:
        raise refusal
    if bool(refused.any()):
        raise ContractError(op, f"rank(s) {refused.nonzero().squeeze(1).tolist()} of group_ep refused the call",
                            "npu_emulator: every rank stops with them")
    if bool((sizes != x.shape[0]).any()):  # global_bs == 0: every rank passes the same BS
        raise ValueError(f"{op}: global_bs=0 needs the same BS on every rank, got {sizes.tolist()}")


def _domain_kwargs(kw: dict) -> dict:
    names = ("group_tp", "tp_world_size", "tp_rank_id", "expert_shard_type", "shared_expert_num", "shared_expert_rank_num")
    return {n: kw[n] for n in names}


def _dispatch(op, x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, **kw):
    mc2_rules.check_dispatch(op, x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num,
                             x_active_mask=kw["x_active_mask"], expert_scales=kw["expert_scales"],
                             expert_token_nums_type=kw["expert_token_nums_type"], comm_alg=kw["comm_alg"],
                             **_domain_kwargs(kw))
    group = _group(group_ep)
    x_active_mask, expert_scales, global_bs = kw["x_active_mask"], kw["expert_scales"], kw["global_bs"]
    with mc2_rules.exclusive_domain(op, group, group_ep):
        _check_args(op, x, expert_ids, group, ep_world_size, ep_rank_id, moe_expert_num, quant_mode=kw["quant_mode"],
                    global_bs=global_bs, refusal=mc2_rules.value_error(op, expert_ids, moe_expert_num, x_active_mask))
        bs, k = expert_ids.shape
        ep, local = ep_world_size, moe_expert_num // ep_world_size
        mask = torch.ones(bs, dtype=torch.bool) if x_active_mask is None else x_active_mask.bool()
        # Every rank's tokens, routing and mask, rank-major: entry g = (src*BS + t)*K + k.
        x_all = all_gather_rows(x, group)
        ids_all = all_gather_rows(expert_ids.to(torch.int64), group).reshape(-1)
        active_all = all_gather_rows(mask.to(torch.uint8), group).bool().repeat_interleave(k)
        scales_all = None if expert_scales is None else all_gather_rows(expert_scales.float(), group).reshape(-1)
        owner = torch.where(active_all, ids_all // local, -1)
        mine = (owner == ep_rank_id).nonzero().squeeze(1)
        local_ids, order = torch.sort(ids_all[mine] - ep_rank_id * local, stable=True)
        entries = mine[order]  # received rows, expert-major, then (src, t, k)
        received = entries.numel()
        rows = _a_rows(bs, ep, local, k, global_bs)
        expand_x = fill_past(torch.cat([x_all[entries // k], x.new_zeros((rows - received, x.shape[1]))]), received)
        counts = torch.bincount(local_ids, minlength=local)
        token_nums = counts if kw["expert_token_nums_type"] == 1 else torch.cumsum(counts, 0)
        assist = torch.full((max(bs * k, rows * 128),), -1, dtype=torch.int32)
        assist[:received] = entries.to(torch.int32)
        # ep_recv_counts (first ep * L entries): rows received from each source rank, per local expert.
        src = entries // (bs * k)
        recv_counts = torch.zeros(_recv_counts_len(bs, ep, local, k, global_bs, expert_scales), dtype=torch.int32)
        recv_counts[: ep * local] = torch.bincount(src * local + local_ids, minlength=ep * local).to(torch.int32)
        # expand_scales: each received row's router weight, when the weights came along.
        expand_scales = torch.full((rows,), float("nan"))
        if scales_all is not None:
            expand_scales[:received] = scales_all[entries]
        # v1's sender-side handle: where each of this rank's entries landed on its destination.
        row_of_entry = torch.full((ep * bs * k,), -1, dtype=torch.int64)
        for dest in range(ep):  # each destination numbers its received rows independently
            theirs = (owner == dest).nonzero().squeeze(1)
            theirs = theirs[torch.sort(ids_all[theirs], stable=True).indices]
            row_of_entry[theirs] = torch.arange(theirs.numel())
        expand_idx = row_of_entry[ep_rank_id * bs * k : (ep_rank_id + 1) * bs * k].to(torch.int32)
    return (
        expand_x,
        torch.full((rows,), float("nan")),  # dynamic_scales: no quantization
        assist if op.endswith("_v2") else expand_idx,
        token_nums.to(torch.int64),
        recv_counts,
        torch.full((kw["tp_world_size"],), received, dtype=torch.int32),  # tp_recv_counts, shape (tp_world_size,)
        expand_scales,
    )


def _dispatch_fake(op, x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, **kw):
    mc2_rules.check_dispatch(op, x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num,
                             x_active_mask=kw["x_active_mask"], expert_scales=kw["expert_scales"],
                             expert_token_nums_type=kw["expert_token_nums_type"], comm_alg=kw["comm_alg"],
                             **_domain_kwargs(kw))
    bs, k = expert_ids.shape
    local = moe_expert_num // ep_world_size
    rows = _a_rows(bs, ep_world_size, local, k, kw["global_bs"])
    f32, i32 = dict(dtype=torch.float32), dict(dtype=torch.int32)
    return (
        x.new_empty((rows, x.shape[1])),
        x.new_empty((rows,), **f32),
        expert_ids.new_empty((max(bs * k, rows * 128),) if op.endswith("_v2") else (bs * k,), **i32),
        expert_ids.new_empty((local,), dtype=torch.int64),
        expert_ids.new_empty((_recv_counts_len(bs, ep_world_size, local, k, kw["global_bs"], kw["expert_scales"]),), **i32),
        expert_ids.new_empty((kw["tp_world_size"],), **i32),
        x.new_empty((rows,), **f32),
    )


def _is_default(value) -> bool:
    return value is None or (isinstance(value, int) and value == 0)


_DISPATCH_DEFAULTS = dict(scales=None, x_active_mask=None, expert_scales=None, group_tp="", tp_world_size=0,
                          tp_rank_id=0, expert_shard_type=0, shared_expert_num=1, shared_expert_rank_num=0, quant_mode=0,
                          global_bs=0, expert_token_nums_type=1, comm_alg="")


def _dispatch_entry(op: str, fake: bool):
    """The op's Python kernel (or fake): torch_npu's defaults, then the shared implementation."""
    def run(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, **kw):
        unknown = {n: v for n, v in kw.items() if n not in _DISPATCH_DEFAULTS and not _is_default(v)}
        if unknown:
            raise unsupported(op, ", ".join(f"{n}={v}" for n, v in unknown.items()))
        kw = {**_DISPATCH_DEFAULTS, **{n: v for n, v in kw.items() if n in _DISPATCH_DEFAULTS}}
        return (_dispatch_fake if fake else _dispatch)(op, x, expert_ids, group_ep, ep_world_size, ep_rank_id,
                                                       moe_expert_num, **kw)
    return run


def _combine(op, expand_x, expert_ids, handle, ep_send_counts, expert_scales, group_ep, ep_world_size, ep_rank_id,
             moe_expert_num, **kw):
    mc2_rules.check_combine(op, expand_x, expert_ids, expert_scales, group_ep, tp_send_counts=kw["tp_send_counts"],
                            expand_scales=kw["expand_scales"], comm_alg=kw["comm_alg"], **_domain_kwargs(kw))
    group = _group(group_ep)
    with mc2_rules.exclusive_domain(op, group, group_ep):
        _check_args(op, expert_ids, expert_ids, group, ep_world_size, ep_rank_id, moe_expert_num, quant_mode=0,
                    global_bs=kw["global_bs"],
                    refusal=mc2_rules.value_error(op, expert_ids, moe_expert_num, kw["x_active_mask"]))
        bs, k = expert_ids.shape
        if op.endswith("_v2"):
            # Each rank scatters its received rows to their global entries; the sum over ranks
            # (each entry filled by exactly one rank) leaves every rank its own entries.
            entries = handle.to(torch.int64)
            entries = entries[entries >= 0]
            slots = expand_x.new_zeros((ep_world_size * bs * k, expand_x.shape[1]), dtype=torch.float32)
            slots[entries] = expand_x[: entries.numel()].float()
            rows = reduce_scatter_rows(slots, group)
        else:
            # Every rank's expand_x; each own entry reads its row on the rank that holds its expert.
            gathered = all_gather_rows(expand_x.float(), group).view(ep_world_size, -1, expand_x.shape[1])
            local = moe_expert_num // ep_world_size
            dest = expert_ids.reshape(-1).to(torch.int64) // local
            row = handle.to(torch.int64)
            rows = torch.where((row >= 0).unsqueeze(1), gathered[dest, row.clamp(min=0)], 0.0)
    mask = torch.ones(bs, dtype=torch.bool) if kw["x_active_mask"] is None else kw["x_active_mask"].bool()
    rows = torch.where(mask.repeat_interleave(k).unsqueeze(1), rows, 0.0)
    # COMBINE_DOC's formula: x = Sum(expert_scales * ata_out + shared_expert_x).
    out = (rows * expert_scales.reshape(-1, 1).float()).view(bs, k, -1).sum(1)
    if kw["shared_expert_x"] is not None:
        out = out + kw["shared_expert_x"].float()
    return out.to(expand_x.dtype)


def _combine_fake(op, expand_x, expert_ids, handle, ep_send_counts, expert_scales, group_ep, ep_world_size, ep_rank_id,
                  moe_expert_num, **kw):
    mc2_rules.check_combine(op, expand_x, expert_ids, expert_scales, group_ep, tp_send_counts=kw["tp_send_counts"],
                            expand_scales=kw["expand_scales"], comm_alg=kw["comm_alg"], **_domain_kwargs(kw))
    return expand_x.new_empty((expert_ids.shape[0], expand_x.shape[1]))


_COMBINE_DEFAULTS = dict(tp_send_counts=None, x_active_mask=None, expand_scales=None, shared_expert_x=None, group_tp="",
                         tp_world_size=0, tp_rank_id=0, expert_shard_type=0, shared_expert_num=1,
                         shared_expert_rank_num=0, global_bs=0, comm_quant_mode=0, comm_alg="")


def _combine_entry(op: str, fake: bool):
    def run(expand_x, expert_ids, handle, ep_send_counts, expert_scales, group_ep, ep_world_size, ep_rank_id,
            moe_expert_num, **kw):
        kw = {**_COMBINE_DEFAULTS, **kw}
        if kw["comm_quant_mode"]:
            raise unsupported(op, f"comm_quant_mode={kw['comm_quant_mode']}")
        return (_combine_fake if fake else _combine)(op, expand_x, expert_ids, handle, ep_send_counts, expert_scales,
                                                     group_ep, ep_world_size, ep_rank_id, moe_expert_num, **kw)
    return run


def register() -> None:
    for schema, op in ((DISPATCH_V1, "npu_moe_distribute_dispatch"), (DISPATCH_V2, "npu_moe_distribute_dispatch_v2")):
        define(schema, _dispatch_entry(op, fake=False), _dispatch_entry(op, fake=True))
    for schema, op in ((COMBINE_V1, "npu_moe_distribute_combine"), (COMBINE_V2, "npu_moe_distribute_combine_v2")):
        define(schema, _combine_entry(op, fake=False), _combine_entry(op, fake=True))
