"""``moe_fx::grouped_mm``: its result on CPU, and which kernel it picks on CUDA (the kernels
themselves need a GPU: scripts/cuda_grouped_mm_check.py)."""

from __future__ import annotations

import pytest
import torch

from moe_fx.lowering.experts import _recorded_as_cuda_graphs, expert_matmul
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
        assert not _recorded_as_cuda_graphs()
    with inductor_config.patch({"triton.cudagraphs": True}):
        assert _recorded_as_cuda_graphs()


def test_bf16_on_cpu_keeps_torch_grouped_mm_even_under_cuda_graphs(monkeypatch):
    from torch._inductor import config as inductor_config

    calls = []
    native = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(a) or native(*a, **k))
    x = torch.randn(6, 16, dtype=torch.bfloat16)
    w = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    offsets = torch.tensor([2, 6], dtype=torch.int32)
    with inductor_config.patch({"triton.cudagraphs": True}), torch.no_grad():
        out = expert_matmul(x, w, offsets, layout="out_in")
    assert len(calls) == 1
    torch.testing.assert_close(out[:2], x[:2] @ w[0].T)
    torch.testing.assert_close(out[2:], x[2:] @ w[1].T)
