"""Every recognized region is proven on numbers before it is rewritten (moe_fx/passes/probe.py):
a wrong claim is refused with a near-miss and the block runs as traced."""

from __future__ import annotations

import torch

from moe_fx.passes.probe import MAX_ROUTINGS, probe_routings, tolerance
from tests.probe_jobs import corrupted_case
from tests.tolerances import within


def test_a_wrong_claim_is_refused_and_the_block_runs_as_traced():
    res = corrupted_case(lowering="auto")
    assert res["blocks"] == []
    assert len(res["misses"]) == 1 and "not what the traced code computes" in res["misses"][0], res["misses"]
    assert within(res, "float32"), res


def test_without_the_probe_the_same_wrong_claim_gives_a_wrong_answer():
    """What the probe catches above: the corrupted rewrite is really wrong."""
    res = corrupted_case(lowering="auto", probe_check=False)
    assert [s for _, s in res["blocks"]] == ["local"]
    assert res["diff"] > 0.05 * res["scale"], res


def test_a_right_claim_passes_its_probe():
    res = corrupted_case(lowering="auto", corrupt_ranks=())
    assert [s for _, s in res["blocks"]] == ["local"] and not res["misses"]
    assert within(res, "float32"), res


def test_a_verdict_on_one_rank_only_is_an_error_not_a_hang(rank_pool):
    """The claim is wrong on rank 0 only (ranks with the same weights never disagree; this forces
    it): rank 0 runs the block as traced (with the foreign experts zeroed here, so against the
    traced code on its weights); rank 1, whose rewrite needs rank 0 for the block's groups and
    guard, fails within collective_timeout_s (3 s) with an error naming the block instead of waiting. moe_fx's group set-up is
    then out of step between the ranks, so the pool is replaced."""
    try:
        results = rank_pool(2).run("tests.probe_jobs:corrupted_case", corrupt_ranks=(0,))
    finally:
        rank_pool(2).close()
    assert results[0]["blocks"] == [] and "not what the traced code computes" in results[0]["misses"][0]
    assert within(results[0]["as_traced"], "float32"), results[0]
    error = results[1].get("error", "")
    assert "CollectiveTimeoutError: MoE block '<root module>'" in error and "came to set up" in error, results[1]


def test_right_claims_pass_on_every_rank(rank_pool):
    for rank, res in enumerate(rank_pool(2).run("tests.probe_jobs:corrupted_case", corrupt_ranks=())):
        assert "error" not in res and [s for _, s in res["blocks"]] == ["allgather"] and not res["misses"], f"rank {rank}: {res}"
        assert within(res, "float32"), f"rank {rank}: {res}"


def test_explain_runs_the_probe_check():
    """explain() reaches the backend's verdict: the wrongly claimed block leaves its table for the
    probe's near-miss; the right claim stays; with the check off nothing is refused."""
    import moe_fx
    import moe_fx.passes
    from tests.ep_jobs import build_plain
    from tests.probe_jobs import wrong_weighting

    model = build_plain("batched", hidden=16, intermediate=8, num_experts=8, top_k=2, dtype="float32")
    x = torch.randn(5, 16)
    find = moe_fx.passes.find_moe_regions
    moe_fx.passes.find_moe_regions = wrong_weighting(find)
    try:
        wrong = moe_fx.explain(model, x)
        with moe_fx.config.patch(probe_check=False):
            unchecked = moe_fx.explain(model, x)
    finally:
        moe_fx.passes.find_moe_regions = find
    right = moe_fx.explain(model, x)
    assert wrong.blocks == [] and [m.form for m in wrong.near_misses] == ["probe"], str(wrong)
    assert "not what the traced code computes" in wrong.near_misses[0].reason
    assert len(unchecked.blocks) == 1 and not unchecked.near_misses, str(unchecked)
    assert len(right.blocks) == 1 and not right.near_misses, str(right)


def test_probe_routings_hit_every_expert():
    for tokens, top_k, experts in ((1, 2, 8), (3, 2, 8), (5, 8, 128), (16, 4, 8), (1, 1, 64)):
        routings = probe_routings(tokens, top_k, experts)
        assert 2 <= len(routings) <= MAX_ROUTINGS
        for ids in routings:
            assert ids.shape == (tokens, top_k) and int(ids.min()) >= 0 and int(ids.max()) < experts
            assert all(len(set(row.tolist())) == top_k for row in ids), "ids repeat within a token"
        hit = set(torch.cat(routings).flatten().tolist())
        if tokens * top_k * (MAX_ROUTINGS - 1) >= experts:
            assert hit == set(range(experts)), (tokens, top_k, experts)


def test_tolerance_follows_the_dtype():
    assert tolerance(torch.bfloat16, "cpu") == tolerance(torch.float16, "cpu") == 2e-2
    assert tolerance(torch.float32, "cpu") == 1e-4
