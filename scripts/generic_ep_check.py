"""The generic path on N ranks (moe_fx/passes/generic.py): tests/generic_forms.py's blocks, which no
recognizer matches, compiled with moe_fx at ep = N, foreign experts zeroed, against eager.

    torchrun --nproc-per-node 2 scripts/generic_ep_check.py                  # CUDA, NCCL, inductor
    torchrun --nproc-per-node 2 scripts/generic_ep_check.py --device cpu     # gloo, eager inner backend

Each case prints its form, strategy and max |diff| / max |eager| per rank; the dense form must be
refused. Exit status 1 on a failed case.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import moe_fx  # noqa: E402
from moe_fx.runtime.comm import destroy_process_group  # noqa: E402
from tests.form_jobs import build_form, zero_foreign_form_experts  # noqa: E402

TOKENS = 10  # not one of the blocks' sizes (H 16, I 8, E 4, K 2): see README "The generic path"
BOUNDS = {"float32": 1e-4, "bfloat16": 2e-2}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--forms", nargs="+", default=["NormedExpertLoop", "NonzeroSlotLoop", "DenseGateLoop"])
    parser.add_argument("--inner", help="moe_fx's inner compiler (default: inductor on CUDA, eager on CPU)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    failed = 0
    for cls in args.forms:
        for dtype in args.dtypes:
            model = build_form(cls, dtype=dtype).to(device)
            gen = torch.Generator().manual_seed(100 + rank)
            x = torch.randn(TOKENS, 16, generator=gen).to(device=device, dtype=getattr(torch, dtype))
            with torch.no_grad():
                ref = model(x).float()
            zero_foreign_form_experts(model)
            torch._dynamo.reset()
            settings = dict(inner_backend=args.inner or ("inductor" if cuda else "eager"), max_tokens_per_rank=TOKENS)
            with moe_fx.config.patch(**settings), moe_fx.recording() as graphs, torch.no_grad():
                out = torch.compile(model, backend=moe_fx.backend, fullgraph=True)(x).float()
            forms = [(b.region.form, b.choice.strategy.value) for g in graphs for b in g.report.blocks]
            misses = [m.reason for g in graphs for m in g.report.misses]
            rel = ((out - ref).abs().max() / ref.abs().max()).item()
            if cls == "DenseGateLoop":
                ok = not forms and any("dense form" in m for m in misses)
            else:
                ok = forms == [("generic", "allgather")] and rel <= BOUNDS[dtype]
            failed += not ok
            print(f"rank {rank} {cls} {dtype}: {'PASS' if ok else 'FAIL'} blocks={forms} rel_diff={rel:.2e}"
                  + ("" if forms else f" miss={misses[-1][:160] if misses else None}"), flush=True)
    destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
