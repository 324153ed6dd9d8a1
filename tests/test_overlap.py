"""The bounded AllGather in overlapped chunks (config.ep_overlap_chunks): every chunk's all-gather is
issued before the first chunk's experts and every reduce-scatter awaited after the last chunk's,
the results equal eager, and inductor keeps that order."""

from __future__ import annotations

import pytest
import torch

from moe_fx import config
from moe_fx.lowering import EPPlan, Strategy
from moe_fx.passes.plan import _overlap_chunks
from tests.tolerances import within


@pytest.mark.parametrize("ep,chunks,tokens", [(2, 2, (9, 1)), (2, 3, (9, 4)), (4, 2, (9, 1, 7, 8))])
def test_overlapped_chunks_match_eager(rank_pool, ep, chunks, tokens):
    """Ranks with fewer tokens than the bound (rank 1: a chunk of padding only), chunks that do not
    divide the bound (9 tokens in 3 and 2 chunks), every rank's tokens routed over every rank."""
    results = rank_pool(ep).run("tests.ep_jobs:plain_case", num_experts=8, tokens=tokens, lowerings=("allgather",),
                                inner="aot_eager", config_patch={"max_tokens_per_rank": 9, "ep_overlap_chunks": chunks})
    for rank, res in enumerate(results):
        r = res["allgather"]
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        assert [s for _, s in r["blocks"]] == ["allgather"] and not r["misses"]
        assert within(r, "float32"), f"rank {rank}: max |diff| {r['diff']:.3g} of {r['scale']:.3g}"


def test_overlapped_chunks_of_a_transformers_model(rank_pool):
    results = rank_pool(2).run("tests.ep_jobs:hf_model_case", key="qwen3_moe", impl="grouped_mm", dtype="bfloat16",
                               lowerings=("allgather",), config_patch={"max_tokens_per_rank": 16,
                                                                      "ep_overlap_chunks": 2})
    for rank, res in enumerate(results):
        r = res["allgather"]
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        assert within(r, "bfloat16"), f"rank {rank}: max |diff| {r['diff']:.3g} of {r['scale']:.3g}"


def test_inductor_keeps_the_exchanges_beside_the_experts(rank_pool):
    """Chunk 2's all-gather comes before chunk 1's experts and chunk 1's reduce-scatter before chunk
    2's experts, in the rewritten graph and in inductor's code (whose peak-memory reordering would
    otherwise await each all-gather right away and run the chunks' experts layer by layer)."""
    order = "AG AG W G MM MM U RS W G MM MM U RS W W"
    for rank, res in enumerate(rank_pool(2).run("tests.ep_jobs:overlap_order_case", chunks=2)):
        assert res["chunks"] == [2]
        assert res["graph"] == order, f"rank {rank}"
        # torch 2.11's inductor inlines the gather and unsort ops on CPU (no G, U calls in its code)
        expected = order if " G " in res["code"] else order.replace(" G", "").replace(" U", "")
        assert res["code"] == expected, f"rank {rank}"
        assert res["diff"] < 1e-5


def test_one_chunk_is_the_plain_bounded_allgather(rank_pool):
    res = rank_pool(2).run("tests.ep_jobs:overlap_order_case", chunks=1)[0]
    assert res["chunks"] == [1] and res["graph"] == "AG W G MM MM U RS W"


EP2 = EPPlan(block="b", num_experts=128, ep_size=2, ep_rank=0, group_name="g")


def test_chunks_are_off_by_default():
    """Measured slower on 2 H200s (README, "Multi-GPU benchmark"): no block is chunked unless asked."""
    assert config.ep_overlap_chunks == 1
    assert _overlap_chunks(EP2, Strategy.ALLGATHER, 4096, "cuda", False) == 1


@pytest.mark.parametrize("strategy,capacity,device,training,chunks", [
    (Strategy.ALLGATHER, 4096, "cuda", False, 4),
    (Strategy.ALLGATHER, 128, "cpu", False, 4),
    (Strategy.ALLGATHER, 3, "cuda", False, 3),      # at most one chunk per token of the bound
    (Strategy.ALLGATHER, 4096, "cuda", True, 1),    # training graphs keep one chunk
    (Strategy.ALLGATHER, 4096, "npu", False, 1),    # the Ascend lowering has no chunked form
    (Strategy.ALLGATHER, None, "cuda", False, 1),   # no bound: the host-synced form
    (Strategy.ALL2ALLV, 4096, "cuda", False, 1),
    (Strategy.MC2, 4096, "cuda", False, 1),
])
def test_configured_chunks_apply_to_the_bounded_allgather_only(strategy, capacity, device, training, chunks):
    with config.patch(ep_overlap_chunks=4):
        assert _overlap_chunks(EP2, strategy, capacity, device, training) == chunks


def test_replicated_tokens_keep_one_chunk():
    with config.patch(ep_overlap_chunks=4, tokens="replicated"):
        assert _overlap_chunks(EP2, Strategy.ALLGATHER, 4096, "cuda", False) == 1
