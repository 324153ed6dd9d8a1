"""The run-time token switch under dynamic shapes: one compiled graph follows the token count."""

from __future__ import annotations

import pytest

CAPACITY = 6
SWEEP = tuple(range(1, CAPACITY + 4))  # rank 0's token counts; rank r gets max(1, t - r)


@pytest.mark.parametrize("ep", (2, 4))
def test_sweep_follows_the_largest_token_count(rank_pool, ep):
    results = rank_pool(ep).run("tests.ep_jobs:token_sweep_case", sweep=SWEEP, capacity=CAPACITY)
    for rank, res in enumerate(results):
        # T = 1 is specialized by dynamo (a static graph); every other count shares one symbolic graph.
        assert (res["graphs"], res["unique_graphs"]) == (2, 2), (rank, res["graphs"], res["unique_graphs"])
        assert res["blocks"] == ["mc2|all2allv"] * 2
        assert "per call, mc2 while the largest rank's token count" in res["reason"]
        for t, step in zip(SWEEP, res["steps"]):
            assert step["tokens"] == max(1, t - rank)
            # rank 0 holds the most tokens (t): the ranks agree on it, whatever their own count
            assert step["ran"] == ["mc2" if t <= CAPACITY else "all2allv"], (rank, t, step)
            assert step["diff"] <= 1e-5, (rank, t, step)


@pytest.mark.parametrize("capacity,branch", [(16, "mc2"), (4, "all2allv")])
def test_switch_backward(rank_pool, capacity, branch):
    """Gradients through each branch (ranks hold 6 and 9 tokens) equal eager's."""
    results = rank_pool(2).run("tests.ep_jobs:grad_case", lowering="mc2|all2allv",
                               config_patch={"auto_mc2_max_tokens": capacity})
    for rank, res in enumerate(results):
        assert res.pop("blocks") == ["mc2|all2allv"]
        assert res.pop("ran") == [branch], rank
        for name, diff in res.items():
            assert diff <= 1e-5, f"rank {rank}: gradient of {name} off by {diff:.3g}"
