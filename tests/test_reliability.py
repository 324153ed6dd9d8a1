"""Issue 19, "never silently wrong, never a hang": what every rank sees when one rank (or all) feed
an MoE block bad routing, build or configure it differently, call out of step, or stop calling
(moe_fx/runtime/guard.py). Every rank is a process of a gloo pool (tests/dist_pool.py); a job
that hangs fails the test after its timeout instead of hanging CI, and a rank that aborts shows
as a dead process (the pool reports its exit code).

Each case asserts the error type and message on every rank, that every rank delivered a result
(none aborted, none hung), and that no call returned a wrong answer.
"""

from __future__ import annotations

import pytest

from tests.dist_pool import get_pool
from tests.reliability_jobs import bad_ids_case, device_check_case, MISMATCHES

JOB_TIMEOUT_S = 120.0

STRATEGIES = {
    "allgather": {"lowering": "allgather"},
    "allgather-bounded": {"lowering": "allgather", "max_tokens_per_rank": 8},
    "all2allv": {"lowering": "all2allv"},
    "mc2": {"lowering": "mc2", "max_tokens_per_rank": 8},
    "switch": {"lowering": "mc2|all2allv"},
}
GOOD = 1e-5


def _run(world: int, job: str, **kwargs):
    return get_pool(world).run(f"tests.reliability_jobs:{job}", _timeout_s=JOB_TIMEOUT_S, **kwargs)


def _assert_bad_ids(outcomes_per_rank, world: int, label: str):
    for rank, outcomes in enumerate(outcomes_per_rank):
        first, one_large, one_negative, all_large, all_negative, last = outcomes
        assert first[0] == "ok" and first[1] <= GOOD, (label, rank, first)
        assert last[0] == "ok" and last[1] <= GOOD, (label, rank, "the group must work after the error", last)
        for got, value, bad_rank in ((one_large, 4, 0), (one_negative, -1, 0), (all_large, 99, 0),
                                     (all_negative, -1, 0)):
            assert got[0] == "error", (label, rank, "a bad id must never return", got)
            assert got[1].startswith("RoutingError: MoE block '<root module>': "), (label, rank, got)
            assert f"rank {bad_rank} routes a token to expert {value}, outside the valid range [0, 4)" in got[1], got
        if world > 1:
            assert f"ranks {list(range(1, world))} too" in all_large[1], all_large


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_bad_ids_raise_on_every_rank_ep2(strategy):
    """Ids E and -1 on rank 0 only, then 99 and -1 on every rank: the same RoutingError on every rank
    (the peers too, no abort), and the next good call is right."""
    _assert_bad_ids(_run(2, "bad_ids_case", patch=STRATEGIES[strategy]), 2, strategy)


@pytest.mark.parametrize("strategy", ["allgather-bounded", "all2allv", "mc2"])
def test_bad_ids_raise_on_every_rank_ep4(strategy):
    _assert_bad_ids(_run(4, "bad_ids_case", patch=STRATEGIES[strategy]), 4, strategy)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bad_ids_raise_at_ep1(dtype):
    """ep = 1 (no process group): before, a bad id was dropped (or read uninitialised memory in bf16)."""
    _assert_bad_ids([bad_ids_case(patch={}, dtype=dtype)], 1, f"ep1-{dtype}")


@pytest.mark.parametrize("inner_backend", ["eager", "inductor"])
def test_device_check_after_the_first_call(inner_backend):
    """``rank_check="first_call"`` (CUDA's default for sync-free strategies): after the first
    call only the graph's own check stands between a bad id and the experts; it must still fire."""
    first, too_large, negative, last = device_check_case(inner_backend=inner_backend)
    assert first[0] == "ok" and first[1] <= GOOD, first
    assert last[0] == "ok" and last[1] <= GOOD, last
    for got in (too_large, negative):
        assert got[0] == "error", ("a bad id must never return", got)
        assert "moe_fx: MoE block '<root module>': an expert id outside [0, 4)" in got[1], got


SAYS = {
    "E": "the ranks disagree on the number of experts E (rank 0: 4, rank 1: 8)",
    "H": "the ranks disagree on the hidden size H (rank 0: 16, rank 1: 32)",
    "K": "the ranks disagree on top-k (rank 0: 2, rank 1: 1)",
    "fp16_vs_bf16": "the ranks disagree on the dtype of the hidden states (rank 0: bfloat16, rank 1: float16)",
    "fp32_vs_bf16": "the ranks disagree on the dtype of the hidden states (rank 0: bfloat16, rank 1: float32)",
    "capacity": "the ranks disagree on the token capacity",
    "strategy": "the ranks disagree on the lowering strategy (rank 0: allgather, rank 1: all2allv)",
}
MISMATCH_PATCH = {"capacity": {"lowering": "mc2", "max_tokens_per_rank": 8}}


@pytest.mark.parametrize("field", list(MISMATCHES))
def test_ranks_disagreeing_raise_on_every_rank(field):
    """Rank 1 builds (E, H, K, dtype) or configures (capacity, strategy) the block differently:
    every rank raises RankMismatchError naming the block and the field, before any exchange."""
    patch = MISMATCH_PATCH.get(field, {"lowering": "allgather"})
    for rank, (outcome,) in enumerate(_run(2, "mismatch_case", field=field, patch=patch)):
        assert outcome[0] == "error", (field, rank, outcome)
        assert outcome[1].startswith("RankMismatchError: MoE block '<root module>': "), outcome
        assert SAYS[field] in outcome[1], outcome
    if field == "capacity":
        assert "(rank 0: 8, rank 1: 16)" in outcome[1]


def test_rank_retrying_after_an_exception_raises_never_pairs_wrong_blocks():
    """Rank 0 fails between two blocks and calls again (it is in l0, its peer in l1): both raise a
    block mismatch instead of exchanging l0's rows with l1's; after reset_call_counts() on every
    rank the step is right again."""
    results = _run(2, "retry_case", patch={"lowering": "all2allv"})
    for rank, res in enumerate(results):
        assert res["first"][0] == "ok" and res["first"][1] <= GOOD, res
        assert res["after_reset"][0] == "ok" and res["after_reset"][1] <= GOOD, res
        mismatch = res["retry"]
        assert mismatch[0] == "error" and mismatch[1].startswith("RankMismatchError: MoE block "), (rank, mismatch)
        assert "the ranks are in different MoE blocks: rank 0 in 'l0' (call 3), rank 1 in 'l1' (call 2)" in mismatch[1]
    assert results[0]["failing"] == ("error", "RuntimeError: simulated failure between the blocks")


@pytest.mark.parametrize("strategy", ["allgather-bounded", "mc2"])
def test_call_numbers_out_of_step_raise(strategy):
    results = _run(2, "call_number_case", patch=STRATEGIES[strategy])
    for rank, (first, second) in enumerate(results):
        assert first[0] == "ok" and first[1] <= GOOD
        assert second[0] == "error", (rank, second)
        assert "the ranks are at different calls of this block: rank 0 at call 3, rank 1 at call 2" in second[1]


def test_capacity_overflow_raises_on_every_rank():
    """Rank 1 holds more tokens than the mc2 capacity: every rank raises (before: only rank 1
    raised and rank 0 waited in the exchange until the process group's timeout)."""
    results = _run(2, "bad_ids_case", patch={"lowering": "mc2", "max_tokens_per_rank": 5}, tokens=(3, 6))
    for rank, outcomes in enumerate(results):
        for outcome in outcomes:
            assert outcome[0] == "error", (rank, outcome)
            assert ("UnsupportedMoEError: MoE block '<root module>': 6 tokens on rank 1 exceed the mc2 capacity "
                    "moe_fx.config.max_tokens_per_rank=5") in outcome[1]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_nan_stays_in_its_token(strategy):
    results = _run(2, "nan_case", patch=STRATEGIES[strategy])
    assert results[0]["nan_rows"] == [1] and results[1]["nan_rows"] == [], results
    assert all(r["diff"] <= GOOD for r in results), results


@pytest.mark.parametrize("world,strategy", [(2, "allgather-bounded"), (2, "all2allv"), (2, "mc2"), (2, "switch"),
                                            (4, "all2allv"), (4, "mc2")])
def test_skewed_routing_conserves_tokens(world, strategy):
    patch = {**STRATEGIES[strategy], **({"max_tokens_per_rank": 12} if "max_tokens_per_rank" in STRATEGIES[strategy]
                                        else {})}
    results = _run(world, "skew_case", patch=patch)
    assert all(r["diff"] <= GOOD for r in results), results


TIMEOUT_S = 2.0


@pytest.mark.parametrize("world", [2, 4])
def test_a_rank_that_stops_calling_is_named_within_the_timeout(world):
    """The last rank stops calling: every other rank raises CollectiveTimeoutError naming the
    block and the absent rank within the timeout (+ the store's grace), and none hangs.
    moe_fx's guard group is broken afterwards, so the pool is replaced."""
    stopper = world - 1
    try:
        results = _run(world, "stop_case", stopper=stopper,
                       patch={"lowering": "all2allv", "collective_timeout_s": TIMEOUT_S})
    finally:
        get_pool(world).close()
    for rank, res in enumerate(results):
        assert res["first"][0] == "ok" and res["first"][1] <= GOOD, res
        if rank == stopper:
            continue
        kind, message = res["second"]
        assert kind == "error" and message.startswith("CollectiveTimeoutError: MoE block '<root module>', call 2: "), res
        assert f"rank(s) [{stopper}] did not reach it within moe_fx.config.collective_timeout_s=2 s" in message
        assert res["seconds"] < TIMEOUT_S + min(TIMEOUT_S, 5.0) + 3.0, res


def test_dtype_codes_agree_between_processes():
    """The fingerprint's dtype code must not depend on the process (Python salts str hashes)."""
    import os
    import subprocess
    import sys

    code = "import torch; from moe_fx.runtime.guard import dtype_code; print(dtype_code(torch.float8_e4m3fn))"
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
            for seed in ("1", "2", "3")}
    assert len(seen) == 1, seen


@pytest.mark.parametrize("strategy", ["allgather-bounded", "mc2"])
def test_a_rank_that_raised_inside_a_block_is_stopped_before_its_next_exchange(strategy):
    """As on CUDA, the entry check reads the host on the first call only (rank_check="first_call"),
    so a later call would go straight to the exchanges. Rank 0 raises inside the block; rank 1 times
    out in the exchange. On their next call both raise OutOfStepError at once, before any collective,
    rather than pair their exchanges with the wrong calls."""
    patch = {**STRATEGIES[strategy], "collective_timeout_s": TIMEOUT_S, "rank_check": "first_call"}
    try:
        results = _run(2, "raise_inside_case", op="unsort_weighted_sum" if strategy != "mc2" else "grouped_mm",
                       patch=patch)
    finally:
        get_pool(2).close()
    assert results[0]["second"] == ("error", "RuntimeError: simulated failure inside the block"), results
    assert results[1]["second"][1].startswith("CollectiveTimeoutError"), results
    for rank, res in enumerate(results):
        kind, message = res["third"]
        assert kind == "error" and message.startswith("OutOfStepError: MoE block(s) '<root module>': not called: an "
                                                      "earlier call raised after a block's entry check"), (rank, res)
        assert res["third_seconds"] < 1.0, (rank, res)


@pytest.mark.parametrize("strategy,op", [("allgather-bounded", "unsort_weighted_sum"), ("all2allv", "grouped_mm"),
                                         ("mc2", "grouped_mm")])
def test_a_rank_that_raises_inside_a_block_stops_its_peers_within_the_timeout(strategy, op):
    """Rank 0 raises inside the block, after the guard (an op's kernel fails): rank 1, waiting in
    the strategy's exchange, raises within moe_fx's timeout, naming the blocks, instead of waiting
    for the EP group's (30 min for gloo by default)."""
    try:
        results = _run(2, "raise_inside_case", op=op, patch={**STRATEGIES[strategy], "collective_timeout_s": TIMEOUT_S})
    finally:
        get_pool(2).close()
    assert results[0]["second"] == ("error", "RuntimeError: simulated failure inside the block"), results
    for rank, res in enumerate(results):
        assert res["first"][0] == "ok" and res["first"][1] <= GOOD, res
    kind, message = results[1]["second"]
    assert kind == "error" and message.startswith("CollectiveTimeoutError: MoE block(s) '<root module>': an exchange "
                                                  "between the ranks did not complete within "
                                                  "moe_fx.config.collective_timeout_s=2 s"), results
    assert "a peer raised inside a block after the entry check" in message, message
    assert results[1]["seconds"] < TIMEOUT_S + 5.0, results
    for res in results:  # calling again after the errors: an error, never a wrong answer
        assert res["third"][0] == "error" or res["third"][1] <= GOOD, res
