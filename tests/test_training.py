"""Backward through the rewritten graph: the runtime ops' autograd formulas."""

from __future__ import annotations

import pytest

from tests.ep_jobs import grad_case


def _assert_grads(results, lowering):
    for rank, res in enumerate(results):
        assert res.pop("blocks") == [lowering]
        for name, diff in res.items():
            assert diff <= 1e-5, f"rank {rank} {lowering}: gradient of {name} off by {diff:.3g}"


def test_local_backward():
    _assert_grads([grad_case(lowering="auto")], "local")


@pytest.mark.parametrize("lowering,patch", [("allgather", {}), ("allgather", {"max_tokens_per_rank": 16}),
                                            ("all2allv", {})], ids=["allgather", "allgather-bounded", "all2allv"])
def test_ep2_backward(rank_pool, lowering, patch):
    """The bounded AllGather runs on c10d functional collectives' autograd (all-gather <->
    reduce-scatter), and gathers the router weights as floats so the router gets its gradient."""
    _assert_grads(rank_pool(2).run("tests.ep_jobs:grad_case", lowering=lowering, config_patch=patch), lowering)


@pytest.mark.parametrize("lowering,patch", [("allgather", {}), ("allgather", {"max_tokens_per_rank": 8}),
                                            ("all2allv", {}), ("mc2", {"max_tokens_per_rank": 8})],
                         ids=["allgather", "allgather-bounded", "all2allv", "mc2"])
def test_a_rank_with_no_tokens_backward(rank_pool, lowering, patch):
    """Rank 0 feeds the block 0 tokens: forward and backward still join every collective, and the
    other rank's gradients equal eager's."""
    results = rank_pool(2).run("tests.ep_jobs:grad_case", lowering=lowering, tokens=(0, 5), config_patch=patch)
    _assert_grads(results, lowering)
