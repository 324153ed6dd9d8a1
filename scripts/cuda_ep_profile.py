"""Where one expert-parallel MoE layer spends its host and GPU time (torchrun, one process per GPU).

    torchrun --nproc-per-node 2 scripts/cuda_ep_profile.py --shape qwen3 --tokens 4096 --lowering allgather

Compiles the bench layer (moe_fx/bench.py) once over a one-rank group ("ep1") and once with the
strategy, then profiles a few back-to-back calls of each and prints, on rank 0, the ops that cost
the host most (self CPU time per call) and the kernels that cost the GPU most.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import moe_fx
from moe_fx.bench import SHAPES, build_blocks, configured_backend, make_tokens


def _profiled(fn, calls: int) -> profile:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof


def _host_times(fn, calls: int = 20) -> tuple[float, float]:
    """Median µs of (host time to return from one call, time until its GPU work is done), each call
    starting with an idle GPU: equal values mean the call waits on the GPU (a host sync) or the
    host paces the GPU."""
    enqueue, done = [], []
    for _ in range(calls):
        torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        fn()
        enqueue.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        done.append(time.perf_counter() - start)
    return statistics.median(enqueue) * 1e6, statistics.median(done) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--lowering", default="allgather")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--trace", help="write each variant's Chrome trace (rank 0) into this folder")
    args = parser.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank = dist.get_rank()
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    shape = SHAPES[args.shape]
    block = build_blocks(shape, device="cuda", impls=("grouped_mm",))["grouped_mm"]
    x = make_tokens(shape, args.tokens, skew=False, device="cuda", seed=1 + rank)
    variants = {"ep1": {"ep_group": singles[rank].group_name}, args.lowering: {"lowering": args.lowering}}
    for name, settings in variants.items():
        torch._dynamo.reset()
        backend = configured_backend(inner_backend="inductor", max_tokens_per_rank=args.tokens, **settings)
        compiled = torch.compile(block, backend=backend, fullgraph=True)
        with torch.no_grad():
            prof = _profiled(lambda: compiled(x), args.calls)
            host_us, done_us = _host_times(lambda: compiled(x))
        if rank == 0 and args.trace:
            os.makedirs(args.trace, exist_ok=True)
            prof.export_chrome_trace(os.path.join(args.trace, f"{shape.name}_{args.tokens}_{name}.json"))
        print(f"[rank {rank}] {shape.name} {args.tokens} {name}: host returns after {host_us:.0f} µs, "
              f"GPU done after {done_us:.0f} µs (one call from an idle GPU)", flush=True)
        if rank == 0:
            events = prof.key_averages()
            cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.rows]
            gpu = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[: args.rows]
            print(f"\n== {shape.name}, {args.tokens} tokens/rank, {name}: per call, µs ==")
            print("host (self CPU):  " + "; ".join(f"{e.key[:60]} {e.self_cpu_time_total / args.calls:.0f}"
                                                 for e in cpu))
            print("GPU (self):  " + "; ".join(f"{e.key[:60]} {e.self_device_time_total / args.calls:.0f}"
                                            for e in gpu if e.self_device_time_total > 0))
    moe_fx.destroy_process_group()


if __name__ == "__main__":
    main()
