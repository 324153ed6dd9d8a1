"""``moe_fx::grouped_mm``: its result on CPU, and which kernel it picks on CUDA (the kernels
themselves need a GPU: scripts/cuda_grouped_mm_check.py)."""

from __future__ import annotations

import pytest
import torch

from moe_fx.passes.plan import records_cuda_graphs
from moe_fx.runtime.grouped_mm import TRITON_MAX_ROWS_PER_GROUP, cuda_kernel_for


def test_matches_one_matmul_per_group_with_empty_groups():
    x = torch.randn(9, 6, dtype=torch.float64)
    w = torch.randn(4, 6, 5, dtype=torch.float64)
    ends = [0, 4, 4, 9]
    out = torch.ops.moe_fx.grouped_mm(x, w, torch.tensor(ends, dtype=torch.int32))
    start = 0
    for g, end in enumerate(ends):
        torch.testing.assert_close(out[start:end], x[start:end] @ w[g])
        start = end


@pytest.mark.parametrize("capturing,tuned,want", [
    (True, True, "triton"),    # inside a CUDA graph: the faster kernel, launch cost is gone
    (True, False, "torch"),    # an untuned size cannot tune inside a capture
    (False, False, "triton"),  # the first call of a size tunes the Triton kernel
    (False, True, "torch"),    # later calls outside graphs: the cheaper launch
])
def test_few_rows_per_expert_pick_by_capture_and_tuning(capturing, tuned, want):
    rows = TRITON_MAX_ROWS_PER_GROUP * 8
    assert cuda_kernel_for(rows=rows, groups=8, native_ok=True, capturing=capturing, tuned=tuned) == want


def test_many_rows_per_expert_take_torch_and_unsupported_operands_triton():
    rows = TRITON_MAX_ROWS_PER_GROUP * 8 + 1
    for capturing in (True, False):
        assert cuda_kernel_for(rows=rows, groups=8, native_ok=True, capturing=capturing, tuned=True) == "torch"
        assert cuda_kernel_for(rows=rows, groups=8, native_ok=False, capturing=capturing, tuned=False) == "triton"


def test_cuda_graphs_are_seen_from_inductor_config():
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"triton.cudagraphs": False}):
        assert not records_cuda_graphs()
    with inductor_config.patch({"triton.cudagraphs": True}):
        assert records_cuda_graphs()


def test_cuda_graphs_are_seen_from_inner_mode_before_inductor_compiles():
    """The backend applies inner_mode's options only when inductor compiles, after the pass: the
    plan must read them from the mode (else MC2 over symm_mem is captured and fails)."""
    import moe_fx
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"triton.cudagraphs": False}):
        with moe_fx.config.patch(inner_backend="inductor", inner_mode="reduce-overhead"):
            assert records_cuda_graphs()
        with moe_fx.config.patch(inner_backend="inductor", inner_mode="max-autotune-no-cudagraphs"):
            assert not records_cuda_graphs()
        with moe_fx.config.patch(inner_backend="aot_eager", inner_mode="reduce-overhead"):
            assert not records_cuda_graphs()


def test_symm_mem_falls_back_to_all_to_all_under_cuda_graphs(monkeypatch, caplog):
    """NVSHMEM's transport fails CUDA-graph capture on 2 H200s: such graphs use all_to_all, logged."""
    import moe_fx
    from torch._dynamo.utils import counters

    from moe_fx.lowering import EPPlan, Strategy
    from moe_fx.passes import plan as plan_module
    from moe_fx.runtime import symm_mem

    monkeypatch.setattr(symm_mem, "unavailable_reason", lambda device_type: None)
    monkeypatch.setattr(symm_mem, "transport_name", lambda: "nvshmem")
    region = type("Region", (), {"block": "layers.0.experts"})()
    ep = EPPlan(block="layers.0.experts", num_experts=8, ep_size=2, ep_rank=0, group_name="0")
    counters.clear()
    with moe_fx.config.patch(mc2_transport="symm_mem"):
        assert plan_module._mc2_transport(region, ep, Strategy.MC2, "cuda", cuda_graphs=False) == "symm_mem"
        with caplog.at_level("WARNING"):
            assert plan_module._mc2_transport(region, ep, Strategy.MC2, "cuda", cuda_graphs=True) == "all_to_all"
    assert counters["moe_fx"]["symm_mem_fallbacks"] == 1
    assert "layers.0.experts" in caplog.text and "CUDA graph" in caplog.text


def _plan(**kw):
    from moe_fx.lowering import EPPlan, LoweringPlan, Strategy

    return LoweringPlan(ep=EPPlan(block="b", num_experts=2), strategy=Strategy.LOCAL, top_k=2, **kw)


@pytest.mark.parametrize("device_type,cuda_graphs,training,dtype,native", [
    ("cpu", True, False, torch.bfloat16, True),     # CPU keeps torch._grouped_mm even under CUDA graphs
    ("cuda", False, False, torch.bfloat16, True),   # outside graphs bf16 keeps the cheaper launch
    ("cuda", True, False, torch.bfloat16, False),   # inference under CUDA graphs: moe_fx's Triton kernel
    ("cuda", True, True, torch.bfloat16, True),     # a training graph keeps the native op for its backward
    ("cuda", False, False, torch.float32, False),   # fp32: torch._grouped_mm cannot compile it
])
def test_kernel_choice_per_projection(device_type, cuda_graphs, training, dtype, native):
    from moe_fx.lowering import LocalLowering

    lowering = LocalLowering(_plan(device_type=device_type, cuda_graphs=cuda_graphs, training=training))
    assert lowering._native_grouped_mm(torch.empty(2, 8, 16, dtype=dtype), "out_in") is native
    # unaligned sizes never go to torch._grouped_mm
    assert not lowering._native_grouped_mm(torch.empty(2, 7, 16, dtype=dtype), "out_in")