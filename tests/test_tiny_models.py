"""Sanity checks for tests/tiny_models.py: every tiny MoE model runs, routes tokens to many experts, and compiles
with fullgraph=True under both stacked-expert implementations."""

from __future__ import annotations

import time

import pytest
import torch

from tests.tiny_models import (
    MODEL_KEYS,
    build_tiny,
    experts_modules,
    make_input_ids,
    moe_blocks,
    router_of,
)


def _routing(model, ids) -> list[torch.Tensor]:
    """top-k expert indices chosen by each MoE block's router on ``ids``."""
    chosen: list[torch.Tensor] = []
    hooks = [router_of(block).register_forward_hook(lambda m, a, out: chosen.append(out[-1])) for _, block in moe_blocks(model)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return chosen


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_tiny_model_eager_and_compiled(key):
    ids10 = make_input_ids(10, 0)
    assert ids10.shape == (1, 10) and ids10.dtype == torch.int64

    # fp32 and bf16, eager
    fp32 = build_tiny(key)
    assert not fp32.training and fp32.config.use_cache is False
    assert fp32.config._experts_implementation == "grouped_mm"
    assert fp32.get_experts_implementation()[""] == "grouped_mm"
    assert len(moe_blocks(fp32)) == 1 and len(experts_modules(fp32)) == 1
    with torch.no_grad():
        ref = fp32(ids10).logits
    assert ref.shape == (1, 10, 128) and ref.dtype == torch.float32 and torch.isfinite(ref).all()
    assert ref.std() > 0.1

    bf16 = build_tiny(key, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    with torch.no_grad():
        out = bf16(ids10).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()

    # routing is spread over experts
    (idx,) = _routing(fp32, make_input_ids(16, 0))
    assert idx.shape == (16, 2)
    assert idx.unique().numel() >= 4, f"{key}: only experts {idx.unique().tolist()} used"

    # torch.compile(fullgraph=True) works for both stacked-expert implementations and matches eager
    for impl in ("grouped_mm", "batched_mm"):
        model = build_tiny(key, experts_implementation=impl)
        assert model.config._experts_implementation == impl
        with torch.no_grad():
            eager = model(ids10).logits
            torch._dynamo.reset()
            t0 = time.perf_counter()
            compiled = torch.compile(model, backend="eager", fullgraph=True)(ids10).logits
            dt = time.perf_counter() - t0
        print(f"{key:12s} {impl:10s} compile+run {dt:.2f}s")
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(eager, ref, rtol=1e-4, atol=1e-4)  # implementations agree
    torch._dynamo.reset()


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_build_options(key):
    a = build_tiny(key, seed=3)
    b = build_tiny(key, seed=3)
    c = build_tiny(key, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "same seed must give identical weights"
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())

    # every bias-like tensor is non-zero (so a rewrite that drops one is caught)
    for name, t in [*a.named_parameters(), *a.named_buffers()]:
        if name.endswith("bias"):
            assert t.abs().min() > 0, f"{name} has zeros"

    # overrides of layer count / expert count / top-k
    m = build_tiny(key, num_hidden_layers=2, num_experts=4, top_k=1)
    blocks = moe_blocks(m)
    assert len(blocks) == 2
    (name, experts), _ = experts_modules(m)
    assert name.endswith(".experts") and experts.gate_up_proj.shape[0] == 4
    idx = _routing(m, make_input_ids(12, 1))
    assert [i.shape for i in idx] == [(12, 1), (12, 1)]
    with torch.no_grad():
        assert torch.isfinite(m(make_input_ids(12, 1)).logits).all()
