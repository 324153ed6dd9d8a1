"""Functions the tests run on every rank of a gloo group (tests/dist_pool.py), or in-process for
ep == 1. Each returns plain data (floats, strings) for the test to assert on."""

from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

import moe_fx
from tests.moe_modules import BatchedMoE, GroupedMoE
from tests.tiny_models import build_tiny, experts_modules, make_input_ids

# Uneven token counts per rank: the EP lowerings must not assume equal sizes.
TOKENS_PER_RANK = (7, 12, 3, 9)


def rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def zero_foreign_experts(model: torch.nn.Module, num_experts: int, ep: tuple[int, int] | None = None) -> int:
    """Zero every expert weight this rank does not own (``ep`` = (EP rank, EP size), default: the
    world); returns how many tensors were touched."""
    rank, world = ep or rank_and_size()
    per_rank = num_experts // world
    touched = 0
    with torch.no_grad():
        for _, experts in experts_modules(model) if hasattr(model, "model") else [("", model)]:
            for name, p in experts.named_parameters(recurse=False):
                if p.shape[0] == num_experts and not name.startswith("router"):
                    foreign = torch.ones(num_experts, dtype=torch.bool)
                    foreign[rank * per_rank : (rank + 1) * per_rank] = False
                    p[foreign] = 0
                    touched += 1
    return touched


def _compile_and_run(model, args, *, lowering: str, inner: str, config_patch: dict | None = None):
    torch._dynamo.reset()
    settings = {"lowering": lowering, "inner_backend": inner, **(config_patch or {})}
    with moe_fx.config.patch(**settings), moe_fx.recording() as graphs, torch.no_grad():
        out = torch.compile(model, backend=moe_fx.backend, fullgraph=True)(*args)
    out = out.logits if hasattr(out, "logits") else out
    blocks = [(b.region.block, b.choice.strategy.value) for g in graphs for b in g.report.blocks]
    misses = [m.reason for g in graphs for m in g.report.misses]
    return out.float(), blocks, misses


def _diff(out: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"diff": (out - ref).abs().max().item(), "scale": ref.abs().max().item()}


def hf_model_case(*, rank: int = 0, world_size: int = 1, key: str, impl: str, dtype: str,
                  lowerings: tuple[str, ...], inner: str = "aot_eager", config_patch: dict | None = None) -> dict:
    """A tiny transformers model on this rank's tokens: eager (before zeroing foreign experts)
    versus moe_fx for each lowering (after zeroing them, so only local experts can contribute)."""
    torch.set_num_threads(1) if world_size > 1 else None
    model = build_tiny(key, experts_implementation=impl, dtype=getattr(torch, dtype))
    ids = make_input_ids(TOKENS_PER_RANK[rank], seed=100 + rank)
    with torch.no_grad():
        ref = model(ids).logits.float()
    compiled_ref = None
    if inner == "inductor" and dtype == "bfloat16":
        torch._dynamo.reset()
        with torch.no_grad():
            compiled_ref = torch.compile(model, backend="inductor", fullgraph=True)(ids).logits.float()
    touched = zero_foreign_experts(model, 8) if world_size > 1 else 0
    results = {"touched": touched, "tokens": ids.shape[1]}
    for lowering in lowerings:
        out, blocks, misses = _compile_and_run(model, (ids,), lowering=lowering, inner=inner, config_patch=config_patch)
        results[lowering] = {**_diff(out, ref), "blocks": blocks, "misses": misses}
        if compiled_ref is not None:
            results[lowering]["vs_compiled"] = _diff(out, compiled_ref)
    return results


def build_plain(kind: str, *, hidden: int, intermediate: int, num_experts: int, top_k: int,
                dtype: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = {"batched": BatchedMoE, "grouped": GroupedMoE}[kind]
    return cls(hidden, intermediate, num_experts, top_k, **kw).to(getattr(torch, dtype))


def plain_case(*, rank: int = 0, world_size: int = 1, kind: str = "batched", hidden: int = 16,
               intermediate: int = 8, num_experts: int = 4, top_k: int = 2, dtype: str = "float32",
               tokens: tuple[int, ...] = (5, 6, 7, 8), routing: str = "router", skew: float = 0.0,
               lowerings: tuple[str, ...] = ("allgather", "all2allv"), inner: str = "eager",
               module_kw: dict | None = None, seed: int = 0, config_patch: dict | None = None) -> dict:
    """A plain-PyTorch MoE on this rank's tokens, with the router's routing or a forced one:
    "foreign" (every token to the next rank's experts), "one_expert" (every token to expert 0)."""
    model = build_plain(kind, hidden=hidden, intermediate=intermediate, num_experts=num_experts,
                        top_k=top_k, dtype=dtype, seed=seed, skew=skew, **(module_kw or {}))
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    t = tokens[rank]
    x = torch.randn(t, hidden, generator=gen).to(getattr(torch, dtype))
    args: tuple = (x,)
    if routing != "router":
        per_rank = num_experts // world_size
        if routing == "foreign":
            first = ((rank + 1) % world_size) * per_rank
            choices = torch.stack([torch.randperm(per_rank, generator=gen)[:top_k] for _ in range(t)]) + first
        elif routing == "one_expert":
            choices = torch.zeros(t, top_k, dtype=torch.int64) + torch.arange(top_k)
        else:
            raise ValueError(routing)
        weights = torch.rand(t, top_k, generator=gen)
        args = (x, choices, (weights / weights.sum(-1, keepdim=True)).float())
    with torch.no_grad():
        ref = model(*args).float()
    if world_size > 1:
        zero_foreign_experts(model, num_experts)
    results = {}
    for lowering in lowerings:
        try:
            out, blocks, misses = _compile_and_run(model, args, lowering=lowering, inner=inner,
                                                   config_patch=config_patch)
        except Exception as exc:  # the test asserts on the message
            results[lowering] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        results[lowering] = {**_diff(out, ref), "blocks": blocks, "misses": misses}
    return results


def render_case(*, rank: int = 0, world_size: int = 1, key: str, impl: str, dtype: str, lowering: str,
                config_patch: dict | None = None) -> str:
    """The normalized rendering of the first rewritten region (for expecttest snapshots)."""
    model = build_tiny(key, experts_implementation=impl, dtype=getattr(torch, dtype))
    ids = make_input_ids(TOKENS_PER_RANK[rank], seed=100 + rank)
    torch._dynamo.reset()
    settings = {"lowering": lowering, "inner_backend": "eager", **(config_patch or {})}
    with moe_fx.config.patch(**settings), moe_fx.recording() as graphs, torch.no_grad():
        torch.compile(model, backend=moe_fx.backend, fullgraph=True)(ids)
    return _stable_group_names(graphs[0].report.blocks[0].rendering)


def _stable_group_names(rendering: str) -> str:
    """moe_fx's own groups (comm.timed_sibling) are named by c10d in creation order: shown as
    ``moe_fx(<EP group's name>)``."""
    from moe_fx.runtime.comm import own_group_parents

    for name, parent in own_group_parents().items():
        rendering = rendering.replace(repr(name), repr(f"moe_fx({parent})"))
    return rendering


def grad_case(*, rank: int = 0, world_size: int = 1, lowering: str, hidden: int = 16,
              intermediate: int = 8, num_experts: int = 4, top_k: int = 2, tokens=(6, 9, 4, 7),
              config_patch: dict | None = None) -> dict:
    """A backward pass through the rewritten graph (training): input and router gradients equal
    eager's on this rank; each local expert's weight gradient equals the sum over ranks of eager's
    (its rows now come from every rank, as data parallelism would all-reduce them); foreign
    experts get none."""
    import copy

    model = build_plain("batched", hidden=hidden, intermediate=intermediate, num_experts=num_experts,
                        top_k=top_k, dtype="float32", bias=True)
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens[rank], hidden, generator=gen)
    probe = torch.randn(tokens[rank], hidden, generator=gen)

    def grads(module, fn):
        xi = x.clone().requires_grad_(True)
        (fn(xi) * probe).sum().backward()
        return xi.grad, {n: p.grad.clone() for n, p in module.named_parameters()}

    if x.shape[0]:
        ref_x, ref = grads(model, model)
    else:  # no tokens on this rank: eager's gradients are all zero (its own code may not take 0 rows)
        ref_x, ref = torch.zeros_like(x), {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    torch._dynamo.reset()
    counters.clear()
    settings = {"lowering": lowering, "inner_backend": "aot_eager", **(config_patch or {})}
    with moe_fx.config.patch(**settings), moe_fx.recording() as graphs:
        compiled = torch.compile(twin, backend=moe_fx.backend, fullgraph=True)
        got_x, got = grads(twin, compiled)
    per_rank = num_experts // world_size
    local = slice(rank * per_rank, (rank + 1) * per_rank)
    out = {"blocks": [b.choice.strategy.value for g in graphs for b in g.report.blocks],
           "x": (got_x - ref_x).abs().max().item() if x.shape[0] else 0.0}
    if lowering == "mc2|all2allv":  # which branch the run-time switch took
        out["ran"] = sorted(k.removeprefix("ran_") for k, n in counters["moe_fx"].items() if k.startswith("ran_") and n)
    for name, g_ref in ref.items():
        if g_ref.shape[0] == num_experts and not name.startswith("router"):
            summed = g_ref.clone()
            if world_size > 1:
                dist.all_reduce(summed)
            out[name] = max((got[name][local] - summed[local]).abs().max().item(),
                            got[name][torch.arange(num_experts) // per_rank != rank].abs().max().item()
                            if world_size > 1 else 0.0)
        else:
            out[name] = (got[name] - g_ref).abs().max().item()
    return out


def explain_case(*, rank: int = 0, world_size: int = 1, config_patch: dict | None = None) -> list[tuple]:
    """explain() on this rank (no collective is issued): (block, local experts, lowering, reason)."""
    model = build_tiny("qwen3_moe", num_hidden_layers=2)
    with moe_fx.config.patch(**(config_patch or {})):
        report = moe_fx.explain(model, make_input_ids(TOKENS_PER_RANK[rank], seed=rank))
    return [(b.block, b.local_experts, b.lowering, b.reason) for b in report.blocks]


def dynamic_case(*, rank: int = 0, world_size: int = 1, lowering: str, inner: str = "aot_eager",
                 sizes=((5, 9, 13), (8, 3, 11)), config_patch: dict | None = None) -> dict:
    """One compiled model fed three token counts per rank: dynamo's automatic dynamic shapes
    recompile once with a symbolic T; the rewrite must not specialize on it again."""
    model = build_tiny("mixtral")
    torch._dynamo.reset()
    diffs = []
    settings = {"lowering": lowering, "inner_backend": inner, **(config_patch or {})}
    with moe_fx.config.patch(**settings), moe_fx.recording() as graphs, torch.no_grad():
        compiled = torch.compile(model, backend=moe_fx.backend, fullgraph=True)
        for t in sizes[rank % len(sizes)]:
            ids = make_input_ids(t, seed=t)
            diffs.append((compiled(ids).logits - model(ids).logits).abs().max().item())
    return {"diffs": diffs, "graphs": len(graphs), "blocks": [len(g.report.blocks) for g in graphs]}


def two_layer_override_case(*, rank: int = 0, world_size: int = 1) -> dict:
    model = build_tiny("qwen3_moe", num_hidden_layers=2)
    ids = make_input_ids(TOKENS_PER_RANK[rank], seed=rank)
    with torch.no_grad():
        ref = model(ids).logits
    zero_foreign_experts(model, 8)
    torch._dynamo.reset()
    overrides = {"model.layers.0.*": "mc2", "model.layers.1.*": "all2allv"}
    with moe_fx.config.patch(lowering_overrides=overrides, max_tokens_per_rank=16, inner_backend="aot_eager"), \
            moe_fx.recording() as graphs, torch.no_grad():
        out = torch.compile(model, backend=moe_fx.backend, fullgraph=True)(ids).logits
    return {"graphs": len(graphs), "diff": (out - ref).abs().max().item(),
            "blocks": [(b.region.block, b.choice.strategy.value) for g in graphs for b in g.report.blocks]}


def replicated_case(*, rank: int = 0, world_size: int = 1, num_tokens: int, lowerings: tuple[str, ...]) -> dict:
    """tokens="replicated": every rank holds the same tokens and must get eager's full output."""
    model = build_tiny("mixtral")
    ids = make_input_ids(num_tokens, seed=7)  # the same on every rank
    with torch.no_grad():
        ref = model(ids).logits.float()
    zero_foreign_experts(model, 8)
    results = {}
    for lowering in lowerings:
        out, blocks, misses = _compile_and_run(
            model, (ids,), lowering=lowering, inner="aot_eager",
            config_patch={"tokens": "replicated", "max_tokens_per_rank": 16},
        )
        results[lowering] = {**_diff(out, ref), "blocks": blocks, "misses": misses}
    return results


def token_sweep_case(*, rank: int = 0, world_size: int = 1, sweep: tuple[int, ...], capacity: int,
                     inner: str = "aot_eager") -> dict:
    """torch.compile(dynamic=True) of a top-1 MoE (ep > top_k and no token bound: "auto" emits the
    mc2|all2allv switch), fed max(1, t - rank) tokens for each t of ``sweep``. Per call: the
    difference to eager and the branch that ran (counters["moe_fx"]["ran_*"])."""
    from torch._dynamo.utils import counters

    model = build_plain("batched", hidden=16, intermediate=8, num_experts=8, top_k=1, dtype="float32")
    gen = torch.Generator().manual_seed(rank)
    inputs = [torch.randn(max(1, t - rank), 16, generator=gen) for t in sweep]
    with torch.no_grad():
        refs = [model(x) for x in inputs]
    zero_foreign_experts(model, 8)
    torch._dynamo.reset()
    counters.clear()
    steps = []
    with moe_fx.config.patch(inner_backend=inner, auto_mc2_max_tokens=capacity), moe_fx.recording() as graphs, \
            torch.no_grad():
        compiled = torch.compile(model, backend=moe_fx.backend, fullgraph=True, dynamic=True)
        for x, ref in zip(inputs, refs):
            before = {k: counters["moe_fx"][k] for k in ("ran_mc2", "ran_all2allv")}
            diff = (compiled(x) - ref).abs().max().item()
            ran = [k.removeprefix("ran_") for k, n in before.items() if counters["moe_fx"][k] > n]
            steps.append({"tokens": x.shape[0], "ran": ran, "diff": diff})
    return {"steps": steps, "graphs": len(graphs), "unique_graphs": counters["stats"]["unique_graphs"],
            "blocks": [b.choice.strategy.value for g in graphs for b in g.report.blocks],
            "reason": graphs[0].report.blocks[0].choice.reason}


def tp_ep_case(*, rank: int = 0, world_size: int = 4, experts_over: str, lowerings: tuple[str, ...],
               num_tokens: int = 7) -> dict:
    """4 ranks, tokens replicated within the TP pairs {0, 1} and {2, 3} (each pair its own tokens),
    experts split over all 4 ranks (``experts_over="world"``) or over the EP pairs {0, 2} and {1, 3}
    (``"pairs"``). Each rank must get eager's output on its pair's tokens."""
    tp_pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    ep_pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    try:
        tp = tp_pairs[rank // 2]
        ep_group, ep = (None, (rank, 4)) if experts_over == "world" else (ep_pairs[rank % 2].group_name, (rank // 2, 2))
        model = build_tiny("mixtral")
        ids = make_input_ids(num_tokens + rank // 2, seed=7 + rank // 2)  # the same within a TP pair
        with torch.no_grad():
            ref = model(ids).logits.float()
        zero_foreign_experts(model, 8, ep)
        patch = {"tokens": "replicated", "tp_group": tp.group_name, "ep_group": ep_group, "max_tokens_per_rank": 16}
        results = {}
        for lowering in lowerings:
            out, blocks, misses = _compile_and_run(model, (ids,), lowering=lowering, inner="eager", config_patch=patch)
            results[lowering] = {**_diff(out, ref), "blocks": blocks, "misses": misses}
        return results
    finally:
        for group in tp_pairs + ep_pairs:
            dist.destroy_process_group(group)


def symm_mem_case(*, rank: int = 0, world_size: int = 1, job: str = "plain_case", emulate: bool = True,
                  **kwargs) -> dict:
    """``job`` with MC2 over the symmetric-memory transport (the gloo emulator unless ``emulate``
    is False); adds how many dispatches went through it."""
    from moe_fx.testing import symm_mem_emulator

    symm_mem_emulator.install() if emulate else symm_mem_emulator.uninstall()
    patch = {"mc2_transport": "symm_mem", "max_tokens_per_rank": 16, **kwargs.pop("config_patch", {})}
    counters.clear()
    results = globals()[job](rank=rank, world_size=world_size, lowerings=("mc2",), config_patch=patch, **kwargs)
    results["symm_mem_dispatches"] = counters["moe_fx"]["ran_symm_mem"]
    return results


def symm_mem_backward_case(*, rank: int = 0, world_size: int = 1) -> str:
    """A backward through the symmetric-memory transport: the error it raises."""
    from moe_fx.testing import symm_mem_emulator

    symm_mem_emulator.install()
    try:
        grad_case(rank=rank, world_size=world_size, lowering="mc2",
                  config_patch={"mc2_transport": "symm_mem", "max_tokens_per_rank": 16})
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def symm_mem_contract_case(*, rank: int = 0, world_size: int = 2) -> dict:
    """The emulator's all_to_all_vdev_2d / _offset on the contract's example (2 ranks, 2 experts
    each); rank r's input row i holds 100 * r + i."""
    from moe_fx.testing.symm_mem_emulator import EmulatedTransport

    transport = EmulatedTransport("emulated")
    group_name = dist.group.WORLD.group_name
    in_splits = torch.tensor([[1, 2, 0, 3], [2, 0, 0, 1]][rank])
    inp = (torch.arange(6, dtype=torch.float32) + 100 * rank)[:, None]
    out = transport.empty((8, 1), torch.float32, "cpu", group_name)
    layout = transport.empty((2, 4), torch.int64, "cpu", group_name)
    transport.to_experts(inp, out, in_splits, layout, group_name)
    back = transport.empty((6, 1), torch.float32, "cpu", group_name)
    back_layout = transport.empty((2, 4), torch.int64, "cpu", group_name)
    transport.to_sources(out, back, layout.clone(), back_layout, group_name)
    return {"out": out[:, 0].tolist(), "layout": layout.tolist(), "back": back[:, 0].tolist(),
            "back_layout": back_layout.tolist()}


def output_cast_case(*, rank: int = 0, world_size: int = 1, lowering: str = "auto",
                     config_patch: dict | None = None) -> dict:
    """bf16 mixtral: transformers' experts sum bf16 rows times fp32 router weights in fp32 and the
    model casts back to bf16. Reports whether that cast survived the rewrite as a separate node
    after the region, the region's output dtype, and the difference to eager."""
    model = build_tiny("mixtral", experts_implementation="grouped_mm", dtype=torch.bfloat16)
    ids = make_input_ids(TOKENS_PER_RANK[rank], seed=3 + rank)
    with torch.no_grad():
        want = model(ids).logits.float()
    zero_foreign_experts(model, model.config.num_local_experts)
    torch._dynamo.reset()
    settings = {"lowering": lowering, "inner_backend": "aot_eager", **(config_patch or {})}
    with torch.no_grad(), moe_fx.config.patch(**settings), moe_fx.recording() as graphs:
        got = torch.compile(model, backend=moe_fx.backend, fullgraph=True)(ids).logits.float()
    block = graphs[0].report.blocks[0]
    separate_cast = any(u.op == "call_method" and u.target == "to" for u in block.output.users)
    return {"separate_cast": separate_cast, "dtype": str(block.output.meta["example_value"].dtype),
            "diff": (got - want).abs().max().item(), "strategy": block.choice.strategy.value}


_ORDER_TAGS = (("all_gather_into_tensor", "AG"), ("reduce_scatter_tensor", "RS"), ("wait_tensor", "W"),
               ("gather_rows_upto", "G"), ("grouped_mm", "MM"), ("unsort_weighted_sum", "U"))


def _order_tag(text: str) -> str | None:
    return next((tag for key, tag in _ORDER_TAGS if key in text), None)


def overlap_order_case(*, rank: int = 0, world_size: int = 1, chunks: int) -> dict:
    """The bounded AllGather in ``chunks`` overlapped chunks, compiled by inductor: the order of the
    exchanges (AG, RS, their waits W) and the expert stages (G gather, MM grouped matmul, U unsort)
    in the rewritten graph and in the code inductor generated from it, and the difference to eager."""
    from torch._inductor.utils import run_and_get_code

    model = build_plain("batched", hidden=16, intermediate=8, num_experts=8, top_k=2, dtype="float32")
    x = torch.randn(7 + rank, 16, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        ref = model(x)
    zero_foreign_experts(model, 8)
    torch._dynamo.reset()
    settings = {"lowering": "allgather", "inner_backend": "inductor", "max_tokens_per_rank": 9,
                "ep_overlap_chunks": chunks}
    with moe_fx.config.patch(**settings), moe_fx.recording() as graphs, torch.no_grad():
        out, codes = run_and_get_code(torch.compile(model, backend=moe_fx.backend, fullgraph=True), x)
    graph_order = [t for n in graphs[0].rewritten.graph.nodes if n.op == "call_function"
                   and (t := _order_tag(str(n.target)))]
    # the wrapper's call(): one line per op it calls outside inductor's own kernels
    calls = re.findall(r"torch\.ops\.\w+\.(\w+)\.default\(", "".join(c[c.index("def call("):] for c in codes))
    code_order = [t for name in calls if (t := _order_tag(name))]
    return {"graph": " ".join(graph_order), "code": " ".join(code_order), "diff": (out - ref).abs().max().item(),
            "chunks": [b.overlap_chunks for g in graphs for b in g.report.blocks]}


def autograd_wrapper_case(*, rank: int = 0, world_size: int = 1, below_autograd: bool = True) -> dict:
    """One call of a bounded-AllGather block compiled with grad off: how many calls it makes into
    torch's Python autograd wrapper of registered ops (torch/_library/autograd.py, which the
    functional collectives pass through), the output against eager, and what kind of tensor it is.
    ``below_autograd=False`` leaves out moe_fx.backend's ``_below_autograd``."""
    import sys

    backend_module = sys.modules["moe_fx.backend"]  # the module (moe_fx.backend is the function)
    model = build_plain("batched", hidden=16, intermediate=8, num_experts=8, top_k=2, dtype="float32")
    x = torch.randn(5 + rank, 16, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        ref = model(x)
    zero_foreign_experts(model, 8)
    wrap = backend_module._below_autograd
    if not below_autograd:
        backend_module._below_autograd = lambda compiled: compiled
    calls: list[str] = []

    def count(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.endswith(os.path.join("_library", "autograd.py")):
            calls.append(frame.f_code.co_name)

    torch._dynamo.reset()
    try:
        with moe_fx.config.patch(lowering="allgather", inner_backend="eager", max_tokens_per_rank=8), torch.no_grad():
            compiled = torch.compile(model, backend=moe_fx.backend, fullgraph=True)
            compiled(x)
            sys.setprofile(count)
            try:
                out = compiled(x)
            finally:
                sys.setprofile(None)
    finally:
        backend_module._below_autograd = wrap
    return {**_diff(out, ref), "wrapper_calls": len(calls), "inference_tensor": out.is_inference(),
            "requires_grad": out.requires_grad}
