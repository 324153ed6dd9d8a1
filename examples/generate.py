"""Serve a transformers MoE model with expert parallelism: every rank its own prompts, greedy
generate(), experts sharded over the ranks and exchanged by moe_fx.

    torchrun --nproc-per-node 2 examples/generate.py --model qwen3_moe --layers 8 --check
    torchrun --nproc-per-node 2 examples/generate.py --model qwen3_moe --layers 8 --static-cache
    python examples/generate.py --model qwen3_moe --layers 8 --backend inductor --workloads 2   # one GPU, no moe_fx
    torchrun --nproc-per-node 2 examples/generate.py --device cpu --tiny --check                # CPU, gloo

Rank r serves ``rounds - r`` batches of ``batch - r`` prompts of ``prompt_len * (2 + r) / 2`` tokens
(ranks differ in batch, length and how long they have work). The lockstep rule: every MoE layer
joins collectives with the other ranks, so every rank must call the model as often as the others.
Here every generate() runs exactly ``new_tokens`` forward calls (EOS disabled), and a rank whose
batches are done runs a dummy batch of its usual shape until the others finish.

Prefill and decode are compiled under different moe_fx settings (read when a graph is compiled):
prefill with no token bound (``"auto"`` picks AllGather or the run-time switch), decode with
``max_tokens_per_rank`` = the largest decode batch, so ``"auto"`` picks a static-shape strategy
(AllGather at ep <= top-k, else MC2: no host sync) and, with ``--static-cache``, inductor captures the decode step in a CUDA graph.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # models.py, and moe_fx of this checkout
import moe_fx  # noqa: E402
from models import MODELS, build_model, parameter_bytes  # noqa: E402


def workload(rank: int, args) -> tuple[int, int, int]:
    """(batches, batch size, prompt length) of serving rank ``rank``."""
    return max(1, args.rounds - rank), max(1, args.batch - rank), args.prompt_len * (2 + rank) // 2


def prompts(rank: int, args, vocab: int, device) -> list[torch.Tensor]:
    n, batch, length = workload(rank, args)
    gen = torch.Generator().manual_seed(1000 + rank)
    return [torch.randint(0, vocab, (batch, length), generator=gen).to(device) for _ in range(n)]


def compile_for_generate(model, backend: str, *, decode_tokens: int, static_cache: bool) -> None:
    """Compile ``model.forward`` in place; one-token calls (decode) compile under the decode settings."""
    if backend == "inductor":  # the baseline: no moe_fx
        mode = "reduce-overhead" if static_cache else None
        model.forward = torch.compile(model.forward, mode=mode, fullgraph=True)
        return
    compiled = torch.compile(model.forward, backend=moe_fx.backend, fullgraph=True)
    decode = {"max_tokens_per_rank": decode_tokens}
    if static_cache:
        decode["inner_mode"] = "reduce-overhead"

    @functools.wraps(model.forward)  # generate() reads the signature (logits_to_keep)
    def forward(*args, **kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        with moe_fx.config.patch(**(decode if ids.shape[1] == 1 else {})):
            return compiled(*args, **kwargs)

    model.forward = forward


def generate(model, ids: torch.Tensor, args, *, logits: bool = False):
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
        do_sample=False, cache_implementation="static" if args.static_cache else None, disable_compile=True,
        return_dict_in_generate=True, output_logits=logits,
    )
    new = out.sequences[:, ids.shape[1]:]
    return (new, torch.stack(out.logits, 1).float()) if logits else new


def serve(model, batches: list[torch.Tensor], rounds: int, args) -> tuple[list[torch.Tensor], int]:
    """Generate for ``batches``; then dummy batches up to ``rounds`` calls (the lockstep rule).
    Returns the outputs of the real batches and the number of tokens they generated."""
    outs = []
    for i in range(rounds):
        out = generate(model, batches[min(i, len(batches) - 1)], args)  # past the end: a dummy, same shape
        if i < len(batches):
            outs.append(out)
    return outs, sum(o.numel() for o in outs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def reference(model, batches, args) -> dict:
    """Tokens and per-step logits of the unsharded eager model, and bf16's own error on this model:
    the first step's logits against the same weights in fp32 (the yardstick of the tolerance)."""
    runs = [generate(model, ids, args, logits=True) for ids in batches]
    with torch.no_grad():
        dtype = next(model.parameters()).dtype
        model.float()  # bf16 -> fp32 -> bf16 is exact: the weights come back unchanged
        exact = [model(ids, logits_to_keep=1).logits[:, -1].float() for ids in batches]
        model.to(dtype)
    # per row, as compare() measures each row: a batch's error averages its rows' and is smaller
    noise = max(rel_err(run[1][row, 0], e[row]) for run, e in zip(runs, exact) for row in range(e.shape[0]))
    return {"runs": runs, "noise": noise}


def compare(model, batches, ref: dict, rounds: int, args) -> dict:
    """This rank's tokens and logits against the reference: logits within the tolerance at every step up
    to each row's first differing token (after it the prefixes differ and nothing is comparable)."""
    # fp32 has no error of its own against fp32: the floor is summation order (real widths, 8 layers:
    # 2.1e-5 on Mixtral-8x7B with every token equal on 2 x H200)
    tol = max(4 * ref["noise"], 1e-4 if args.dtype == "float32" else 1e-5)
    worst, same_rows, rows, diverged = 0.0, 0, 0, []
    runs = [generate(model, batches[min(i, len(batches) - 1)], args, logits=True) for i in range(rounds)]
    for ids, (tokens, logits), (ref_tokens, ref_logits) in zip(batches, runs, ref["runs"]):
        for row in range(ids.shape[0]):
            differ = (tokens[row] != ref_tokens[row]).nonzero()
            last = differ[0, 0].item() if len(differ) else args.new_tokens - 1
            worst = max([worst] + [rel_err(logits[row, s], ref_logits[row, s]) for s in range(last + 1)])
            rows += 1
            same_rows += not len(differ)
            diverged += [last] if len(differ) else []
    return {"tol": tol, "worst": worst, "rows": rows, "same_rows": same_rows, "diverged_at": diverged,
            "ok": worst <= tol and (same_rows == rows or args.dtype != "float32")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="qwen3_moe")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny widths (CPU); default: the published widths")
    p.add_argument("--backend", choices=("moe_fx", "inductor"), default="moe_fx",
                   help="inductor: the unsharded model compiled without moe_fx (run as one process)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workloads", type=int, default=None,
                   help="serve the workloads of this many ranks in one process (the one-GPU baseline)")
    p.add_argument("--static-cache", action="store_true", help="static KV cache; decode in CUDA graphs")
    p.add_argument("--check", action="store_true", help="compare with the unsharded model in eager mode")
    args = p.parse_args(argv)

    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1)) if distributed else 1
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", device_id=device if args.device == "cuda" else None)
    if args.backend == "inductor" and world > 1:
        raise SystemExit("--backend inductor is the one-process baseline: run it without torchrun")
    dtype = getattr(torch, args.dtype)

    def say(*msg):
        print(f"[rank {rank}]", *msg, flush=True)

    model = build_model(args.model, layers=args.layers, dtype=dtype, device=device, tiny=args.tiny)
    model.eval()
    served = range(args.workloads or world) if world == 1 else [rank]
    batches = {r: prompts(r, args, model.config.vocab_size, device) for r in served}
    rounds = max(workload(r, args)[0] for r in range(args.workloads or world))
    decode_tokens = max(workload(r, args)[1] for r in range(args.workloads or world))  # same on every rank
    refs = {r: reference(model, batches[r], args) for r in served} if args.check else None

    before = parameter_bytes(model)
    if args.backend == "moe_fx":
        moe_fx.shard_experts(model)
    say(f"{args.model}, {args.layers} layers, {args.dtype}: parameters {before / 2**30:.2f} GiB, "
        + (f"{parameter_bytes(model) / 2**30:.2f} GiB after shard_experts (ep {world})" if args.backend == "moe_fx" else "not sharded"))
    compile_for_generate(model, args.backend, decode_tokens=decode_tokens, static_cache=args.static_cache)

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    counters.clear()
    with moe_fx.recording() as graphs:
        for r in served:  # warm-up: compiles prefill and decode (one round of each workload)
            generate(model, batches[r][0], args)
        warm_graphs = len(graphs)
        sync()
        start, tokens = time.perf_counter(), 0
        for r in served:
            tokens += serve(model, batches[r], rounds, args)[1]
        sync()
        seconds = time.perf_counter() - start
    strategies = sorted({b.choice.strategy.value for g in graphs for b in g.report.blocks})
    say(f"workload {[workload(r, args) for r in served]} (batches, batch, prompt length): {tokens} tokens in "
        f"{seconds:.2f} s = {tokens / seconds:.1f} tokens/s; graphs compiled: {counters['stats']['unique_graphs']} "
        f"by dynamo, {warm_graphs} by moe_fx in warm-up + {len(graphs) - warm_graphs} later; MoE lowerings {strategies}")
    if args.device == "cuda":
        say(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    if distributed:
        total = torch.tensor([tokens / seconds], device=device)
        dist.all_reduce(total)
        if rank == 0:
            say(f"all ranks: {total.item():.1f} tokens/s")

    failed = 0
    if args.check:
        for r in served:
            res = compare(model, batches[r], refs[r], rounds, args)
            failed += not res["ok"]
            say(f"check workload {r}: {'PASS' if res['ok'] else 'FAIL'}: logits rel. L2 error {res['worst']:.2e} "
                f"(tolerance {res['tol']:.2e} = 4 x this dtype's own error vs fp32, {refs[r]['noise']:.2e}); "
                f"{res['same_rows']}/{res['rows']} rows generate the reference's tokens, "
                f"the others first differ at steps {res['diverged_at']}")
    if distributed:
        moe_fx.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
