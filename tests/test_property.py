"""Property test: rewritten == eager over shapes, routing skew, ep, lowering and dtype."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.ep_jobs import plain_case
from tests.tolerances import within


@st.composite
def moe_cases(draw):
    ep = draw(st.sampled_from((1, 2)))
    num_experts = draw(st.sampled_from((2, 4, 8)))
    return dict(
        ep=ep,
        kind="batched",
        hidden=draw(st.sampled_from((8, 16, 24))),
        intermediate=draw(st.sampled_from((4, 8, 16))),
        num_experts=num_experts,
        top_k=draw(st.integers(1, min(3, num_experts))),
        dtype=draw(st.sampled_from(("float32", "bfloat16"))),
        tokens=tuple(draw(st.integers(1, 12)) for _ in range(ep)),
        skew=draw(st.sampled_from((0.0, 4.0))),
        lowerings=(draw(st.sampled_from(("allgather", "all2allv"))),) if ep > 1 else ("auto",),
        module_kw={"gated": draw(st.booleans()), "bias": draw(st.booleans())},
        seed=draw(st.integers(0, 3)),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=moe_cases())
def test_rewritten_matches_eager(rank_pool, case):
    ep = case.pop("ep")
    if ep == 1:
        results = [plain_case(**case)]
    else:
        results = rank_pool(ep).run("tests.ep_jobs:plain_case", **case)
    for rank, res in enumerate(results):
        for lowering, r in res.items():
            assert "error" not in r, r.get("error")
            expected = "local" if ep == 1 else lowering
            assert [s for _, s in r["blocks"]] == [expected], r
            assert within(r, case["dtype"]), f"rank {rank}: {r['diff']:.3g} of {r['scale']:.3g} ({case})"
