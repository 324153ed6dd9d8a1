"""How much of torch.compile's time the moe_fx pass and its probe check take, and how they grow with depth.

    python scripts/compile_time.py                       # tiny Mixtral (transformers), 12/24/48 layers
    python scripts/compile_time.py --layers 12 48 --inner-backend aot_eager

For each depth: the first compiled call (dynamo capture + moe_fx pass + inner compiler + one run),
the time spent inside the pass (every recognizer, the lowering choice, the probe check and the
rewrite) and inside its probe check (moe_fx/passes/probe.py), then the first compiled call again
with ``config.probe_check=False``; measured in one process on CPU, one MoE block per layer (E 8,
K 2, H 64, I 32).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import moe_fx  # noqa: E402
from tests.tiny_models import build_tiny, make_input_ids  # noqa: E402

backend_module = sys.modules["moe_fx.backend"]  # the module (moe_fx.backend is the function)
passes_module = sys.modules["moe_fx.passes"]


def measure(layers: int, inner: str, form: str, probe: bool = True) -> dict:
    model = build_tiny("mixtral", num_hidden_layers=layers, experts_implementation=form)
    ids = make_input_ids(16, seed=0)
    spent, probing = [], []
    original, original_probe = backend_module.moe_ep_pass, passes_module.prove_region

    def timed_pass(gm, example_inputs=None):
        start = time.perf_counter()
        report = original(gm, example_inputs)
        spent.append(time.perf_counter() - start)
        return report

    def timed_probe(*args):
        start = time.perf_counter()
        result = original_probe(*args)
        probing.append(time.perf_counter() - start)
        return result

    torch._dynamo.reset()
    backend_module.moe_ep_pass, passes_module.prove_region = timed_pass, timed_probe
    try:
        with moe_fx.config.patch(inner_backend=inner, probe_check=probe), moe_fx.recording() as graphs, \
                torch.no_grad():
            compiled = torch.compile(model, backend=moe_fx.backend, fullgraph=True)
            start = time.perf_counter()
            compiled(ids)
            total = time.perf_counter() - start
    finally:
        backend_module.moe_ep_pass, passes_module.prove_region = original, original_probe
    blocks = sum(len(g.report.blocks) for g in graphs)
    return {"layers": layers, "blocks": blocks, "total_s": total, "pass_s": sum(spent), "probe_s": sum(probing),
            "probes": len(probing)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48])
    parser.add_argument("--inner-backend", default="eager")
    parser.add_argument("--experts-implementation", default="grouped_mm", choices=("grouped_mm", "batched_mm"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    measure(2, args.inner_backend, args.experts_implementation)  # warm-up: imports, first-use costs
    rows = [measure(n, args.inner_backend, args.experts_implementation) for n in args.layers]
    without = [measure(n, args.inner_backend, args.experts_implementation, probe=False) for n in args.layers]
    base = rows[0]
    print(f"torch {torch.__version__}, inner backend {args.inner_backend}, experts {args.experts_implementation}")
    print("layers  blocks  compile+first call (s)  pass (s)  pass share  probe (s)  probe share  probe growth"
          "  layers growth  compile+first call without probe (s)")
    for r, w in zip(rows, without):
        print(f"{r['layers']:6d}  {r['blocks']:6d}  {r['total_s']:22.2f}  {r['pass_s']:8.3f}  {r['pass_s'] / r['total_s']:10.1%}"
              f"  {r['probe_s']:9.3f}  {r['probe_s'] / r['total_s']:11.1%}  {r['probe_s'] / base['probe_s']:12.2f}"
              f"  {r['layers'] / base['layers']:13.2f}  {w['total_s']:36.2f}")


if __name__ == "__main__":
    main()
