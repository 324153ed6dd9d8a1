"""The MC2 lowering off Ascend: static capacity, no host sync, exact results, loud overflows."""

from __future__ import annotations

import pytest
import torch

from tests.tolerances import within

BOUND = {"max_tokens_per_rank": 16}


def _assert_mc2(results, dtype="float32"):
    for rank, res in enumerate(results):
        r = res["mc2"]
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        assert [s for _, s in r["blocks"]] == ["mc2"] and not r["misses"]
        assert within(r, dtype), f"rank {rank}: max |diff| {r['diff']:.3g} of {r['scale']:.3g}"


@pytest.mark.parametrize("routing", ("router", "foreign", "one_expert"))
@pytest.mark.parametrize("ep", (2, 4))
def test_mc2_plain_module(rank_pool, ep, routing):
    _assert_mc2(rank_pool(ep).run("tests.ep_jobs:plain_case", num_experts=8, routing=routing,
                                  lowerings=("mc2",), config_patch=BOUND, inner="aot_eager"))


@pytest.mark.parametrize("key,impl,dtype", [("mixtral", "grouped_mm", "float32"),
                                            ("gpt_oss", "batched_mm", "bfloat16"),
                                            ("deepseek_v3", "grouped_mm", "float32")])
def test_mc2_hf_models_ep2(rank_pool, key, impl, dtype):
    results = rank_pool(2).run("tests.ep_jobs:hf_model_case", key=key, impl=impl, dtype=dtype,
                               lowerings=("mc2",), config_patch=BOUND)
    _assert_mc2(results, dtype)


def test_mc2_inductor_ep2(rank_pool):
    results = rank_pool(2).run("tests.ep_jobs:hf_model_case", key="qwen3_moe", impl="grouped_mm",
                               dtype="float32", lowerings=("mc2",), config_patch=BOUND, inner="inductor")
    _assert_mc2(results)


def test_mc2_needs_a_token_bound(rank_pool):
    for res in rank_pool(2).run("tests.ep_jobs:plain_case", lowerings=("mc2",)):
        assert "lowering='mc2' sizes its buffers from a token bound" in res["mc2"]["error"]


def test_mc2_tokens_above_the_bound_raise(rank_pool):
    """Ranks hold 9 and 10 tokens with a bound of 8: an error naming the block and the sizes, never a
    dropped token. The block's agreement check (moe_fx/runtime/guard.py) raises it on every rank,
    naming the first rank over the bound; tests/test_reliability.py has one rank within it."""
    results = rank_pool(2).run("tests.ep_jobs:plain_case", tokens=(9, 10), lowerings=("mc2",),
                               config_patch={"max_tokens_per_rank": 8})
    for res in results:
        assert ("MoE block '<root module>': 9 tokens on rank 0 exceed the mc2 capacity "
                "moe_fx.config.max_tokens_per_rank=8") in res["mc2"]["error"]
        assert "(raised on every rank; nothing was exchanged)" in res["mc2"]["error"]


def test_bounded_allgather_tokens_above_the_bound_raise(rank_pool):
    """The static AllGather pads every rank to the bound: a rank above it raises the same error
    (never a truncated pad, which would drop tokens)."""
    results = rank_pool(2).run("tests.ep_jobs:plain_case", tokens=(9, 10), lowerings=("allgather",),
                               config_patch={"max_tokens_per_rank": 8})
    for rank, res in enumerate(results):
        assert (f"MoE block '<root module>': {9 + rank} tokens on rank {rank} exceed the allgather capacity "
                "moe_fx.config.max_tokens_per_rank=8") in res["allgather"]["error"]


def test_mc2_backward(rank_pool):
    for rank, res in enumerate(rank_pool(2).run("tests.ep_jobs:grad_case", lowering="mc2", config_patch=BOUND)):
        assert res.pop("blocks") == ["mc2"]
        for name, diff in res.items():
            assert diff <= 1e-5, f"rank {rank}: gradient of {name} off by {diff:.3g}"


def test_two_blocks_two_strategies_one_graph(rank_pool):
    """Per-block overrides: layer 0 through mc2, layer 1 through all2allv, in one compiled graph."""
    results = rank_pool(2).run("tests.ep_jobs:two_layer_override_case")
    for rank, res in enumerate(results):
        assert res["graphs"] == 1
        assert res["blocks"] == [("model.layers.0.mlp.experts", "mc2"), ("model.layers.1.mlp.experts", "all2allv")]
        assert res["diff"] <= 1e-5, (rank, res)


# The symmetric-memory transport (config.mc2_transport="symm_mem") over the gloo emulator of
# torch's all_to_all_vdev_2d contract (moe_fx/testing/symm_mem_emulator.py): padding rows are NaN
# there, so reading one would show.

def _assert_symm_mem(results, dtype="float32"):
    _assert_mc2(results, dtype)
    assert [res["symm_mem_dispatches"] for res in results] == [1] * len(results)


@pytest.mark.parametrize("routing", ("router", "foreign", "one_expert"))
@pytest.mark.parametrize("ep", (2, 4))
def test_symm_mem_transport_plain_module(rank_pool, ep, routing):
    _assert_symm_mem(rank_pool(ep).run("tests.ep_jobs:symm_mem_case", num_experts=8, routing=routing,
                                       inner="aot_eager"))


@pytest.mark.parametrize("key,impl,dtype", [("mixtral", "grouped_mm", "float32"),
                                            ("deepseek_v3", "grouped_mm", "float32"),
                                            ("gpt_oss", "batched_mm", "bfloat16")])
def test_symm_mem_transport_hf_models_ep2(rank_pool, key, impl, dtype):
    results = rank_pool(2).run("tests.ep_jobs:symm_mem_case", job="hf_model_case", key=key, impl=impl, dtype=dtype)
    _assert_symm_mem(results, dtype)


def test_symm_mem_transport_limits(rank_pool):
    """32 experts per rank: more than torch's kernels take; the error names the block and the sizes."""
    for res in rank_pool(2).run("tests.ep_jobs:symm_mem_case", num_experts=64):
        assert ("mc2_transport='symm_mem' handles at most 16 experts per rank (torch's all_to_all_vdev_2d); "
                "this block has 32") in res["mc2"]["error"]


def test_symm_mem_transport_needs_cuda(rank_pool):
    for res in rank_pool(2).run("tests.ep_jobs:symm_mem_case", num_experts=8, emulate=False):
        assert "mc2_transport='symm_mem' cannot run: it needs CUDA tensors (the block runs on 'cpu')" in res["mc2"]["error"]


def test_symm_mem_transport_has_no_backward(rank_pool):
    """Compiling a training step fails while the backward is traced, before any step runs."""
    for res in rank_pool(2).run("tests.ep_jobs:symm_mem_backward_case"):
        assert "NotImplementedError: moe_fx: the symmetric-memory MC2 transport has no backward" in res, res


def test_symm_mem_emulator_follows_the_contract(rank_pool):
    """The docstring example of torch's all_to_all_vdev_2d: rank 0 sends rows to experts (c0, c1,
    c2, c3) = (1, 2, 0, 3), rank 1 (d0, d1, d2, d3) = (2, 0, 0, 1). Each rank receives its experts'
    chunks expert-major (c0 d0 c1 d1 on rank 0); expert 2 receives nothing and still takes one row.
    The offset variant returns every row to its sender, packed rank-major."""
    nan = float("nan")
    got = rank_pool(2).run("tests.ep_jobs:symm_mem_contract_case")
    want = [
        {"out": [0, 100, 101, 1, 2, nan, nan, nan], "layout": [[1, 2, 2, 0], [0, 1, 3, 5]],
         "back": [0, 1, 2, 3, 4, 5], "back_layout": [[1, 2, 0, 3], [0, 1, 3, 3]]},
        {"out": [nan, 3, 4, 5, 102, nan, nan, nan], "layout": [[0, 0, 3, 1], [0, 0, 1, 4]],
         "back": [100, 101, 102, nan, nan, nan], "back_layout": [[2, 0, 0, 1], [0, 2, 2, 2]]},
    ]
    for rank, (g, w) in enumerate(zip(got, want)):
        assert g["layout"] == w["layout"] and g["back_layout"] == w["back_layout"], (rank, g)
        for key in ("out", "back"):
            torch.testing.assert_close(torch.tensor(g[key]), torch.tensor(w[key], dtype=torch.float32), equal_nan=True, msg=f"rank {rank} {key}")
