"""Holding only the local experts: moe_fx.shard_experts and moe_fx.load_sharded over gloo ranks.

Expert memory is measured from the storages the parameters keep alive; outputs are compared with
the unsharded model's eager output on each rank's own tokens.
"""

from __future__ import annotations

import logging
import os
import re

import pytest
from safetensors import safe_open

import torch

import moe_fx
from tests.tiny_models import build_tiny, make_input_ids
from tests.tolerances import within

# (model, experts implementation, dtype, lowering): biases and the grouped form through AOTAutograd
# at ep=2; the batched form in bf16 at ep=4 (test_load_sharded adds Mixtral's grouped form).
SHARD_CASES = {
    2: (("gpt_oss", "grouped_mm", "float32", "allgather"),),
    4: (("qwen3_moe", "batched_mm", "bfloat16", "all2allv"),),
}


@pytest.mark.parametrize("ep", (2, 4))
def test_sharded_experts_hold_one_ep_th_and_match_eager(rank_pool, ep):
    inner = "aot_eager" if ep == 2 else "eager"
    results = rank_pool(ep).run("tests.shard_jobs:sharded_case", cases=SHARD_CASES[ep], inner=inner, explain=ep == 2)
    for rank, per_case in enumerate(results):
        for r in per_case:
            key, _, dtype, lowering = r["case"]
            assert r["blocks"] == [("model.layers.0.mlp.experts", lowering)] and not r["misses"], r
            assert r["after"] * ep == r["before"], f"rank {rank} {key}: {r['after']} of {r['before']} bytes held"
            assert r["all_after"] == r["others"] + r["after"], f"rank {rank} {key}: other parameters changed"
            (block, start, local, params), = r["sharded"]
            assert (start, local) == (rank * 8 // ep, 8 // ep)
            if key == "gpt_oss":
                assert {"gate_up_proj_bias", "down_proj_bias"} <= set(params)
            assert within(r, dtype), f"rank {rank} {key}: max |diff| {r['diff']:.3g}, max |eager| {r['scale']:.3g}"
            assert re.search(rf"MoEFxError: .*'{block}' holds only experts {start}\.\.{start + local - 1} of 8 "
                             r".*torch\.compile", r["eager_error"]), r["eager_error"]
            if ep == 2:  # explain, called before sharding, reports what was then measured
                assert (r["explain_held"], r["explain_sharded"]) == (r["before"], r["after"]), r["explain_table"]
                assert re.search(r"expert weights on this rank: 196\.0 KiB held, 98\.0 KiB after "
                                 r"moe_fx.shard_experts \(ep 2\)", r["explain_table"]), r["explain_table"]
                assert "Call explain before sharding" in r["explain_sharded_error"]
    if ep == 4:
        errors = rank_pool(4).run("tests.shard_jobs:uneven_split_error", num_experts=6)
        assert all(re.search(r"MoE block '<root module>': 6 experts cannot be split evenly over .* 4 ranks", e)
                   for e in errors), errors
        for rank, err in enumerate(rank_pool(4).run("tests.shard_jobs:compile_errors")):
            first = 2 * rank
            assert re.search(rf"UnsupportedMoEError: MoE block 'moe': its parameter moe\.w_\w+ holds only experts "
                             rf"{rank}\.\.{rank} of 4 .*did not rewrite .*activation: reads", err["unrewritable"], re.S), err
            assert re.search(rf"holds experts {first}\.\.{first + 1} of 8 .*over 4 ranks.*compiled with \(2 ranks\) "
                             rf"assigns it experts {rank % 2 * 4}\.\.{rank % 2 * 4 + 3}", err["other_group"], re.S), err


def _checkpoint(path: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def _expert_keys(tensors: dict[str, torch.Tensor]) -> dict[str, int | None]:
    """Checkpoint keys of routed experts: key -> expert index (per-expert tensors) or None (fused [E, ...])."""
    out = {}
    for key, t in tensors.items():
        per_expert = re.search(r"\.experts\.(\d+)\.", key)
        if per_expert:
            out[key] = int(per_expert.group(1))
        elif ".experts." in key and t.shape[0] == 8:
            out[key] = None
    return out


def test_load_sharded_reads_only_local_experts(rank_pool, tmp_path):
    # Mixtral is saved one tensor per expert (w1/w2/w3, renamed), split over several files with an
    # index; GPT-OSS as fused [E, ...] tensors with biases.
    checkpoints = {}
    for key, max_shard in (("mixtral", "100KB"), ("gpt_oss", "5GB")):
        checkpoints[key] = str(tmp_path / key)
        build_tiny(key).save_pretrained(checkpoints[key], max_shard_size=max_shard)
    assert os.path.exists(tmp_path / "mixtral" / "model.safetensors.index.json")
    results = rank_pool(2).run("tests.shard_jobs:load_case", checkpoints=checkpoints, lowering="all2allv",
                               inner="eager")
    for key, path in checkpoints.items():
        tensors = _checkpoint(path)
        experts = _expert_keys(tensors)
        shared = set(tensors) - set(experts)
        expert_bytes = sum(tensors[k].nbytes for k in experts)
        assert {i for i in experts.values() if i is not None} == (set(range(8)) if key == "mixtral" else set())
        for rank, res in enumerate(results):
            r = res[key]
            local = range(4 * rank, 4 * rank + 4)
            read_keys = [k for k, _ in r["reads"]]
            assert len(read_keys) == len(set(read_keys)), f"{key} rank {rank}: a tensor was read twice"
            assert {k for k, rows in r["reads"] if rows is None and k not in experts} == shared
            for k, rows in r["reads"]:
                if k in experts and experts[k] is not None:
                    assert experts[k] in local and rows is None, f"{key} rank {rank} read {k}"
                elif k in experts:
                    assert rows == (local.start, local.stop), f"{key} rank {rank} read rows {rows} of {k}"
            per_expert_read = {k for k, _ in r["reads"] if experts.get(k) is not None}
            assert per_expert_read == {k for k, i in experts.items() if i in local}
            assert r["expert_bytes"] * 2 == expert_bytes
            assert r["blocks"] == [("model.layers.0.mlp.experts", "all2allv")] and not r["misses"]
            assert within(r, "float32"), f"{key} rank {rank}: max |diff| {r['diff']:.3g}"


# One family per checkpoint layout: renamed w1/w3/w2 per expert, per expert plus a shared expert, per
# expert plus a persistent buffer, fused with biases, fused under other names (qwen3_moe and olmoe
# share qwen2_moe's mapping).
@pytest.mark.parametrize("key", ("mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "granitemoe"))
def test_load_sharded_ep1_rebuilds_each_layout(tmp_path, key):
    """Without a group nothing is sharded: the checkpoint key mapping (renamings, per-expert stacking,
    gate|up joining, fused tensors) must rebuild the model exactly."""
    model = build_tiny(key)
    model.save_pretrained(tmp_path)
    loaded = moe_fx.load_sharded(str(tmp_path), experts_implementation="grouped_mm")
    ids = make_input_ids(6, seed=0)
    want, got = model.state_dict(), loaded.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with torch.no_grad():  # equal weights may sit in other layouts: fp32 rounding may differ
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert not loaded.sharded and all(r.rows is None for r in loaded.reads)
    assert sum(r.nbytes for r in loaded.reads) == sum(t.nbytes for t in model.state_dict().values())


def test_sharded_backward(rank_pool):
    """Training a sharded model: the local block's weight and bias gradients are the sum over ranks
    of eager's rows for those experts; input and router gradients equal eager's."""
    for rank, diffs in enumerate(rank_pool(2).run("tests.shard_jobs:sharded_grad_case", lowering="all2allv")):
        assert set(diffs) == {"x", "w_up", "w_down", "b_up", "b_down", "router.weight"}
        assert all(d <= 1e-5 for d in diffs.values()), f"rank {rank}: {diffs}"


class _Pair:
    """Rank 0 of a two-rank expert-parallel group, for shard_experts in this process (it reads only
    rank() and size(); nothing is exchanged before the model is compiled)."""

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 2


def _expert_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("select", ("one_hot", "eq"))
def test_shard_refuses_an_expert_loop(select):
    """A ``for e in range(num_experts)`` loop reads num_experts as the router's id range: sharding
    used to change it (one_hot: "Class values must be smaller than num_classes"); it is refused
    before anything changes."""
    from tests.form_modules import LoopMoE

    model = LoopMoE(16, 8, 4, 2, experts="params", select=select)
    before = _expert_shapes(model)
    with pytest.raises(moe_fx.UnsupportedMoEError) as info:
        moe_fx.shard_experts(model, _Pair())
    assert re.search(r"MoE block '<root module>' \(LoopMoE\): its forward reads num_experts=4 .*range\(num_experts\)"
                     r".*With 2 of its 4 experts on this rank .*nothing was sharded.*Compile it unsharded",
                     str(info.value)), str(info.value)
    assert _expert_shapes(model) == before and model.num_experts == 4


def test_shard_refuses_transformers_eager_experts():
    model = build_tiny("mixtral", experts_implementation="eager")
    before = _expert_shapes(model)
    with pytest.raises(moe_fx.UnsupportedMoEError) as info:
        moe_fx.shard_experts(model, _Pair())
    assert re.search(r"MoE block 'model\.layers\.0\.mlp\.experts' \(MixtralExperts\): its transformers "
                     r"experts_implementation='eager' .*Set experts_implementation to one of \['grouped_mm', "
                     r"'batched_mm'\]", str(info.value)), str(info.value)
    assert _expert_shapes(model) == before


def test_shard_keeps_forms_that_do_not_read_the_expert_count():
    """The gather form indexes weights by router id only; transformers' grouped_mm reads num_experts
    as its weight-group count (set to e, as transformers' own EP does)."""
    from tests.form_modules import WeightGatherMoE

    gather = WeightGatherMoE(16, 8, 4, 2)
    (block,) = moe_fx.shard_experts(gather, _Pair())
    assert (block.shard.start, block.shard.num_local, gather.w1.shape[0]) == (0, 2, 2)
    grouped = build_tiny("mixtral", experts_implementation="grouped_mm")
    (block,) = moe_fx.shard_experts(grouped, _Pair())
    experts = grouped.get_submodule(block.block)
    assert (experts.num_experts, experts.gate_up_proj.shape[0]) == (4, 4)


def test_shard_says_when_it_finds_nothing(caplog):
    """An nn.ModuleList of expert modules has no [E, ...] parameters: nothing is sharded, and it says so."""
    from tests.form_modules import LoopMoE

    model = LoopMoE(16, 8, 4, 2, experts="modulelist")
    before = _expert_shapes(model)
    with caplog.at_level(logging.WARNING, logger="moe_fx.shard"):
        assert moe_fx.shard_experts(model, _Pair()) == []
    assert "moe_fx.shard_experts: LoopMoE holds no experts module" in caplog.text and "nothing was sharded" in caplog.text
    assert _expert_shapes(model) == before
