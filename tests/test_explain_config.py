"""explain(), config, the backend's entry points and its errors (single process)."""

from __future__ import annotations

import logging

import pytest
import torch

import moe_fx
from moe_fx.passes import analyze_graph
from tests.ep_jobs import build_plain
from tests.tiny_models import build_tiny, make_input_ids


def test_explain_reports_every_block():
    model = build_tiny("qwen3_moe", num_hidden_layers=2)
    report = moe_fx.explain(model, make_input_ids(6, seed=0))
    assert [b.block for b in report.blocks] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    block = report.blocks[0]
    assert (block.form, block.num_experts, block.top_k, block.hidden_size, block.intermediate_size) == (
        "hf_grouped_mm", 8, 2, 64, 32)
    assert block.lowering == "local" and "ep=1" in block.reason
    assert block.local_experts == "0..7 (ep 0/1)"
    table = str(report)
    assert "model.layers.1.mlp.experts" in table and "hf_grouped_mm" in table
    assert not report.near_misses


def test_explain_on_eager_experts_says_how_to_fix():
    model = build_tiny("mixtral", experts_implementation="eager")
    report = moe_fx.explain(model, make_input_ids(6, seed=0))
    assert not report.blocks
    assert report.graph_breaks
    assert any('experts_implementation="grouped_mm"' in m.reason for m in report.near_misses), str(report)
    assert "could not" in str(report) or "cannot be captured as one graph" in str(report)


class _LeakyActivation(torch.nn.Module):
    """Almost an MoE: the activation multiplies by a per-token scale computed outside the experts,
    whose rows do not follow a dispatch."""

    def __init__(self):
        super().__init__()
        self.moe = build_plain("batched", hidden=16, intermediate=8, num_experts=4, top_k=2, dtype="float32")

    def forward(self, x):
        m = self.moe
        ids, w = m.router(x)
        t, k = ids.shape
        ids_s = ids.reshape(-1)
        scale = x.repeat_interleave(k, dim=0).sum(-1, keepdim=True)
        h = torch.bmm(m.w_up[ids_s], x.repeat_interleave(k, dim=0).unsqueeze(-1)).squeeze(-1)
        g, u = h.chunk(2, dim=-1)
        a = torch.nn.functional.silu(g) * u * scale
        y = torch.bmm(m.w_down[ids_s], a.unsqueeze(-1)).squeeze(-1)
        return (y * w.reshape(-1).unsqueeze(-1)).view(t, k, -1).sum(dim=1)


def test_near_miss_has_a_reason_and_keeps_the_original(caplog):
    model, x = _LeakyActivation(), torch.randn(5, 16)
    report = moe_fx.explain(model, x)
    assert not report.blocks
    misses = [m for m in report.near_misses if m.form != "generic"]  # the generic path's line: tests/test_generic.py
    assert len(misses) == 1
    assert "computed outside the experts" in misses[0].reason
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING), moe_fx.config.patch(inner_backend="eager"):
        out = torch.compile(model, backend=moe_fx.backend, fullgraph=True)(x)
    assert torch.equal(out, model(x))
    assert "left as traced" in caplog.text


def test_on_unmatched_raise():
    torch._dynamo.reset()
    with moe_fx.config.patch(on_unmatched="raise", inner_backend="eager"):
        with pytest.raises(Exception, match="moe.*left as traced: activation: reads"):
            torch.compile(_LeakyActivation(), backend=moe_fx.backend, fullgraph=True)(torch.randn(5, 16))


def test_mc2_at_ep1_is_the_local_path():
    """With no EP group there is nothing to dispatch: forcing mc2 gives the (static) local path."""
    torch._dynamo.reset()
    model = build_plain("batched", hidden=16, intermediate=8, num_experts=4, top_k=2, dtype="float32")
    with moe_fx.config.patch(lowering="mc2", inner_backend="eager"), moe_fx.recording() as graphs:
        torch.compile(model, backend=moe_fx.backend, fullgraph=True)(torch.randn(4, 16))
    assert [b.choice.strategy.value for b in graphs[0].report.blocks] == ["local"]


@pytest.mark.parametrize(
    "setting,value",
    [("lowering", "alltoall"), ("on_unmatched", "ignore"), ("tokens", "sharded")],
)
def test_unknown_config_values_are_rejected(rank_pool, setting, value):
    """Checked when set (moe_fx/config_check.py), before any graph is compiled; tokens under EP too."""
    if setting == "tokens":
        results = rank_pool(2).run("tests.ep_jobs:plain_case", lowerings=("allgather",),
                                   config_patch={"tokens": value})
        for res in results:
            assert f"tokens={value!r} is not one of" in res["allgather"]["error"]
        return
    torch._dynamo.reset()
    model = build_plain("batched", hidden=16, intermediate=8, num_experts=4, top_k=2, dtype="float32")
    with pytest.raises(Exception, match=rf"{setting}={value!r} is not one of"):
        with moe_fx.config.patch(**{setting: value}, inner_backend="eager"):
            torch.compile(model, backend=moe_fx.backend, fullgraph=True)(torch.randn(4, 16))


@moe_fx.config.patch(lowering="all2allv")
def test_config_patch_as_decorator():
    assert moe_fx.config.lowering == "all2allv"


def test_config_patch_restores():
    with moe_fx.config.patch(inner_backend="aot_eager", max_tokens_per_rank=64):
        assert (moe_fx.config.inner_backend, moe_fx.config.max_tokens_per_rank) == ("aot_eager", 64)
    assert (moe_fx.config.inner_backend, moe_fx.config.max_tokens_per_rank) == ("inductor", None)


def test_backend_by_name_through_entry_point():
    """torch.compile(backend="moe_fx") finds the backend through the torch_dynamo_backends entry point."""
    torch._dynamo.reset()
    model = build_plain("batched", hidden=16, intermediate=8, num_experts=4, top_k=2, dtype="float32")
    x = torch.randn(6, 16)
    with moe_fx.config.patch(inner_backend="eager"), moe_fx.recording() as graphs:
        out = torch.compile(model, backend="moe_fx", fullgraph=True)(x)
    assert len(graphs) == 1 and len(graphs[0].report.blocks) == 1
    torch.testing.assert_close(out, model(x), rtol=0, atol=1e-5)


def test_recording_gives_original_and_rewritten_graphs():
    torch._dynamo.reset()
    model = build_plain("batched", hidden=16, intermediate=8, num_experts=4, top_k=2, dtype="float32")
    with moe_fx.config.patch(inner_backend="eager"), moe_fx.recording() as graphs:
        torch.compile(model, backend=moe_fx.backend, fullgraph=True)(torch.randn(6, 16))
    (g,) = graphs
    before = [n.target for n in g.original.graph.nodes]
    after = [n.target for n in g.rewritten.graph.nodes]
    assert torch.bmm in before and torch.bmm not in after
    assert analyze_graph(g.original.graph).blocks and not analyze_graph(g.rewritten.graph).blocks


@pytest.mark.parametrize(
    "ep,config_patch,expected",
    [
        (2, {}, "allgather"),  # ep=2 <= top_k=2
        (4, {}, "mc2|all2allv"),  # ep=4 > top_k=2, no token bound: decided per call
        (4, {"max_tokens_per_rank": 300}, "all2allv"),  # ep=4 > top_k=2, bound above auto_mc2_max_tokens
        (2, {"max_tokens_per_rank": 64}, "allgather"),  # ep=2 <= top_k=2, bounded: static, sync-free
        (4, {"max_tokens_per_rank": 64}, "mc2"),  # ep=4 > top_k=2, small known bound: sync-free
        (4, {"tokens": "replicated"}, "mc2"),  # static replicated T: the bound is ceil(T/ep)
        (4, {"lowering": "allgather"}, "allgather"),  # forced
        (4, {"lowering_overrides": {"model.layers.*": "mc2"}}, "mc2"),  # forced per block
    ],
)
def test_auto_rule_reported_per_rank(rank_pool, ep, config_patch, expected):
    results = rank_pool(ep).run("tests.ep_jobs:explain_case", config_patch=config_patch)
    for rank, rows in enumerate(results):
        assert [r[0] for r in rows] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        per_rank = 8 // ep
        assert rows[0][1] == f"{rank * per_rank}..{(rank + 1) * per_rank - 1} (ep {rank}/{ep})"
        assert {r[2] for r in rows} == {expected}, rows
        assert rows[0][3].startswith("forced" if config_patch.keys() & {"lowering", "lowering_overrides"} else "auto:"), rows[0][3]
