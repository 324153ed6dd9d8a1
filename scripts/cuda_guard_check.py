"""moe_fx::guard on one GPU at ep = 1 (README "Failure behaviour"): the first call reads the host,
later calls check on the device with no host sync (torch.cuda sync debug mode "error"), a bad id
ends in a device-side assert. Usage: python scripts/cuda_guard_check.py {plain,graphs}"""

import sys

import torch

import moe_fx
from tests.ep_jobs import build_plain


def main(mode: str) -> None:
    torch.manual_seed(0)
    model = build_plain("batched", hidden=64, intermediate=32, num_experts=8, top_k=2, dtype="bfloat16").cuda()
    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(16)]).cuda()
    w = torch.rand(16, 2, device="cuda")
    with torch.no_grad():
        ref = model(x, ids, w).float()
    settings = {"inner_backend": "inductor", "inner_mode": "reduce-overhead" if mode == "graphs" else None}
    with moe_fx.config.patch(**settings), torch.no_grad():
        compiled = torch.compile(model, backend=moe_fx.backend, fullgraph=True)
        for i in range(4):
            if i == 3:
                torch.cuda.set_sync_debug_mode("error")
            out = compiled(x, ids, w).float()
            torch.cuda.set_sync_debug_mode(0)
            print(f"{mode} call {i + 1}: max diff {(out - ref).abs().max().item():.3g}", flush=True)
        bad = ids.clone()
        bad[0, 0] = 8
        try:
            compiled(x, bad, w)
            torch.cuda.synchronize()
            print(f"{mode} bad id: NO ERROR", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"{mode} bad id raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
