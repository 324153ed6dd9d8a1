"""Self-test of tests/dist_pool.py (persistent gloo rank pools)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests.dist_pool import RankPool, get_pool

# ---- functions run on the ranks (module level, so workers can import them) --------------------------------------


def _all_reduce_sum(rank: int, world_size: int, base: float = 1.0):
    t = torch.tensor([base + rank], dtype=torch.float64)
    dist.all_reduce(t)
    return {"rank": rank, "world_size": world_size, "pg_size": dist.get_world_size(), "sum": t}


def _raise_on_rank_1(rank: int, world_size: int):
    if rank == 1:
        raise ValueError(f"deliberate failure on rank {rank}")
    return rank


def _raise_on_rank_1_while_peers_reduce(rank: int, world_size: int):
    if rank == 1:
        raise ValueError("rank 1 bails out before the collective")
    t = torch.ones(1)
    dist.all_reduce(t)  # never completes: rank 1 is not there
    return t


def _sleep_on_rank_0(rank: int, world_size: int, seconds: float):
    if rank == 0:
        time.sleep(seconds)
    return rank


_COMPILES: list[int] = []


def _counting_backend(gm, example_inputs):
    _COMPILES.append(1)
    return gm.forward


def _compile_target(x):
    return torch.sin(x) + 1


def _count_compiles(rank: int, world_size: int):
    before = len(_COMPILES)
    torch.compile(_compile_target, backend=_counting_backend)(torch.ones(3))
    return len(_COMPILES) - before


# ---- tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce(rank_pool, world_size):
    pool = rank_pool(world_size)
    expected = sum(1.0 + r for r in range(world_size))
    for fn in (_all_reduce_sum, f"{__name__}:_all_reduce_sum"):
        out = pool.run(fn, base=1.0)
        assert [o["rank"] for o in out] == list(range(world_size))
        assert all(o["world_size"] == o["pg_size"] == world_size for o in out)
        assert all(o["sum"].item() == expected for o in out)
    assert rank_pool(world_size) is pool  # cached for the session


def test_rank_error_carries_traceback(rank_pool):
    pool = rank_pool(2)
    with pytest.raises(RuntimeError) as excinfo:
        pool.run(_raise_on_rank_1)
    msg = str(excinfo.value)
    assert "rank 1" in msg and "Traceback (most recent call last)" in msg
    assert "ValueError: deliberate failure on rank 1" in msg
    assert "_raise_on_rank_1" in msg  # the frame of the failing function is in the traceback
    # every rank delivered a result, so the pool is still usable
    assert rank_pool(2) is pool
    assert pool.run(_all_reduce_sum)[0]["sum"].item() == 3.0


def test_dynamo_is_reset_between_jobs(rank_pool):
    pool = rank_pool(2)
    assert pool.run(_count_compiles) == [1, 1]
    assert pool.run(_count_compiles) == [1, 1]  # without torch._dynamo.reset() this would hit the cache: [0, 0]


def test_timeout_kills_pool_and_next_get_pool_is_fresh(rank_pool):
    pool = rank_pool(2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0\]"):
        pool.run(_sleep_on_rank_0, seconds=10.0, _timeout_s=3.0)
    assert time.monotonic() - t0 < 8.0
    assert not pool.alive
    with pytest.raises(RuntimeError, match="not alive"):
        pool.run(_all_reduce_sum)
    fresh = rank_pool(2)
    assert fresh is not pool and fresh.alive
    assert [o["sum"].item() for o in fresh.run(_all_reduce_sum)] == [3.0, 3.0]


def test_failure_while_peer_blocks_in_collective(rank_pool):
    pool = rank_pool(2)
    pool.error_grace_s = 1.0
    with pytest.raises(RuntimeError) as excinfo:
        pool.run(_raise_on_rank_1_while_peers_reduce)
    msg = str(excinfo.value)
    assert "rank 1 bails out before the collective" in msg and "[0] gave no result" in msg
    assert not pool.alive
    assert [o["sum"].item() for o in rank_pool(2).run(_all_reduce_sum)] == [3.0, 3.0]


def test_worker_death_is_reported(rank_pool):
    pool = rank_pool(2)
    pool.error_grace_s = 1.0
    with pytest.raises(RuntimeError, match=r"rank 1 process died \(exit code 3\)"):
        pool.run(_exit_on_rank_1)
    assert not pool.alive


def _exit_on_rank_1(rank: int, world_size: int):
    import os

    if rank == 1:
        os._exit(3)
    return rank


def test_standalone_pool_context_manager():
    with RankPool(1, timeout_s=60.0) as pool:
        assert pool.run(_raise_on_rank_1) == [0]  # rank 1 does not exist in a world of one
    assert not pool.alive
