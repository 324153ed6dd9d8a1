"""The other ways MoE is written (tests/form_modules.py): static expert loops, torchtitan's grouped
experts, gpt-fast's weight gather. Every rank on its own tokens, compiled equals eager per rank,
with ep > 1 after zeroing the experts the rank does not own; ep 1, 2 and 4, both EP lowerings.
"""

from __future__ import annotations

import pytest
import torch

import moe_fx
from tests.form_jobs import build_form, forms_case
from tests.tolerances import within

EP_LOWERINGS = ("allgather", "all2allv")

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
ALL_CASES = LOOP_CASES + TITAN_CASES
FORMS = {"LoopMoE": "expert_loop", "TitanMoE": "titan_grouped_mm"}

# Each variant runs at ep 1 and at one of ep 2 / ep 4 (the pool matrix is what costs CI time).
EP_CASES = {2: [LOOP_CASES[i] for i in (1, 3, 5)] + TITAN_CASES, 4: [LOOP_CASES[i] for i in (0, 2, 4)] + TITAN_CASES}


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
    results = rank_pool(ep).run("tests.form_jobs:forms_case", cases=cases, lowerings=EP_LOWERINGS)
    assert all(res["touched"] > 0 for per_case in results for res in per_case), "foreign experts were not zeroed"
    _check(results, cases, EP_LOWERINGS)


def test_explain_lists_loop_blocks_with_form_and_capture_note():
    model = build_form("LoopMoE")
    report = moe_fx.explain(model, torch.randn(6, 16))
    assert [(b.block, b.form, b.num_experts, b.top_k, b.activation) for b in report.blocks] == [
        ("experts", "expert_loop", 4, 2, "gated silu")]
    assert "capture_dynamic_output_shape_ops" in str(report)


@pytest.mark.parametrize(
    "cls,reason",
    [
        ("PartialLoopMoE", r"the loop covers 3 experts but the router picks among 4"),
        ("BranchyLoopMoE", r"data-dependent Python branch"),
    ],
)
def test_loop_near_misses_say_why(cls, reason):
    report = moe_fx.explain(build_form(cls), torch.randn(6, 16))
    assert not report.blocks
    assert any(__import__("re").search(reason, m.reason) for m in report.near_misses), str(report)
