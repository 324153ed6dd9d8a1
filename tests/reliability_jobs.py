"""Jobs of tests/test_reliability.py: each runs on every rank of a gloo pool (tests/dist_pool.py),
or in-process for ep = 1, and returns per-call outcomes: ("ok", max difference to eager) or
("error", "ExceptionType: message"). A job never lets an error escape, so the test sees every
rank's outcome; each leaves moe_fx's call numbers reset for the next job."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

import moe_fx
from moe_fx.runtime import guard
from tests.ep_jobs import build_plain, zero_foreign_experts

HIDDEN, INTERMEDIATE = 16, 8


def _outcome(fn) -> tuple:
    try:
        return ("ok", fn())
    except Exception as exc:  # noqa: BLE001 - the test asserts on type and message
        return ("error", f"{type(exc).__name__}: {exc}")


def _routing(rank: int, tokens: int, num_experts: int, top_k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, top_k, dtype=torch.int64)
    weights = torch.rand(tokens, top_k, generator=gen)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    return x, ids, (weights / weights.sum(-1, keepdim=True)).float()


def _compiled(model, patch: dict):
    torch._dynamo.reset()
    settings = {"inner_backend": "eager", **patch}
    compiled = torch.compile(model, backend=moe_fx.backend, fullgraph=True)

    def call(*args):
        with moe_fx.config.patch(**settings), torch.no_grad():
            return compiled(*args)

    return call


def _setup(rank: int, world_size: int, *, num_experts: int = 4, top_k: int = 2, dtype: str = "float32",
           hidden: int = HIDDEN):
    """A plain MoE whose foreign experts are zeroed after eager, so wrong rows show as differences."""
    model = build_plain("batched", hidden=hidden, intermediate=INTERMEDIATE, num_experts=num_experts, top_k=top_k,
                        dtype=dtype)
    eager = build_plain("batched", hidden=hidden, intermediate=INTERMEDIATE, num_experts=num_experts, top_k=top_k,
                        dtype=dtype)
    if world_size > 1:
        zero_foreign_experts(model, num_experts)
    return model, eager


def _diff(out: torch.Tensor, eager, args) -> float:
    with torch.no_grad():
        ref = eager(*args).float()
    return (out.float() - ref).abs().max().item() if out.numel() else 0.0


def bad_ids_case(*, rank: int = 0, world_size: int = 1, patch: dict, tokens=(5, 6, 3, 7),
                 dtype: str = "float32") -> list[tuple]:
    """Good call; then bad ids (E and -1) on rank 0 only, then on every rank; then a good call
    again (the group must still work). Returns the outcome of each call."""
    guard.reset_call_counts()
    try:
        model, eager = _setup(rank, world_size, dtype=dtype)
        call = _compiled(model, patch)
        x, ids, w = _routing(rank, tokens[rank], 4, 2)
        x = x.to(getattr(torch, dtype))
        outcomes = [_outcome(lambda: _diff(call(x, ids, w), eager, (x, ids, w)))]
        for value, bad_ranks in ((4, (0,)), (-1, (0,)), (99, range(world_size)), (-1, range(world_size))):
            bad = ids.clone()
            if rank in bad_ranks:
                bad[-1, -1] = value
            outcomes.append(_outcome(lambda: _diff(call(x, bad, w), eager, (x, ids, w))))
        outcomes.append(_outcome(lambda: _diff(call(x, ids, w), eager, (x, ids, w))))
        return outcomes
    finally:
        guard.reset_call_counts()


# (what rank 1 changes, its model kwargs, its config patch)
MISMATCHES = {
    "E": ({"num_experts": 8}, {}),
    "H": ({"hidden": 32}, {}),
    "K": ({"top_k": 1}, {}),
    "fp16_vs_bf16": ({"dtype": "float16"}, {}),
    "fp32_vs_bf16": ({"dtype": "float32"}, {}),
    "capacity": ({}, {"max_tokens_per_rank": 16}),
    "strategy": ({}, {"lowering": "all2allv"}),
}


def mismatch_case(*, rank: int = 0, world_size: int = 1, field: str, patch: dict) -> list[tuple]:
    """Rank 1 builds or configures the block differently (MISMATCHES[field]); rank 0 (and any
    other rank) as given. Every rank must raise, naming the field."""
    guard.reset_call_counts()
    try:
        model_kw, config_kw = MISMATCHES[field] if rank == 1 else ({}, {})
        model_kw = {"dtype": "bfloat16", **model_kw} if field.endswith("_vs_bf16") and rank != 1 else model_kw
        num_experts, top_k = model_kw.get("num_experts", 4), model_kw.get("top_k", 2)
        hidden = model_kw.get("hidden", HIDDEN)
        model, eager = _setup(rank, world_size, **model_kw)
        call = _compiled(model, {**patch, **config_kw})
        x, ids, w = _routing(rank, 5, num_experts, top_k)
        x = torch.randn(5, hidden).to(getattr(torch, model_kw.get("dtype", "float32")))
        return [_outcome(lambda: _diff(call(x, ids, w), eager, (x, ids, w)))]
    finally:
        guard.reset_call_counts()


class _TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l0 = build_plain("batched", hidden=HIDDEN, intermediate=INTERMEDIATE, num_experts=4, top_k=2,
                              dtype="float32", seed=1)
        self.l1 = build_plain("batched", hidden=HIDDEN, intermediate=INTERMEDIATE, num_experts=4, top_k=2,
                              dtype="float32", seed=2)

    def forward(self, x, ids, w):
        y = self.l0(x, ids, w)
        _maybe_fail()
        return self.l1(y, ids, w)


_FAIL_ONCE = [False]


@torch._dynamo.disable
def _maybe_fail():
    if _FAIL_ONCE[0]:
        _FAIL_ONCE[0] = False
        raise RuntimeError("simulated failure between the blocks")


def retry_case(*, rank: int = 0, world_size: int = 1, patch: dict) -> dict:
    """Rank 0 raises between two blocks (after block l0 ran), catches and calls again: it is in l0
    while its peers are in l1. Every rank must raise a block mismatch; after
    moe_fx.reset_call_counts() on every rank, the step runs again correctly."""
    guard.reset_call_counts()
    try:
        model = _TwoBlocks()
        torch.manual_seed(0)
        eager = _TwoBlocks()
        eager.load_state_dict(model.state_dict())
        if world_size > 1:
            zero_foreign_experts(model.l0, 4)
            zero_foreign_experts(model.l1, 4)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=moe_fx.backend)
        x, ids, w = _routing(rank, 6, 4, 2)

        def call():
            # the graph break needs fullgraph=False, so the flags fullgraph turns on are set here
            dynamic_outputs = torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True,
                                                         capture_scalar_outputs=True)
            with moe_fx.config.patch(inner_backend="eager", **patch), dynamic_outputs, torch.no_grad():
                return _diff(compiled(x, ids, w), eager, (x, ids, w))

        outcomes = {"first": _outcome(call)}
        _FAIL_ONCE[0] = rank == 0
        outcomes["failing"] = _outcome(call)  # rank 0: the simulated failure; peers: the mismatch
        outcomes["retry"] = _outcome(call) if rank == 0 else outcomes["failing"]
        moe_fx.reset_call_counts()
        outcomes["after_reset"] = _outcome(call)
        return outcomes
    finally:
        _FAIL_ONCE[0] = False
        guard.reset_call_counts()


def call_number_case(*, rank: int = 0, world_size: int = 1, patch: dict) -> list[tuple]:
    """Rank 0's call count of the block is one ahead (as after an exchange only it saw fail):
    every rank must raise naming the call numbers, never pair different calls."""
    guard.reset_call_counts()
    try:
        model, eager = _setup(rank, world_size)
        call = _compiled(model, patch)
        x, ids, w = _routing(rank, 5, 4, 2)
        outcomes = [_outcome(lambda: _diff(call(x, ids, w), eager, (x, ids, w)))]
        if rank == 0:
            for key in list(guard._calls):
                guard._calls[key] += 1
        outcomes.append(_outcome(lambda: _diff(call(x, ids, w), eager, (x, ids, w))))
        return outcomes
    finally:
        guard.reset_call_counts()


def stop_case(*, rank: int = 0, world_size: int = 1, patch: dict, stopper: int) -> dict:
    """Every rank calls once; then rank ``stopper`` stops calling. The others must raise within
    the timeout (plus the store's grace), naming the block and the absent rank."""
    guard.reset_call_counts()
    model, eager = _setup(rank, world_size)
    call = _compiled(model, patch)
    x, ids, w = _routing(rank, 5, 4, 2)
    first = _outcome(lambda: _diff(call(x, ids, w), eager, (x, ids, w)))
    if rank == stopper:
        return {"first": first, "second": ("stopped", 0.0), "seconds": 0.0}
    start = time.monotonic()
    second = _outcome(lambda: _diff(call(x, ids, w), eager, (x, ids, w)))
    return {"first": first, "second": second, "seconds": time.monotonic() - start}


def nan_case(*, rank: int = 0, world_size: int = 1, patch: dict, tokens=(5, 6, 3, 7)) -> dict:
    """Rank 0's token 1 is NaN: only that token's output may be NaN, on rank 0 only; every other
    row equals eager."""
    guard.reset_call_counts()
    try:
        model, eager = _setup(rank, world_size)
        call = _compiled(model, patch)
        x, ids, w = _routing(rank, tokens[rank], 4, 2)
        if rank == 0:
            x[1] = float("nan")
        out = call(x, ids, w).float()
        with torch.no_grad():
            ref = eager(x, ids, w).float()
        nan_rows = torch.isnan(out).any(1).nonzero().flatten().tolist()
        keep = ~torch.isnan(ref).any(1)
        return {"nan_rows": nan_rows, "diff": (out[keep] - ref[keep]).abs().max().item() if keep.any() else 0.0}
    finally:
        guard.reset_call_counts()


def skew_case(*, rank: int = 0, world_size: int = 1, patch: dict, tokens=(0, 9, 4, 12)) -> dict:
    """Every token to experts 0 and 1 (one rank's), uneven counts, a rank with none: the output
    equals eager on every rank (no token lost or duplicated)."""
    guard.reset_call_counts()
    try:
        model, eager = _setup(rank, world_size)
        call = _compiled(model, patch)
        t = tokens[rank]
        x = torch.randn(t, HIDDEN, generator=torch.Generator().manual_seed(rank))
        ids = torch.tensor([[0, 1]] * t, dtype=torch.int64).reshape(t, 2)
        w = torch.full((t, 2), 0.5)
        return {"diff": _diff(call(x, ids, w), eager, (x, ids, w)), "tokens": t}
    finally:
        guard.reset_call_counts()


def rank_of_world() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def device_check_case(*, inner_backend: str) -> list[tuple]:
    """ep = 1 with ``rank_check="first_call"``: the table is read on the first call; later calls
    keep only the graph's device-side check (``_assert_async``; on CPU it raises at once)."""
    guard.reset_call_counts()
    try:
        model, eager = _setup(0, 1)
        call = _compiled(model, {"rank_check": "first_call", "inner_backend": inner_backend})
        x, ids, w = _routing(0, 6, 4, 2)
        outcomes = []
        for value in (None, 4, -1, None):
            bad = ids.clone()
            if value is not None:
                bad[-1, -1] = value
            outcomes.append(_outcome(lambda: _diff(call(x, bad, w), eager, (x, ids, w))))
        return outcomes
    finally:
        guard.reset_call_counts()


def _failing_kernel(*args, **kwargs):
    raise RuntimeError("simulated failure inside the block")


def raise_inside_case(*, rank: int = 0, world_size: int = 1, patch: dict, op: str, failing_rank: int = 0) -> dict:
    """Every rank calls once; on the second call rank ``failing_rank`` raises inside the block
    (``moe_fx::<op>``'s CPU kernel replaced: after the guard, before the strategy's last
    exchange). Its peers, waiting in that exchange, must raise within the timeout, naming the
    blocks, rather than wait for the EP group's timeout. Then every rank calls again."""
    guard.reset_call_counts()
    model, eager = _setup(rank, world_size)
    call = _compiled(model, patch)
    x, ids, w = _routing(rank, 5, 4, 2)
    first = _outcome(lambda: _diff(call(x, ids, w), eager, (x, ids, w)))
    override = torch.library.Library("moe_fx", "IMPL") if rank == failing_rank else None
    try:
        if override is not None:
            override.impl(op, _failing_kernel, "CPU")
        start = time.monotonic()
        second = _outcome(lambda: _diff(call(x, ids, w), eager, (x, ids, w)))
        seconds = time.monotonic() - start
    finally:
        if override is not None:
            override._destroy()
    # every rank calls again, as a user catching the errors would: an error or the right answer
    start = time.monotonic()
    third = _outcome(lambda: _diff(call(x, ids, w), eager, (x, ids, w)))
    return {"first": first, "second": second, "seconds": seconds, "third": third,
            "third_seconds": time.monotonic() - start}
