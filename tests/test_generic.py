"""The generic path (moe_fx/passes/generic.py): MoE blocks no recognizer matches are rewritten by
what they compute, with real expert parallelism, once their probe check proves it; a dense form
is refused with the reason."""

from __future__ import annotations

import pytest

from tests.form_jobs import forms_case
from tests.tolerances import within

SPARSE = [dict(cls="NormedExpertLoop"), dict(cls="NonzeroSlotLoop")]
BOUND = {"max_tokens_per_rank": 12}  # tests/form_jobs.py's ranks hold 7, 12, 3 and 9 tokens


def _check_rewritten(results: list[list[dict]]) -> None:
    for rank, per_case in enumerate(results):
        for case, res in zip(SPARSE, per_case):
            assert res["touched"] > 0, "foreign experts were not zeroed"
            r = res["auto"]
            assert r["forms"] == ["generic"] and [s for _, s in r["blocks"]] == ["allgather"], (rank, case, r)
            assert not r["misses"], (rank, case, r["misses"])
            assert within(r, "float32"), (rank, case, r["diff"], r["scale"])
            before, after = r["nonzero"]
            if case["cls"] == "NonzeroSlotLoop":  # the copy's nonzeros replace the traced ones
                assert before == after == 4, r["nonzero"]


def test_ep1_leaves_the_block_as_traced_and_says_so():
    for res in forms_case(cases=SPARSE):
        r = res["auto"]
        assert r["blocks"] == [] and within(r, "float32")
        assert any("generic" in m and "ep = 1" in m for m in r["misses"]), r["misses"]


@pytest.mark.parametrize("world", [2, 4])
def test_rewritten_with_expert_parallelism(rank_pool, world):
    _check_rewritten(rank_pool(world).run("tests.form_jobs:forms_case", cases=SPARSE, config_patch=BOUND))


def test_a_dense_form_is_refused_with_the_reason(rank_pool):
    """Every expert on every token: the sum over ranks is right, but each rank would compute every
    expert, so the probe refuses it (with foreign experts zeroed, the traced block on one rank's
    weights is not the eager reference: only the reason is checked here)."""
    results = rank_pool(2).run("tests.form_jobs:forms_case", cases=[dict(cls="DenseGateLoop")], config_patch=BOUND)
    for (res,) in results:
        r = res["auto"]
        assert r["blocks"] == [], r
        assert any("dense form" in m and "FLOPs" in m for m in r["misses"]), r["misses"]


def test_explain_names_the_generic_candidate():
    import torch

    import moe_fx
    from tests.form_jobs import build_form

    def generic_line(name: str) -> str:
        report = moe_fx.explain(build_form(name), torch.randn(7, 16))
        rows = [m.reason for m in report.near_misses if m.form == "generic"]
        assert len(rows) == 1, str(report)
        return rows[0]

    with torch.no_grad():  # an inference graph, as the generic path rewrites
        assert "probe check passed here" in generic_line("NormedExpertLoop")
        assert "dense form" in generic_line("DenseGateLoop")
        with moe_fx.config.patch(probe_check=False):
            assert "did not run its probe check" in generic_line("NormedExpertLoop")
    # with grad on, the parameters make it a training graph, which the backend leaves as traced
    assert "a training graph" in generic_line("NormedExpertLoop")


def test_operator_methods_are_named_as_their_operators():
    """torch 2.11's dynamo (Python 3.12) records ``ids == e`` as ``Tensor.__eq__``, where 2.13's
    records ``operator.eq``: the recognizers and the generic path read both as "eq" (on the GPU
    machine's torch 2.11, expert loops were refused and a dense loop got no near-miss before)."""
    import operator

    import torch
    import torch.fx as fx

    from moe_fx.passes.graph_utils import op_name
    from moe_fx.passes.rowwise import mutates

    graph = fx.Graph()
    x = graph.placeholder("x")
    nodes = {
        "eq": graph.call_function(torch.Tensor.__eq__, (x, 3)),
        "eq_op": graph.call_function(operator.eq, (x, 3)),
        "eq_method": graph.call_method("__eq__", (x, 3)),
        "and": graph.call_function(torch.Tensor.__and__, (x, x)),
        "add_": graph.call_method("add_", (x, x)),
    }
    assert [op_name(nodes[k]) for k in ("eq", "eq_op", "eq_method")] == ["eq"] * 3
    assert op_name(nodes["and"]) == "and_" and not mutates(nodes["and"])
    assert mutates(nodes["add_"])


def test_ranks_with_different_token_counts_and_no_bound_raise_on_every_rank(rank_pool):
    """Without max_tokens_per_rank the bound is each rank's own token count (7 and 12 here): the
    guard names the block and both counts on every rank instead of exchanging unequal buffers."""
    results = rank_pool(2).run("tests.form_jobs:outcome_case", cls="NormedExpertLoop")
    for rank, (outcome, text) in enumerate(results):
        assert outcome == "error", (rank, text)
        assert "MoE block '<root module>'" in text and "token capacity" in text, text
        assert "(rank 0: 7, rank 1: 12)" in text, text


def test_a_capacity_no_recognizer_knows_is_refused(rank_pool):
    """At most 12 slots per expert: on the probe routings no expert of one rank overflows, but with
    every rank's tokens on the same experts the gathered rows do, so the probe refuses the block."""
    results = rank_pool(2).run("tests.form_jobs:forms_case", cases=[dict(cls="CappedLoop")], config_patch=BOUND)
    for (res,) in results:
        r = res["auto"]
        assert r["blocks"] == [], r
        assert any("generic path's rewrite is not what its code computes" in m for m in r["misses"]), r["misses"]


def test_tokens_above_the_bound_raise_naming_the_block():
    """A rank holding more tokens than max_tokens_per_rank gets an error naming the block and both
    sizes, as the recognized AllGather's bound does (rather than leaving the block as traced on that
    rank alone while its peers rewrite it). The plan is built directly: ep = 2 without a group."""
    import torch

    import moe_fx
    from moe_fx.errors import UnsupportedMoEError
    from moe_fx.lowering.base import EPPlan
    from moe_fx.passes.generic import GenericRegion, find_generic, plan_generic
    from tests.form_jobs import build_form

    found = []

    def capture(gm, example_inputs):
        found.extend(g for g in find_generic(gm.graph, []) if isinstance(g, GenericRegion))
        return gm

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        torch.compile(build_form("NormedExpertLoop"), backend=capture, fullgraph=True)(torch.randn(7, 16))
    (region,) = found
    ep = EPPlan(block=region.block, num_experts=4, ep_size=2, ep_rank=1, group_name="unused")
    with moe_fx.config.patch(max_tokens_per_rank=5), pytest.raises(UnsupportedMoEError) as err:
        plan_generic(region, ep)
    assert "MoE block '<root module>' (generic): 7 tokens on rank 1 exceed" in str(err.value)
    assert "max_tokens_per_rank=5" in str(err.value)


def test_a_capacity_gate_is_not_a_candidate():
    """A top-k router feeding a capacity-dropping gate: the capacity_gate near-miss, no generic line."""
    import torch

    import moe_fx
    from tests.generic_forms import TopKCapacityGate

    torch.manual_seed(0)
    report = moe_fx.explain(TopKCapacityGate(16, 8, 4, 2), torch.randn(9, 16))
    forms = [m.form for m in report.near_misses]
    assert "capacity_gate" in forms and "generic" not in forms, str(report)
