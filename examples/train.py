"""Train a transformers MoE model with expert parallelism for the experts and data parallelism
(DDP, or FSDP2 with --fsdp) for everything else; AdamW on synthetic next-token data.

    torchrun --nproc-per-node 2 examples/train.py --model qwen3_moe --layers 8 --steps 50 --check
    torchrun --nproc-per-node 2 examples/train.py --device cpu --tiny --steps 3 --check     # CPU, gloo

What a user must do beyond a single-GPU loop (the README's rules):
1. shard the experts before wrapping (``moe_fx.shard_experts``): rank r keeps experts [r*e, (r+1)*e);
2. keep the data-parallel wrapper off them (``moe_fx.expert_parallel_parameters``): DDP's
   parameters to ignore, FSDP2's ``ignored_params``;
3. divide their gradients by the data-parallel size (``moe_fx.average_expert_gradients``): they
   arrive summed over the ranks, DDP averages the rest;
4. let dynamo see whole MoE blocks: ``torch._dynamo.config.optimize_ddp = False`` (DDP's graph
   splitting hands the backend pieces cut at bucket boundaries);
5. call the model the same number of times on every rank (each MoE layer joins collectives).

Rank r trains on its own batches (a pool of ``--data-batches`` fixed random batches, cycled, so the
loss falls as the model memorizes them). ``--check`` trains the unsharded model in one process on the
same data (every step: all ranks' batches as micro-batches) and compares the losses, within what
summation order alone does to this training (the comment at SLACK).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # models.py, and moe_fx of this checkout
import moe_fx  # noqa: E402
from models import MODELS, build_model, parameter_bytes  # noqa: E402

# The tolerance of --check is measured, not guessed. Training amplifies rounding: a router's top-k flips
# where two scores are within a rounding of each other, and Adam divides by sqrt(v), so runs that sum the
# same gradient in other orders drift apart step by step (on CPU in fp32 by 2e-3 within 30 steps). The
# reference trains on the ranks' batches as micro-batches, rank by rank, as DDP with expert parallelism
# does; a second one-process run on the same batches concatenated (the same mean loss and gradient, other
# summation orders) drifts from it by d(s) by step s: what summation order alone does to this model. The
# expert-parallel run sums in other orders again (its own matmuls, the cross-rank sums), so at step s it
# may differ from the reference by SLACK * max d(s' <= s), never less than FLOOR: the first steps drift by
# ~0, and a bf16 run's loss, from bf16 logits, is not resolved below a few bf16 steps (2^-8 each). A real
# gradient bug moves the loss from the first update on, where the allowance is still small.
SLACK, FLOOR = 3.0, {"float32": 1e-4, "bfloat16": 1e-2}


def batch(rank: int, step: int, args, vocab: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 * rank + step % args.data_batches)
    return torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss  # mean next-token cross-entropy over the batch


def train_reference(args, world: int, device, concatenate: bool = False) -> tuple[list[float], torch.nn.Module]:
    """One process, the unsharded model, every step all ranks' batches: as micro-batches (each rank's
    forward and backward in turn, gradients accumulated as loss / N, what DDP with expert parallelism
    computes), or ``concatenate``d into one batch (equal shapes: the same mean loss, other summation orders)."""
    model = build_model(args.model, layers=args.layers, dtype=getattr(torch, args.dtype), device=device, tiny=args.tiny)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for step in range(args.steps):
        batches = [batch(r, step, args, model.config.vocab_size, device) for r in range(world)]
        parts = [torch.cat(batches)] if concatenate else batches
        loss = 0.0
        for ids in parts:
            part = loss_of(model, ids) / len(parts)
            part.backward()
            loss += part.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
    return losses, model


def tolerances(reference: list[float], concatenated: list[float], dtype: str) -> list[float]:
    """Per step: SLACK x the largest drift between the two one-process runs so far, at least FLOOR."""
    out, drift = [], 0.0
    for a, b in zip(concatenated, reference):
        drift = max(drift, abs(a - b) / abs(b))
        out.append(max(SLACK * drift, FLOOR[dtype]))
    return out


def wrap(model, args, device):
    """Experts expert-parallel, the rest data-parallel; returns the module to call."""
    moe_fx.shard_experts(model)
    experts = moe_fx.expert_parallel_parameters(model)
    moe_fx.average_expert_gradients(model)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        ignored = {p for _, p in experts}
        for layer in model.model.layers:
            fully_shard(layer, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
        for layer in model.model.layers:  # inside the layer: FSDP2 has gathered the parameters there
            layer.mlp.compile(backend=moe_fx.backend, fullgraph=True)
        return model
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [n for n, _ in experts])
    torch._dynamo.config.optimize_ddp = False
    model.compile(backend=moe_fx.backend, fullgraph=True)  # in place: parameter names unchanged
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)  # rotary tables: equal on every rank


def train_ep(args, rank: int, world: int, device, log=print) -> tuple[list[float], list[float], torch.nn.Module]:
    """The expert-parallel run; returns the mean loss over ranks per step, step times, the model."""
    model = build_model(args.model, layers=args.layers, dtype=getattr(torch, args.dtype), device=device, tiny=args.tiny)
    model.train()
    before = parameter_bytes(model)
    wrapped = wrap(model, args, device)
    log(f"parameters {before / 2**30:.2f} GiB, {parameter_bytes(model) / 2**30:.2f} GiB after shard_experts (ep {world})")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    losses, times = [], []
    for step in range(args.steps):
        sync()
        start = time.perf_counter()
        loss = loss_of(wrapped, batch(rank, step, args, model.config.vocab_size, device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # for printing: the loss of the whole global batch
        sync()
        times.append(time.perf_counter() - start)
        losses.append(mean.item() / world)
        log(f"step {step}: loss {losses[-1]:.4f}, {times[-1] * 1e3:.0f} ms")
    return losses, times, model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="qwen3_moe")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny widths (CPU); default: the published widths")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP for the non-expert parameters")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--data-batches", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--check", action="store_true", help="compare the losses with one process holding everything")
    args = p.parse_args(argv)

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(args.device, int(os.environ["LOCAL_RANK"])) if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", device_id=device if args.device == "cuda" else None)

    def say(*msg):
        print(f"[rank {rank}]", *msg, flush=True)

    reference = None
    if args.check:  # rank 0 trains the whole model first (twice: the drift d); the others wait
        if rank == 0:
            reference = train_reference(args, world, device)[0]
            concatenated = train_reference(args, world, device, concatenate=True)[0]
            reference = (reference, tolerances(reference, concatenated, args.dtype))
            if args.device == "cuda":
                say(f"reference (one GPU, whole model): peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        box = [reference]
        dist.broadcast_object_list(box, src=0)
        reference, tols = box[0]

    losses, times, _ = train_ep(args, rank, world, device, log=say if rank == 0 else (lambda *_: None))
    steady = times[2:] or times
    say(f"step time {sum(steady) / len(steady) * 1e3:.0f} ms (mean of steps 2..{len(times) - 1})"
        + (f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if args.device == "cuda" else ""))
    failed = False
    if reference is not None and rank == 0:
        diffs = [abs(a - b) / abs(b) for a, b in zip(losses, reference)]
        for step, (a, b, diff, tol) in enumerate(zip(losses, reference, diffs, tols)):
            say(f"check step {step}: loss {a:.5f}, one process {b:.5f}, relative difference {diff:.2e}, tolerance {tol:.2e}"
                + (" FAIL" if diff > tol else ""))
        worst = max(range(len(diffs)), key=lambda s: diffs[s] / tols[s])
        failed = diffs[worst] > tols[worst]
        say(f"check: {'FAIL' if failed else 'PASS'}: closest to its tolerance: step {worst}, relative loss difference "
            f"{diffs[worst]:.2e} against {tols[worst]:.2e} ({SLACK:g} x the largest drift so far between the one-process "
            f"runs on micro-batches and on the concatenated batch, or {FLOOR[args.dtype]:g}); largest difference {max(diffs):.2e}")
    moe_fx.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
