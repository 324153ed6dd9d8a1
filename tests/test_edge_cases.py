"""Routing corner cases and bad sizes, on a plain-PyTorch MoE over gloo."""

from __future__ import annotations

import re

import pytest

from tests.tolerances import within

LOWERINGS = ("allgather", "all2allv")


def _assert_all_match(results, dtype="float32"):
    for rank, res in enumerate(results):
        for lowering in LOWERINGS:
            r = res[lowering]
            assert "error" not in r, f"rank {rank} {lowering}: {r.get('error')}"
            assert [s for _, s in r["blocks"]] == [lowering]
            assert within(r, dtype), f"rank {rank} {lowering}: max |diff| {r['diff']:.3g}"


@pytest.mark.parametrize("ep", (2, 4))
def test_every_token_routed_to_another_rank(rank_pool, ep):
    """No rank computes any of its own tokens: everything crosses the group and comes back."""
    _assert_all_match(rank_pool(ep).run("tests.ep_jobs:plain_case", num_experts=8, routing="foreign"))


@pytest.mark.parametrize("ep", (2, 4))
def test_all_tokens_to_one_expert(rank_pool, ep):
    """Top-k = 2 and every token picks experts 0 and 1: rank 0 gets every row, others none."""
    _assert_all_match(rank_pool(ep).run("tests.ep_jobs:plain_case", num_experts=8, routing="one_expert"))


def test_rank_with_a_single_token(rank_pool):
    _assert_all_match(rank_pool(2).run("tests.ep_jobs:plain_case", tokens=(9, 1)))


def test_grouped_form_bf16(rank_pool):
    """The sort / histc / torch._grouped_mm form written by hand (bf16: what torch 2.13 compiles)."""
    _assert_all_match(
        rank_pool(2).run("tests.ep_jobs:plain_case", kind="grouped", dtype="bfloat16"), dtype="bfloat16"
    )


def test_non_gated_biased_gelu_experts_bf16(rank_pool):
    _assert_all_match(
        rank_pool(2).run("tests.ep_jobs:plain_case", kind="batched", dtype="bfloat16",
                         module_kw={"gated": False, "bias": True}),
        dtype="bfloat16",
    )


def test_experts_not_divisible_by_ep(rank_pool):
    results = rank_pool(4).run("tests.ep_jobs:plain_case", num_experts=6, lowerings=("allgather",))
    for res in results:
        message = res["allgather"].get("error", "")
        assert re.search(
            r"MoE block '<root module>': 6 experts cannot be split evenly over an expert-parallel "
            r"group of 4 ranks \(6 % 4 = 2\)", message
        ), message


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_changing_token_counts_compile_once_more(rank_pool, lowering):
    """Three token counts per rank: one static graph, then one dynamic graph serves the rest."""
    for rank, res in enumerate(rank_pool(2).run("tests.ep_jobs:dynamic_case", lowering=lowering)):
        assert max(res["diffs"]) <= 1e-5, (rank, res)
        assert res["graphs"] == 2 and res["blocks"] == [1, 1], (rank, res)


@pytest.mark.parametrize("lowering,patch", [("allgather", {}), ("allgather", {"ep_overlap_chunks": 2}),
                                           ("mc2", {}), ("auto", {})])
def test_changing_token_counts_under_a_token_bound(rank_pool, lowering, patch):
    """With max_tokens_per_rank the static strategies pad a symbolic token count to the bound: one
    dynamic graph serves every count (until this session the bounded AllGather failed to compile
    there: F.pad's fake kernel refuses a symbolic pad)."""
    results = rank_pool(2).run("tests.ep_jobs:dynamic_case", lowering=lowering,
                               config_patch={"max_tokens_per_rank": 16, **patch})
    for rank, res in enumerate(results):
        assert max(res["diffs"]) <= 1e-5, (rank, res)
        assert res["graphs"] == 2 and res["blocks"] == [1, 1], (rank, res)


@pytest.mark.parametrize("mask_from,kept", [(8, False), (7, True)])
def test_row_mask_on_expert_ids(mask_from, kept):
    """transformers 5.17 zeroes rows of ids >= E after the down projection: an identity on a
    router's ids, dropped (it would cost a pass over every row). A threshold below E does mask
    real experts' rows and must survive the rewrite."""
    import torch

    import moe_fx
    from tests.moe_modules import GroupedMoE

    torch.manual_seed(0)
    model = GroupedMoE(16, 8, 8, 2, mask_rows_from=mask_from).to(torch.bfloat16)
    x = torch.randn(11, 16).to(torch.bfloat16)
    with torch.no_grad():
        want = model(x).float()
        torch._dynamo.reset()
        with moe_fx.config.patch(inner_backend="aot_eager"), moe_fx.recording() as graphs:
            got = torch.compile(model, backend=moe_fx.backend, fullgraph=True)(x).float()
    (decision,) = graphs[0].report.blocks
    assert ("masked_fill" in decision.rendering) == kept, decision.rendering
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()
