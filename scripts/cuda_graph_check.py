"""GPU check: the tiny Mixtral of the demo compiled with moe_fx under CUDA graphs
(inner_mode="reduce-overhead", lowering="mc2"; at ep = 1 that is the static local path), compared
with eager and with plain torch.compile(mode="reduce-overhead"). Run from the repo root on a GPU:

    python scripts/cuda_graph_check.py
"""
import torch, sys
sys.path.insert(0, ".")
import moe_fx
from moe_fx.demo import _build_model
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    m, _ = _build_model("mixtral", dtype); m = m.cuda()
    torch._dynamo.reset()
    ids = [torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(s)).cuda() for s in range(3)]
    with torch.no_grad():
        try:
            plain = torch.compile(m, mode="reduce-overhead", fullgraph=True)
            ref_c = [plain(i).logits.float().clone() for i in ids]
        except Exception as e:
            print(dtype, "plain torch.compile(mode='reduce-overhead') FAILED:", type(e).__name__, str(e).splitlines()[0][:200])
            ref_c = [m(i).logits.float() for i in ids]
        torch._dynamo.reset()
        try:
            with moe_fx.config.patch(lowering="mc2", inner_mode="reduce-overhead"), moe_fx.recording() as graphs:
                c = torch.compile(m, backend=moe_fx.backend, fullgraph=True)
                outs = [c(i).logits.float().clone() for i in ids]
                outs += [c(i).logits.float().clone() for i in ids]  # replays
        except Exception as e:
            print(dtype, "FAILED", type(e).__name__, str(e)[:300]); continue
        eager = [m(i).logits.float() for i in ids]
        from torch._dynamo.utils import counters
        print(dtype, "blocks", [b.choice.strategy.value for g in graphs for b in g.report.blocks],
              "vs eager", max((o - e).abs().max().item() for o, e in zip(outs, eager + eager)),
              "vs plain reduce-overhead", max((o - e).abs().max().item() for o, e in zip(outs, ref_c + ref_c)),
              "plain vs eager", max((o - e).abs().max().item() for o, e in zip(ref_c, eager)),
              "cudagraph skips", dict(counters["inductor"]).get("cudagraph_skips", 0))
