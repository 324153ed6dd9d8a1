"""examples/generate.py and examples/train.py at ep = 2 over gloo, against one process holding
the whole model; moe_fx.expert_parallel_parameters and average_expert_gradients; a rank with 0
tokens in an MoE block."""

from __future__ import annotations

import pytest
import torch

import moe_fx
from moe_fx.errors import MoEFxError
from tests.ep_jobs import build_plain


@pytest.mark.parametrize("model,static_cache", [("qwen3_moe", False), ("gpt_oss", True)])
def test_generate_matches_eager_with_ranks_out_of_step(rank_pool, model, static_cache):
    results = rank_pool(2).run("tests.example_jobs:generate_case", model=model, static_cache=static_cache)
    (r0, r1) = results
    # rank 0: two batches of 3 x 6 tokens; rank 1: one batch of 2 x 9, then a dummy (finished early)
    assert (r0["batches"], r0["shapes"], r1["batches"], r1["shapes"]) == (2, [(3, 6)] * 2, 1, [(2, 9)]), results
    assert (r0["tokens"], r1["tokens"]) == (2 * 3 * 4, 2 * 4), results
    for rank, r in enumerate(results):
        assert r["equal"] and all(r["equal"]), f"rank {rank}: tokens differ from eager's: {r}"
        # prefill (AllGather reading the largest count at run time: no token bound) and decode
        # (AllGather in its static form: bound = the largest decode batch; ep=2 <= top_k);
        # a dynamic cache grows each step: one more, symbolic, decode graph; a static cache: none
        assert all(lw == ["allgather"] for lw in r["lowerings"]), r
        assert r["graphs"] == r["dynamo_graphs"] == (2 if static_cache else 3), r


def test_gradients_and_training_match_one_process(rank_pool):
    pool = rank_pool(2)
    for rank, r in enumerate(pool.run("tests.example_jobs:grad_case")):
        assert r["experts"] and all(".experts." in n for n in r["experts"]), r["experts"]
        bad = {n: d for n, d in r["diffs"].items() if d > 1e-5}
        assert not bad, f"rank {rank}: gradients off the one-process run (relative): {bad}"
    for rank, r in enumerate(pool.run("tests.example_jobs:train_case")):
        assert len(r["losses"]) == 3
        for step, (a, b) in enumerate(zip(r["losses"], r["ref_losses"])):
            assert abs(a - b) <= 1e-5 * abs(b), f"rank {rank} step {step}: loss {a} against one process {b}"
        # Adam divides by sqrt(v): where a gradient is near 0 its fp32 roundoff moves the step by a
        # fraction of lr (1e-2 here), so parameters get 1e-4 of their magnitude, gradients 1e-5 above
        assert r["param_diff"] <= 1e-4, f"rank {rank}: parameters after 3 steps off by {r['param_diff']:.3g}"


def test_fsdp2_gradients_match_one_process(rank_pool):
    for rank, r in enumerate(rank_pool(2).run("tests.example_jobs:grad_case", fsdp=True)):
        bad = {n: d for n, d in r["diffs"].items() if d > 1e-5}
        assert not bad, f"rank {rank}: FSDP2 gradients off the one-process run (relative): {bad}"


@pytest.mark.parametrize("lowering", ("allgather", "all2allv", "mc2"))
def test_rank_with_no_tokens_joins_the_block(rank_pool, lowering):
    r0, r1 = rank_pool(2).run("tests.example_jobs:empty_rank_case", lowering=lowering, form="hf_block")
    assert r1 == {"shape": (1, 0, 64), "diff": None}, r1
    assert r0["shape"] == (1, 5, 64) and r0["diff"] <= 1e-5, r0


def test_expert_parallel_parameters_without_sharding():
    model = build_plain("batched", hidden=16, intermediate=8, num_experts=4, top_k=2, dtype="float32")
    assert moe_fx.expert_parallel_parameters(model) == []
    with pytest.raises(MoEFxError, match="no sharded expert parameters"):
        moe_fx.average_expert_gradients(model)


def test_average_expert_gradients_divides_by_the_data_parallel_size():
    from moe_fx.shard import ExpertShard, replace_param

    model = build_plain("batched", hidden=16, intermediate=8, num_experts=4, top_k=2, dtype="float32")
    names = [n for n, p in model.named_parameters() if p.dim() == 3]
    for name in names:
        shard = ExpertShard(block="", num_experts=4, start=0, num_local=4, ep_size=2)
        replace_param(model, name, getattr(model, name).detach(), shard)
    assert [n for n, _ in moe_fx.expert_parallel_parameters(model)] == names
    with pytest.raises(MoEFxError, match="sharded over \\[2\\] ranks but the data-parallel group has 4"):
        moe_fx.average_expert_gradients(model, dp_size=4)
    moe_fx.average_expert_gradients(model, dp_size=2)
    loss = sum(getattr(model, n).sum() for n in names)
    loss.backward()
    for n in names:
        assert torch.equal(getattr(model, n).grad, torch.full_like(getattr(model, n), 0.5)), n
