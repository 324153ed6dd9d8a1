"""GPU check of moe_fx's fused unsort + weighted sum (moe_fx/runtime/unsort.py): the Triton kernel
against the op's torch formula, exact shapes of the benchmark layers, and its time next to the
same formula compiled by inductor (what the local lowering emitted before). With bf16 rows and fp32
weights it also checks the folded output cast (out_dtype=bf16) against the fp32 result cast to bf16,
bit for bit. Run from the repo root:

    python scripts/cuda_unsort_check.py
"""

import sys

import torch

sys.path.insert(0, ".")
from moe_fx.bench import median_us  # noqa: E402
from moe_fx.runtime.unsort import _reference  # noqa: E402

compiled_reference = torch.compile(_reference, dynamic=False, fullgraph=True)
SIZES = ((1, 8, 2048), (16, 4, 2880), (1024, 8, 2048), (8192, 8, 2048), (8192, 8, 7168),
         (8192, 2, 4096), (8192, 4, 2880), (37, 3, 100))
if len(sys.argv) > 1:  # e.g. 8192,4,2880
    SIZES = (tuple(int(v) for v in sys.argv[1].split(",")),)
for tokens, top_k, hidden in SIZES:
    for y_dtype, w_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                             (torch.bfloat16, torch.bfloat16)):
        y = torch.randn(tokens * top_k, hidden, device="cuda").to(y_dtype)
        w = torch.rand(tokens, top_k, device="cuda").to(w_dtype)
        position = torch.randperm(tokens * top_k, device="cuda")
        out = torch.ops.moe_fx.unsort_weighted_sum(y, position, w)
        want = _reference(y, position, w, None)
        diff = (out.float() - want.float()).abs().max().item()
        bound = 1e-5 if out.dtype == torch.float32 else 2e-2 * want.float().abs().max().item()
        ok = out.dtype == want.dtype and diff <= bound
        kernel = median_us(lambda: torch.ops.moe_fx.unsort_weighted_sum(y, position, w), warmup=5, iters=50)
        inductor = median_us(lambda: compiled_reference(y, position, w, None), warmup=5, iters=50)
        if y_dtype != w_dtype:
            folded = torch.ops.moe_fx.unsort_weighted_sum(y, position, w, y_dtype)
            same = torch.equal(folded, out.to(y_dtype))
            ok = ok and same
            folded_us = median_us(lambda: torch.ops.moe_fx.unsort_weighted_sum(y, position, w, y_dtype), warmup=5, iters=50)
            cast_us = median_us(lambda: compiled_reference(y, position, w, y_dtype), warmup=5, iters=50)
            print(f"    out_dtype={y_dtype}: {'bitwise equal' if same else 'DIFFERS'}; kernel {folded_us:.1f} us, "
                  f"inductor with the cast {cast_us:.1f} us ({cast_us / folded_us:.2f}x)")
        print(f"T={tokens} K={top_k} H={hidden} {y_dtype}x{w_dtype}: max|diff| {diff:.3g} "
              f"{'ok' if ok else 'FAIL'}; kernel {kernel:.1f} us, inductor {inductor:.1f} us "
              f"({inductor / kernel:.2f}x)")
        assert ok
