"""What moe_fx.prepare's probe check costs next to compiling, and how it grows with depth.

    PYTHONPATH=~/.cache/moe_fx/transformers-4.57.1:. python scripts/prepare_cost.py
    PYTHONPATH=~/.cache/moe_fx/transformers-4.57.1:. python scripts/prepare_cost.py --layers 12 48 --inner-backend aot_eager

For each depth, a tiny transformers 4.57 Mixtral (one MoE block per layer, E 8, K 2, H 64, I 32,
fp32, CPU, one thread): the time of ``moe_fx.prepare`` (finding the blocks, the probes, the swap)
and of the first compiled call after it (dynamo capture + moe_fx pass + inner compiler + one run,
fullgraph). The load average before each step is printed: the figures are wall-clock.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the repo, after transformers 4.57

import torch  # noqa: E402
import transformers  # noqa: E402

import moe_fx  # noqa: E402
from tests.tiny_models import _COMMON, _reinit_, make_input_ids  # noqa: E402


def build_mixtral(layers: int) -> torch.nn.Module:
    config = transformers.MixtralConfig(**{**_COMMON, "num_hidden_layers": layers}, intermediate_size=32,
                                        num_local_experts=8, num_experts_per_tok=2)
    config.use_cache = False
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    _reinit_(model, 0)
    return model.eval()


def measure(layers: int, inner: str) -> dict:
    model = build_mixtral(layers)
    ids = make_input_ids(16, seed=0)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    moe_fx.prepare(model)
    prepare_s = time.perf_counter() - start
    prepared = len(moe_fx.prepare_report(model).prepared)
    torch._dynamo.reset()
    with moe_fx.config.patch(inner_backend=inner), moe_fx.recording() as graphs, torch.no_grad():
        compiled = torch.compile(model, backend=moe_fx.backend, fullgraph=True)
        start = time.perf_counter()
        compiled(ids)
        compile_s = time.perf_counter() - start
    torch._dynamo.reset()
    blocks = sum(len(g.report.blocks) for g in graphs)
    return dict(layers=layers, prepared=prepared, blocks=blocks, prepare_s=prepare_s, compile_s=compile_s, load=load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48])
    parser.add_argument("--inner-backend", default="eager")
    args = parser.parse_args()
    torch.set_num_threads(1)
    measure(2, args.inner_backend)  # warm-up: imports, first-use costs
    rows = [measure(n, args.inner_backend) for n in args.layers]
    base = rows[0]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, inner backend {args.inner_backend}")
    print("| layers | blocks prepared / rewritten | prepare (s) | first compiled call (s) | prepare / compile | "
          "prepare growth | layers growth | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['prepared']} / {r['blocks']} | {r['prepare_s']:.3f} | {r['compile_s']:.2f} | "
              f"{r['prepare_s'] / r['compile_s']:.1%} | {r['prepare_s'] / base['prepare_s']:.2f} | "
              f"{r['layers'] / base['layers']:.2f} | {r['load']:.1f} |")


if __name__ == "__main__":
    main()
