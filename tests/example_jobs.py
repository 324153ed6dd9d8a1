"""Per-rank jobs running the code of examples/generate.py and examples/train.py on gloo ranks
(tests/dist_pool.py), against the unsharded model in one process."""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch._dynamo.utils import counters

import moe_fx
from tests.ep_jobs import build_plain

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import generate as gen_example  # noqa: E402
import train as train_example  # noqa: E402
from models import build_model  # noqa: E402


def generate_case(*, rank: int = 0, world_size: int = 1, model: str, static_cache: bool) -> dict:
    """Rank r serves rounds - r batches of its own shape (rank 1 finishes early and feeds a dummy
    batch); the sharded, compiled model's tokens against the unsharded eager model's, per batch."""
    torch.set_num_threads(1)
    args = argparse.Namespace(rounds=2, batch=3, prompt_len=6, new_tokens=4, static_cache=static_cache)
    net = build_model(model, layers=2, dtype=torch.float32, device="cpu", tiny=True).eval()
    batches = gen_example.prompts(rank, args, net.config.vocab_size, "cpu")
    with torch.no_grad():
        expected = [gen_example.generate(net, ids, args) for ids in batches]
    moe_fx.shard_experts(net)
    decode = max(gen_example.workload(r, args)[1] for r in range(world_size))
    with moe_fx.config.patch(inner_backend="eager"):
        gen_example.compile_for_generate(net, "moe_fx", decode_tokens=decode, static_cache=static_cache)
        counters.clear()
        with moe_fx.recording() as graphs:
            got, tokens = gen_example.serve(net, batches, args.rounds, args)
    return {
        "batches": len(batches), "shapes": [tuple(ids.shape) for ids in batches], "tokens": tokens,
        "equal": [torch.equal(a, b) for a, b in zip(got, expected)],
        "graphs": len(graphs), "dynamo_graphs": counters["stats"]["unique_graphs"],
        "lowerings": [sorted({b.choice.strategy.value for b in g.report.blocks}) for g in graphs],
    }


def _args(**kw) -> argparse.Namespace:
    base = dict(model="qwen3_moe", layers=1, dtype="float32", tiny=True, fsdp=False, steps=3, batch=2, seq=12,
                data_batches=4, lr=1e-2)
    return argparse.Namespace(**{**base, **kw})


def grad_case(*, rank: int = 0, world_size: int = 1, fsdp: bool = False) -> dict:
    """One backward of the wrapped expert-parallel model against one process on the concatenated
    batch: every gradient must equal the single process's (expert ones: its rows of this rank)."""
    torch.set_num_threads(1)
    args = _args(fsdp=fsdp)
    device = torch.device("cpu")
    full = build_model(args.model, layers=args.layers, dtype=torch.float32, device=device, tiny=True).train()
    ids = [train_example.batch(r, 0, args, full.config.vocab_size, device) for r in range(world_size)]
    train_example.loss_of(full, torch.cat(ids)).backward()
    model = build_model(args.model, layers=args.layers, dtype=torch.float32, device=device, tiny=True).train()
    with moe_fx.config.patch(inner_backend="aot_eager"):
        wrapped = train_example.wrap(model, args, device)
        train_example.loss_of(wrapped, ids[rank]).backward()
    ref = dict(full.named_parameters())
    diffs, experts = {}, dict(moe_fx.expert_parallel_parameters(model))
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        want = ref[name].grad
        if name in experts:
            shard = experts[name]._moe_fx_expert_shard
            want = want[shard.start:shard.stop]
        diffs[name] = ((grad - want).abs().max() / want.abs().max()).item()
    return {"diffs": diffs, "experts": sorted(experts)}


def train_case(*, rank: int = 0, world_size: int = 1, fsdp: bool = False) -> dict:
    """examples/train.py's expert-parallel loop for 3 AdamW steps against its one-process reference:
    losses and every parameter after the last step (expert ones: this rank's rows), the largest
    difference relative to the parameter's largest entry."""
    torch.set_num_threads(1)
    args = _args(fsdp=fsdp)
    device = torch.device("cpu")
    ref_losses, ref = train_example.train_reference(args, world_size, device)
    with moe_fx.config.patch(inner_backend="aot_eager"):
        losses, _, model = train_example.train_ep(args, rank, world_size, device, log=lambda *_: None)
    ref_params = dict(ref.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        want = ref_params[name]
        shard = getattr(p, "_moe_fx_expert_shard", None)
        if shard is not None:
            want = want[shard.start:shard.stop]
        worst = max(worst, ((value - want).abs().max() / want.abs().max()).item())
    return {"losses": losses, "ref_losses": ref_losses, "param_diff": worst}


def empty_rank_case(*, rank: int = 0, world_size: int = 1, lowering: str, form: str) -> dict:
    """Rank 1 feeds 0 tokens to a compiled MoE block while rank 0 feeds 5: the output on rank 0
    against eager, or the error (as text) each rank saw. ``form``: "plain" (tests' BatchedMoE) or
    "hf" (the tiny transformers Qwen3-MoE, a [0, 5] batch of ids on rank 1)."""
    torch.set_num_threads(1)
    if form == "plain":
        model = build_plain("batched", hidden=16, intermediate=8, num_experts=4, top_k=2, dtype="float32")
        x = torch.randn(5 if rank == 0 else 0, 16, generator=torch.Generator().manual_seed(rank))
    elif form == "hf_block":
        model = build_model("qwen3_moe", layers=1, dtype=torch.float32, device="cpu", tiny=True).model.layers[0].mlp
        x = torch.randn(1, 5 if rank == 0 else 0, 64, generator=torch.Generator().manual_seed(rank))
    else:
        model = build_model("qwen3_moe", layers=1, dtype=torch.float32, device="cpu", tiny=True).eval()
        x = torch.randint(0, 128, (1 if rank == 0 else 0, 5), generator=torch.Generator().manual_seed(rank))
    logits = lambda out: out.logits if hasattr(out, "logits") else out  # noqa: E731
    with torch.no_grad():
        ref = logits(model(x)) if form == "hf_block" or rank == 0 else None  # 0 rows may fail in the model's own code
    torch._dynamo.reset()
    settings = {"lowering": lowering, "inner_backend": "eager"}
    if lowering == "mc2":
        settings["max_tokens_per_rank"] = 5
    try:
        with moe_fx.config.patch(**settings), torch.no_grad():
            out = logits(torch.compile(model, backend=moe_fx.backend, fullgraph=True)(x))
    except Exception as exc:  # reported as found
        return {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}
    diff = (out - ref).abs().max().item() if ref is not None and ref.numel() else None
    return {"shape": tuple(out.shape), "diff": diff}
