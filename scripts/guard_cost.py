"""Cost of moe_fx::guard per block call on 2 CPU gloo ranks (README "Failure behaviour"): the host
check (every_call), the device-side form, and a scalar all-reduce on the EP group for scale.
Usage: PYTHONPATH=. python scripts/guard_cost.py"""
import os, sys, time
import torch, torch.distributed as dist
import torch.multiprocessing as mp

def main(rank, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    import moe_fx.runtime  # noqa
    from moe_fx.runtime.guard import block_id
    ids = torch.randint(0, 8, (64, 2))
    fp = [block_id("b"), 8, 64, 2, 0, 2, -1, 2, -1]
    op = torch.ops.moe_fx.guard
    for _ in range(20): op(ids, fp, "b", "0", 30000, True)
    dist.barrier()
    n = 500
    t = time.perf_counter()
    for _ in range(n): op(ids, fp, "b", "0", 30000, True)
    host = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n): op(ids, fp, "b", "0", 30000, False)
    dev = (time.perf_counter() - t) / n
    x = torch.zeros(1)
    t = time.perf_counter()
    for _ in range(n): dist.all_reduce(x)
    ar = (time.perf_counter() - t) / n
    if rank == 0: print(f"guard host-mode {host*1e6:.0f} us, device-mode {dev*1e6:.0f} us, scalar all_reduce on EP group {ar*1e6:.0f} us")
    dist.destroy_process_group()

if __name__ == "__main__":
    port = 29617
    mp.spawn(main, args=(port,), nprocs=2)
