"""Cost of moe_fx::guard per block call on 2 CPU gloo ranks (README "Failure behaviour"): the host
check (every call), the device-side form, and a scalar all-reduce on the EP group for scale.

    PYTHONPATH=. python scripts/guard_cost.py
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PORT = 29617
CALLS = 500


def per_call_us(fn, calls: int = CALLS) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main(rank: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{PORT}")
    import moe_fx.runtime  # noqa: F401  (registers torch.ops.moe_fx)
    from moe_fx.runtime.guard import block_id

    ids = torch.randint(0, 8, (64, 2))
    # block, E, H, K, dtype code, strategy code, capacity, ep, token limit (moe_fx/runtime/guard.py FIELDS)
    fingerprint = [block_id("b"), 8, 64, 2, 0, 2, -1, 2, -1]

    def guard(every_call: bool):
        return lambda: torch.ops.moe_fx.guard(ids, fingerprint, "b", "0", 30000, every_call, True)  # op checks ids

    per_call_us(guard(True), 20)  # warm-up: creates the guard's gloo group
    dist.barrier()
    host, device = per_call_us(guard(True)), per_call_us(guard(False))
    scalar = torch.zeros(1)
    all_reduce = per_call_us(lambda: dist.all_reduce(scalar))
    if rank == 0:
        print(f"guard host check {host:.0f} us, device-side form {device:.0f} us, "
              f"scalar all_reduce on the EP group {all_reduce:.0f} us per call")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(main, nprocs=2)
