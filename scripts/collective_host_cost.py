"""Host time per call of the collectives moe_fx's compiled graphs issue (README "Multi-GPU
benchmark", host time without CUDA graphs), with and without torch.profiler running.

    torchrun --nproc-per-node N scripts/collective_host_cost.py [--rows 8 4096] [--hidden 2048]

Runs on any number of GPUs, one included (a one-rank NCCL group still takes c10d's and NCCL's host
path and launches a kernel). For each size it times back-to-back calls on the host clock, without
synchronizing inside the loop (what a graph without CUDA graphs pays per call), of:

- ``functional``: ``_c10d_functional.all_gather_into_tensor`` + ``wait_tensor`` (the ops in moe_fx's
  graphs), and the same for ``reduce_scatter_tensor``;
- ``eager``: ``dist.all_gather_into_tensor`` / ``dist.reduce_scatter_tensor``;
- ``compiled``: an inductor function doing one all-gather and one reduce-scatter, against the same
  function with the two collectives left out (its pointwise kernels only), and the same call with
  the autograd dispatch keys excluded (moe_fx/backend.py ``_below_autograd``: torch's functional
  collectives pass through a Python autograd wrapper otherwise);
- ``launch``: one small pointwise kernel, the floor of any launch.

Everything runs under ``torch.no_grad()``, as inference does. Each figure is the median over
rounds of the mean host time per call in a round. The last
column reruns each loop under torch.profiler (CPU and CUDA activities), for comparison with
profiled host times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile


def host_us(fn: Callable[[], object], *, calls: int, rounds: int, profiled: bool = False) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    per_round = []
    for _ in range(rounds):
        if profiled:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                per_round.append((time.perf_counter() - start) / calls * 1e6)
                torch.cuda.synchronize()
        else:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            per_round.append((time.perf_counter() - start) / calls * 1e6)
            torch.cuda.synchronize()
        dist.barrier()
    return statistics.median(per_round)


def below_autograd(fn: Callable, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return fn(*args)


def variants(rows: int, hidden: int, world: int, group: str) -> dict[str, Callable[[], object]]:
    ops = torch.ops._c10d_functional
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    xs = torch.randn(world * rows, hidden, device="cuda", dtype=torch.bfloat16)
    gathered, scattered = torch.empty_like(xs), torch.empty_like(x)

    def exchange(t: torch.Tensor) -> torch.Tensor:
        g = ops.wait_tensor(ops.all_gather_into_tensor(t * 2, world, group))
        return ops.wait_tensor(ops.reduce_scatter_tensor(g + 1, "sum", world, group))

    def no_exchange(t: torch.Tensor) -> torch.Tensor:
        return (t * 2).repeat(world, 1)[: t.shape[0]] + 1

    compiled, compiled_bare = torch.compile(exchange), torch.compile(no_exchange)
    small = torch.zeros(16, device="cuda")
    return {
        "functional all-gather": lambda: ops.wait_tensor(ops.all_gather_into_tensor(x, world, group)),
        "functional reduce-scatter": lambda: ops.wait_tensor(ops.reduce_scatter_tensor(xs, "sum", world, group)),
        "eager all-gather": lambda: dist.all_gather_into_tensor(gathered, x),
        "eager reduce-scatter": lambda: dist.reduce_scatter_tensor(scattered, xs),
        "compiled: both exchanges + pointwise": lambda: compiled(x),
        "compiled: the same, below autograd": lambda: below_autograd(compiled, x),
        "compiled: the pointwise alone": lambda: compiled_bare(x),
        "launch: one pointwise kernel": lambda: small.add_(1),
    }


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 4096])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    world, group = dist.get_world_size(), dist.group.WORLD.group_name
    if rank == 0:
        print(f"{torch.cuda.get_device_name()} x {world}, torch {torch.__version__}, "
              f"NCCL {_nccl_version()}; host µs per call, median of "
              f"{args.rounds} rounds of {args.calls} calls; hidden {args.hidden}, bf16")
    torch.set_grad_enabled(False)
    for rows in args.rows:
        for name, fn in variants(rows, args.hidden, world, group).items():
            plain = host_us(fn, calls=args.calls, rounds=args.rounds)
            profiled = host_us(fn, calls=args.calls, rounds=2, profiled=True)
            if rank == 0:
                print(f"{rows:>5} rows  {name:<40} {plain:8.1f}   under the profiler {profiled:8.1f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
