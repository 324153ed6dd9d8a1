"""transformers MoE models from tiny configs, whole model compiled with fullgraph=True, every
rank on its own (uneven) tokens, compared with eager on that rank.

With ep > 1 each rank zeroes the experts it does not own after the eager reference is taken: the
compiled model can only match if every routed row really went to the rank owning its expert.
"""

from __future__ import annotations

import pytest

from tests.ep_jobs import TOKENS_PER_RANK, hf_model_case
from tests.tiny_models import MODEL_KEYS
from tests.tolerances import within

IMPLS = ("grouped_mm", "batched_mm")
DTYPES = ("float32", "bfloat16")
EP_LOWERINGS = ("allgather", "all2allv")


def _check(results: list[dict], dtype: str, lowerings, expected_strategy=None) -> None:
    for rank, res in enumerate(results):
        for lowering in lowerings:
            r = res[lowering]
            assert not r["misses"], f"rank {rank}: near-misses {r['misses']}"
            assert len(r["blocks"]) == 1, f"rank {rank}: rewrote {r['blocks']}"
            assert r["blocks"][0][1] == (expected_strategy or lowering)
            assert within(r, dtype), (
                f"rank {rank} ({res['tokens']} tokens) {lowering}: max |diff| {r['diff']:.3g}, "
                f"max |eager| {r['scale']:.3g}"
            )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("key", MODEL_KEYS)
def test_ep1_matches_eager(key, impl, dtype):
    res = hf_model_case(key=key, impl=impl, dtype=dtype, lowerings=("auto",))
    _check([res], dtype, ("auto",), expected_strategy="local")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("key", MODEL_KEYS)
@pytest.mark.parametrize("ep", (2, 4))
def test_ep_matches_eager(rank_pool, ep, key, impl, dtype):
    # ep=2 goes through AOTAutograd (the custom ops' fake implementations); ep=4 runs the
    # rewritten graph directly to keep the 4-process matrix affordable on 2 cores.
    inner = "aot_eager" if ep == 2 else "eager"
    lowerings = EP_LOWERINGS + ("mc2",)
    results = rank_pool(ep).run(
        "tests.ep_jobs:hf_model_case", key=key, impl=impl, dtype=dtype, lowerings=lowerings, inner=inner,
        config_patch={"max_tokens_per_rank": max(TOKENS_PER_RANK)},  # mc2's capacity; unused by the others
    )
    assert all(r["touched"] >= 2 for r in results), "foreign experts were not zeroed"
    _check(results, dtype, lowerings)


@pytest.mark.parametrize(
    "key,impl,dtype",
    [("mixtral", "grouped_mm", "float32"), ("gpt_oss", "grouped_mm", "bfloat16"), ("qwen3_moe", "batched_mm", "bfloat16")],
)
def test_ep2_inductor(rank_pool, key, impl, dtype):
    results = rank_pool(2).run(
        "tests.ep_jobs:hf_model_case", key=key, impl=impl, dtype=dtype, lowerings=EP_LOWERINGS, inner="inductor"
    )
    if dtype == "bfloat16":
        results = [{**r, **{lw: {**r[lw], **r[lw]["vs_compiled"]} for lw in EP_LOWERINGS}} for r in results]
    _check(results, dtype, EP_LOWERINGS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ep1_inductor(dtype):
    res = hf_model_case(key="mixtral", impl="grouped_mm", dtype=dtype, lowerings=("auto",), inner="inductor")
    if dtype == "bfloat16":
        res["auto"].update(res["auto"]["vs_compiled"])
    _check([res], dtype, ("auto",), expected_strategy="local")
