"""Per-rank jobs for the MoE forms of tests/form_modules.py (run by tests/dist_pool.py, or in
process for ep == 1). One call checks several modules, to keep the pool round trips few."""

from __future__ import annotations

import torch

import moe_fx
from tests import form_modules, generic_forms, handwritten_forms
from tests.ep_jobs import _compile_and_run, _diff, hf_model_case, rank_and_size

HIDDEN, INTERMEDIATE, NUM_EXPERTS, TOP_K = 16, 8, 4, 2
TOKENS_PER_RANK = (7, 12, 3, 9)


def build_form(cls_name: str, *, dtype: str = "float32", seed: int = 0, **module_kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = next(getattr(m, cls_name) for m in (form_modules, handwritten_forms, generic_forms) if hasattr(m, cls_name))
    return cls(HIDDEN, INTERMEDIATE, NUM_EXPERTS, TOP_K, **module_kw).to(getattr(torch, dtype))


def zero_foreign_form_experts(model: torch.nn.Module) -> int:
    """Zero every tensor of the experts this rank does not own; returns how many were touched."""
    rank, world = rank_and_size()
    per_rank = model.num_experts // world
    touched = 0
    with torch.no_grad():
        for e, tensors in enumerate(model.expert_parameters()):
            if e // per_rank != rank:
                for t in tensors:
                    t.zero_()
                    touched += 1
    return touched


def forms_case(*, rank: int = 0, world_size: int = 1, cases: list[dict], lowerings: tuple[str, ...] = ("auto",),
               inner: str = "eager", config_patch: dict | None = None) -> list[dict]:
    """For each case ({"cls": ..., "dtype": ..., **module kwargs}): eager on this rank's tokens
    before zeroing foreign experts, then moe_fx with each lowering after zeroing them."""
    torch.set_num_threads(1) if world_size > 1 else None
    out = []
    for case in cases:
        case = dict(case)
        cls_name, dtype = case.pop("cls"), case.pop("dtype", "float32")
        model = build_form(cls_name, dtype=dtype, **case)
        gen = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(TOKENS_PER_RANK[rank], HIDDEN, generator=gen).to(getattr(torch, dtype))
        with torch.no_grad():
            ref = model(x).float()
        touched = zero_foreign_form_experts(model) if world_size > 1 else 0
        result = {"touched": touched}
        for lowering in lowerings:
            with moe_fx.recording() as graphs:
                got, blocks, misses = _compile_and_run(model, (x,), lowering=lowering, inner=inner,
                                                       config_patch=config_patch)
            forms = [b.region.form for g in graphs for b in g.report.blocks]
            # data-dependent ops in the graphs before and after the pass (the rewrite's leftovers)
            nonzeros = [sum(str(n.target) in ("nonzero", "<built-in method nonzero of type object>")
                            or getattr(n.target, "__name__", "") == "nonzero" for n in gm.graph.nodes)
                        for g in graphs for gm in (g.original, g.rewritten)]
            result[lowering] = {**_diff(got, ref), "blocks": blocks, "misses": misses, "forms": forms,
                                "nonzero": nonzeros}
        out.append(result)
    return out


def hf_form_case(**kwargs) -> dict:
    """tests/ep_jobs.py's hf_model_case, plus the forms of the blocks moe_fx rewrote."""
    with moe_fx.recording() as graphs:
        result = hf_model_case(**kwargs)
    result["forms"] = sorted({b.region.form for g in graphs for b in g.report.blocks})
    return result


def sentinel517_case(*, rank: int = 0, world_size: int = 1, cases: list[dict], lowerings: tuple[str, ...] = ("auto",),
                     shard: bool = False, config_patch: dict | None = None) -> list[dict]:
    """transformers 5.17's guarded experts (tests/hf517_modules.py): eager on this rank's tokens,
    then moe_fx after zeroing the experts this rank does not own, or after ``shard_experts``
    (``shard``: the guards then read e = E / ep). Also the rewritten region's rendering."""
    from tests.hf517_modules import Sentinel517MoE

    torch.set_num_threads(1) if world_size > 1 else None
    out = []
    for case in cases:
        case = dict(case)
        dtype = getattr(torch, case.pop("dtype", "float32"))
        torch.manual_seed(0)
        model = Sentinel517MoE(HIDDEN, INTERMEDIATE, 8, TOP_K, **case).to(dtype)
        x = torch.randn(TOKENS_PER_RANK[rank], HIDDEN, generator=torch.Generator().manual_seed(100 + rank)).to(dtype)
        with torch.no_grad():
            ref = model(x).float()
        touched = 0
        if shard:
            moe_fx.shard_experts(model)
        elif world_size > 1:
            with torch.no_grad():
                for p in model.experts.parameters():
                    foreign = torch.ones(8, dtype=torch.bool)
                    foreign[rank * 8 // world_size:(rank + 1) * 8 // world_size] = False
                    p[foreign] = 0
                    touched += 1
        result = {"touched": touched}
        for lowering in lowerings:
            with moe_fx.recording() as graphs:
                got, blocks, misses = _compile_and_run(model, (x,), lowering=lowering, inner="eager",
                                                       config_patch=config_patch)
            result[lowering] = {**_diff(got, ref), "blocks": blocks, "misses": misses,
                                "forms": [b.region.form for g in graphs for b in g.report.blocks],
                                "renderings": [b.rendering for g in graphs for b in g.report.blocks]}
        out.append(result)
    return out


def outcome_case(*, rank: int = 0, world_size: int = 1, cls: str, config_patch: dict | None = None) -> tuple[str, str]:
    """("ok", max |diff|) or ("error", "<type>: <message>") of compiling ``cls`` on this rank's
    tokens (foreign experts zeroed)."""
    torch.set_num_threads(1) if world_size > 1 else None
    model = build_form(cls)
    x = torch.randn(TOKENS_PER_RANK[rank], HIDDEN, generator=torch.Generator().manual_seed(100 + rank))
    with torch.no_grad():
        ref = model(x)
    zero_foreign_form_experts(model)
    try:
        got, _, _ = _compile_and_run(model, (x,), lowering="auto", inner="eager", config_patch=config_patch)
    except Exception as exc:  # noqa: BLE001 - the test reads the message
        return "error", f"{type(exc).__name__}: {exc}"
    return "ok", f"{(got - ref).abs().max().item():.3g}"
