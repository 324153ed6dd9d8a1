"""moe_fx.bench --ep: the multi-GPU benchmark, run here over gloo on CPU (2 ranks, tiny layer), and
its arithmetic (bytes, the profiler split, ratios) on made-up inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from moe_fx import bench_ep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EP_STRATEGIES = ("allgather", "all2allv", "mc2")  # what gloo can run; symm_mem needs CUDA


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_ep") / "ep.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "moe_fx.bench", "--ep", "2", "--device", "cpu", "--shapes", "tiny", "--tokens", "8",
           "--warmup", "0", "--iters", "2", "--rounds", "1", "--profile-calls", "1", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_cpu_run_times_every_strategy_and_derives_the_ratios(cpu_run):
    result, stdout = cpu_run
    (row,) = result["rows"]
    times = row["times_us"]
    for name in ("ep1", *EP_STRATEGIES, "auto", "bare_a2a"):
        assert times[name] > 0, name
    assert set(row["rank_times_us"]["mc2"]) and max(row["rank_times_us"]["mc2"]) == times["mc2"]
    assert "needs CUDA" in row["skipped"]["mc2_symm_mem"] and "mc2_symm_mem" not in times
    assert row["auto"] == {"picked": "allgather", "timed_as": "allgather"}  # ep=2 <= top_k=2
    assert times["auto"] == times["allgather"]
    ratio = row["ratios"]["no_graphs"]
    best = min(EP_STRATEGIES, key=times.get)
    assert ratio["best_ep"] == best
    assert ratio["best_ep_over_ep1"] == pytest.approx(times[best] / times["ep1"])
    assert ratio["auto_over_ep1"] == pytest.approx(times["auto"] / times["ep1"])
    assert "graphs" not in row["ratios"]  # no CUDA graphs on CPU
    line = next(line for line in stdout.splitlines() if line.startswith("| tiny (64, 32, 8, 2) | 8 | no |"))
    assert line.rstrip(" |").endswith(f"{ratio['best_ep_over_ep1']:.2f} | {ratio['auto_over_ep1']:.2f}")
    assert result["environment"]["ranks"] == 2


def test_cpu_run_splits_dispatch_and_combine(cpu_run):
    (row,) = cpu_run[0]["rows"]
    for name in EP_STRATEGIES:
        split = row["split"][name]
        assert split["dispatch_us"] > 0 and split["combine_us"] > 0, name
        want = bench_ep.link_bytes(name, tokens=8, top_k=2, hidden=64, ep=2, capacity=8)
        assert (split["dispatch_bytes"], split["combine_bytes"]) == want
        assert split["dispatch_gbps"] == pytest.approx(want[0] / split["dispatch_us"] / 1e3)
    assert row["split"]["ep1"]["dispatch_us"] is None  # one rank: no dispatch op to time


def test_link_bytes_follow_each_strategy():
    kw = dict(tokens=128, top_k=8, hidden=7168, ep=2, capacity=256)
    row = 7168 * 2
    assert bench_ep.link_bytes("allgather", **kw) == (128 * row, 128 * row)
    assert bench_ep.link_bytes("all2allv", **kw) == (128 * 8 * row // 2,) * 2
    assert bench_ep.link_bytes("mc2", **kw) == (256 * 8 * row,) * 2  # padded to capacity
    assert bench_ep.link_bytes("mc2_symm_mem", **kw) == bench_ep.link_bytes("all2allv", **kw)
    assert bench_ep.bare_a2a_bytes(tokens=4096, top_k=8, hidden=7168, ep=2) == 4096 * 8 * row // 2
    with pytest.raises(ValueError, match="no byte count"):
        bench_ep.link_bytes("auto", **kw)


@dataclass
class FakeEvent:
    name: str
    device_type: DeviceType = DeviceType.CPU
    cpu_time_total: float = 0.0
    device_time_total: float = 0.0
    elapsed: float = 0.0
    cpu_parent: "FakeEvent | None" = None
    is_user_annotation: bool = False
    time_range: SimpleNamespace = field(init=False)

    def __post_init__(self):
        self.time_range = SimpleNamespace(elapsed_us=lambda: self.elapsed)


def test_profile_split_counts_outermost_ops_and_separates_nccl():
    outer = FakeEvent("moe_fx::switch_dispatch", device_time_total=300.0, cpu_time_total=900.0)
    inner = FakeEvent("moe_fx::mc2_dispatch", device_time_total=280.0, cpu_parent=outer)
    combine = FakeEvent("moe_fx::mc2_combine_v2", device_time_total=100.0)
    other = FakeEvent("moe_fx::grouped_mm", device_time_total=50.0)
    not_ours = FakeEvent("aten::dispatch_something", device_time_total=1000.0)
    kernels = [FakeEvent("ncclDevKernel_SendRecv", DeviceType.CUDA, elapsed=200.0),
               FakeEvent("triton_poi_fused_0", DeviceType.CUDA, elapsed=150.0),
               FakeEvent("moe_fx::mc2_dispatch", DeviceType.CUDA, elapsed=999.0, is_user_annotation=True)]
    events = [outer, inner, combine, other, not_ours, *kernels]
    got = bench_ep.summarize_profile(events, on_device=True, calls=2)
    assert got["dispatch_us"] == 150.0 and got["combine_us"] == 50.0  # per call, inner not counted twice
    assert got["ops_us"] == {"moe_fx::switch_dispatch": 150.0, "moe_fx::mc2_combine_v2": 50.0,
                             "moe_fx::grouped_mm": 25.0}
    assert got["kernel_us"] == 175.0 and got["nccl_us"] == 100.0
    on_cpu = bench_ep.summarize_profile([outer, inner, other], on_device=False, calls=3)
    assert on_cpu["dispatch_us"] == 300.0 and on_cpu["combine_us"] is None and on_cpu["kernel_us"] is None


def test_split_rows_divide_the_layer_by_the_busier_rank_kernels():
    row = {"tokens_per_rank": 128, "top_k": 8, "hidden": 7168, "ep": 2, "auto": {"picked": "mc2"},
           "times_us": {"mc2": 1000.0, "auto": 1000.0}}
    ranks = [{"dispatch_us": 100.0, "combine_us": 80.0, "kernel_us": 500.0, "nccl_us": 300.0},
             {"dispatch_us": 120.0, "combine_us": 70.0, "kernel_us": 400.0, "nccl_us": 100.0}]
    split = bench_ep.split_rows(row, {"mc2": ranks, "auto": ranks}, on_device=True)
    mc2 = split["mc2"]
    assert (mc2["dispatch_us"], mc2["combine_us"], mc2["kernel_us"], mc2["kernel_without_nccl_us"]) == (
        120.0, 80.0, 500.0, 300.0)
    assert mc2["layer_over_kernels"] == 2.0 and mc2["layer_over_kernels_without_nccl"] == pytest.approx(1000 / 300)
    assert split["auto"]["dispatch_bytes"] == mc2["dispatch_bytes"] == 128 * 8 * 7168 * 2


def test_ratios_take_the_fastest_strategy_on_each_side():
    times = {"ep1": 400.0, "allgather": 500.0, "mc2": 300.0, "auto": 500.0,
             "ep1+graphs": 200.0, "mc2+graphs": 100.0, "auto+graphs": 100.0}
    got = bench_ep.ratios({"times_us": times})
    assert got["no_graphs"] == {"best_ep": "mc2", "best_ep_over_ep1": 0.75, "auto_over_ep1": 1.25}
    assert got["graphs"] == {"best_ep": "mc2", "best_ep_over_ep1": 0.5, "auto_over_ep1": 0.5}
    assert "graphs" not in bench_ep.ratios({"times_us": {"ep1": 1.0, "mc2": 1.0}})


def test_refuses_to_run_outside_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit, match="torchrun --nproc-per-node 2"):
        bench_ep.main(["--ep", "2", "--device", "cpu"])


def test_bench_hands_ep_over_to_bench_ep(monkeypatch):
    from moe_fx import bench

    seen = []
    monkeypatch.setattr(bench_ep, "main", lambda argv: seen.append(argv) or 7)
    assert bench.main(["--ep", "2", "--device", "cpu"]) == 7 and seen == [["--ep", "2", "--device", "cpu"]]


def test_overlap_variants_time_allgather_per_chunk_count():
    ctx = SimpleNamespace(inner_backend="inductor", one_rank_group="one")
    variants = bench_ep.variants_for(4096, ctx, strategies=("allgather",), graphs=False, overlap_chunks=(1, 4))
    named = {v.name: v.settings for v in variants}
    assert list(named) == ["ep1", "allgather", "allgather/1", "allgather/4"]
    assert named["allgather/4"] == {"inner_backend": "inductor", "max_tokens_per_rank": 4096,
                                    "lowering": "allgather", "ep_overlap_chunks": 4}
    assert "ep_overlap_chunks" not in named["allgather"]  # "auto" decides there
    row = {"shape": "s", "tokens_per_rank": 4096, "skipped": {}, "cudagraph_skips": {},
           "times_us": {"ep1": 1000.0, "allgather": 1100.0, "allgather/4": 950.0}}
    assert bench_ep.notes([row]) == ["s T=4096 allgather/4 (AllGather in 4 overlapped chunks): 950 µs, 0.95 x ep1"]
