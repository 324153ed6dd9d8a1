"""moe_fx.bench's arithmetic and report (the timing itself needs a GPU: see the README)."""

from __future__ import annotations

import pytest

from moe_fx import bench

H100 = bench.Hardware(hbm_bytes_per_s=3.35e12, bf16_flops_per_s=989e12)


def test_roofline_is_weight_bound_at_decode_and_flop_bound_at_prefill():
    mixtral = bench.SHAPES["mixtral"]
    # 2 experts hit by one token: 2 * 3*4096*14336 bf16 weights + the router.
    weight_bytes = 2 * 3 * 4096 * 14336 * 2 + 4096 * 8 * 2
    assert H100.roofline_us(mixtral, 1, 2) == pytest.approx(1e6 * weight_bytes / 3.35e12)
    flops = 2 * 8192 * 2 * 3 * 4096 * 14336 + 2 * 8192 * 4096 * 8
    assert H100.roofline_us(mixtral, 8192, 8) == pytest.approx(1e6 * flops / 989e12)


def test_table_ratios_use_the_fastest_of_each_side():
    times = {"hf_eager": 900.0, "hf_batched_mm": None, "hf_grouped_mm": 300.0, "hf_grouped_mm_cudagraphs": 120.0,
             "moe_fx": 250.0, "moe_fx_cudagraphs": 100.0, bench.GEMM_FLOOR: 80.0}
    row = bench.Row(shape=bench.SHAPES["qwen3"], tokens=16, routing="random", touched_experts=86,
                    busiest_share=0.05, roofline_us=50.0, times_us=times)
    line = bench.table([row]).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-5:] == ["3.00", "1.20", "0.50", "80", "0.62"]  # 300/100, 120/100, 50/100; 50/80
    assert cells[6] == "-"  # batched_mm skipped


def test_needs_cuda(monkeypatch, capsys):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "qwen3"])
    assert "needs a CUDA device" in capsys.readouterr().err


def test_rounds_alternate_the_order_of_the_variants(monkeypatch):
    timed: list[str] = []

    def fake_timed_us(fn, *, warmup, iters):
        timed.append(fn())
        return [float(len(timed))] * iters

    monkeypatch.setattr(bench, "timed_us", fake_timed_us)
    monkeypatch.setattr(bench.torch.cuda, "empty_cache", lambda: None)
    medians = bench.interleaved_medians({n: (lambda n=n: n) for n in "abc"}, warmup=0, iters=8, rounds=4)
    assert timed == list("abccbaabccba")
    # a's samples are the calls numbered 1, 6, 7 and 12: the median of [1,1,6,6,7,7,12,12]
    assert medians["a"] == 6.5 and medians["b"] == 6.5 and medians["c"] == 6.5
