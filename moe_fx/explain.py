"""``moe_fx.explain``: what moe_fx finds in a model and what it would do with each MoE block.

    report = moe_fx.explain(model, input_ids)
    print(report)            # a table of blocks, then near-misses and graph breaks

It captures the model with dynamo (with the dynamic-shape flags ``fullgraph=True`` turns on),
runs the recognizers, the lowering choice and the backend's probe check on every graph (the
probe's EP ranks simulated), and runs the model eagerly: no collective is issued, so it may be
called on one rank alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from moe_fx.errors import MoEFxError
from moe_fx.graph_breaks import BreakSite, break_site, explain_break, outside_experts, owner_modules
from moe_fx.passes import PassReport, analyze_graph, probe_refusals
from moe_fx.passes.graph_utils import fake, module_path, real_value
from moe_fx.passes.probe import FORM as PROBE
from moe_fx.passes.region import MoERegion
from moe_fx.passes.unclaimed import FORM as UNCLAIMED, LEAVES_GRAPH
from moe_fx.prepare import find_candidates, prepare_report
from moe_fx.shard import expert_shard, held_bytes

_DATA_DEPENDENT = ("data-dependent", "Dynamic shape operator", "nonzero", "specialized integer", "unbacked")

_FIX_EAGER_EXPERTS = (
    "the experts loop iterates over a data-dependent set of experts and cannot be captured as one "
    "graph; for transformers >= 5 models set experts_implementation=\"grouped_mm\" (or \"batched_mm\") in "
    "the config or call model.set_experts_implementation(\"grouped_mm\"); "
)
# A data-dependent break in code that holds no experts (a model's mask code): not an MoE miss.
_OUTSIDE = ("{where}: a data-dependent graph break in {owner}, outside any experts code: dynamo splits the graph "
            "there and moe_fx rewrites the MoE blocks of each graph on its own (not a near-miss)")
# The 4.x half of that fix: prepare where it finds a block, else what to write instead.
_FIX_BY_PREPARE = "for transformers 4.x models call model = moe_fx.prepare(model) before torch.compile"
_FIX_WITHOUT_PREPARE = (
    "moe_fx.prepare finds no block of this model it can rebuild (README: its layouts), so for transformers 4.x "
    "write the experts as a static `for e in range(E)` loop (README \"Supported MoE forms\": expert_loop)"
)

_FIX_PREPARE = (
    "{cls}.{method} runs its experts behind a data-dependent step (a graph break); call "
    "model = moe_fx.prepare(model) before torch.compile: it gives this block a static expert loop "
    "({layout}) and keeps it only if it equals the block's own code on probe inputs"
)


@dataclass(frozen=True, kw_only=True)
class BlockRow:
    block: str
    form: str
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    dtype: str
    activation: str
    local_experts: str
    lowering: str
    reason: str
    ep_size: int = 1
    expert_bytes_held: int = 0  # this rank's expert weights and biases now (measured storages)
    expert_bytes_sharded: int = 0  # what this rank holds after moe_fx.shard_experts: 1/ep of all E


@dataclass(frozen=True, kw_only=True)
class NearMissRow:
    block: str
    form: str
    reason: str


@dataclass(kw_only=True)
class ExplainReport:
    blocks: list[BlockRow] = field(default_factory=list)
    near_misses: list[NearMissRow] = field(default_factory=list)
    graph_count: int = 0
    graph_breaks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        header = ("block", "form", "E", "K", "H", "I", "dtype", "activation", "local experts", "lowering", "why")
        rows = [
            (b.block, b.form, str(b.num_experts), str(b.top_k), str(b.hidden_size), str(b.intermediate_size),
             b.dtype, b.activation, b.local_experts, b.lowering, b.reason)
            for b in self.blocks
        ]
        lines = [f"moe_fx: {len(self.blocks)} MoE block(s) in {self.graph_count} graph(s)"]
        if rows:
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
            for r in [header, tuple("-" * w for w in widths), *rows]:
                lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if self.blocks:
            held = sum(b.expert_bytes_held for b in self.blocks)
            sharded = sum(b.expert_bytes_sharded for b in self.blocks)
            lines.append(
                f"expert weights on this rank: {_format_bytes(held)} held, {_format_bytes(sharded)} after "
                f"moe_fx.shard_experts (ep {self.blocks[0].ep_size})"
            )
        for miss in self.near_misses:
            lines.append(f"not rewritten: {miss.block} ({miss.form}): {miss.reason}")
        for reason in self.graph_breaks:
            lines.append(f"graph break: {reason}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    __str__ = table


_DELIMITED = "the generic path delimited its code"
_GENERIC = ("no recognizer matched the block of the router {router}; " + _DELIMITED + " ({nodes} "
            "nodes from the router's top-k to its [T, H] result). Under an expert-parallel group the backend "
            "rewrites it (AllGather; the block's own code on the gathered rows, other ranks' slots dropped) if its "
            "probe check passes at compile time. At ep = 1 it stays as traced.")
_PROVEN = " Its probe check passed here (every rank of the EP group simulated; without one, 2 ranks)."
_NOT_PROBED = " explain() did not run its probe check (moe_fx.config.probe_check is off, or the inputs were fake)."


def explain(model_or_fn, *args, **kwargs) -> ExplainReport:
    """Report every MoE block of ``model_or_fn(*args, **kwargs)`` and every near-miss."""
    if isinstance(model_or_fn, torch.nn.Module):
        sharded = next((s for p in model_or_fn.parameters() if (s := expert_shard(p)) is not None), None)
        if sharded is not None:
            raise MoEFxError(
                f"explain() runs the model eagerly, and MoE block {sharded.block!r} holds only "
                f"{sharded.describe()} (moe_fx.shard_experts). Call explain before sharding: its report "
                "gives the expert bytes held before and after."
            )
    torch._dynamo.reset()
    flags = dict(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True)
    try:
        with torch._dynamo.config.patch(**flags):
            captured = torch._dynamo.explain(model_or_fn)(*args, **kwargs)
        # torch 2.11 gives up on a frame whose unbacked size it cannot guard without raising:
        # no graph at all (seen with a slice by counts read on the host)
        capture_failed = captured.graph_count == 0
    except Exception:  # noqa: BLE001  (the flags make some breaks errors; the fullgraph capture below says why)
        # e.g. a loop over `nonzero(...).tolist()`: with capture_scalar_outputs its unbacked
        # length is guarded on, an error; without the flags dynamo breaks the graph there.
        capture_failed = True
    if capture_failed:
        torch._dynamo.reset()
        captured = torch._dynamo.explain(model_or_fn)(*args, **kwargs)
    torch._dynamo.reset()
    report = ExplainReport(graph_count=captured.graph_count)
    params = dict(model_or_fn.named_parameters()) if isinstance(model_or_fn, torch.nn.Module) else {}
    for gm in captured.graphs:
        _add_graph(report, analyze_graph(gm.graph), params)
    if report.blocks or any(m.form == "generic" for m in report.near_misses):
        _add_probe_verdicts(report, model_or_fn, args, kwargs, flags if not capture_failed else {})
    explained = False
    candidates = find_candidates(model_or_fn) if isinstance(model_or_fn, torch.nn.Module) else []
    fix = _FIX_EAGER_EXPERTS + (_FIX_BY_PREPARE if candidates else _FIX_WITHOUT_PREPARE)
    for brk in captured.break_reasons:
        where = _where(brk)
        text = f"{where}: {brk.reason.strip().splitlines()[0]}"
        report.graph_breaks.append(text)
        if not any(marker in brk.reason for marker in _DATA_DEPENDENT):
            continue
        site = _site(brk)
        if site is not None and outside_experts(model_or_fn, site):
            report.notes.append(_OUTSIDE.format(where=where, owner=owner_modules(model_or_fn, site)))
        else:
            report.near_misses.append(NearMissRow(block=where, form="graph break", reason=fix))
        explained = True
    # A break dynamo gave no reason for (a data-dependent guard restarts the frame; one inside a
    # loop skips it whole), or a router whose ids leave the graph with no break explained: capture
    # once more with fullgraph=True to read the error.
    leaves = any(m.form == UNCLAIMED and LEAVES_GRAPH in m.reason for m in report.near_misses)
    if capture_failed or captured.graph_break_count > len(captured.break_reasons) or (leaves and not explained):
        _add_fullgraph_error(report, model_or_fn, args, kwargs, flags)
    if any(m.form == "graph break" for m in report.near_misses):
        _add_prepare_candidates(report, candidates)
    _add_prepare_report(report, model_or_fn)
    return report


def _add_probe_verdicts(report: ExplainReport, model_or_fn, args, kwargs, flags: dict) -> None:
    """The backend's probe check on each block, as it runs at compile time: a recognized block it
    refuses leaves the table for the near-miss the backend logs, and a generic candidate's line
    says whether it passed. One more capture, whose graphs come with their real inputs (those of
    dynamo.explain do not)."""
    verdicts = []

    def probe(gm, example_inputs):
        verdicts.append(probe_refusals(gm, example_inputs))
        return gm.forward

    try:
        with torch._dynamo.config.patch(**flags):  # in the caller's grad mode: a training graph is refused
            torch.compile(model_or_fn, backend=probe)(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001  (the report says so; the first capture's findings stand)
        report.notes.append(f"the probe check could not run ({type(exc).__name__}: {str(exc).strip()[:200]})")
        verdicts.clear()
    finally:
        torch._dynamo.reset()
    ran = [v for v in verdicts if v is not None]
    refused = [m for misses, _ in ran for m in misses]
    proven = set().union(*(blocks for _, blocks in ran))
    report.blocks[:] = [b for b in report.blocks if b.block not in {m.block for m in refused if m.form == PROBE}]
    refused_generic = {m.block for m in refused if m.form != PROBE}
    rows = []
    for row in report.near_misses:
        if _DELIMITED not in row.reason:
            rows.append(row)
        elif row.block not in refused_generic:  # a refused candidate's line is its refusal, below
            note = _PROVEN if row.block in proven else "" if ran else _NOT_PROBED
            rows.append(replace(row, reason=row.reason + note))
    report.near_misses[:] = rows + [NearMissRow(block=m.block, form=m.form, reason=m.reason) for m in refused]


def _add_prepare_candidates(report: ExplainReport, candidates: list) -> None:
    """A near-miss per block ``moe_fx.prepare`` would handle: the module, by path, and the fix."""
    for path, module, layout in candidates:
        method = "moe" if layout == "experts_method" else "forward"
        report.near_misses.append(NearMissRow(block=path, form="graph break", reason=_FIX_PREPARE.format(
            cls=type(module).__name__, method=method, layout=layout)))


def _add_prepare_report(report: ExplainReport, model_or_fn) -> None:
    prepared = prepare_report(model_or_fn) if isinstance(model_or_fn, torch.nn.Module) else None
    if prepared is None:
        return
    for block in prepared.prepared:
        report.notes.append(f"moe_fx.prepare gave {block.path} ({block.module}) a static expert loop "
                            f"({block.layout}, routing: {block.routing})")
    for block in prepared.refused:
        report.near_misses.append(NearMissRow(block=block.path, form="moe_fx.prepare",
                                              reason=f"{block.module} left as it is: {block.reason}; fix: {block.fix}"))


def _add_fullgraph_error(report: ExplainReport, model_or_fn, args, kwargs, flags: dict) -> None:
    """The error of a fullgraph capture: a graph break line, and for a data-dependent one a
    near-miss naming the module, the line and the fix (moe_fx/graph_breaks.py)."""
    def ignore(gm, example_inputs):
        return gm.forward

    try:
        with torch._dynamo.config.patch(**flags):
            torch.compile(model_or_fn, backend=ignore, fullgraph=True)(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001  (any capture error is what the report shows)
        text = str(exc)
        site = break_site(text)
        location = site.where if site is not None else "<unknown>"
        report.graph_breaks.append(f"{location}: {type(exc).__name__}: {text.strip().splitlines()[0]}")
        reason = explain_break(site, text) if site is not None else None
        if reason is not None and outside_experts(model_or_fn, site):
            report.notes.append(_OUTSIDE.format(where=site.where, owner=owner_modules(model_or_fn, site)))
        elif reason is not None:
            report.near_misses.append(NearMissRow(block=owner_modules(model_or_fn, site), form="graph break", reason=reason))
    finally:
        torch._dynamo.reset()


def _held_bytes(region: MoERegion, params: dict[str, torch.Tensor]) -> int:
    """Bytes this rank's expert parameters of ``region`` keep alive: measured on the model's own
    parameters (found by module path: dynamo drops its references once a graph is compiled), from
    the traced shapes only when ``explain`` got a function rather than a module."""
    tensors, computed = [], 0
    for node in region.expert_params():
        value = real_value(node) if real_value(node) is not None else params.get(module_path(node))
        if value is not None:
            tensors.append(value)
        else:
            computed += fake(node).numel() * fake(node).element_size()
    return held_bytes(tensors) + computed


def _add_graph(report: ExplainReport, analysis: PassReport, params: dict[str, torch.Tensor]) -> None:
    for decision in analysis.blocks:
        region, plan = decision.region, decision.plan
        if region.requires:
            report.notes.append(f"{region.block} ({region.form}) needs {region.requires}")
        local = plan.local_experts
        held = _held_bytes(region, params)
        every_expert = held * region.num_experts // region.shard.num_local if region.shard else held
        report.blocks.append(
            BlockRow(
                block=region.block,
                form=region.form,
                num_experts=region.num_experts,
                top_k=region.top_k,
                hidden_size=region.hidden_size,
                intermediate_size=region.intermediate_size,
                dtype=str(region.dtype).replace("torch.", ""),
                activation=region.activation.label,
                local_experts=f"{local.start}..{local.stop - 1} (ep {plan.ep_rank}/{plan.ep_size})",
                lowering=decision.choice.strategy.value,
                reason=decision.choice.reason,
                ep_size=plan.ep_size,
                expert_bytes_held=held,
                expert_bytes_sharded=every_expert // plan.ep_size,
            )
        )
    for miss in analysis.misses:
        report.near_misses.append(NearMissRow(block=miss.block, form=miss.form, reason=miss.reason))
    for region in analysis.generic:
        report.near_misses.append(NearMissRow(block=region.block, form=region.form, reason=_GENERIC.format(
            router=region.router, nodes=len(region.nodes))))


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _site(brk) -> BreakSite | None:
    stack = getattr(brk, "user_stack", None) or []
    if not stack:
        return None
    frame = stack[-1]
    return BreakSite(frame.filename, frame.lineno, (frame.line or "").strip())


def _where(brk) -> str:
    stack = getattr(brk, "user_stack", None) or []
    if not stack:
        return "<unknown>"
    frame = stack[-1]
    return f"{frame.filename.rsplit('/', 2)[-2:][-1]}:{frame.lineno} in {frame.name}"
