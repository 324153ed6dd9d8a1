"""Jobs of tests/test_prepare.py run on every rank of a gloo group (tests/dist_pool.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import moe_fx
from tests.tf4_modules import HitLoopBlock, MethodLoopMoE

H, I, E, K = 16, 8, 4, 2
BUILDERS = {"hit_loop": lambda: HitLoopBlock(H, I, E, K), "moe_method": lambda: MethodLoopMoE(H, I, E, K)}


def sharded_case(*, rank: int = 0, world_size: int = 1, kind: str, lowering: str, tokens=(5, 9),
                 inner: str = "eager") -> dict:
    """A prepared block, then moe_fx.shard_experts: this rank keeps its experts only; compiled, it
    equals the whole block run eagerly on this rank's tokens."""
    torch.manual_seed(0)
    model = BUILDERS[kind]()
    x = torch.randn(1, tokens[rank], H, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        ref = model(x)
    ref = ref[0] if isinstance(ref, tuple) else ref
    moe_fx.prepare(model)
    (block,) = moe_fx.shard_experts(model)
    try:
        model(x)
        eager = "ran"
    except moe_fx.MoEFxError as exc:
        eager = str(exc)
    torch._dynamo.reset()
    with moe_fx.config.patch(lowering=lowering, inner_backend=inner), moe_fx.recording() as graphs, torch.no_grad():
        out = torch.compile(model, backend=moe_fx.backend, fullgraph=True)(x)
    out = out[0] if isinstance(out, tuple) else out
    singles = [dist.new_group([r]) for r in range(world_size)]  # every rank creates every group
    torch._dynamo.reset()
    try:
        with moe_fx.config.patch(ep_group=singles[rank].group_name, inner_backend="eager"), torch.no_grad():
            torch.compile(model, backend=moe_fx.backend, fullgraph=True)(x)
        wrong_group = "compiled"
    except Exception as exc:  # noqa: BLE001  (the test asserts on the message)
        wrong_group = str(exc)
    return {"diff": (out - ref).abs().max().item(), "eager": eager,
            "bytes": (block.bytes_before, block.bytes_after), "local": (block.shard.start, block.shard.num_local),
            "blocks": [(b.region.block, b.region.form, b.choice.strategy.value) for g in graphs for b in g.report.blocks],
            "wrong_group": wrong_group,
            "expert_params": len(moe_fx.expert_parallel_parameters(model))}
