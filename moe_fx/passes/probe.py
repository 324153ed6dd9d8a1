"""Proving a recognized region on numbers before it is rewritten.

A recognizer matches a spelling; what it claims is a meaning: the region computes
``out[t] = base[t] + sum_k w[t, k] * f(x[t]; theta[ids[t, k]])`` with ``f`` and ``theta`` as it
extracted them. The probe checks that claim at compile time, on the block's own parameters:

- the traced region and the region as moe_fx emits it at ep = 1 (``LocalLowering``: sort, grouped
  matmul, the extracted activation, weighted unsort) both run eagerly on the same probe inputs:
  random hidden states of the traced shape (seeded, the same on every rank) and routings forced at
  the router's ``topk`` (cyclic ids that hit every expert, then random distinct ids, with random
  positive weights); without a ``topk`` to steer, the router's own choice on the probe states;
- they must agree to the dtype's tolerance, relative to the largest value of the traced result;
  otherwise the block is left as traced with a near-miss saying by how much they differed.

The probe inputs are the same on every rank, so ranks holding the same weights reach the same
verdict without exchanging it (a compile-time collective would hang ranks that compile different
graphs, e.g. one specialized to a single token). A rank whose verdict differed would leave the
block as traced while its peers rewrite it; they then fail within ``config.collective_timeout_s``
(setting up the block's groups, or at its guard) rather than wait (tests/test_probe.py).

Only the region is evaluated: the nodes from the hidden states (the tensor the region's rows are
a view of, which the router may read too) and the router's ``topk`` to the experts' result, never
the model before them. Rewritten without the check, with a debug log saying why: a region whose
code reads a graph input other than the model's parameters and buffers (the model before it
would have to run), or writes into a graph input (the probe must not touch the model's state);
sharded experts (the traced code indexes experts this rank does not hold); graphs compiled on
fake inputs; and a probe that cannot run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from moe_fx.lowering.base import EPPlan, LocalLowering, LoweringPlan, Strategy
from moe_fx.passes.dataflow import needed, router_topk, view_source
from moe_fx.passes.generic import GenericRegion, drop_foreign_slots
from moe_fx.passes.graph_utils import fake, is_graph_input, is_state_input, op_name
from moe_fx.passes.region import MoERegion, NoMatch
from moe_fx.passes.rewrite import emit_beside, nodes_between
from moe_fx.passes.rowwise import mutates

FORM = "probe"
MAX_ROUTINGS = 8  # cyclic routings (to hit every expert) plus one random, at most
_SEED = 20261130


@dataclass(frozen=True)
class ProbeResult:
    """One region's verdict: ``agreed`` None when it could not be evaluated (``note`` says why)."""

    agreed: bool | None
    worst: float = 0.0  # largest |traced - emitted| over the routings, relative to max |traced|
    tolerance: float = 0.0
    note: str = ""


def tolerance(dtype: torch.dtype, device_type: str) -> float:
    """Relative tolerance of two implementations of one MoE region in ``dtype`` (tests/tolerances.py's
    bounds; TF32 matmuls on CUDA loosen fp32's)."""
    if dtype in (torch.bfloat16, torch.float16):
        return 2e-2
    if device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return 2e-3
    return 1e-4


def probe_routings(tokens: int, top_k: int, num_experts: int) -> list[torch.Tensor]:
    """[T, K] expert ids, distinct within each token: cyclic blocks of T*K consecutive experts until
    every expert was hit (at most MAX_ROUTINGS - 1 of them), then one random routing."""
    slots = torch.arange(tokens).unsqueeze(1) * top_k + torch.arange(top_k).unsqueeze(0)
    cyclic = min(MAX_ROUTINGS - 1, max(1, math.ceil(num_experts / max(1, tokens * top_k))))
    routings = [(slots + shift * tokens * top_k) % num_experts for shift in range(cyclic)]
    generator = torch.Generator().manual_seed(_SEED)
    routings.append(torch.rand(tokens, num_experts, generator=generator).argsort(dim=1)[:, :top_k])
    return routings


def prove_region(evaluator: RegionEvaluator, region: MoERegion) -> ProbeResult:
    """Evaluate ``region`` as traced and as emitted at ep = 1 on probe inputs; compare."""
    gm, inputs = evaluator.module, evaluator.inputs
    if region.shard is not None:
        return ProbeResult(None, note="sharded experts: the traced code indexes experts this rank does not hold")
    source = view_source(region.hidden)
    hidden = fake(source)
    shape = _concrete(hidden.shape) if hidden is not None else None
    if shape is None:
        return ProbeResult(None, note="the hidden states have no concrete shape")
    topk = router_topk(region.topk_ids)
    emitted = _emit_local(gm.graph, region)
    if emitted is None:
        return ProbeResult(None, note="the ep = 1 lowering does not take this region")
    out, new_nodes = emitted
    try:
        traced_targets = [*region.nodes, region.output]
        if region.last_update is not None:
            traced_targets.append(region.last_update)
        stop = {source: None, **({topk: None} if topk is not None else {})}
        evaluated = needed(traced_targets, stop) | needed([out], stop, region.nodes)
        if reason := _unprovable(evaluated, source, inputs):
            return ProbeResult(None, note=f"the region {reason}")
        generator = torch.Generator().manual_seed(_SEED)
        x = torch.randn(shape, generator=generator).to(device=hidden.device, dtype=hidden.dtype)
        tol = max(tolerance(region.dtype, hidden.device.type), tolerance(hidden.dtype, hidden.device.type))
        worst = 0.0
        rows = _concrete(fake(region.hidden).shape)
        if rows is None:
            return ProbeResult(None, note="the hidden states have no concrete shape")
        routings = probe_routings(rows[0], region.top_k, region.num_experts) if topk is not None else [None]
        for ids in routings:
            overrides = {source: x}
            if ids is not None:
                overrides[topk] = _forced_topk(topk, ids, x.device, generator)
            with torch.no_grad():
                traced = evaluator.run(traced_targets, overrides)[region.output]
                ours = evaluator.run([out], overrides, region.nodes)[out]
            traced, ours = traced.float(), ours.float()
            if traced.shape != ours.shape:
                return ProbeResult(False, note=f"the rewrite returns {tuple(ours.shape)}, the traced code "
                                               f"{tuple(traced.shape)}")
            if not torch.isfinite(traced).all():
                return ProbeResult(None, note="the traced region is not finite on the probe inputs")
            scale = traced.abs().max().item() or 1.0
            worst = max(worst, (traced - ours).abs().max().item() / scale)
            if not worst <= tol:
                break
        return ProbeResult(worst <= tol, worst=worst, tolerance=tol)
    finally:
        for node in reversed(new_nodes):
            gm.graph.erase_node(node)


def prove_generic(evaluator: RegionEvaluator, region: GenericRegion, ep_size: int, capacity: int) -> ProbeResult:
    """Run the generic rewrite of ``region`` (passes/generic.py) for each of ``ep_size`` ranks on
    probe inputs, as it will run: every rank's probe tokens and routing padded to ``capacity``
    rows and gathered, the block's code copied onto them with other ranks' slots dropped (the
    probe routings, then every rank's tokens on the same K experts). The sum over ranks must equal
    the traced block on each rank's tokens, and the ranks together may compute at most 1.25x the
    traced block's matmul FLOPs (a block that computes every expert for
    every token, whatever the routing, would gain nothing and cost ep x more)."""
    graph = evaluator.module.graph
    source = view_source(region.hidden)
    shape = _concrete(fake(source).shape)
    targets = [region.output, *([region.last_update] if region.last_update is not None else [])]
    stop = {source: None, region.topk: None}
    if reason := _unprovable(needed(targets, stop), source, evaluator.inputs):
        return ProbeResult(None, note=f"the block {reason}")
    insert_before = region.last_update.next if region.last_update is not None else region.output
    first_new = insert_before.prev
    with graph.inserting_before(insert_before):
        out = region.replay(graph, region.hidden, region.ids, region.values, ep_size * capacity)
    copied = nodes_between(first_new, insert_before)
    try:
        return _compare_generic(evaluator, region, (out, copied[-1]), targets, source, shape, ep_size, capacity)
    finally:
        for node in reversed(copied):
            graph.erase_node(node)


def _compare_generic(evaluator: RegionEvaluator, region: GenericRegion, copy: tuple[fx.Node, fx.Node],
                     targets: list[fx.Node],
                     source: fx.Node, shape: tuple[int, ...], ep_size: int, capacity: int) -> ProbeResult:
    """``copy``: the copied code's result and its last node (an in-place write into the result)."""
    hidden = fake(source)
    out = copy[0]
    generator = torch.Generator().manual_seed(_SEED)
    tol = tolerance(region.dtype, hidden.device.type)
    routings = probe_routings(region.num_tokens, region.top_k, region.num_experts)
    per_rank = region.num_experts // ep_size
    worst, traced_flops, rewritten_flops = 0.0, 0, 0
    # every rank's tokens on the same K experts: code whose result depends on how many tokens an
    # expert gets (a capacity that drops the excess) then differs on the gathered rows
    crowded = torch.arange(region.top_k).expand(region.num_tokens, -1)
    schedule = [[routings[(i + rank) % len(routings)] for rank in range(ep_size)] for i in range(len(routings))]
    for rank_routings in [*schedule, [crowded] * ep_size]:
        wanted, gathered = [], {region.hidden: [], region.ids: [], region.values: []}
        for rank in range(ep_size):
            x = torch.randn(shape, generator=generator).to(device=hidden.device, dtype=hidden.dtype)
            forced = _forced_topk(region.topk, rank_routings[rank], x.device, generator)
            with torch.no_grad(), FlopCounterMode(display=False) as flops:
                env = evaluator.run(targets, {source: x, region.topk: forced})
            traced_flops += flops.get_total_flops()
            wanted.append(env[region.output].float())
            for node, fill in ((region.hidden, 0), (region.ids, -1), (region.values, 0)):
                if node is not None:
                    gathered[node].append(_pad_rows(env[node], capacity, fill))
        overrides = {node: torch.cat(rows) for node, rows in gathered.items() if node is not None}
        total = 0
        for rank in range(ep_size):
            overrides[region.ids] = drop_foreign_slots(torch.cat(gathered[region.ids]), rank * per_rank, per_rank)
            with torch.no_grad(), FlopCounterMode(display=False) as flops:
                total = total + evaluator.run(list(copy), overrides, frozenset(region.nodes))[out].float()
            rewritten_flops += flops.get_total_flops()
        got = torch.cat([total[r * capacity:r * capacity + region.num_tokens] for r in range(ep_size)])
        want = torch.cat(wanted)
        if got.shape != want.shape:
            return ProbeResult(False, note=f"the rewrite returns {tuple(got.shape)}, the traced code "
                                           f"{tuple(want.shape)}")
        if not torch.isfinite(want).all():
            return ProbeResult(None, note="the traced block is not finite on the probe inputs")
        worst = max(worst, (want - got).abs().max().item() / (want.abs().max().item() or 1.0))
        if not worst <= tol:
            return ProbeResult(False, worst=worst, tolerance=tol)
    if rewritten_flops > 1.25 * traced_flops:
        return ProbeResult(False, worst=worst, tolerance=tol, note=(
            f"with other ranks' slots dropped, the {ep_size} ranks together computed "
            f"{rewritten_flops / max(1, traced_flops):.2f}x the traced block's matmul FLOPs: its code computes "
            "experts whatever the routing (a dense form), so expert parallelism would not divide its work"))
    return ProbeResult(True, worst=worst, tolerance=tol)


def _pad_rows(t: torch.Tensor, rows: int, fill: float) -> torch.Tensor:
    return torch.cat([t, t.new_full((rows - t.shape[0], *t.shape[1:]), fill)])


def refusal(region: MoERegion, result: ProbeResult) -> NoMatch:
    """The near-miss of a region the probe refused."""
    if result.note:
        return NoMatch(region.block, FORM, f"the {region.form} match failed its probe check: {result.note}")
    return NoMatch(region.block, FORM,
                   f"the {region.form} match is not what the traced code computes: on probe inputs the rewrite "
                   f"differs from it by {result.worst:.3g} of its largest value (tolerance {result.tolerance:.0e} "
                   f"for {str(region.dtype).removeprefix('torch.')}); left as traced")


def generic_refusal(region: GenericRegion, result: ProbeResult) -> NoMatch:
    """The near-miss of a block the generic path leaves as traced."""
    head = f"no recognizer matched the block of the router {region.router}"
    if result.note:
        return NoMatch(region.block, region.form, f"{head}; the generic path leaves it as traced: {result.note}",
                       anchor=region.topk)
    return NoMatch(region.block, region.form, anchor=region.topk, _reason=(
        f"{head}, and the generic path's rewrite is not what its code computes: on probe inputs the sum over ranks "
        f"differs from the traced block by {result.worst:.3g} of its largest value (tolerance {result.tolerance:.0e} "
        f"for {str(region.dtype).removeprefix('torch.')}): code that does not skip a slot whose id is -1 (one "
        f"that indexes expert weights by the ids reads it as the last expert; a capacity counts it) cannot be "
        f"split by expert; left as traced"))


class RegionEvaluator(fx.Interpreter):
    """Runs the nodes a target needs, in graph order, from the overrides and the graph's inputs
    (one per graph: an Interpreter's set-up reads the whole module)."""

    def __init__(self, gm: fx.GraphModule, inputs: dict[fx.Node, Any]):
        super().__init__(gm, garbage_collect_values=False)  # run() keeps its own env
        self.inputs = inputs

    def run(self, targets: list[fx.Node], overrides: dict[fx.Node, Any],  # type: ignore[override]
            replaced: frozenset[fx.Node] = frozenset()) -> dict[fx.Node, Any]:
        # copies: the code evaluated may write into what it reads, and each run starts afresh
        self.env = {node: tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)
                    for node, value in overrides.items()}
        for node in sorted(needed(targets, overrides, replaced)):  # fx nodes sort in graph order
            if node in self.env:
                continue
            self.env[node] = self.inputs[node] if node.op == "placeholder" else self.run_node(node)
        return self.env


def _writes_graph_input(nodes: set[fx.Node]) -> fx.Node | None:
    """An in-place op among ``nodes`` whose destination is (a view of) a graph input."""
    for node in nodes:
        if not mutates(node) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        root = view_source(node.args[0])
        if is_graph_input(root):
            return node
    return None


def _unprovable(evaluated: set[fx.Node], source: fx.Node, inputs: dict[fx.Node, Any]) -> str | None:
    """Why code evaluating ``evaluated`` from ``source`` cannot be probed on its own, or None: it
    would write into the model's inputs or state, or read data other than its hidden states."""
    if written := _writes_graph_input(evaluated):
        return f"writes into a graph input ({written.format_node()})"
    if read := next((n for n in evaluated if n.op == "placeholder" and n is not source
                     and not is_state_input(n, inputs[n])), None):
        return f"reads the graph input {read.name} besides its hidden states"
    return None


def concrete_inputs(example_inputs: list) -> list | None:
    """The graph's inputs with symbolic sizes replaced by their hints (evaluating on a SymInt would
    add guards, and with them a recompile), or None for fake tensors (no probe can run on them)."""
    from torch._subclasses.fake_tensor import FakeTensor

    values = []
    for value in example_inputs:
        if isinstance(value, FakeTensor):
            return None
        if isinstance(value, torch.SymInt):
            value = _concrete((value,))
            if value is None:
                return None
            value = value[0]
        values.append(value)
    return values


def _forced_topk(topk: fx.Node, ids: torch.Tensor, device: torch.device, generator: torch.Generator):
    """(values, indices) for ``topk``: positive weights in descending order, and ``ids``."""
    values_fake = _fake_item(topk, 0)
    indices_fake = _fake_item(topk, 1)
    weights = torch.rand(ids.shape, generator=generator).mul(0.9).add(0.1).sort(dim=1, descending=True).values
    values = weights.to(device=device, dtype=values_fake.dtype if values_fake is not None else torch.float32)
    indices = ids.to(device=device, dtype=indices_fake.dtype if indices_fake is not None else torch.int64)
    return torch.return_types.topk((values, indices))


def _fake_item(node: fx.Node, index: int) -> torch.Tensor | None:
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, (tuple, list)) and len(value) > index and isinstance(value[index], torch.Tensor):
        return value[index]
    return None


def _emit_local(graph: fx.Graph, region: MoERegion) -> tuple[fx.Node, list[fx.Node]] | None:
    """The region as the ep = 1 lowering emits it, beside the traced code."""
    plan = LoweringPlan(ep=EPPlan(block=region.block, num_experts=region.num_experts), strategy=Strategy.LOCAL,
                        top_k=1 if region.weights_on_input else region.top_k, device_type=fake(region.hidden).device.type)
    lowering = LocalLowering(plan)
    return None if lowering.unsupported(region) else emit_beside(graph, region, lowering)


def _concrete(shape) -> tuple[int, ...] | None:
    """``shape`` with symbolic sizes replaced by their hints; None where a size has none."""
    sizes = []
    for size in shape:
        if isinstance(size, int):
            sizes.append(size)
            continue
        hint = getattr(getattr(size, "node", None), "hint", None)
        if not isinstance(hint, int):
            return None
        sizes.append(hint)
    return tuple(sizes)
