"""GPU check of moe_fx's Triton grouped matmul (``torch.ops.moe_fx.grouped_mm`` on CUDA,
moe_fx/runtime/grouped_mm.py): against the per-group loop on edge cases (empty groups, rows past the
last group, one group) in bf16, fp16 and fp32, then its time next to ``torch._grouped_mm`` on the
projections of the benchmark layers, random routing. Run from the repo root:

    python scripts/cuda_grouped_mm_check.py [T ...]       # default: 16 1024 8192
"""

import sys

import torch

sys.path.insert(0, ".")
from moe_fx import bench  # noqa: E402
from moe_fx.runtime.grouped_mm import _grouped_mm_loop  # noqa: E402

EDGES = ((37, 64, 48, [5, 5, 30]), (100, 128, 256, [100]), (64, 72, 40, [0, 0, 10, 64]),
         (300, 256, 128, [10, 50, 50, 90, 200, 260, 299, 299]))
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for rows, k, n, ends in EDGES:
        x = torch.randn(rows, k, device="cuda", dtype=dtype)
        w = torch.randn(len(ends), n, k, device="cuda", dtype=dtype).transpose(-2, -1)
        offsets = torch.tensor(ends, device="cuda", dtype=torch.int32)
        got = torch.ops.moe_fx.grouped_mm(x, w, offsets).float()
        want = _grouped_mm_loop(x.float(), w.float(), offsets)
        diff = (got - want).abs().max().item()
        bound = 1e-4 * want.abs().max().item() if dtype == torch.float32 else 1e-2 * want.abs().max().item()
        tail = got[ends[-1]:].abs().max().item() if ends[-1] < rows else 0.0
        ok = diff <= bound and tail == 0
        print(f"{dtype} M={rows} K={k} N={n} ends={ends}: max|diff| {diff:.3g} (bound {bound:.3g}), "
              f"rows past the last group {tail} {'ok' if ok else 'FAIL'}", flush=True)
        assert ok

tokens = [int(t) for t in sys.argv[1:]] or [16, 1024, 8192]
for shape in bench.SHAPES.values():
    e, h, i, top_k = shape.num_experts, shape.hidden, shape.intermediate, shape.top_k
    for t in tokens:
        ids = torch.rand(t, e, device="cuda").topk(top_k, dim=1).indices.reshape(-1)
        offsets = torch.bincount(ids, minlength=e).cumsum(0).to(torch.int32)
        for name, n, k in (("gate_up", 2 * i, h), ("down", h, i)):
            w = (torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) * 0.02).transpose(-2, -1)
            x = torch.randn(t * top_k, k, device="cuda", dtype=torch.bfloat16)
            diff = (torch.ops.moe_fx.grouped_mm(x, w, offsets).float()
                    - torch._grouped_mm(x, w, offs=offsets).float()).abs().max().item()
            ours = bench.median_us(lambda: torch.ops.moe_fx.grouped_mm(x, w, offsets), warmup=5, iters=30)
            torchs = bench.median_us(lambda: torch._grouped_mm(x, w, offs=offsets), warmup=5, iters=30)
            print(f"{shape.name} {name} T={t}: max|diff| vs torch._grouped_mm {diff:.3g}; Triton {ours:.0f} us, "
                  f"torch._grouped_mm {torchs:.0f} us ({torchs / ours:.2f}x)", flush=True)
            del w, x
        torch.cuda.empty_cache()
