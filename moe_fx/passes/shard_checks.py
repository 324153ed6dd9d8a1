"""Sharded experts are rewritten or refused (invariant 8 in README.md): a parameter made by
``moe_fx.shard_experts`` holds only this rank's block, so code that indexes all E experts must not
read it, and the compile-time EP group must assign this rank that very block."""

from __future__ import annotations

import torch.fx as fx

from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering import EPPlan
from moe_fx.passes.graph_utils import expert_shard_of, module_path
from moe_fx.passes.region import MoERegion, NoMatch
from moe_fx.shard import ExpertShard


def _list_shard(region: MoERegion) -> ExpertShard | None:
    """The record of per-expert weights (a ModuleList) sharded by moe_fx.shard_experts: they stay
    one tensor per expert (other ranks' as stubs), so the region reads them as unsharded."""
    weights = [w for p in (region.up, *region.side_up, region.down) if isinstance(p.weight, tuple) for w in p.weight]
    return next((s for w in weights if (s := expert_shard_of(w)) is not None), None)


def check_shard_matches_group(region: MoERegion, plan: EPPlan) -> None:
    """Sharded weights must be exactly the block the compile-time EP group gives this rank."""
    shard = region.shard or _list_shard(region)
    if shard is None or (shard.start, shard.num_local) == (plan.expert_start, plan.num_local_experts):
        return
    raise UnsupportedMoEError(
        f"MoE block {region.block!r}: this rank holds {shard.describe()} (moe_fx.shard_experts over "
        f"{shard.ep_size} ranks), but the expert-parallel group it is compiled with ({plan.ep_size} "
        f"ranks) assigns it experts {plan.expert_start}..{plan.expert_start + plan.num_local_experts - 1}. "
        "Compile with the group the model was sharded with (moe_fx.config.ep_group)."
    )


def check_sharded_params_rewritten(graph: fx.Graph, misses: list[NoMatch], new_nodes: set[fx.Node]) -> None:
    """A sharded parameter read by code left as traced would index experts this rank does not hold."""
    for node in graph.nodes:
        shard = expert_shard_of(node) if node.op == "placeholder" else None
        if shard is None or all(user in new_nodes for user in node.users):
            continue
        reasons = "; ".join(m.reason for m in misses if m.block == shard.block) or "no experts region was matched"
        raise UnsupportedMoEError(
            f"MoE block {shard.block!r}: its parameter {module_path(node)} holds only {shard.describe()} "
            f"(moe_fx.shard_experts), but moe_fx did not rewrite the code that reads it ({reasons}). "
            "Without the rewrite it would index experts this rank does not hold; load the full model instead."
        )
