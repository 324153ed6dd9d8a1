"""Per-rank jobs of tests/test_probe.py: a plain MoE whose recognized region is corrupted on purpose
(the router weights moved from the experts' output to their input: SwiGLU is not linear, so the
claim is wrong) on some ranks, compiled with moe_fx."""

from __future__ import annotations

import dataclasses

import torch

import moe_fx
import moe_fx.passes
from tests.ep_jobs import _compile_and_run, _diff, build_plain, zero_foreign_experts


def wrong_weighting(find):
    """``find_moe_regions`` whose regions claim the router weights scale the experts' input."""

    def find_wrongly(graph):
        regions, misses = find(graph)
        return [dataclasses.replace(r, weights_on_input=not r.weights_on_input) for r in regions], misses

    return find_wrongly


def corrupted_case(*, rank: int = 0, world_size: int = 1, corrupt_ranks: tuple[int, ...] = (0,),
                   probe_check: bool = True, lowering: str = "allgather", tokens: tuple[int, ...] = (5, 7)) -> dict:
    num_experts, hidden = 8, 16
    model = build_plain("batched", hidden=hidden, intermediate=8, num_experts=num_experts, top_k=2, dtype="float32")
    x = torch.randn(tokens[rank], hidden, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        ref = model(x).float()
    if world_size > 1:
        zero_foreign_experts(model, num_experts)
    with torch.no_grad():
        as_traced = model(x).float()  # what a block left as traced computes with this rank's weights
    find = moe_fx.passes.find_moe_regions
    if rank in corrupt_ranks:
        moe_fx.passes.find_moe_regions = wrong_weighting(find)
    try:
        out, blocks, misses = _compile_and_run(model, (x,), lowering=lowering, inner="eager",
                                               config_patch={"probe_check": probe_check, "collective_timeout_s": 3.0})
    except Exception as exc:  # the test asserts on it
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        moe_fx.passes.find_moe_regions = find
    return {**_diff(out, ref), "as_traced": _diff(out, as_traced), "blocks": blocks, "misses": misses}
