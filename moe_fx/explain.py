"""``moe_fx.explain``: what moe_fx finds in a model and what it would do with each MoE block.

    report = moe_fx.explain(model, input_ids)
    print(report)            # a table of blocks, then near-misses and graph breaks

It captures the model with dynamo (with the dynamic-shape flags ``fullgraph=True`` turns on),
runs the recognizers and the lowering choice on every graph, and runs the model eagerly: no
collective is issued, so it may be called on one rank alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe_fx.passes import PassReport, analyze_graph

_DATA_DEPENDENT = ("data-dependent", "Dynamic shape operator", "nonzero", "specialized integer", "unbacked")

_DATA_DEPENDENT_BRANCH = ("Could not guard on data-dependent expression", "data-dependent branching")

_FIX_BRANCH = (
    "expert loop contains a data-dependent Python branch ({where}); every expert must run "
    "unconditionally for the loop to be one graph (an expert with no tokens costs nothing): remove the branch"
)

_FIX_EAGER_EXPERTS = (
    "the experts loop iterates over a data-dependent set of experts and cannot be captured as one "
    "graph; for transformers models set experts_implementation=\"grouped_mm\" (or \"batched_mm\") in "
    "the config or call model.set_experts_implementation(\"grouped_mm\")"
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
        for miss in self.near_misses:
            lines.append(f"not rewritten: {miss.block} ({miss.form}): {miss.reason}")
        for reason in self.graph_breaks:
            lines.append(f"graph break: {reason}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    __str__ = table


def explain(model_or_fn, *args, **kwargs) -> ExplainReport:
    """Report every MoE block of ``model_or_fn(*args, **kwargs)`` and every near-miss."""
    torch._dynamo.reset()
    flags = dict(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True)
    with torch._dynamo.config.patch(**flags):
        captured = torch._dynamo.explain(model_or_fn)(*args, **kwargs)
    torch._dynamo.reset()
    report = ExplainReport(graph_count=captured.graph_count)
    if captured.graph_break_count > len(captured.break_reasons):
        _add_silent_break(report, model_or_fn, args, kwargs, flags)
    for gm in captured.graphs:
        _add_graph(report, analyze_graph(gm.graph))
    for brk in captured.break_reasons:
        where = _where(brk)
        text = f"{where}: {brk.reason.strip().splitlines()[0]}"
        report.graph_breaks.append(text)
        if any(marker in brk.reason for marker in _DATA_DEPENDENT):
            report.near_misses.append(NearMissRow(block=where, form="graph break", reason=_FIX_EAGER_EXPERTS))
    return report


def _add_silent_break(report: ExplainReport, model_or_fn, args, kwargs, flags: dict) -> None:
    """Breaks on data-dependent guards (``if tok.numel() == 0``) restart the frame and are not in
    dynamo's break reasons: capture once more with fullgraph=True to read the error."""
    def ignore(gm, example_inputs):
        return gm.forward

    try:
        with torch._dynamo.config.patch(**flags):
            torch.compile(model_or_fn, backend=ignore, fullgraph=True)(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001  (any capture error is what the report shows)
        text = str(exc)
        # "Caused by: if tok.numel() == 0:  # .../model.py:107 in forward (_dynamo/...)"
        caused = next((line.split("Caused by:", 1)[1] for line in text.splitlines() if "Caused by:" in line), "")
        code, _, location = caused.partition("#")
        location = location.split(" (")[0].strip().rsplit("/", 1)[-1] or "<unknown>"
        report.graph_breaks.append(f"{location}: {type(exc).__name__}: {text.strip().splitlines()[0]}")
        if any(marker in text for marker in _DATA_DEPENDENT_BRANCH):
            report.near_misses.append(NearMissRow(block=location, form="graph break",
                                                  reason=_FIX_BRANCH.format(where=code.strip() or "see the graph break")))
    finally:
        torch._dynamo.reset()


def _add_graph(report: ExplainReport, analysis: PassReport) -> None:
    for decision in analysis.blocks:
        region, plan = decision.region, decision.plan
        if region.requires:
            report.notes.append(f"{region.block} ({region.form}) needs {region.requires}")
        local = plan.local_experts
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
            )
        )
    for miss in analysis.misses:
        report.near_misses.append(NearMissRow(block=miss.block, form=miss.form, reason=miss.reason))


def _where(brk) -> str:
    stack = getattr(brk, "user_stack", None) or []
    if not stack:
        return "<unknown>"
    frame = stack[-1]
    return f"{frame.filename.rsplit('/', 2)[-2:][-1]}:{frame.lineno} in {frame.name}"
