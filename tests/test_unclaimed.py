"""No silent miss: a top-k router whose ids reach experts that no recognizer matched is a near-miss
(moe_fx/passes/unclaimed.py); models without such a router get none, and rewritten blocks no extra."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_fx
from tests.form_modules import LoopMoE
from tests.handwritten_forms import FORMS as HANDWRITTEN

H, I, E, K, T = 16, 8, 4, 2, 6


class ElementwiseExperts(nn.Module):
    """Experts computed without a matmul (a broadcast product and a sum): no recognizer's anchor."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, H, I) * 0.2)
        self.w_out = nn.Parameter(torch.randn(E, I, H) * 0.2)

    def forward(self, x):
        weights, ids = torch.topk(self.gate(x).softmax(-1), K)
        h = F.silu((x[:, None, :, None] * self.w_in[ids]).sum(-2))  # [T, K, I]
        y = (h[..., None] * self.w_out[ids]).sum(-2)  # [T, K, H]
        return (y * weights[..., None]).sum(1)


class TopkAttention(nn.Module):
    """Attention keeping each query's top-k keys: a top-k over scores that no parameter makes."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(H, 3 * H)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        scores = q @ k.T
        top, idx = torch.topk(scores, 3)
        return (top.softmax(-1)[..., None] * v[idx]).sum(1)


class DepthRouter(nn.Module):
    """Mixture-of-depths: one score per token, the top-k tokens go through the block."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(H, 1)
        self.mlp = nn.Sequential(nn.Linear(H, I), nn.GELU(), nn.Linear(I, H))

    def forward(self, x):
        scores = self.router(x).squeeze(-1)
        weights, idx = torch.topk(scores, 3)
        out = x.clone()
        out[idx] = x[idx] + self.mlp(x[idx]) * weights[:, None].sigmoid()
        return out


def test_a_router_feeding_unknown_experts_code_is_a_near_miss():
    """No recognizer matches; the generic path delimits the block and its probe check refuses it
    (``self.w_in[ids]`` reads a dropped slot's id -1 as the last expert), and explain() says so."""
    with torch.no_grad():  # with grad on, the generic path's reason is the training graph
        report = moe_fx.explain(ElementwiseExperts(), torch.randn(T, H))
    assert not report.blocks
    misses = [m for m in report.near_misses if m.form == "generic"]
    assert len(misses) == 1 and not [m for m in report.near_misses if m.form == "unrecognized"], str(report)
    assert "router gate.weight" in misses[0].reason and "slot whose id is -1" in misses[0].reason, str(report)


@pytest.mark.parametrize("model", [TopkAttention(), DepthRouter(), nn.Sequential(nn.Linear(H, I), nn.GELU(), nn.Linear(I, H))],
                         ids=["topk_attention", "mixture_of_depths", "dense_mlp"])
def test_models_without_an_experts_router_get_no_near_miss(model):
    report = moe_fx.explain(model, torch.randn(T, H))
    assert not report.blocks and not report.near_misses, str(report)


def test_a_rewritten_block_gets_no_extra_near_miss():
    torch.manual_seed(0)
    model = LoopMoE(H, I, E, K)
    report = moe_fx.explain(model, torch.randn(T, H))
    assert len(report.blocks) == 1 and not report.near_misses, str(report)


class BrokenAfterRouter(ElementwiseExperts):
    """The graph breaks right after the router (as transformers 4.x's loops over ``nonzero()`` do)."""

    def forward(self, x):
        weights, ids = torch.topk(self.gate(x).softmax(-1), K)
        torch._dynamo.graph_break()
        h = F.silu((x[:, None, :, None] * self.w_in[ids]).sum(-2))
        y = (h[..., None] * self.w_out[ids]).sum(-2)
        return (y * weights[..., None]).sum(1)


def test_a_router_whose_ids_leave_the_graph_is_a_near_miss():
    report = moe_fx.explain(BrokenAfterRouter(), torch.randn(T, H))
    misses = [m for m in report.near_misses if m.form == "unrecognized"]
    assert len(misses) == 1 and "leave this graph" in misses[0].reason, str(report)
    assert report.graph_breaks


class HostCountsLoop(ElementwiseExperts):
    """Aria 4.x: top-k over dim=1, rows sorted by expert, a loop over range(E) slicing them by
    counts read on the host and multiplying one expert's slice ``w_in[e]``."""

    def forward(self, x):
        logits = self.gate(x)
        top, ids = torch.topk(logits, K, dim=1)
        counts = torch.histc(ids.flatten().float(), bins=E, min=0, max=E - 1).long()
        order = torch.argsort(ids.flatten())
        rows = x.index_select(0, order // K)
        ends = torch.cumsum(counts, 0).cpu()
        y = torch.zeros(T * K, H)
        for e in range(E):
            start, end = (ends[e - 1] if e else 0), ends[e]
            y[start:end] = F.silu(rows[start:end] @ self.w_in[e]) @ self.w_out[e]
        out = torch.zeros(T * K, H).index_copy_(0, order, y).view(T, K, H)
        return (out * top.softmax(-1)[..., None]).sum(1)


def test_a_router_over_dim_1_feeding_expert_slices_is_a_near_miss():
    """torch 2.13 captures the loop into the router's graph (the generic path's line); torch 2.11
    gives up on the flagged capture without raising (no graph at all, once a silent miss), and
    explain() then captures without the flags: the ids leave the graph at the loop's break."""
    report = moe_fx.explain(HostCountsLoop(), torch.randn(T, H))
    generic = [m for m in report.near_misses if m.form == "generic"]
    if generic:
        assert len(generic) == 1 and "router gate.weight" in generic[0].reason, str(report)
    else:
        forms = {m.form: m.reason for m in report.near_misses}
        assert "router gate" in forms.get("unrecognized", "") and "graph break" in forms, str(report)


class NonzeroListLoop(ElementwiseExperts):
    """Switch Transformers 4.x: a loop over ``nonzero(counts).tolist()``. explain()'s capture
    flags make it a guard error; explain() must still answer, naming the line."""

    def forward(self, x):
        _, ids = torch.topk(self.gate(x), 1)
        mask = F.one_hot(ids[:, 0], E).bool()
        out = torch.zeros_like(x)
        for e in torch.nonzero(mask.sum(0), as_tuple=True)[0].tolist():
            out[mask[:, e]] = F.silu(x[mask[:, e]] @ self.w_in[e]) @ self.w_out[e]
        return out


def test_explain_survives_a_loop_over_a_host_list():
    report = moe_fx.explain(NonzeroListLoop(), torch.randn(T, H))
    assert not report.blocks and report.graph_breaks, str(report)
    assert any("test_unclaimed.py" in m.block + m.reason for m in report.near_misses), str(report)


FORM_MODULES = [("LoopMoE", {}), ("LoopMoE", {"experts": "params", "select": "eq", "accumulate": "setitem"}),
                ("TitanMoE", {"dtype": "bfloat16"}), ("WeightGatherMoE", {}), ("DenseMoE", {}), ("SplitMoE", {}),
                ("PartialLoopMoE", {}), ("BranchyLoopMoE", {}), ("CapacityMoE", {})]
# issue 20's hand-written forms of public repositories (tests/handwritten_forms.py)
FORM_MODULES += [(name, {"dtype": "bfloat16"} if name.startswith(("Titan", "GroupedMLP")) else {})
                 for name in (*HANDWRITTEN.values(), "TorchMoERefFixed")]
# blocks only the generic path takes (tests/generic_forms.py)
FORM_MODULES += [(name, {}) for name in ("NormedExpertLoop", "NonzeroSlotLoop", "DenseGateLoop")]


@pytest.mark.parametrize("cls,kw", FORM_MODULES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(FORM_MODULES)])
def test_every_form_module_is_rewritten_or_explained(cls, kw):
    """Each MoE block of the suite's form modules is a block or a near-miss with a reason, once."""
    from tests.form_jobs import build_form

    dtype = getattr(torch, kw.get("dtype", "float32"))
    report = moe_fx.explain(build_form(cls, **kw), torch.randn(6, 16, dtype=dtype))
    explained = [m for m in report.near_misses if m.reason]
    assert len(report.blocks) + len(explained) >= 1, str(report)
    assert not (report.blocks and report.near_misses), str(report)  # a rewritten block is not also a miss


class HeadProjection(nn.Module):
    """Per-head projections as one einsum over a [heads, H, d] parameter, and a gather of its rows
    by integer ids with an ellipsis: the spellings passes/canonical.py respells for MoE blocks."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, H, 8) * 0.2)

    def forward(self, x):
        heads = torch.einsum("th,ehf->etf", x, self.w)  # [4, T, 8]
        picked = self.w[torch.arange(2), ...]  # [2, H, 8]
        return heads.sum(0) + (x @ picked[0])


@pytest.mark.parametrize("model", [TopkAttention(), DepthRouter(), HeadProjection()],
                         ids=["topk_attention", "mixture_of_depths", "head_projection"])
def test_models_without_experts_compile_untouched(model):
    """Compiled with moe_fx, a model without experts keeps its traced graph: nothing rewritten."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(T, H)
    with moe_fx.config.patch(inner_backend="eager"), torch.no_grad(), moe_fx.recording() as graphs:
        out = torch.compile(model, backend=moe_fx.backend, fullgraph=True)(x)
        assert torch.equal(out, model(x))
    assert graphs and all(not g.report.blocks and not g.report.misses for g in graphs)
    assert counters["moe_fx"]["regions_rewritten"] == 0
    for g in graphs:  # the user's spelling, op for op (a respelling no region claims is undone)
        assert _spelling(g.original) == _spelling(g.rewritten), g.rewritten.code


def _spelling(gm) -> list:
    """Each node's op, target and arguments, nodes named by position (a restored node's name may differ)."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    return [(n.op, n.target, str(torch.fx.node.map_arg(n.args, lambda a: position[a]))) for n in gm.graph.nodes]


class MaskedThenMoE(nn.Module):
    """A data-dependent branch in code that holds no experts (a model's mask code), then an MoE block."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(H, H)
        self.block = LoopMoE(H, I, E, K)

    def forward(self, x):
        if (x.sum() > 0).item():  # host read: dynamo splits the graph here
            x = x * 0.5
        return self.block(self.proj(x))


def test_a_graph_break_outside_the_experts_is_a_note_not_a_near_miss():
    """explain(): the block is rewritten; the break in the root's mask-like code is said to lie
    outside any experts code (a note), not reported as an experts loop that cannot be captured."""
    report = moe_fx.explain(MaskedThenMoE(), torch.randn(T, H))
    assert report.graph_breaks, str(report)
    assert [b.block for b in report.blocks] == ["block.experts"], str(report)
    assert not [m for m in report.near_misses if m.form == "graph break"], str(report)
    assert any("outside any experts code" in note and "<root module> (MaskedThenMoE)" in note for note in report.notes), \
        str(report)
