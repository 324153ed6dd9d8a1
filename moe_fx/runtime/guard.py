"""The agreement exchange at the entry of every MoE block call: never silently wrong, never a hang.

    moe_fx::guard(topk_ids [T, K], fingerprint, block, group_name, timeout_ms, every_call) -> ids [T, K]

Before a block's dispatch moves any row, every rank of the EP group sends every other rank one
row of int64s (``FIELDS``): the block's fingerprint from compile time (block id, E, H, K, dtype,
strategy, capacity, ep, token limit), this rank's call number of the block, its token count, how
many of its expert ids lie outside [0, E) and the first such id. Every rank then reads the same
[ep, F] table and reaches the same verdict, so every rank raises the same error, or none does:

    1. the fingerprint fields differ (another block, another call, E, H, K, dtype, strategy,
       capacity, ep)                                      -> RankMismatchError
    2. a rank holds more tokens than a static buffer      -> UnsupportedMoEError (capacity message)
    3. a rank routes to an id outside [0, E)              -> RoutingError
    4. a peer does not arrive within the timeout          -> CollectiveTimeoutError

No rank has exchanged a row when 1-3 are raised, so the EP group stays usable: the ranks may
catch the error and call again (every rank's call number moved on together).

The exchange is an all-gather over a gloo group of moe_fx's own with the EP group's ranks,
created with ``timeout_ms`` (``config.collective_timeout_s``) the first time a block of that EP
group runs (only the EP ranks take part, as they all enter the block). gloo honours the timeout
per op, so a peer that stopped calling makes every rank that arrived raise after the timeout; the
ranks that did not arrive are learned through the default store (each arrived rank posts a key,
on the error path only). A group that failed stays failed: later calls raise at once.

``every_call`` False (CUDA strategies without a host sync: MC2, AllGather with a token bound,
ep = 1; Ascend MC2): the table is exchanged and read on the first call of each block only; later
calls (and calls inside a CUDA graph capture) check the ids on the device (``device_check``): ids
outside [0, E) are clamped into range (no out-of-bounds access, the exchange stays matched, peers'
tokens stay correct) and ``torch._assert_async`` fails this rank's device context at its next
synchronization (a device-side assert: the process cannot continue). Where inductor compiles the
graph the check is graph ops right after this op, which then only copies the ids
(``moe_fx.lowering.guard.emit_guard``); elsewhere (``checks_ids``: Ascend, whose graph compiler
gets the guard as one op) the op runs it.

The call numbers, failed groups and the out-of-step mark (a compiled call that raised after a
block's entry check: moe_fx/backend.py) are per-process state (``reset_call_counts``).
"""

from __future__ import annotations

import time
import zlib
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from moe_fx.errors import CollectiveTimeoutError, OutOfStepError, RankMismatchError, RoutingError, UnsupportedMoEError
from moe_fx.runtime.comm import all_gather_rows, resolve_group
from moe_fx.runtime.library import LIB, capacity_message, host_op

# One row of the exchanged table. The first nine are compared between ranks ("call" is filled
# in at run time); "limit" is the token capacity checked (-1: none), then this call's facts.
FIELDS = ("block", "call", "num_experts", "hidden_size", "top_k", "dtype", "strategy", "capacity", "ep_size",
          "limit", "tokens", "bad_count", "bad_value")
_COMPARED = FIELDS[:9]
_WHAT = {"num_experts": "the number of experts E", "hidden_size": "the hidden size H", "top_k": "top-k",
         "dtype": "the dtype of the hidden states", "strategy": "the lowering strategy",
         "capacity": "the token capacity (moe_fx.config.max_tokens_per_rank / auto_mc2_max_tokens)",
         "ep_size": "the expert-parallel group size"}
# Codes for the fingerprint (the order is the protocol; append only).
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
STRATEGIES = ("local", "allgather", "all2allv", "mc2", "mc2|all2allv")

_calls: dict[tuple[Optional[str], str], int] = {}  # (EP group, block) -> calls made so far
_block_names: dict[int, str] = {}  # block id -> module path, for messages naming a peer's block
_guard_groups: dict[tuple[str, int], dist.ProcessGroup] = {}
_failed: dict[str, str] = {}  # EP group -> the error that broke its guard group
_entered = 0  # guard calls made by this process: whether a graph's call reached a block's entry
_out_of_step: Optional[str] = None  # why this rank's exchanges may no longer pair with its peers'


def block_id(block: str) -> int:
    """A rank-invariant id of a block's module path (31 bits)."""
    bid = zlib.crc32(block.encode()) & 0x7FFFFFFF
    _block_names.setdefault(bid, block)
    return bid


def dtype_code(dtype: torch.dtype) -> int:
    """A rank-invariant code (crc32, not ``hash``: Python salts string hashes per process)."""
    return DTYPES.index(dtype) if dtype in DTYPES else len(DTYPES) + zlib.crc32(str(dtype).encode()) % 1000


def reset_call_counts() -> None:
    """Forget the call numbers, the failed guard groups and an out-of-step mark. Every rank must
    call it at the same point: after catching a call-number or block mismatch on every rank,
    before running the step again. A guard group that failed is dropped (not torn down: a gloo group that timed out may
    not tear down cleanly); the next block call creates a new one, which every EP rank must reach."""
    global _out_of_step
    _calls.clear()
    for key in [k for k in _guard_groups if k[0] in _failed]:
        del _guard_groups[key]
    _failed.clear()
    _out_of_step = None


def entered_blocks() -> int:
    """How many block entries (guard calls) this process has made."""
    return _entered


def mark_out_of_step(reason: str) -> None:
    """This rank raised after a block's entry check: its later compiled calls raise
    ``OutOfStepError`` (``check_in_step``) until ``reset_call_counts``."""
    global _out_of_step
    _out_of_step = reason


def check_in_step(blocks: list[str]) -> None:
    """Raise ``OutOfStepError`` naming ``blocks`` where an earlier call left this rank out of step."""
    if _out_of_step is not None:
        shown = ", ".join(repr(b) for b in blocks)
        raise OutOfStepError(f"MoE block(s) {shown}: not called: {_out_of_step}. This rank's exchanges may no "
                             "longer pair with its peers' (a peer may still wait in the one this rank left): end "
                             "the job on every rank and restart it")


@host_op("guard")
def guard(topk_ids: torch.Tensor, fingerprint: list[int], block: str, group_name: Optional[str], timeout_ms: int,
          every_call: bool, checks_ids: bool) -> torch.Tensor:
    """topk_ids [T, K] -> the same ids [T, K] (a copy), after the ranks agreed on this call
    (module docstring). ``fingerprint``: the compile-time fields of ``FIELDS`` without "call", in
    order. ``checks_ids``: on calls without the table, this op checks the ids on the device itself
    (where the graph holds no check of its own: moe_fx.lowering.guard)."""
    global _entered
    _entered += 1
    num_experts = fingerprint[1]
    key = (group_name, block)
    call = _calls.get(key, 0) + 1
    _calls[key] = call
    _block_names.setdefault(fingerprint[0], block)
    capturing = topk_ids.is_cuda and torch.cuda.is_current_stream_capturing()
    if capturing or not (every_call or call == 1):
        return device_check(topk_ids, num_experts, block) if checks_ids else topk_ids.clone()
    # NOTE: host read of the bad-id count (free on CPU; on CUDA only where the strategy reads
    # the host anyway, or on a block's first call).
    bad = (topk_ids < 0) | (topk_ids >= num_experts)
    bad_count = int(bad.sum())
    bad_value = int(topk_ids[bad].reshape(-1)[0]) if bad_count else 0
    row = [fingerprint[0], call, *fingerprint[1:], topk_ids.shape[0], bad_count, bad_value]
    if group_name is None:
        ranks, table = [dist.get_rank() if dist.is_initialized() else 0], [row]
    else:
        ranks, table = _exchange(row, group_name, timeout_ms, block, call)
    error = verdict(table, ranks, block)
    if error is not None:
        raise error
    return topk_ids.clone()


@torch.library.register_fake(f"{LIB}::guard")
def _(topk_ids, fingerprint, block, group_name, timeout_ms, every_call, checks_ids):
    return torch.empty_like(topk_ids)


def device_check(topk_ids: torch.Tensor, num_experts: int, block: str) -> torch.Tensor:
    """The check of calls without the table: ids outside [0, E) fail this rank's device context at
    its next synchronization (``_assert_async``: no host sync), and are clamped meanwhile, so no op
    reads out of bounds and the peers' exchange stays matched. Plain torch calls: emitted into the
    graph on fx Proxies (moe_fx/lowering/guard.py), or run by the op on tensors."""
    bad = (topk_ids < 0) | (topk_ids >= num_experts)
    torch._assert_async(~bad.any(), f"moe_fx: MoE block {block!r}: an expert id outside [0, {num_experts})")
    return topk_ids.clamp(0, num_experts - 1)



def _guard_group(group_name: str, timeout_ms: int) -> dist.ProcessGroup:
    key = (group_name, timeout_ms)
    if key not in _guard_groups:
        ranks = dist.get_process_group_ranks(resolve_group(group_name))
        _guard_groups[key] = dist.new_group(ranks, timeout=timedelta(milliseconds=timeout_ms), backend="gloo",
                                            use_local_synchronization=True)
    return _guard_groups[key]


def _exchange(row: list[int], group_name: str, timeout_ms: int, block: str, call: int):
    """(global ranks of the EP group, every rank's row), or CollectiveTimeoutError."""
    if group_name in _failed:
        raise CollectiveTimeoutError(f"MoE block {block!r}: moe_fx's agreement exchange failed earlier "
                                     f"({_failed[group_name]}); end the job on every rank and restart it")
    ranks = dist.get_process_group_ranks(resolve_group(group_name))
    group = _guard_group(group_name, timeout_ms)
    try:
        gathered = all_gather_rows(torch.tensor(row, dtype=torch.int64), group)
    except Exception as exc:  # gloo: a timeout, or a peer's connection closed
        message = _absent_message(group_name, ranks, block, call, timeout_ms, exc)
        _failed[group_name] = message
        raise CollectiveTimeoutError(message) from exc
    return ranks, gathered.view(len(ranks), len(row)).tolist()


def _absent_message(group_name: str, ranks: list[int], block: str, call: int, timeout_ms: int,
                    exc: Exception) -> str:
    arrived, absent = _arrivals(f"moe_fx/guard/{group_name}/{block_id(block)}/{call}/", ranks, timeout_ms)
    seconds = f"{timeout_ms / 1000:g}"
    if absent:
        who = f"rank(s) {absent} did not reach it within moe_fx.config.collective_timeout_s={seconds} s (ranks {arrived} did)"
    else:
        who = f"the exchange failed although every rank reached it ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    return (f"MoE block {block!r}, call {call}: {who}. A peer that stopped calling, hangs or died leaves the "
            "EP group's collectives out of step: end the job on every rank and restart it")


def is_gloo_failure(exc: BaseException) -> bool:
    """A gloo collective that timed out or lost its peer (gloo's transport errors)."""
    return "gloo/transport" in str(exc) or "Timed out waiting" in str(exc)


def peer_failure_message(blocks: list[str], exc: BaseException) -> str:
    """The error of a graph whose strategy exchange failed after the blocks' entry checks."""
    from moe_fx import config

    shown = ", ".join(repr(b) for b in blocks)
    return (f"MoE block(s) {shown}: an exchange between the ranks did not complete within "
            f"moe_fx.config.collective_timeout_s={config.collective_timeout_s:g} s ({str(exc).splitlines()[0]}): a peer "
            "raised inside a block after the entry check, stopped calling, or died. The EP group's collectives are "
            "out of step: end the job on every rank and restart it")


def _arrivals(prefix: str, ranks: list[int], timeout_ms: int) -> tuple[list[int], list[int]]:
    """Which ranks reached the failed exchange: each posts a key in the default store, then waits
    for the others' (they time out at about the same time) up to min(timeout, 5 s)."""
    me = dist.get_rank()
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{prefix}{me}", "1")
        arrived, deadline = {me}, time.monotonic() + min(timeout_ms / 1000, 5.0)
        while len(arrived) < len(ranks) and time.monotonic() < deadline:
            arrived |= {r for r in ranks if r not in arrived and store.check([f"{prefix}{r}"])}
            time.sleep(0.05)
    except Exception:  # no store (it lived on a rank that died): say what this rank knows
        arrived = {me}
    return sorted(arrived), [r for r in ranks if r not in arrived]


def verdict(table: list[list[int]], ranks: list[int], block: str) -> Exception | None:
    """The error every rank raises for this table (the same on every rank), or None."""
    column = {name: [row[i] for row in table] for i, name in enumerate(FIELDS)}
    if len(set(column["block"])) > 1:
        where = ", ".join(f"rank {r} in {_block_names.get(b, f'block id {b}')!r} (call {c})"
                          for r, b, c in zip(ranks, column["block"], column["call"]))
        return RankMismatchError(
            f"MoE block {block!r}: the ranks are in different MoE blocks: {where}. A rank that caught an "
            "exception (or skipped a block) and called the model again is out of step with its peers; nothing "
            "was exchanged. Catch the error on every rank, call moe_fx.reset_call_counts() on every rank, and run "
            "the step again on all of them")
    calls = column["call"]
    if len(set(calls)) > 1:
        where = ", ".join(f"rank {r} at call {c}" for r, c in zip(ranks, calls))
        return RankMismatchError(
            f"MoE block {block!r}: the ranks are at different calls of this block: {where}. A rank called the "
            "model again after an exception its peers did not raise (or skipped a call), so the ranks' calls no "
            "longer pair up; nothing was exchanged. Catch the error on every rank, call "
            "moe_fx.reset_call_counts() on every rank, and run the step again on all of them")
    for name in _COMPARED[2:]:
        values = column[name]
        if len(set(values)) > 1:
            where = ", ".join(f"rank {r}: {_show(name, v)}" for r, v in zip(ranks, values))
            return RankMismatchError(
                f"MoE block {block!r}: the ranks disagree on {_WHAT[name]} ({where}). Every rank must run the same "
                "model, in the same dtype, with the same moe_fx.config; nothing was exchanged")
    limit = column["limit"][0]
    over = [(r, t) for r, t in zip(ranks, column["tokens"]) if 0 <= limit < t]
    if over:
        rank, tokens = over[0]
        strategy = STRATEGIES[column["strategy"][0]] if 0 <= column["strategy"][0] < len(STRATEGIES) else "?"
        return UnsupportedMoEError(capacity_message(block, tokens, limit, rank, strategy)
                                   + " (raised on every rank; nothing was exchanged)")
    bad = [(r, n, v) for r, n, v in zip(ranks, column["bad_count"], column["bad_value"]) if n]
    if bad:
        rank, count, value = bad[0]
        others = f"; ranks {[r for r, _, _ in bad[1:]]} too" if len(bad) > 1 else ""
        return RoutingError(
            f"MoE block {block!r}: rank {rank} routes a token to expert {value}, outside the valid range "
            f"[0, {column['num_experts'][0]}) ({count} such id(s) on that rank{others}). Expert ids must index the "
            "block's experts; check the router's output. Raised on every rank; nothing was exchanged")
    return None


def _show(name: str, value: int) -> str:
    if name == "dtype":
        return str(DTYPES[value]).replace("torch.", "") if value < len(DTYPES) else f"dtype code {value}"
    if name == "strategy":
        return STRATEGIES[value] if 0 <= value < len(STRATEGIES) else f"strategy code {value}"
    if name == "capacity":
        return "none" if value < 0 else str(value)
    return str(value)
