"""The hand-written MoE forms of public repositories (tests/handwritten_forms.py, issue 20): each is
rewritten with real expert parallelism (ep 2 and 4 over gloo, foreign experts zeroed, equal to eager
on every rank) or refused with a reason in explain() that names what in the user's code prevents it.
"""

from __future__ import annotations

import re

import pytest
import torch

import moe_fx
from tests.form_jobs import build_form, forms_case
from tests.tolerances import within

# issue 20's form number -> (case, the recognizer that rewrites it)
REWRITTEN = {
    1: (dict(cls="MaskedAssignMoE"), "expert_loop"),
    3: (dict(cls="FlatMaskMoE"), "expert_loop"),
    4: (dict(cls="SequentialMLPMoE"), "split_experts"),
    5: (dict(cls="DenseEinsumMoE"), "dense_bmm"),
    6: (dict(cls="GptOssReferenceMoE"), "weight_gather_einsum"),
    7: (dict(cls="TorchMoERefFixed"), "expert_loop"),  # torch_moe after the fix explain() gives
    8: (dict(cls="TitanCurrentMoE", dtype="bfloat16"), "titan_grouped_mm"),
    9: (dict(cls="GroupedMLP2D", dtype="bfloat16"), "hf_grouped_mm"),
    10: (dict(cls="FusedW13EinsumMoE"), "weight_gather_einsum"),
    11: (dict(cls="TitanIndexRowsMoE", dtype="bfloat16"), "titan_grouped_mm"),
}
CASES = [case for case, _ in REWRITTEN.values()]

# issue 20's form number -> (class, patterns the near-misses must match: module, construct, fix)
REFUSED = {
    2: ("SortedInferMoE", [r"SortedInferMoE", r"for i, n in enumerate\(counts\)", r"\.cpu\(\)\.numpy\(\)",
                           r"torch\.where\(ids == e\)"]),
    7: ("TorchMoERef", [r"TorchMoERef", r"data-dependent Python branch \(if mask\.sum\(\):\)", r"remove the branch"]),
}


def _check(results: list[list[dict]], lowering: str) -> None:
    for rank, per_case in enumerate(results):
        for (case, form), res in zip(REWRITTEN.values(), per_case):
            r = res[lowering]
            assert not r["misses"], (rank, case, r["misses"])
            assert r["forms"] == [form] and len(r["blocks"]) == 1, (rank, case, r["forms"], r["blocks"])
            assert within(r, case.get("dtype", "float32")), (
                f"rank {rank} {case} {lowering}: max |diff| {r['diff']:.3g}, max |eager| {r['scale']:.3g}")


def test_rewritten_ep1():
    _check([forms_case(cases=CASES)], "auto")


@pytest.mark.parametrize("world,lowering", [(2, "all2allv"), (4, "allgather")])
def test_rewritten_with_expert_parallelism(rank_pool, world, lowering):
    """One pool job: every rewritten form at ep 2 through All2AllV and at ep 4 (one expert per rank)
    through AllGather, foreign experts zeroed."""
    results = rank_pool(world).run("tests.form_jobs:forms_case", cases=CASES, lowerings=(lowering,))
    assert all(res["touched"] > 0 for per_case in results for res in per_case), "foreign experts were not zeroed"
    for per_case in results:
        for (case, _), res in zip(REWRITTEN.values(), per_case):
            assert res[lowering]["blocks"][0][1] == lowering, (case, res[lowering]["blocks"])
    _check(results, lowering)


@pytest.mark.parametrize("number", sorted(REFUSED))
def test_refused_with_what_prevents_it(number):
    cls, patterns = REFUSED[number]
    report = moe_fx.explain(build_form(cls), torch.randn(6, 16))
    assert not report.blocks, str(report)
    reasons = [f"{m.block}: {m.reason}" for m in report.near_misses]
    for pattern in patterns:
        assert any(re.search(pattern, r) for r in reasons), (pattern, str(report))
