"""How much of the bounded AllGather's exchange can hide under the experts' GEMMs, on N GPUs.

    torchrun --nproc-per-node 2 scripts/exchange_overlap.py [--tokens 4096] [--json out.json]

For each layer shape of the EP benchmark and tokens per rank T, one rank's pieces of an ep = N
AllGather layer, timed apart (CUDA-event medians, the slowest rank's):

- "experts ep1": the two grouped matmuls (gate|up, SwiGLU, down) over T*K rows and all E experts
  (what one GPU holding every expert computes), and "experts epN" over the same T*K rows and E/N
  experts (what each rank computes at ep = N with uniform routing);
- the exchange: the all-gather of T rows of H + 16 values (tokens with their routing columns) and
  the reduce-scatter of N*T rows of H partial sums, bf16, through NCCL (c10d functional) and through
  torch's low-contention symmetric-memory collectives (copy engines, ``symm_mem._low_contention_*``);
- each collective issued before the epN experts and awaited after them ("beside"): the exchange's
  exposed cost is beside - experts epN.

The headroom of ep = N over ep1 is experts ep1 - experts epN: an exchange whose exposed cost
exceeds it keeps the layer slower than one GPU, however it is overlapped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives  # noqa: F401  (registers _c10d_functional)
import torch.distributed._symmetric_memory  # noqa: F401  (registers symm_mem's low-contention collectives)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from moe_fx.bench import SHAPES  # noqa: E402

ROUTING_COLUMNS = 16  # ids and weights of K <= 8 slots, as bf16 columns


def median_us(fn, iters: int, warmup: int = 5) -> float:
    """The slowest rank's median over ``iters`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1000 for s, e in zip(starts, ends))
    worst = torch.tensor([times[len(times) // 2]], device="cuda")
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def experts_call(rows: int, hidden: int, intermediate: int, experts: int):
    """The two grouped matmuls of ``experts`` experts over ``rows`` rows spread evenly."""
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    w_up = torch.randn(experts, hidden, 2 * intermediate, device="cuda", dtype=torch.bfloat16) * 0.02
    w_down = torch.randn(experts, intermediate, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    counts = torch.full((experts,), rows // experts, device="cuda", dtype=torch.int32)
    counts[: rows % experts] += 1
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)

    def call():
        h = torch._grouped_mm(x, w_up, offs=offsets)
        gate, up = h.split(intermediate, dim=1)
        return torch._grouped_mm(torch.nn.functional.silu(gate) * up, w_down, offs=offsets)

    return call


def exchanges(tokens: int, hidden: int, world: int, group_name: str) -> dict:
    """Each exchange as a function that issues it and returns what ``wait_tensor`` takes."""
    c10d, symm = torch.ops._c10d_functional, torch.ops.symm_mem
    gather_in = torch.randn(tokens, hidden + ROUTING_COLUMNS, device="cuda", dtype=torch.bfloat16)
    scatter_in = torch.randn(world * tokens, hidden, device="cuda", dtype=torch.bfloat16)
    return {
        "all-gather NCCL": lambda: c10d.all_gather_into_tensor(gather_in, world, group_name),
        "reduce-scatter NCCL": lambda: c10d.reduce_scatter_tensor(scatter_in, "sum", world, group_name),
        "all-gather copy engine": lambda: symm._low_contention_all_gather(gather_in, group_name),
        "reduce-scatter copy engine": lambda: symm._low_contention_reduce_scatter(scatter_in, "sum", group_name),
    }


def measure(shape, tokens: int, world: int, group_name: str, iters: int) -> dict:
    rows = tokens * shape.top_k
    ep1 = experts_call(rows, shape.hidden, shape.intermediate, shape.num_experts)
    epn = experts_call(rows, shape.hidden, shape.intermediate, shape.num_experts // world)
    row = {"shape": shape.name, "tokens": tokens, "experts ep1": median_us(ep1, iters),
           "experts epN": median_us(epn, iters)}
    wait = torch.ops._c10d_functional.wait_tensor
    for name, issue in exchanges(tokens, shape.hidden, world, group_name).items():
        row[name] = median_us(lambda: wait(issue()), iters)

        def beside(issue=issue):
            issued = issue()
            out = epn()
            return wait(issued), out

        row[name + " beside"] = median_us(beside, iters)
    del ep1, epn
    torch.cuda.empty_cache()
    return row


def table(rows: list[dict], world: int) -> str:
    lines = [f"| shape | tokens/rank | experts ep1 | experts ep{world} | headroom | exchange | alone | "
             f"beside experts | exposed | hidden share |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        headroom = row["experts ep1"] - row["experts epN"]
        for name in ("all-gather NCCL", "reduce-scatter NCCL", "all-gather copy engine", "reduce-scatter copy engine"):
            alone, exposed = row[name], row[name + " beside"] - row["experts epN"]
            lines.append(f"| {row['shape']} | {row['tokens']} | {row['experts ep1']:.0f} | {row['experts epN']:.0f} | "
                         f"{headroom:.0f} | {name} | {alone:.0f} | {row[name + ' beside']:.0f} | {exposed:.0f} | "
                         f"{1 - exposed / alone:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["deepseek_v3", "gpt_oss", "qwen3"], choices=sorted(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--json", help="also write the rows to this file (rank 0)")
    args = parser.parse_args()
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    world, group_name = dist.get_world_size(), dist.group.WORLD.group_name
    try:
        rows = [measure(SHAPES[key], tokens, world, group_name, args.iters)
                for key in args.shapes for tokens in args.tokens]
        if dist.get_rank() == 0:
            print(f"{world} x {torch.cuda.get_device_name()}, torch {torch.__version__}, "
                  f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}; µs, the slowest rank's median of {args.iters}")
            print(table(rows, world))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
