"""NCCL's protocols on the EP collectives' sizes, eager calls (torchrun, one process per GPU).

    torchrun --nproc-per-node 2 scripts/nccl_protocols.py

NCCL reads NCCL_PROTO when a communicator is initialized, so one process can hold communicators
with different protocols over the same ranks. For each (default, Simple, LL128, LL) this creates a
group with the variable set, initializes its communicator, and times all_gather_into_tensor and
reduce_scatter_tensor (bf16) of per-rank sizes from decode to prefill: CUDA-event median of
back-to-back calls, the slowest rank's, µs and GB/s (bytes received from the other ranks).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from moe_fx.bench import median_us

PROTOCOLS = (None, "Simple", "LL128", "LL")
SIZES_KB = (32, 256, 1024, 4096, 16384, 57344)


def group_with_protocol(protocol: str | None) -> dist.ProcessGroup:
    before = os.environ.pop("NCCL_PROTO", None)
    if protocol is not None:
        os.environ["NCCL_PROTO"] = protocol
    try:
        group = dist.new_group(list(range(dist.get_world_size())))
        dist.all_reduce(torch.ones(1, device="cuda"), group=group)  # the communicator starts here
        torch.cuda.synchronize()
    finally:
        os.environ.pop("NCCL_PROTO", None)
        if before is not None:
            os.environ["NCCL_PROTO"] = before
    return group


def slowest_median_us(fn) -> float:
    """The slowest rank's CUDA-event median of back-to-back calls (moe_fx.bench's timer)."""
    torch.cuda.synchronize()
    dist.barrier()
    mine = median_us(fn, warmup=5, iters=30)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return max(every)


def main() -> None:
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    world = dist.get_world_size()
    groups = {p or "default": group_with_protocol(p) for p in PROTOCOLS}
    rows = []
    for kb in SIZES_KB:
        n = kb * 1024 // 2
        x = torch.randn(n, device="cuda").to(torch.bfloat16)
        gathered = torch.empty(world * n, device="cuda", dtype=torch.bfloat16)
        scattered = torch.empty(n // world, device="cuda", dtype=torch.bfloat16)
        for name, group in groups.items():
            ag = slowest_median_us(lambda: dist.all_gather_into_tensor(gathered, x, group=group))
            rs = slowest_median_us(lambda: dist.reduce_scatter_tensor(scattered, x, group=group))
            moved = (world - 1) * kb * 1024
            rows.append((kb, name, ag, moved / ag / 1e3, rs, moved / world / rs / 1e3))
    if dist.get_rank() == 0:
        print(f"{world} ranks, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, torch {torch.__version__}")
        print("| KB per rank | protocol | all-gather µs | GB/s | reduce-scatter µs | GB/s |")
        print("|---|---|---|---|---|---|")
        for kb, name, ag, ag_bw, rs, rs_bw in rows:
            print(f"| {kb} | {name} | {ag:.1f} | {ag_bw:.0f} | {rs:.1f} | {rs_bw:.0f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
