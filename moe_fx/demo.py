"""The main job: compile a small MoE model with moe_fx on N CPU (gloo) or CUDA (NCCL) ranks,
show what was rewritten, and check every rank's output against eager.

Every rank builds the same model from the same seed and feeds it its own tokens (rank r gets
``tokens + 5*r`` of them), as a user's data-parallel launch would.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist

# fp32: compared with eager, 1e-5 absolute (the rewrite keeps the traced order of operations).
# bf16: compared with the same model compiled by the same inner compiler without moe_fx, 2e-2 of
# the largest output: inductor alone moves bf16 logits of tiny random models by up to ~11% of their
# maximum relative to eager (router scores within one rounding step pick other experts), so eager
# is no yardstick for the rewrite there. The difference to eager is printed too. tests/tolerances.py
# says the same for the tests.
_TOLERANCE = {torch.float32: (1e-5, "absolute, vs eager"),
              torch.bfloat16: (2e-2, "of max |output|, vs torch.compile without moe_fx")}


def run_demo(args: argparse.Namespace) -> int:
    if "RANK" in os.environ:  # launched by torchrun
        return _rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, args)
    if args.ep == 1:
        return _rank_main(0, 1, None, args)
    import torch.multiprocessing as mp

    port = _free_port()
    ctx = mp.start_processes(_spawned, args=(args.ep, port, args), nprocs=args.ep, start_method="spawn", join=False)
    while not ctx.join():
        pass
    codes = [p.exitcode for p in ctx.processes]
    return max(codes)


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    code = _rank_main(rank, world, port, args)
    if code:
        raise SystemExit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_model(kind: str, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    if kind in ("auto", "mixtral"):
        try:
            import transformers
        except ImportError:
            if kind == "mixtral":
                raise
        else:
            config = transformers.MixtralConfig(
                vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                num_experts_per_tok=2, max_position_embeddings=128, use_cache=False,
                experts_implementation="grouped_mm",
            )
            model = transformers.MixtralForCausalLM(config)
            for p in model.parameters():  # an untrained router routes almost uniformly; spread it
                torch.nn.init.normal_(p, std=0.2)
            return model.to(dtype).eval(), "transformers Mixtral (tiny config, 2 layers)"
    from moe_fx.examples import TinyMoEModel

    return TinyMoEModel().to(dtype).eval(), "built-in plain-PyTorch MoE (2 layers)"


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _rank_main(rank: int, world: int, port: int | None, args: argparse.Namespace) -> int:
    import moe_fx

    device = torch.device(args.device, rank if args.device == "cuda" else None)
    if world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        backend = "nccl" if args.device == "cuda" else "gloo"
        if args.device == "cuda":
            torch.cuda.set_device(device)
        init = f"tcp://127.0.0.1:{port}" if port is not None else "env://"
        dist.init_process_group(backend, rank=rank, world_size=world, init_method=init)
    try:
        dtype = getattr(torch, args.dtype)
        model, description = _build_model(args.model, dtype)
        model = model.to(device)
        generator = torch.Generator().manual_seed(1000 + rank)
        input_ids = torch.randint(0, 128, (1, args.tokens + 5 * rank), generator=generator).to(device)
        if rank == 0:
            print(f"moe_fx demo: {description}, {world} rank(s) over "
                  f"{'NCCL' if args.device == 'cuda' else 'gloo'}, {args.dtype}, lowering={args.lowering}, "
                  f"inner backend {args.inner_backend}\n")
        with torch.no_grad():
            eager = _logits(model(input_ids)).float()
            expected = eager
            if dtype == torch.bfloat16 and args.inner_backend != "eager":
                baseline = torch.compile(model, backend=args.inner_backend, fullgraph=True)
                expected = _logits(baseline(input_ids)).float()
                torch._dynamo.reset()
                if rank == 0:
                    print(f"reference: torch.compile(backend={args.inner_backend!r}) without moe_fx; "
                          f"its max |difference| to eager on rank 0: {(expected - eager).abs().max().item():.3g}\n")
        compiled = torch.compile(model, backend=moe_fx.backend, fullgraph=True)
        settings = dict(lowering=args.lowering, inner_backend=args.inner_backend)
        if args.lowering == "mc2":  # mc2 sizes its buffers from the largest rank's token count
            settings["max_tokens_per_rank"] = args.tokens + 5 * (world - 1)
        with moe_fx.config.patch(**settings):
            if rank == 0:
                print(moe_fx.explain(model, input_ids), "\n")
            with moe_fx.recording() as graphs, torch.no_grad():
                actual = _logits(compiled(input_ids)).float()
        blocks = [b for g in graphs for b in g.report.blocks]
        if not blocks:
            print(f"rank {rank}: FAILED: moe_fx rewrote no MoE block (see the reasons above)")
            return 1
        if rank == 0:
            print(f"rewrote {len(blocks)} MoE block(s); the first, {blocks[0].region.block} "
                  f"({blocks[0].choice.strategy.value}):")
            print("\n".join("    " + line for line in blocks[0].rendering.splitlines()), "\n")
        diff = (actual - expected).abs().max().item()
        scale = expected.abs().max().item()
        tol, kind = _TOLERANCE[dtype]
        bound = tol * scale if kind.startswith("of max") else tol
        row = (rank, input_ids.shape[1], diff, bound, (actual - eager).abs().max().item())
        rows = [None] * world
        if world > 1:
            dist.all_gather_object(rows, row)
        else:
            rows = [row]
        ok = all(r[2] <= r[3] for r in rows)
        if rank == 0:
            for r, tokens, d, b, vs_eager in rows:
                print(f"rank {r}: {tokens} tokens, max |moe_fx - reference| = {d:.3g} "
                      f"(bound {b:.3g}: {tol:g} {kind}); max |moe_fx - eager| = {vs_eager:.3g}")
            print("\nOK: every rank matches its reference" if ok else "\nFAILED: a rank differs from its reference")
        return 0 if ok else 1
    finally:
        if world > 1:
            moe_fx.destroy_process_group()
