"""Per-rank jobs for the expert-sharding tests (moe_fx.shard_experts, moe_fx.load_sharded).

Memory is measured, not computed: the bytes of the distinct storages the model's expert
parameters keep alive, so a parameter that is a view of the full tensor would count in full.
"""

from __future__ import annotations

import torch

import moe_fx
from tests.ep_jobs import TOKENS_PER_RANK, _compile_and_run, _diff, build_plain
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


def sharded_case(*, rank: int = 0, world_size: int = 1, cases: tuple, inner: str) -> list[dict]:
    """For each (key, impl, dtype, lowering): eager reference, shard_experts, measured bytes, the
    compiled model against the reference, and the eager model's error after sharding."""
    torch.set_num_threads(1)
    results = []
    for key, impl, dtype, lowering in cases:
        model = build_tiny(key, experts_implementation=impl, dtype=getattr(torch, dtype))
        ids = make_input_ids(TOKENS_PER_RANK[rank], seed=100 + rank)
        with torch.no_grad():
            ref = model(ids).logits.float()
        before = _storage_bytes(_expert_params(model))
        others = _storage_bytes(p for p in model.parameters() if all(p is not q for q in _expert_params(model)))
        blocks = moe_fx.shard_experts(model)
        after = _storage_bytes(_expert_params(model))
        out, rewritten, misses = _compile_and_run(model, (ids,), lowering=lowering, inner=inner)
        try:
            with torch.no_grad():
                model(ids)
            eager_error = ""
        except moe_fx.MoEFxError as exc:
            eager_error = str(exc)
        results.append({
            "case": (key, impl, dtype, lowering), **_diff(out, ref), "blocks": rewritten, "misses": misses,
            "before": before, "after": after, "all_after": _storage_bytes(model.parameters()), "others": others,
            "sharded": [(b.block, b.shard.start, b.shard.num_local, b.params) for b in blocks],
            "eager_error": eager_error,
        })
    return results


def uneven_split_error(*, rank: int = 0, world_size: int = 1, num_experts: int) -> str:
    model = build_plain("batched", hidden=16, intermediate=8, num_experts=num_experts, top_k=2, dtype="float32")
    try:
        moe_fx.shard_experts(model)
    except moe_fx.UnsupportedMoEError as exc:
        return str(exc)
    return ""


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
