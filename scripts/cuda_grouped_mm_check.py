"""GPU check of ``torch.ops.moe_fx.grouped_mm`` on CUDA (moe_fx/runtime/grouped_mm.py).

1. Correctness against the per-group loop on edge cases (empty groups, rows past the last group,
   one group, more groups than rows), in bf16, fp16 and fp32, for each kernel the op may pick
   (rows past the last group are padding, unspecified by the op's contract, so not compared).
2. Time, under CUDA graphs (GPU time, no launch cost), of its Triton kernel next to
   ``torch._grouped_mm`` on the projections of the benchmark layers, random and skewed routing,
   and which of the two the op picks at that size inside a CUDA graph (outside one, bf16 calls
   with few rows per expert take torch._grouped_mm for its cheaper launch).

Run from the repo root:

    python scripts/cuda_grouped_mm_check.py [T ...]       # default: 1 16 128 1024 8192
"""

import sys

import torch

sys.path.insert(0, ".")
from moe_fx import bench  # noqa: E402
from moe_fx.runtime.grouped_mm import (  # noqa: E402
    _grouped_mm_loop, _grouped_mm_triton, cuda_kernel_for, native_grouped_mm_ok)

EDGES = ((37, 64, 48, [5, 5, 30]), (100, 128, 256, [100]), (64, 72, 40, [0, 0, 10, 64]),
         (300, 256, 128, [10, 50, 50, 90, 200, 260, 299, 299]), (8, 64, 48, [0] * 60 + [1, 3, 3, 8]),
         (5, 32, 64, [1, 2, 2, 3] + [3] * 100 + [4]), (600, 64, 128, [150, 300]))


def check_edges() -> None:
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rows, k, n, ends in EDGES:
            x = torch.randn(rows, k, device="cuda", dtype=dtype)
            w = torch.randn(len(ends), n, k, device="cuda", dtype=dtype).transpose(-2, -1)
            offsets = torch.tensor(ends, device="cuda", dtype=torch.int32)
            want = _grouped_mm_loop(x.float(), w.float(), offsets)
            bound = 1e-4 * want.abs().max().item() if dtype == torch.float32 else 1e-2 * want.abs().max().item()
            for name, fn in (("op", torch.ops.moe_fx.grouped_mm), ("triton", _grouped_mm_triton)):
                for _ in range(2):  # the op's first call of a size may pick another kernel than later ones
                    got = fn(x, w, offsets).float()
                    diff = (got[: ends[-1]] - want[: ends[-1]]).abs().max().item()
                    ok = diff <= bound
                    print(f"{name} {dtype} M={rows} K={k} N={n} groups={len(ends)} last end={ends[-1]}: "
                          f"max|diff| {diff:.3g} (bound {bound:.3g}) {'ok' if ok else 'FAIL'}", flush=True)
                    assert ok


def graph_timed(fn, calls: int = 10):
    """A CUDA graph of ``calls`` back-to-back calls: replaying it times the kernels, not the launches."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def time_projections(tokens: list[int]) -> None:
    for shape in bench.SHAPES.values():
        e, h, i, top_k = shape.num_experts, shape.hidden, shape.intermediate, shape.top_k
        for name, n, k in (("gate_up", 2 * i, h), ("down", h, i)):
            w = (torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) * 0.02).transpose(-2, -1)
            for t in tokens:
                for routing in ("random", "skewed"):
                    gen = torch.Generator(device="cuda").manual_seed(t)
                    logits = torch.randn(t, e, device="cuda", generator=gen)
                    if routing == "skewed":
                        logits += 3.0 / torch.arange(1, e + 1, device="cuda")
                    ids = logits.topk(top_k, dim=1).indices.reshape(-1)
                    offsets = torch.bincount(ids, minlength=e).cumsum(0).to(torch.int32)
                    x = torch.randn(t * top_k, k, device="cuda", dtype=torch.bfloat16)
                    diff = (_grouped_mm_triton(x, w, offsets).float()
                            - torch._grouped_mm(x, w, offs=offsets).float()).abs().max().item()
                    replays = {"triton": graph_timed(lambda: _grouped_mm_triton(x, w, offsets)),
                               "torch": graph_timed(lambda: torch._grouped_mm(x, w, offs=offsets))}
                    us = {a: v / 10 for a, v in bench.interleaved_medians(replays, warmup=3, iters=30, rounds=3).items()}
                    picks = cuda_kernel_for(rows=x.shape[0], groups=e, native_ok=native_grouped_mm_ok(x, w),
                                            capturing=True, tuned=True)
                    print(f"{shape.name} {name} T={t} {routing}: max|diff| {diff:.3g}; Triton {us['triton']:.1f} us, "
                          f"torch._grouped_mm {us['torch']:.1f} us ({us['torch'] / us['triton']:.2f}x); "
                          f"the op picks {picks} in a CUDA graph", flush=True)
                    del replays, x
            del w
            torch.cuda.empty_cache()


if __name__ == "__main__":
    check_edges()
    time_projections([int(t) for t in sys.argv[1:]] or [1, 16, 128, 1024, 8192])
