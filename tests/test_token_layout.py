"""tokens="replicated" (TP-style inputs): every rank holds the same tokens."""

from __future__ import annotations

import pytest

from tests.tolerances import within

LOWERINGS = ("allgather", "all2allv", "mc2")


@pytest.mark.parametrize("ep,num_tokens", [(2, 7), (4, 10), (4, 3), (2, 1)])
def test_replicated_tokens_match_eager(rank_pool, ep, num_tokens):
    """Token counts not divisible by ep, and fewer tokens than ranks."""
    for rank, res in enumerate(rank_pool(ep).run("tests.ep_jobs:replicated_case", num_tokens=num_tokens,
                                                   lowerings=LOWERINGS)):
        for lowering in LOWERINGS:
            r = res[lowering]
            assert [s for _, s in r["blocks"]] == [lowering] and not r["misses"]
            assert within(r, "float32"), f"rank {rank} {lowering}: max |diff| {r['diff']:.3g}"


@pytest.mark.parametrize("experts_over", ("world", "pairs"))
def test_separate_tp_and_ep_groups(rank_pool, experts_over):
    """4 ranks as 2 TP pairs; experts over all 4 ranks, or over 2 EP pairs across the TP pairs."""
    for rank, res in enumerate(rank_pool(4).run("tests.ep_jobs:tp_ep_case", experts_over=experts_over,
                                                  lowerings=LOWERINGS)):
        for lowering in LOWERINGS:
            r = res[lowering]
            assert [s for _, s in r["blocks"]] == [lowering] and not r["misses"]
            assert within(r, "float32"), f"rank {rank} {lowering}: max |diff| {r['diff']:.3g}"
