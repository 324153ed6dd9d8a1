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
FORM_OF = {"LoopMoE": "expert_loop"}


def _check(results: list[list[dict]], cases: list[dict], lowerings) -> None:
    for rank, per_case in enumerate(results):
        for case, res in zip(cases, per_case):
            for lowering in lowerings:
                r = res[lowering]
                assert not r["misses"], f"rank {rank} {case}: near-misses {r['misses']}"
                assert len(r["blocks"]) == 1, f"rank {rank} {case}: rewrote {r['blocks']}"
                assert r["blocks"][0][1] == ("local" if lowering == "auto" else lowering), (case, r["blocks"])
                assert within(r, case.get("dtype", "float32")), (
                    f"rank {rank} {case} {lowering}: max |diff| {r['diff']:.3g}, max |eager| {r['scale']:.3g}")


@pytest.mark.parametrize("cases", [LOOP_CASES], ids=["loops"])
def test_ep1(cases):
    _check([forms_case(cases=cases)], cases, ("auto",))


@pytest.mark.parametrize("cases", [LOOP_CASES], ids=["loops"])
@pytest.mark.parametrize("ep", (2, 4))
def test_ep(rank_pool, ep, cases):
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
