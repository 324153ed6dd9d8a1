"""The other ways MoE is written (tests/form_modules.py): static expert loops, torchtitan's grouped
experts, gpt-fast's weight gather. Every rank on its own tokens, compiled equals eager per rank,
with ep > 1 after zeroing the experts the rank does not own; ep 1, 2 and 4, both EP lowerings.
"""

from __future__ import annotations

import re

import pytest
import torch

import moe_fx
from tests.ep_jobs import TOKENS_PER_RANK
from tests.form_jobs import build_form, forms_case, hf_form_case, sentinel517_case
from tests.tolerances import within

EP_LOWERINGS = ("allgather", "all2allv", "mc2")
# mc2's capacity: the largest rank's token count (tests/ep_jobs.py); unused by the other lowerings.
BOUND = {"max_tokens_per_rank": max(TOKENS_PER_RANK)}

LOOP_CASES = [
    dict(cls="LoopMoE"),  # ModuleList, gated SiLU, one_hot mask, index_add_
    dict(cls="LoopMoE", bias=True, gated=False, act="gelu", select="eq", accumulate="index_put"),
    dict(cls="LoopMoE", experts="params", select="eq", accumulate="setitem"),
    dict(cls="LoopMoE", bias=True, shared=True),
    dict(cls="LoopMoE", experts="params", gated=False, act="gelu", dtype="bfloat16"),
    dict(cls="LoopMoE", bias=True, dtype="bfloat16"),
]
TITAN_CASES = [
    dict(cls="TitanMoE", dtype="bfloat16"),
    dict(cls="TitanMoE", dtype="bfloat16", score_before_experts=True, shared=True),
]
GATHER_CASES = [dict(cls="WeightGatherMoE"), dict(cls="WeightGatherMoE", dtype="bfloat16")]
DENSE_CASES = [dict(cls="DenseMoE"), dict(cls="DenseMoE", scores_on_input=False, dtype="bfloat16"),
               dict(cls="DenseMoE", scores_on_input=False, batch_view=True)]
SPLIT_CASES = [dict(cls="SplitMoE"), dict(cls="SplitMoE", dtype="bfloat16")]
ALL_CASES = LOOP_CASES + TITAN_CASES + GATHER_CASES + DENSE_CASES + SPLIT_CASES
FORMS = {"LoopMoE": "expert_loop", "TitanMoE": "titan_grouped_mm", "WeightGatherMoE": "weight_gather_einsum",
         "DenseMoE": "dense_bmm", "SplitMoE": "split_experts"}

# Every variant runs at ep 1 (recognition and equivalence of each spelling); each form at ep 2
# and ep 4, with its variants split between them (the multi-rank matrix is what costs CI time).
EP_CASES = {
    2: [LOOP_CASES[1], TITAN_CASES[1], GATHER_CASES[1], DENSE_CASES[1], DENSE_CASES[2], SPLIT_CASES[1]],
    4: [LOOP_CASES[0], TITAN_CASES[0], GATHER_CASES[0], DENSE_CASES[0], SPLIT_CASES[0]],
}
# transformers models: (key, experts_implementation) -> the form their MoE blocks take.
HF_FORMS = {
    ("llama4_text", "eager"): "dense_bmm",
    ("jetmoe", "eager"): "split_experts",
    ("deepseek_v2", "grouped_mm"): "hf_grouped_mm",
    ("jamba", "grouped_mm"): "hf_grouped_mm",
}


def _check(results: list[list[dict]], cases: list[dict], lowerings) -> None:
    for rank, per_case in enumerate(results):
        for case, res in zip(cases, per_case):
            for lowering in lowerings:
                r = res[lowering]
                assert not r["misses"], f"rank {rank} {case}: near-misses {r['misses']}"
                assert len(r["blocks"]) == 1, f"rank {rank} {case}: rewrote {r['blocks']}"
                assert r["forms"] == [FORMS[case["cls"]]], (case, r["forms"])
                assert r["blocks"][0][1] == ("local" if lowering == "auto" else lowering), (case, r["blocks"])
                assert within(r, case.get("dtype", "float32")), (
                    f"rank {rank} {case} {lowering}: max |diff| {r['diff']:.3g}, max |eager| {r['scale']:.3g}")


def test_ep1():
    _check([forms_case(cases=ALL_CASES)], ALL_CASES, ("auto",))


@pytest.mark.parametrize("ep", (2, 4))
def test_ep(rank_pool, ep):
    cases = EP_CASES[ep]
    results = rank_pool(ep).run("tests.form_jobs:forms_case", cases=cases, lowerings=EP_LOWERINGS, config_patch=BOUND)
    assert all(res["touched"] > 0 for per_case in results for res in per_case), "foreign experts were not zeroed"
    _check(results, cases, EP_LOWERINGS)


def _check_hf(results: list[dict], key: str, impl: str, dtype: str, lowerings) -> None:
    for rank, res in enumerate(results):
        assert res["forms"] == [HF_FORMS[key, impl]], (key, res["forms"])
        for lowering in lowerings:
            r = res[lowering]
            # JetMoE's attention mixes attention heads (a near-miss: it reads the attention mask)
            assert all("attention_mask" in m for m in r["misses"]), r["misses"]
            assert [s for _, s in r["blocks"]] == ["local" if lowering == "auto" else lowering], r["blocks"]
            assert within(r, dtype), f"rank {rank} {key} {lowering}: max |diff| {r['diff']:.3g}, max |eager| {r['scale']:.3g}"


# Every real model at ep 1, 2 and 4 (deepseek_v2 and jamba use transformers' standard experts).
HF_EPS = [(ep, key, impl) for ep in (1, 2, 4) for key, impl in HF_FORMS]


@pytest.mark.parametrize("ep,key,impl", HF_EPS)
def test_transformers_models(rank_pool, ep, key, impl):
    # JetMoE's tiny logits reach ~40, where one fp32 rounding step (4.8e-6) of the cross-rank sum
    # in a different order already nears the 1e-5 absolute bound: compared in bf16 (relative) at ep > 1.
    dtype = "bfloat16" if ep == 1 or key == "jetmoe" else "float32"
    if ep == 1:
        results = [hf_form_case(key=key, impl=impl, dtype=dtype, lowerings=("auto",), inner="eager")]
        lowerings = ("auto",)
    else:
        lowerings = EP_LOWERINGS
        results = rank_pool(ep).run("tests.form_jobs:hf_form_case", key=key, impl=impl, dtype=dtype,
                                    lowerings=lowerings, inner="eager", config_patch=BOUND)
        assert all(r["touched"] >= 2 for r in results), "foreign experts were not zeroed"
    _check_hf(results, key, impl, dtype, lowerings)


def test_explain_lists_each_form():
    report = moe_fx.explain(build_form("LoopMoE"), torch.randn(6, 16))
    assert [(b.block, b.form, b.num_experts, b.top_k, b.activation) for b in report.blocks] == [
        ("experts", "expert_loop", 4, 2, "gated silu")]
    assert "capture_dynamic_output_shape_ops" in str(report)
    for case in (TITAN_CASES[1], GATHER_CASES[0], DENSE_CASES[0], SPLIT_CASES[0]):
        case = dict(case)
        cls, dtype = case.pop("cls"), getattr(torch, case.pop("dtype", "float32"))
        report = moe_fx.explain(build_form(cls, dtype=str(dtype).split(".")[1], **case), torch.randn(6, 16, dtype=dtype))
        assert [b.form for b in report.blocks] == [FORMS[cls]] and not report.near_misses, str(report)


@pytest.mark.parametrize(
    "cls,reason",
    [
        ("PartialLoopMoE", r"the loop covers 3 experts but the router picks among 4"),
        ("BranchyLoopMoE", r"data-dependent Python branch \(if tok.numel\(\) == 0:\)"),
        ("CapacityMoE", r"capacity-dropping gate: tokens past an expert's capacity are dropped"),
    ],
)
def test_near_misses_say_why_and_run_as_traced(cls, reason):
    model, x = build_form(cls), torch.randn(6, 16)
    report = moe_fx.explain(model, x)
    assert not report.blocks
    assert any(re.search(reason, m.reason) for m in report.near_misses), str(report)
    if cls != "BranchyLoopMoE":  # fullgraph=True cannot capture the branch at all
        torch._dynamo.reset()
        with moe_fx.config.patch(inner_backend="eager"), torch.no_grad():
            assert torch.equal(torch.compile(model, backend=moe_fx.backend, fullgraph=True)(x), model(x))


# transformers 5.17's experts guard ids >= num_experts (tests/hf517_modules.py); sharded, they read e.
SENTINEL_CASES = [dict(impl="grouped_mm"), dict(impl="grouped_mm", bias=True), dict(impl="batched_mm", bias=True),
                  dict(impl="grouped_mm", dtype="bfloat16")]
SENTINEL_FORMS = {"grouped_mm": "hf_grouped_mm", "batched_mm": "hf_batched_mm"}


def _check_sentinels(results: list[list[dict]], lowerings) -> None:
    for rank, per_case in enumerate(results):
        for case, res in zip(SENTINEL_CASES, per_case):
            for lowering in lowerings:
                r = res[lowering]
                assert not r["misses"] and r["forms"] == [SENTINEL_FORMS[case["impl"]]], (rank, case, lowering, r)
                # proven identities: dropped, not replayed on the dispatched rows' global ids
                assert not any("masked_fill" in x for x in r["renderings"]), (rank, case, r["renderings"])
                assert within(r, case.get("dtype", "float32")), (
                    f"rank {rank} {case} {lowering}: max |diff| {r['diff']:.3g}, max |eager| {r['scale']:.3g}")


def test_transformers_517_guards_ep1():
    _check_sentinels([sentinel517_case(cases=SENTINEL_CASES)], ("auto",))


@pytest.mark.parametrize("shard", (False, True), ids=("foreign-zeroed", "sharded"))
def test_transformers_517_guards_ep2(rank_pool, shard):
    results = rank_pool(2).run("tests.form_jobs:sentinel517_case", cases=SENTINEL_CASES, lowerings=EP_LOWERINGS,
                               shard=shard, config_patch=BOUND)
    assert shard or all(res["touched"] for per_case in results for res in per_case), "foreign experts were not zeroed"
    _check_sentinels(results, EP_LOWERINGS)


@pytest.mark.parametrize("impl,reason", [
    ("grouped_mm", r"in-place clamp_ \(\w+\) of the sorted expert ids is not a guard of ids >= E=8"),
    ("batched_mm", r"gathered expert ids are clamped \(\w+\) below the router's E=8"),
])
def test_transformers_517_guards_below_e_are_real_masks(impl, reason):
    """A guard at 4 < E = 8 in an unsharded block zeroes real experts' rows: never dropped."""
    (res,) = sentinel517_case(cases=[dict(impl=impl, guard_from=4)])
    r = res["auto"]
    assert not r["blocks"] and any(re.search(reason, m) for m in r["misses"]), r
    assert r["diff"] == 0.0, r  # run as traced
