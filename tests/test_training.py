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


@pytest.mark.parametrize("lowering", ("allgather", "all2allv"))
def test_ep2_backward(rank_pool, lowering):
    _assert_grads(rank_pool(2).run("tests.ep_jobs:grad_case", lowering=lowering), lowering)
