"""Per-rank jobs for the expert-sharding tests (moe_fx.shard_experts, moe_fx.load_sharded).

Memory is measured, not computed: the bytes of the distinct storages the model's expert
parameters keep alive, so a parameter that is a view of the full tensor would count in full.
"""

from __future__ import annotations

import torch

import moe_fx
from tests.ep_jobs import TOKENS_PER_RANK, _compile_and_run, _diff, build_plain
from tests.test_explain_config import _LeakyActivation
from tests.tiny_models import build_tiny, experts_modules, make_input_ids


def _storage_bytes(tensors) -> int:
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _expert_params(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every direct parameter of the models' ``experts`` modules (the tests' own rule)."""
    modules = experts_modules(model) if hasattr(model, "model") else [("", model)]
    return [p for _, m in modules for p in m.parameters(recurse=False) if p.dim() >= 2]


def sharded_case(*, rank: int = 0, world_size: int = 1, cases: tuple, inner: str, explain: bool = False) -> list[dict]:
    """For each (key, impl, dtype, lowering): eager reference, (explain,) shard_experts, measured
    bytes, the compiled model against the reference, and the errors of the sharded eager model and
    of explain on it."""
    torch.set_num_threads(1)
    results = []
    for key, impl, dtype, lowering in cases:
        model = build_tiny(key, experts_implementation=impl, dtype=getattr(torch, dtype))
        ids = make_input_ids(TOKENS_PER_RANK[rank], seed=100 + rank)
        with torch.no_grad():
            ref = model(ids).logits.float()
        report = moe_fx.explain(model, ids) if explain else None
        before = _storage_bytes(_expert_params(model))
        others = _storage_bytes(p for p in model.parameters() if all(p is not q for q in _expert_params(model)))
        blocks = moe_fx.shard_experts(model)
        after = _storage_bytes(_expert_params(model))
        out, rewritten, misses = _compile_and_run(model, (ids,), lowering=lowering, inner=inner)
        with torch.no_grad():
            eager_error = _error(model, ids)
        explained = {}
        if report is not None:
            explained = {"explain_held": sum(b.expert_bytes_held for b in report.blocks),
                         "explain_sharded": sum(b.expert_bytes_sharded for b in report.blocks),
                         "explain_table": str(report), "explain_sharded_error": _error(moe_fx.explain, model, ids)}
        results.append({
            "case": (key, impl, dtype, lowering), **_diff(out, ref), "blocks": rewritten, "misses": misses,
            "before": before, "after": after, "all_after": _storage_bytes(model.parameters()), "others": others,
            "sharded": [(b.block, b.shard.start, b.shard.num_local, b.params) for b in blocks],
            "eager_error": eager_error, **explained,
        })
    return results


def _error(fn, *args) -> str:
    """The error ``fn(*args)`` raises, as "Type: message" (dynamo wraps the backend's errors)."""
    try:
        fn(*args)
    except Exception as exc:  # the test asserts on the text
        return f"{type(exc).__name__}: {exc}"
    return ""


def compile_errors(*, rank: int = 0, world_size: int = 1) -> dict:
    """Sharded models the backend must refuse: a block it cannot rewrite, and a compile-time EP
    group other than the one the model was sharded over."""
    x = torch.randn(5, 16)

    def compiled(model, **settings):
        torch._dynamo.reset()
        with moe_fx.config.patch(inner_backend="eager", **settings), torch.no_grad():
            return _error(lambda: torch.compile(model, backend=moe_fx.backend, fullgraph=True)(x))

    unrewritable = _LeakyActivation()  # its activation reads a per-token scale: not rewritable
    moe_fx.shard_experts(unrewritable)
    plain = build_plain("batched", hidden=16, intermediate=8, num_experts=8, top_k=2, dtype="float32")
    moe_fx.shard_experts(plain)
    halves = [torch.distributed.new_group([0, 1]), torch.distributed.new_group([2, 3])]
    half = halves[rank // 2]
    return {"unrewritable": compiled(unrewritable), "other_group": compiled(plain, ep_group=half.group_name)}


def uneven_split_error(*, rank: int = 0, world_size: int = 1, num_experts: int) -> str:
    model = build_plain("batched", hidden=16, intermediate=8, num_experts=num_experts, top_k=2, dtype="float32")
    return _error(moe_fx.shard_experts, model)



def load_case(*, rank: int = 0, world_size: int = 1, checkpoints: dict, lowering: str, inner: str) -> dict:
    """moe_fx.load_sharded on this rank for each saved tiny model: what was read, the expert bytes
    held, and the compiled model against the full model's eager output (the full model is built
    here only as the reference)."""
    torch.set_num_threads(1)
    results = {}
    for key, path in checkpoints.items():
        ids = make_input_ids(TOKENS_PER_RANK[rank], seed=100 + rank)
        with torch.no_grad():
            ref = build_tiny(key)(ids).logits.float()
        loaded = moe_fx.load_sharded(path, experts_implementation="grouped_mm")
        out, blocks, misses = _compile_and_run(loaded.model, (ids,), lowering=lowering, inner=inner)
        results[key] = {
            **_diff(out, ref), "blocks": blocks, "misses": misses,
            "reads": [(r.key, r.rows) for r in loaded.reads],
            "expert_bytes": _storage_bytes(_expert_params(loaded.model)),
        }
    return results


def sharded_grad_case(*, rank: int = 0, world_size: int = 1, lowering: str) -> dict:
    """Backward through a sharded, compiled plain MoE with biases: input gradients equal eager's on
    this rank; each local expert parameter's gradient equals the sum over ranks of eager's rows."""
    import copy

    model = build_plain("batched", hidden=16, intermediate=8, num_experts=8, top_k=2, dtype="float32", bias=True)
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(rank)
    x, probe = torch.randn(TOKENS_PER_RANK[rank], 16, generator=gen), torch.randn(TOKENS_PER_RANK[rank], 16, generator=gen)

    def grads(module, fn):
        xi = x.clone().requires_grad_(True)
        (fn(xi) * probe).sum().backward()
        return xi.grad, {n: p.grad for n, p in module.named_parameters()}

    ref_x, ref = grads(model, model)
    (block,) = moe_fx.shard_experts(twin)
    torch._dynamo.reset()
    with moe_fx.config.patch(lowering=lowering, inner_backend="aot_eager"):
        got_x, got = grads(twin, torch.compile(twin, backend=moe_fx.backend, fullgraph=True))
    out = {"x": (got_x - ref_x).abs().max().item()}
    s = block.shard
    for name, g in ref.items():
        if name in block.params:
            torch.distributed.all_reduce(g)
            g = g[s.start : s.stop]
        out[name] = (got[name] - g).abs().max().item()
    return out
