"""``moe_fx.prepare``: graph-breaking MoE blocks get a static expert loop, checked on probes.

In-process: hand-built blocks written the transformers 4.x way (tests/tf4_modules.py) are
prepared, captured whole and rewritten at ep = 1; blocks prepare cannot rebuild are left alone
with the reason. Then transformers 4.57 itself (installed by this test into a cached folder,
run in subprocesses with it first on PYTHONPATH): tiny mixtral, qwen3_moe, deepseek_v3, gpt_oss,
phimoe, qwen2_moe, ernie4_5_moe, hunyuan_v1_moe and dbrx at ep = 2 over gloo, foreign experts zeroed,
equal to eager.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_fx
from moe_fx.prepare import PLAN_ATTR
from tests.form_modules import LoopMoE
from tests.tf4_modules import (CorrectedRoutingBlock, GateModuleBlock, GluLoopBlock, HitLoopBlock, MethodLoopMoE,
                               ScaledMethodMoE, SigmoidSkipBlock, StackedLoopBlock)
from tests.tolerances import FP32_ATOL

H, I, E, K = 16, 8, 4, 2

# (builder, the prepared module's path, layout, routing kept)
HAND_BUILT = {
    "hit_loop": (lambda: HitLoopBlock(H, I, E, K), "<root module>", "routed_block", "softmax, top-k, renormalized"),
    "hit_loop_no_renorm": (lambda: HitLoopBlock(H, I, E, K, norm_topk_prob=False), "<root module>", "routed_block",
                           "softmax, top-k"),
    "hit_loop_shared": (lambda: HitLoopBlock(H, I, E, K, norm_topk_prob=False, shared=True), "<root module>",
                        "routed_block", "softmax, top-k"),
    "gate_module": (lambda: GateModuleBlock(H, I, E, K), "<root module>", "routed_block",
                    "softmax, top-k, renormalized"),
    "corrected": (lambda: CorrectedRoutingBlock(H, I, E, K), "<root module>", "routed_block",
                  "softmax, top-k of the bias-corrected scores, renormalized"),
    "moe_method": (lambda: MethodLoopMoE(H, I, E, K), "<root module>", "experts_method", "the module's own router"),
    "stacked": (lambda: StackedLoopBlock(H, I, E, K), "experts", "stacked_experts", "the module's own router"),
    "glu": (lambda: GluLoopBlock(H, I, E, K), "experts", "glu_experts", "the module's own router"),
}


def _compile(model, x):
    torch._dynamo.reset()
    with moe_fx.config.patch(inner_backend="eager"), moe_fx.recording() as graphs, torch.no_grad():
        out = torch.compile(model, backend=moe_fx.backend, fullgraph=True)(x)
    return out, graphs


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", HAND_BUILT)
def test_prepared_block_is_captured_whole_and_rewritten(kind):
    build, path, layout, routing = HAND_BUILT[kind]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        ref = model(x)
    assert moe_fx.prepare(model) is model
    report = moe_fx.prepare_report(model)
    assert [(b.path, b.layout, b.routing) for b in report.prepared] == [(path, layout, routing)] and not report.refused
    assert report.prepared[0].max_diff <= 1e-5
    with torch.no_grad():
        again = model(x)
    assert (_first(again) - _first(ref)).abs().max().item() <= FP32_ATOL
    if isinstance(ref, tuple):  # the router logits come back too
        assert torch.equal(again[1], ref[1])
    out, graphs = _compile(model, x)
    assert len(graphs) == 1, "the prepared block must be one graph"
    assert [b.region.form for b in graphs[0].report.blocks] == ["expert_loop"] and not graphs[0].report.misses
    assert (_first(out) - _first(ref)).abs().max().item() <= FP32_ATOL


def test_fp32_router_of_a_bf16_block():
    """ERNIE-4.5 / HunYuan keep the router in fp32 in a bf16 model: the prepared forward casts the
    router's input up and its weights back, as their own code does, and probes in the experts' dtype."""
    torch.manual_seed(0)
    model = CorrectedRoutingBlock(H, I, E, K).to(torch.bfloat16)
    model.gate.float()
    model.moe_statics.float()
    x = torch.randn(2, 5, H).to(torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    moe_fx.prepare(model)
    (block,) = moe_fx.prepare_report(model).prepared
    assert block.routing == "softmax, top-k of the bias-corrected scores, renormalized"
    out, graphs = _compile(model, x)
    assert [b.region.form for b in graphs[0].report.blocks] == ["expert_loop"]
    assert torch.equal(out[1], ref[1])  # the fp32 router logits
    assert (out[0].float() - ref[0].float()).abs().max().item() <= 2e-2 * ref[0].float().abs().max().item()


def test_refuses_a_routing_it_cannot_rebuild(caplog):
    """No routing prepare knows gives sigmoid scores: every replacement disagrees on the probes,
    the block keeps its own code, and the report, the log and explain() say why."""
    torch.manual_seed(0)
    model = SigmoidSkipBlock(H, I, E, K)
    x = torch.randn(1, 6, H)
    with torch.no_grad():
        ref = model(x)
    with caplog.at_level(logging.WARNING, logger="moe_fx.prepare"):
        moe_fx.prepare(model)
    (refused,) = moe_fx.prepare_report(model).refused
    assert refused.path == "<root module>" and refused.module == "SigmoidSkipBlock"
    assert re.search(r"the static expert loop built from its parameters differs from its own forward \(tolerance "
                     r"1e-05; softmax, top-k, renormalized: max relative \|diff\| \S+ on the '[a-z, ]+' probe; "
                     r"softmax, top-k: max relative", refused.reason), refused.reason
    assert "static `for e in range(E)` loop" in refused.fix
    assert type(model) is SigmoidSkipBlock and not hasattr(model, PLAN_ATTR)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert "moe_fx.prepare: <root module> (SigmoidSkipBlock) left as it is" in caplog.text
    text = str(moe_fx.explain(model, x))
    assert "not rewritten: <root module> (moe_fx.prepare): SigmoidSkipBlock left as it is: the static expert loop" in text


def test_refuses_a_method_whose_result_differs():
    torch.manual_seed(0)
    model = ScaledMethodMoE(H, I, E, K)
    moe_fx.prepare(model)
    (refused,) = moe_fx.prepare_report(model).refused
    assert re.search(r"differs from its own moe \(tolerance 1e-05; max relative \|diff\| \S+ on the "
                     r"'(random|every expert)' probe\)", refused.reason), refused.reason
    assert type(model) is ScaledMethodMoE


def test_leaves_capturable_blocks_alone():
    """A static loop already is one graph: not a candidate, nothing recorded."""
    model = LoopMoE(H, I, E, K)
    moe_fx.prepare(model)
    report = moe_fx.prepare_report(model)
    assert not report.prepared and not report.refused and type(model) is LoopMoE


def test_explain_names_the_block_and_the_fix_before_prepare():
    torch.manual_seed(0)
    model = torch.nn.Sequential(MethodLoopMoE(H, I, E, K))
    text = str(moe_fx.explain(model, torch.randn(1, 6, H)))
    assert ("not rewritten: 0 (graph break): MethodLoopMoE.moe runs its experts behind a data-dependent step "
            "(a graph break); call model = moe_fx.prepare(model) before torch.compile") in text, text


def test_explain_calls_an_experts_module_with_2d_weights_an_experts_loop():
    """DBRX's experts module holds only 2-D parameters: its empty-expert branch is still experts
    code (the module is named experts), a near-miss with prepare as the fix, not a note."""
    torch.manual_seed(0)
    text = str(moe_fx.explain(GluLoopBlock(H, I, E, K), torch.randn(1, 6, H)))
    assert ("not rewritten: experts (graph break): GluLoopExperts.forward runs its experts behind a data-dependent "
            "step (a graph break); call model = moe_fx.prepare(model) before torch.compile: it gives this block a "
            "static expert loop (glu_experts)") in text, text
    assert "outside any experts code" not in text, text


class _Pair:
    """The EP group shard_experts asks rank and size of: rank 0 of 2."""

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 2


def test_shard_experts_after_prepare():
    """A prepared loop over stacked experts reads every expert: shard_experts refuses it with the
    reason, before changing anything. A ModuleList's experts are sharded (other ranks' as stubs)."""
    model = StackedLoopBlock(H, I, E, K)
    moe_fx.prepare(model)
    with pytest.raises(moe_fx.UnsupportedMoEError, match=r"moe_fx\.prepare gave it a static loop over all 4 experts"
                       r".*Compile it unsharded"):
        moe_fx.shard_experts(model, _Pair())
    listed = HitLoopBlock(H, I, E, K)
    moe_fx.prepare(listed)
    (block,) = moe_fx.shard_experts(listed, _Pair())
    assert (block.block, block.shard.start, block.shard.num_local) == ("experts", 0, 2)
    stub = listed.experts[3].w1.weight
    assert stub.shape == (I, H) and stub.stride() == (0, 0) and not stub.requires_grad


# ------------------------------------------------------------------------------------------
# transformers 4.57 at ep = 2
# ------------------------------------------------------------------------------------------

TF4_PINS = ("transformers==4.57.1", "tokenizers==0.22.2", "huggingface-hub==0.36.2")
_OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "ConnectionError", "Max retries exceeded",
            "Network is unreachable", "ProxyError")
_EXPECTED = {  # key -> (prepared layout, strategy of tests/tf4_jobs.py)
    "mixtral": ("routed_block", "allgather"),
    "qwen3_moe": ("routed_block", "all2allv"),
    "deepseek_v3": ("experts_method", "allgather"),
    "gpt_oss": ("stacked_experts", "all2allv"),
    "phimoe": ("routed_block", "mc2"),
    "qwen2_moe": ("routed_block", "mc2"),
    "ernie4_5_moe": ("routed_block", "allgather"),
    "hunyuan_v1_moe": ("routed_block", "all2allv"),
    "dbrx": ("glu_experts", "mc2"),
}


def _tf4_dir() -> Path:
    """transformers 4.57 in a folder of its own (``MOE_FX_TF4_DIR``, else the user cache), installed once."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = Path(os.environ.get("MOE_FX_TF4_DIR") or cache / "moe_fx" / "transformers-4.57.1")
    if (root / "transformers" / "__init__.py").exists():
        return root
    partial = root.with_name(f"{root.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--no-deps", "--target", str(partial), *TF4_PINS], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        shutil.rmtree(partial, ignore_errors=True)
        output = proc.stdout + proc.stderr
        if any(marker in output for marker in _OFFLINE):
            pytest.skip(f"pip cannot reach the package registry to install {' '.join(TF4_PINS)}: "
                        f"{output.strip().splitlines()[-1]}")
        pytest.fail(f"pip install of {' '.join(TF4_PINS)} failed:\n{output}")
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        partial.rename(root)  # whole or not at all: a folder half-installed is never used
    except OSError:  # another process installed it first
        shutil.rmtree(partial, ignore_errors=True)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_transformers4_models_run_expert_parallel(tmp_path):
    tf4 = _tf4_dir()
    repo = Path(__file__).resolve().parent.parent
    path = [str(tf4), str(repo), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    port, world = _free_port(), 2
    procs = [subprocess.Popen([sys.executable, "-m", "tests.tf4_jobs", "--rank", str(r), "--world", str(world),
                               "--port", str(port), "--out", str(tmp_path / f"rank{r}.json")],
                              cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, text) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{text[-6000:]}"
    for rank in range(world):
        results = {r["key"]: r for r in json.loads((tmp_path / f"rank{rank}.json").read_text())}
        assert sorted(results) == sorted(_EXPECTED)
        for key, r in results.items():
            layout, strategy = _EXPECTED[key]
            where = f"rank {rank} {key} ({r['tokens']} tokens)"
            assert r["transformers"] == "4.57.1"
            assert [p[1] for p in r["prepared"]] == [layout] and not r["refused"], f"{where}: {r}"
            assert r["graphs"] == 1 and not r["misses"], f"{where}: {r}"
            assert [(b[1], b[2]) for b in r["blocks"]] == [("expert_loop", strategy)], f"{where}: {r['blocks']}"
            assert r["touched"] > 0, f"{where}: foreign experts were not zeroed"
            if key in ("mixtral", "deepseek_v3"):  # sharded too: half the expert bytes kept
                (block, before, after), = r["sharded"]
                assert block.endswith(".experts") and after < 0.51 * before, f"{where}: {r['sharded']}"
            assert r["diff"] <= FP32_ATOL, f"{where}: max |diff| {r['diff']:.3g}, max |eager| {r['scale']:.3g}"


def test_shard_experts_keeps_a_prepared_blocks_local_experts(rank_pool):
    """After prepare, shard_experts keeps this rank's experts of the ModuleList (others become
    one-element stubs): about half the expert bytes at ep = 2, and the compiled model still
    equals the whole block run eagerly. (The transformers 4.57 test shards a routed block too.)"""
    lowering = "all2allv"
    results = rank_pool(2).run("tests.prepare_jobs:sharded_case", kind="moe_method", lowering=lowering)
    for rank, r in enumerate(results):
        assert r["local"] == (2 * rank, 2)
        assert [b[1:] for b in r["blocks"]] == [("expert_loop", lowering)], r["blocks"]
        assert r["diff"] <= FP32_ATOL, f"rank {rank}: {r['diff']:.3g}"
        before, after = r["bytes"]
        assert after < 0.51 * before, r["bytes"]
        assert "holds only experts" in r["eager"] and r["expert_params"] > 0
        assert "Compile with the group the model was sharded with" in r["wrong_group"], r["wrong_group"]
