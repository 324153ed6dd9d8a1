"""What the pass found and did, per graph: the records ``explain()`` and ``recording()`` show."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from moe_fx.lowering import EPPlan, LoweringChoice
from moe_fx.passes.canonical import Respelling
from moe_fx.passes.generic import GenericRegion
from moe_fx.passes.region import MoERegion, NoMatch


@dataclass(frozen=True, kw_only=True)
class BlockDecision:
    """One MoE block found in a graph and what moe_fx does with it."""

    region: MoERegion | GenericRegion
    plan: EPPlan
    choice: LoweringChoice
    rendering: str = ""  # the rewritten region (empty when only analyzed)
    output: fx.Node | None = None  # the rewritten region's result in the graph (None when only analyzed)
    overlap_chunks: int = 1  # token chunks whose exchanges overlap other chunks' experts (1: none)


@dataclass(kw_only=True)
class PassReport:
    blocks: list[BlockDecision] = field(default_factory=list)
    misses: list[NoMatch] = field(default_factory=list)
    # passes/canonical.py's rewrites into the recognizers' spelling (moe_ep_pass keeps the claimed ones)
    respelled: list[Respelling] = field(default_factory=list)
    # blocks no recognizer matched whose code the generic path delimited (passes/generic.py): the
    # backend rewrites them under an EP group once their probe check passes
    generic: list[GenericRegion] = field(default_factory=list)
