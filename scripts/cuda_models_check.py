"""GPU check: the 7 tiny transformers models of the tests, ep = 1, on CUDA, grouped_mm and
batched_mm, fp32, bf16 and fp16, inner backend aot_eager (all) and inductor (mixtral, gpt_oss);
bf16 with inductor is compared with plain inductor (tests/tolerances.py says why). From the repo root:

    python scripts/cuda_models_check.py [dtype ...]     # default: float32 bfloat16 float16
"""
import sys, time, torch
sys.path.insert(0, ".")
import moe_fx
from tests.tiny_models import MODEL_KEYS, build_tiny, make_input_ids
rows = []
for inner, keys in (("aot_eager", MODEL_KEYS), ("inductor", ("mixtral", "gpt_oss"))):
    for key in keys:
        for impl in ("grouped_mm", "batched_mm"):
            for dtype in sys.argv[1:] or ("float32", "bfloat16", "float16"):
                t0 = time.time()
                try:
                    m = build_tiny(key, experts_implementation=impl, dtype=getattr(torch, dtype)).cuda()
                    ids = make_input_ids(9, seed=3).cuda()
                    with torch.no_grad():
                        ref = m(ids).logits.float()
                        if inner == "inductor" and dtype != "float32":
                            torch._dynamo.reset()
                            ref = torch.compile(m, backend="inductor", fullgraph=True)(ids).logits.float()
                        torch._dynamo.reset()
                        with moe_fx.config.patch(inner_backend=inner), moe_fx.recording() as g:
                            out = torch.compile(m, backend=moe_fx.backend, fullgraph=True)(ids).logits.float()
                    blocks = [b.choice.strategy.value for r in g for b in r.report.blocks]
                    d, s = (out - ref).abs().max().item(), ref.abs().max().item()
                    ok = d <= (1e-5 if dtype == "float32" else 2e-2 * s)
                    print(f"{inner:9s} {key:12s} {impl:10s} {dtype:8s} blocks={blocks} diff={d:.3g} scale={s:.3g} {'OK' if ok else 'FAIL'} ({time.time()-t0:.0f}s)", flush=True)
                except Exception as e:
                    print(f"{inner:9s} {key:12s} {impl:10s} {dtype:8s} ERROR {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
