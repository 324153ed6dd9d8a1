"""``torchrun --nproc-per-node N -m moe_fx.bench --ep N``: one MoE layer expert-parallel over N GPUs,
against the same layer holding every expert on one GPU.

One process per rank. For each layer shape and number of tokens per rank it builds one
transformers ``MixtralSparseMoeBlock`` (grouped_mm experts, bf16, the weights and tokens of
``python -m moe_fx.bench``; the same weights on every rank, each rank its own tokens) and times:

- "ep1": the layer compiled with moe_fx over a one-rank EP group (all experts on this GPU, no
  collective), the same tokens per rank;
- ep = N for each strategy: allgather, all2allv, mc2, mc2 over the symmetric-memory transport
  (where the block fits its limits; otherwise its reason is printed as "–"), and "auto". Every
  EP variant gets ``max_tokens_per_rank`` = the token count (what a user who knows the bound sets;
  mc2 needs it). "auto" is timed as the variant it picks when that variant has the same settings
  (the same compiled graph), otherwise compiled on its own;
- each of them with CUDA graphs too (``inner_mode="reduce-overhead"``) where tokens/rank <= 128;
- a bare ``dist.all_to_all_single`` of the bytes an exact dispatch moves (T*K*H bf16 per rank,
  equal splits);
- with ``--overlap-chunks n ...``, above 128 tokens per rank: AllGather in n overlapped chunks
  (``config.ep_overlap_chunks``), named "allgather/n", in the split table and the notes.

Each variant is compiled once (``torch._dynamo.reset()`` between token counts) and its output
checked against the uncompiled layer (bf16 bound of the tests) before it is timed. Times are
medians of CUDA-event timings of back-to-back calls, in interleaved rounds as in bench.py, every
rank synchronized and lined up at a barrier before each variant's calls; the figure reported is
the largest of the ranks' medians.

Dispatch and combine are split out with torch.profiler over a few calls of each variant without
CUDA graphs: the GPU kernel time under the outermost ``moe_fx::`` ops whose names contain
"dispatch" / "combine" (collectives and the time a rank waits in them for the other included).
Bytes are what one rank sends to the other ranks per call (rows of H values, bf16; routing ids
and weights left out), with uniform routing for the exact strategies:

    allgather     dispatch (ep-1)*T*H           combine (ep-1)*T*H (reduce-scatter; partial sums kept in
                                                fp32 put twice that on the wire)
    all2allv      dispatch T*K*H*(ep-1)/ep      combine the same
    mc2           dispatch (ep-1)*C*K*H         combine the same (fixed C*K-row buffers, C = max_tokens_per_rank)
    mc2 symm_mem  dispatch T*K*H*(ep-1)/ep      combine the same
    bare a2a      T*K*H*(ep-1)/ep

GB/s = those bytes / the op's time, comparable with the link's per-direction bandwidth. The
"host overhead" columns divide the layer time by the busier rank's summed GPU kernel time per
call, with and without the NCCL kernels (NCCL kernel time includes waiting for the other rank).

``--device cpu`` runs the same over gloo with the host clock (tests; use ``--shapes tiny``);
there the split is the host time under the ops, and CUDA graphs and symm_mem are skipped.

    torchrun --nproc-per-node 2 -m moe_fx.bench --ep 2 --json ep.json --png ep.png
    python -m torch.distributed.run --nproc-per-node 2 -m moe_fx.bench --ep 2 --device cpu --shapes tiny --tokens 8 32
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

import moe_fx
from moe_fx.runtime.comm import destroy_process_group
from moe_fx.bench import (SHAPES, LayerShape, build_blocks, configured_backend, interleaved_medians, make_tokens,
                          timed_us)

EP_SHAPES = {
    **{key: SHAPES[key] for key in ("deepseek_v3", "gpt_oss", "qwen3", "mixtral")},
    "tiny": LayerShape(name="tiny", hidden=64, intermediate=32, num_experts=8, top_k=2),
}
DEFAULT_SHAPES = {"cuda": ("deepseek_v3", "gpt_oss", "qwen3"), "cpu": ("tiny",)}
DEFAULT_TOKENS = {"cuda": (8, 128, 4096), "cpu": (8, 32)}
STRATEGIES = ("allgather", "all2allv", "mc2", "mc2_symm_mem")
EP1, AUTO, BARE_A2A = "ep1", "auto", "bare_a2a"
HOST_SYNCED = ("all2allv",)  # strategies that read sizes on the host (no CUDA graphs)
GRAPHS = "+graphs"  # suffix of a variant's name under CUDA graphs
GRAPHS_MAX_TOKENS = 128
BF16_RTOL = 2e-2  # tests/tolerances.py
ELEM_BYTES = 2  # bf16


@dataclass(frozen=True, kw_only=True)
class Variant:
    name: str  # "ep1", a strategy, "auto"; + GRAPHS
    strategy: str  # EP1, a strategy or AUTO
    graphs: bool
    settings: dict  # moe_fx.config while it compiles


@dataclass
class RankContext:
    rank: int
    world: int
    device: str
    side: dist.ProcessGroup  # gloo: barriers and the exchange of results, off the timed streams
    one_rank_group: str  # group_name of this rank's one-rank group (ep1)
    inner_backend: str


# ------------------------------------------------------------------------------------------
# Bytes and profiles
# ------------------------------------------------------------------------------------------


def link_bytes(strategy: str, *, tokens: int, top_k: int, hidden: int, ep: int, capacity: int,
               elem_bytes: int = ELEM_BYTES) -> tuple[int, int]:
    """(dispatch, combine) bytes one rank sends to the other ranks per call: the module docstring's
    formulas."""
    if strategy == "allgather":
        sent = (ep - 1) * tokens * hidden * elem_bytes
    elif strategy in ("all2allv", "mc2_symm_mem"):
        sent = tokens * top_k * hidden * elem_bytes * (ep - 1) // ep
    elif strategy == "mc2":
        sent = (ep - 1) * capacity * top_k * hidden * elem_bytes
    else:
        raise ValueError(f"no byte count for strategy {strategy!r}; expected one of {STRATEGIES}")
    return sent, sent


def bare_a2a_bytes(*, tokens: int, top_k: int, hidden: int, ep: int, elem_bytes: int = ELEM_BYTES) -> int:
    """Bytes of the bare all-to-all that leave this rank (its own chunk stays)."""
    return tokens * top_k * hidden * elem_bytes * (ep - 1) // ep


def gbps(num_bytes: float, us: float | None) -> float | None:
    return None if not us else num_bytes / (us * 1e-6) / 1e9


_COLLECTIVE_CATEGORY = {"_c10d_functional::all_gather_into_tensor": "dispatch",
                        "_c10d_functional::reduce_scatter_tensor": "combine"}


def _op_category(name: str) -> str | None:
    """"dispatch" or "combine" for a moe_fx op whose name says so (matched by substring: op names
    change), or for the c10d functional collective a strategy emits in its place (the bounded
    AllGather: all-gather = dispatch, reduce-scatter = combine); else None."""
    if name in _COLLECTIVE_CATEGORY:
        return _COLLECTIVE_CATEGORY[name]
    if not name.startswith("moe_fx::"):
        return None
    return next((c for c in ("dispatch", "combine") if c in name.lower()), None)


def _has_ancestor(event, predicate: Callable) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if predicate(parent):
            return True
        parent = parent.cpu_parent
    return False


def summarize_profile(events, *, on_device: bool, calls: int) -> dict:
    """Per-call times from torch.profiler events: dispatch / combine (the outermost moe_fx ops of
    each category; GPU kernel time under them on CUDA, host time on CPU), every outermost moe_fx
    op, and on CUDA the summed kernel time and its NCCL part."""
    from torch.autograd import DeviceType

    def op_us(event) -> float:
        return (event.device_time_total if on_device else event.cpu_time_total) / calls

    # None, not 0, where no op matched: a renamed op must not read as a free one.
    summary: dict = {"dispatch_us": None, "combine_us": None, "ops_us": {}, "kernel_us": None, "nccl_us": None}
    for event in events:
        timed = _op_category(event.name) is not None or event.name.startswith("moe_fx::")
        if event.device_type != DeviceType.CPU or not timed:
            continue
        category = _op_category(event.name)
        if category and not _has_ancestor(event, lambda p, c=category: _op_category(p.name) == c):
            summary[f"{category}_us"] = (summary[f"{category}_us"] or 0.0) + op_us(event)
        if not _has_ancestor(event, lambda p: p.name.startswith("moe_fx::")):
            summary["ops_us"][event.name] = summary["ops_us"].get(event.name, 0.0) + op_us(event)
    if on_device:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
                   and "annotation" not in str(getattr(e, "activity_type", "")).lower()]
        summary["kernel_us"] = sum(e.time_range.elapsed_us() for e in kernels) / calls
        summary["nccl_us"] = sum(e.time_range.elapsed_us() for e in kernels if "nccl" in e.name.lower()) / calls
        # Strategies that emit c10d functional collectives (the bounded AllGather) have no
        # dispatch/combine op: their exchange is the NCCL all-gather and reduce-scatter kernels.
        for category, kernel in (("dispatch", "allgather"), ("combine", "reducescatter")):
            if summary[f"{category}_us"] is None:
                matched = [e.time_range.elapsed_us() for e in kernels
                           if "nccl" in e.name.lower() and kernel in e.name.lower().replace("_", "")]
                summary[f"{category}_us"] = sum(matched) / calls if matched else None
    return summary


# ------------------------------------------------------------------------------------------
# One rank's work
# ------------------------------------------------------------------------------------------


def host_timed_us(fn: Callable[[], object], *, warmup: int, iters: int) -> list[float]:
    """timed_us on the host clock (CPU runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return times


def variants_for(tokens: int, ctx: RankContext, *, strategies: tuple[str, ...], graphs: bool,
                 overlap_chunks: tuple[int, ...] = ()) -> list[Variant]:
    """ep1, each strategy, and AllGather with each of ``overlap_chunks`` (named "allgather/n"); each
    also under CUDA graphs when ``graphs``."""
    common = {"inner_backend": ctx.inner_backend, "max_tokens_per_rank": tokens}
    plain = [Variant(name=EP1, strategy=EP1, graphs=False, settings={**common, "ep_group": ctx.one_rank_group})]
    for strategy in strategies:
        lowering = {"lowering": "mc2", "mc2_transport": "symm_mem"} if strategy == "mc2_symm_mem" else {
            "lowering": strategy}
        plain.append(Variant(name=strategy, strategy=strategy, graphs=False, settings={**common, **lowering}))
    for n in overlap_chunks:
        plain.append(Variant(name=f"allgather/{n}", strategy="allgather", graphs=False,
                             settings={**common, "lowering": "allgather", "ep_overlap_chunks": n}))
    if not graphs:
        return plain
    # All2AllV reads split sizes on the host: it cannot be captured in a CUDA graph.
    return plain + [Variant(name=v.name + GRAPHS, strategy=v.strategy, graphs=True,
                            settings={**v.settings, "inner_mode": "reduce-overhead"})
                    for v in plain if v.strategy not in HOST_SYNCED]


def auto_pick(block: torch.nn.Module, x: torch.Tensor, tokens: int, ctx: RankContext) -> str:
    """The strategy "auto" picks for this layer with the token bound (moe_fx.explain: no
    collective, no compilation; it resets dynamo, so call it before compiling anything)."""
    with moe_fx.config.patch(lowering="auto", max_tokens_per_rank=tokens), torch.no_grad():
        report = moe_fx.explain(block, x)
    if len(report.blocks) != 1:
        raise RuntimeError(f"moe_fx.explain found {len(report.blocks)} MoE blocks in the layer, expected 1")
    picked = report.blocks[0].lowering
    return "mc2_symm_mem" if picked == "mc2" and moe_fx.config.mc2_transport == "symm_mem" else picked


def _reason(exc: BaseException) -> str:
    """First line of the UnsupportedMoEError behind ``exc`` (dynamo wraps backend errors), else of ``exc``."""
    seen, cause = set(), exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, moe_fx.UnsupportedMoEError):
            return str(cause).strip().splitlines()[0]
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def prepare(variant: Variant, block: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor,
            ctx: RankContext) -> tuple[Callable[[], object] | None, dict]:
    """Compile ``variant``, run it (three calls under graphs: warm-up, capture, replay) and check
    its output. Returns (the call to time or None, facts); every rank gets the same verdict."""
    fn = torch.compile(block, backend=configured_backend(**variant.settings), fullgraph=True)
    call = (lambda: (torch.compiler.cudagraph_mark_step_begin(), fn(x))[1]) if variant.graphs else (lambda: fn(x))
    facts: dict = {"skip": None, "wrong": None}
    skips_before = counters["inductor"]["cudagraph_skips"]
    try:
        with moe_fx.recording() as graphs, torch.no_grad():
            out = [call() for _ in range(3 if variant.graphs else 1)][-1].float()
            bound = BF16_RTOL * ref.abs().max().item()
            diff = (out - ref).abs().max().item()
        blocks = [b.choice.strategy.value for g in graphs for b in g.report.blocks]
        facts.update(diff=diff, bound=bound, blocks=blocks)
        if len(blocks) != 1:
            facts["skip"] = f"moe_fx rewrote {len(blocks)} MoE blocks, expected 1: not timed"
        elif not diff <= bound:
            facts["wrong"] = facts["skip"] = f"WRONG: max |diff| {diff:.3g} > bound {bound:.3g}"
    except Exception as exc:  # reported as the variant's reason ("–" in the table)
        facts["skip"] = _reason(exc)
    facts["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips_before
    every = [None] * ctx.world
    dist.all_gather_object(every, facts, group=ctx.side)
    failing = [(r, f) for r, f in enumerate(every) if f["skip"]]
    if failing:
        rank, worst = failing[0]
        facts = {**worst, "skip": worst["skip"] + (f" (rank {rank})" if ctx.world > 1 else "")}
        return None, facts
    facts["diff"] = max(f["diff"] for f in every)
    facts["cudagraph_skips"] = max(f["cudagraph_skips"] for f in every)
    return call, facts


def bare_a2a(shape: LayerShape, tokens: int, ctx: RankContext) -> Callable[[], object]:
    """all_to_all_single of T*K rows of H bf16 values, equal splits (rows padded to a multiple of ep)."""
    rows = -(-tokens * shape.top_k // ctx.world) * ctx.world
    send = torch.randn(rows, shape.hidden, device=ctx.device).to(torch.bfloat16)
    recv = torch.empty_like(send)
    return lambda: dist.all_to_all_single(recv, send)


def profile(call: Callable[[], object], ctx: RankContext, calls: int, line_up: Callable[[], None]) -> dict:
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device == "cuda" else [])
    line_up()
    with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        if ctx.device == "cuda":
            torch.cuda.synchronize()
    return summarize_profile(prof.events(), on_device=ctx.device == "cuda", calls=calls)


def bench_tokens(shape: LayerShape, block: torch.nn.Module, tokens: int, ctx: RankContext, args,
                 log: Callable[[str], None]) -> dict:
    """Everything for one (shape, tokens per rank); the same dict on every rank."""
    started = time.perf_counter()
    torch._dynamo.reset()
    x = make_tokens(shape, tokens, skew=False, device=ctx.device, seed=1 + 7919 * ctx.rank)
    with torch.no_grad():
        ref = block(x).float()
    try:
        picked = auto_pick(block, x, tokens, ctx)
    except Exception as exc:  # then "auto" is compiled and timed on its own
        picked = f"unknown ({_reason(exc)})"
    use_graphs = ctx.device == "cuda" and tokens <= GRAPHS_MAX_TOKENS and not args.no_graphs
    # overlapped chunks only pay (if ever) where the exchange is bandwidth, not latency: prefill sizes
    variants = variants_for(tokens, ctx, strategies=tuple(args.strategies), graphs=use_graphs,
                            overlap_chunks=tuple(args.overlap_chunks) if tokens > GRAPHS_MAX_TOKENS else ())
    calls: dict[str, Callable[[], object]] = {}
    facts: dict[str, dict] = {}
    for variant in variants:
        call, fact = prepare(variant, block, x, ref, ctx)
        facts[variant.name] = fact
        if call is not None:
            calls[variant.name] = call
        log(f"  {shape.name} T={tokens} {variant.name}: "
            + (f"skipped: {fact['skip']}" if call is None else f"ok, diff {fact['diff']:.3g}"))
    auto_as = picked if picked in STRATEGIES and picked in args.strategies else None
    if auto_as is None:  # a pick the strategy variants do not cover: compile it on its own
        common = {"inner_backend": ctx.inner_backend, "max_tokens_per_rank": tokens, "lowering": "auto"}
        autos = [Variant(name=AUTO, strategy=AUTO, graphs=False, settings=common)]
        if use_graphs:
            autos.append(Variant(name=AUTO + GRAPHS, strategy=AUTO, graphs=True,
                                 settings={**common, "inner_mode": "reduce-overhead"}))
        for variant in autos:
            call, facts[variant.name] = prepare(variant, block, x, ref, ctx)
            if call is not None:
                calls[variant.name] = call
    calls[BARE_A2A] = bare_a2a(shape, tokens, ctx)

    def line_up() -> None:
        if ctx.device == "cuda":
            torch.cuda.synchronize()
        dist.barrier(group=ctx.side)

    timer = timed_us if ctx.device == "cuda" else host_timed_us
    mine = interleaved_medians(calls, warmup=args.warmup, iters=args.iters, rounds=args.rounds, timer=timer,
                               before_each=line_up)
    every: list = [None] * ctx.world
    dist.all_gather_object(every, mine, group=ctx.side)
    times = {name: max(m[name] for m in every) for name in calls}
    if auto_as is not None:
        times[AUTO] = times.get(auto_as)
        if use_graphs:
            times[AUTO + GRAPHS] = times.get(auto_as + GRAPHS)

    profiles: dict[str, list[dict]] = {}
    for name, call in calls.items():
        if GRAPHS in name or name == BARE_A2A or args.profile_calls < 1:
            continue
        summary = profile(call, ctx, args.profile_calls, line_up)
        profiles[name] = [None] * ctx.world
        dist.all_gather_object(profiles[name], summary, group=ctx.side)

    row = {
        "shape": shape.name, "hidden": shape.hidden, "intermediate": shape.intermediate,
        "experts": shape.num_experts, "top_k": shape.top_k, "tokens_per_rank": tokens, "ep": ctx.world,
        "times_us": times, "rank_times_us": {name: [m[name] for m in every] for name in calls},
        "skipped": {n: f["skip"] for n, f in facts.items() if f["skip"]},
        "wrong": {n: f["wrong"] for n, f in facts.items() if f.get("wrong")},
        "max_diff": {n: f["diff"] for n, f in facts.items() if "diff" in f and not f["skip"]},
        "cudagraph_skips": {n: f["cudagraph_skips"] for n, f in facts.items() if n.endswith(GRAPHS)},
        "auto": {"picked": picked, "timed_as": auto_as},
        "bare_a2a": _bare_row(shape, tokens, ctx.world, times[BARE_A2A]),
    }
    row["split"] = split_rows(row, profiles, on_device=ctx.device == "cuda")
    row["ratios"] = ratios(row)
    log(f"  {shape.name} T={tokens}: {time.perf_counter() - started:.1f} s; "
        + ", ".join(f"{n} {v:.0f}" for n, v in times.items() if v is not None) + " us")
    del calls
    torch._dynamo.reset()
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
    return row


def _bare_row(shape: LayerShape, tokens: int, ep: int, us: float) -> dict:
    across = bare_a2a_bytes(tokens=tokens, top_k=shape.top_k, hidden=shape.hidden, ep=ep)
    return {"us": us, "bytes_per_rank": tokens * shape.top_k * shape.hidden * ELEM_BYTES, "bytes_across": across,
            "gbps_across": gbps(across, us)}


def split_rows(row: dict, profiles: dict[str, list[dict]], *, on_device: bool) -> dict:
    """Per profiled variant: dispatch / combine time (busier rank), bytes and GB/s, and the layer
    time over the busier rank's summed kernel time, with and without NCCL kernels."""
    out = {}
    for name, per_rank in profiles.items():
        strategy = row["auto"]["picked"] if name == AUTO else name.split("/")[0]
        entry = {f"{c}_us": _max_or_none(p[f"{c}_us"] for p in per_rank) for c in ("dispatch", "combine")}
        entry["per_rank"] = per_rank
        if strategy in STRATEGIES:
            sent = link_bytes(strategy, tokens=row["tokens_per_rank"], top_k=row["top_k"], hidden=row["hidden"],
                              ep=row["ep"], capacity=row["tokens_per_rank"])
            entry.update(dispatch_bytes=sent[0], combine_bytes=sent[1],
                         dispatch_gbps=gbps(sent[0], entry["dispatch_us"]),
                         combine_gbps=gbps(sent[1], entry["combine_us"]))
        if on_device:
            layer = row["times_us"][name]
            kernels = max(p["kernel_us"] for p in per_rank)
            compute = max(p["kernel_us"] - p["nccl_us"] for p in per_rank)
            entry.update(kernel_us=kernels, kernel_without_nccl_us=compute,
                         nccl_us=max(p["nccl_us"] for p in per_rank),
                         layer_over_kernels=layer / kernels if kernels else None,
                         layer_over_kernels_without_nccl=layer / compute if compute else None)
        out[name] = entry
    return out


def _max_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def ratios(row: dict) -> dict:
    """best EP ÷ ep1 and auto ÷ ep1, without and with CUDA graphs (where both sides ran)."""
    out = {}
    for suffix, label in (("", "no_graphs"), (GRAPHS, "graphs")):
        base = row["times_us"].get(EP1 + suffix)
        ep = {s: v for s in STRATEGIES if (v := row["times_us"].get(s + suffix)) is not None}
        auto = row["times_us"].get(AUTO + suffix)
        if base is None or (not ep and auto is None):
            continue
        best = min(ep, key=ep.get) if ep else None
        out[label] = {"best_ep": best, "best_ep_over_ep1": ep[best] / base if best else None,
                      "auto_over_ep1": auto / base if auto is not None else None}
    return out


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "–" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    """Times (µs, the slowest rank's median) per variant; "–" where a variant did not run (its reason
    is in the notes)."""
    header = ("shape (H, I, E, K)", "tokens/rank", "CUDA graphs", "ep1", "AllGather", "All2AllV", "MC2",
              "MC2 symm_mem", "auto (picks)", "bare a2a (GB/s across)", "best EP ÷ ep1", "auto ÷ ep1")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        for suffix, label in (("", "no"), (GRAPHS, "yes")):
            if EP1 + suffix not in r["times_us"] and EP1 + suffix not in r["skipped"]:
                continue  # no graph variants at this size
            t = r["times_us"]
            ratio = r["ratios"].get("no_graphs" if not suffix else "graphs", {})
            bare = r["bare_a2a"]
            shape = f"{r['shape']} ({r['hidden']}, {r['intermediate']}, {r['experts']}, {r['top_k']})"
            lines.append("| " + " | ".join((
                shape, str(r["tokens_per_rank"]), label,
                *(_fmt(t.get(n + suffix)) for n in (EP1, *STRATEGIES)),
                f"{_fmt(t.get(AUTO + suffix))} ({r['auto']['picked']})",
                f"{_fmt(bare['us'])} ({_fmt(bare['gbps_across'], '.3g')})",
                _fmt(ratio.get("best_ep_over_ep1"), ".2f"), _fmt(ratio.get("auto_over_ep1"), ".2f"),
            )) + " |")
    return "\n".join(lines)


def split_table(rows: list[dict], *, on_device: bool) -> str:
    header = ["shape", "tokens/rank", "variant", "layer µs", "dispatch µs", "dispatch MB", "dispatch GB/s",
              "combine µs", "combine MB", "combine GB/s"]
    if on_device:
        header += ["kernels µs (busier rank)", "NCCL µs", "layer ÷ kernels", "layer ÷ kernels w/o NCCL"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        for name, s in r["split"].items():
            mb = (lambda b: _fmt(None if b is None else b / 1e6, ".3g"))
            cells = [r["shape"], str(r["tokens_per_rank"]), name, _fmt(r["times_us"][name]),
                     _fmt(s["dispatch_us"]), mb(s.get("dispatch_bytes")), _fmt(s.get("dispatch_gbps"), ".3g"),
                     _fmt(s["combine_us"]), mb(s.get("combine_bytes")), _fmt(s.get("combine_gbps"), ".3g")]
            if on_device:
                cells += [_fmt(s["kernel_us"]), _fmt(s["nccl_us"]), _fmt(s["layer_over_kernels"], ".2f"),
                          _fmt(s["layer_over_kernels_without_nccl"], ".2f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        ep1 = r["times_us"].get(EP1)
        for name, us in r["times_us"].items():
            if "/" in name and us is not None and ep1:
                out.append(f"{r['shape']} T={r['tokens_per_rank']} {name} (AllGather in {name.split('/')[1]} "
                           f"overlapped chunks): {us:.0f} µs, {us / ep1:.2f} x ep1")
        for name, reason in r["skipped"].items():
            out.append(f"{r['shape']} T={r['tokens_per_rank']} {name}: {reason}")
        for name, n in r["cudagraph_skips"].items():
            if n:
                out.append(f"{r['shape']} T={r['tokens_per_rank']} {name}: {n} cudagraph skip(s) (ran without graphs)")
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    names = (*STRATEGIES, AUTO)
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        groups = [(r, s) for r in rows if r["shape"] == shape for s in ("", GRAPHS)
                  if r["times_us"].get(EP1 + s)]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            heights = [(r["times_us"].get(name + s) or 0) / r["times_us"][EP1 + s] for r, s in groups]
            ax.bar([g + i * width for g in range(len(groups))], heights, width, label=name)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))],
                      [f"T={r['tokens_per_rank']}{' graphs' if s else ''}" for r, s in groups])
        ax.set_title(shape)
        ax.set_ylabel("time ÷ ep1 (lower is better)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def link_description(device: str) -> dict:
    """What joins the GPUs: ``nvidia-smi topo -m``'s GPU0-GPU1 cell ("NV18": 18 NVLinks), else unknown."""
    if device != "cuda":
        return {"summary": "gloo over loopback (CPU)"}
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"summary": "unknown (no nvidia-smi)"}
    try:
        text = subprocess.run([smi, "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return {"summary": f"unknown ({exc})"}
    for line in text.splitlines():
        cells = line.split()
        if cells[:1] == ["GPU0"] and len(cells) > 2:
            return {"summary": f"GPU0-GPU1: {cells[2]}", "topo": text}
    return {"summary": "unknown", "topo": text}


def environment(device: str, world: int) -> dict:
    import transformers

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "ranks": world,
           "torch": torch.__version__, "transformers": transformers.__version__, "link": link_description(device),
           "env": {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "NVSHMEM_", "TORCH_SYMM_MEM"))}}
    if device == "cuda":
        nccl = torch.cuda.nccl.version()
        env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    return env


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m moe_fx.bench --ep N",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ep", type=int, required=True, help="expert-parallel size: the number of processes")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shapes", nargs="+", choices=sorted(EP_SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, help="tokens per rank")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph variants")
    parser.add_argument("--overlap-chunks", nargs="*", type=int, default=[],
                        help="also time AllGather in these numbers of overlapped chunks (config.ep_overlap_chunks) "
                             f"at more than {GRAPHS_MAX_TOKENS} tokens per rank")
    parser.add_argument("--warmup", type=int, help="calls before each timed round (default 3 on CUDA, 1 on CPU)")
    parser.add_argument("--iters", type=int, help="timed calls per variant, over all rounds (default 30; CPU 4)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; CPU 2)")
    parser.add_argument("--profile-calls", type=int, help="calls profiled per variant, 0: no split (default 3; CPU 2)")
    parser.add_argument("--inner-backend", help="moe_fx's inner compiler (default inductor on CUDA, aot_eager on CPU)")
    parser.add_argument("--timeout-s", type=float, default=600, help="process-group timeout")
    parser.add_argument("--json", help="write the rows and the environment here")
    parser.add_argument("--png", help="also plot time ÷ ep1 per variant to this file (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    for name, cuda_default, cpu_default in (("warmup", 3, 1), ("iters", 30, 4), ("rounds", 3, 2),
                                            ("profile_calls", 3, 2)):
        if getattr(args, name) is None:
            setattr(args, name, cpu_default if cpu else cuda_default)
    args.shapes = args.shapes or list(DEFAULT_SHAPES[args.device])
    args.tokens = sorted(args.tokens or DEFAULT_TOKENS[args.device])
    args.inner_backend = args.inner_backend or ("aot_eager" if cpu else "inductor")
    if not cpu and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device (--device cpu runs over gloo)")
    if args.png:
        try:
            import matplotlib  # noqa: F401  (fail now, not after minutes of timing)
        except ImportError:
            parser.error("--png needs matplotlib: pip install 'moe_fx[bench]'")
    return args


def start_process_group(device: str, timeout_s: float) -> None:
    """The default group of a torchrun process: NCCL on this rank's GPU, or gloo on CPU."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo", timeout=timeout)


def init(args) -> RankContext:
    if "RANK" not in os.environ:
        raise SystemExit(f"--ep {args.ep} runs one process per rank: "
                         f"torchrun --nproc-per-node {args.ep} -m moe_fx.bench --ep {args.ep} ...")
    start_process_group(args.device, args.timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != args.ep:
        raise SystemExit(f"--ep {args.ep} but {world} processes: start one process per rank "
                         f"(torchrun --nproc-per-node {args.ep})")
    side = dist.new_group(backend="gloo")
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    return RankContext(rank=rank, world=world, device=args.device, side=side,
                       one_rank_group=singles[rank].group_name, inner_backend=args.inner_backend)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # transformers' grouped_mm check calls an lru_cache'd helper; dynamo says so once per compile.
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    ctx = init(args)
    log = (lambda s: None) if args.quiet or ctx.rank else (lambda s: print(s, file=sys.stderr, flush=True))
    torch.set_float32_matmul_precision("high")
    # One code object compiled for a dozen backends per token count: past dynamo's default limit
    # it would silently run eagerly.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    started = time.perf_counter()
    env = environment(ctx.device, ctx.world)
    rows = []
    try:
        for key in args.shapes:
            shape = EP_SHAPES[key]
            block = build_blocks(shape, device=ctx.device, impls=("grouped_mm",))["grouped_mm"]
            for tokens in args.tokens:
                rows.append(bench_tokens(shape, block, tokens, ctx, args, log))
                if ctx.rank == 0 and args.json:  # after every row: a run cut short keeps what it measured
                    save_json(args.json, env, args, rows, seconds=time.perf_counter() - started)
            del block
        if ctx.rank == 0:
            report(rows, env, args, seconds=time.perf_counter() - started)
    finally:
        destroy_process_group()
    return 1 if any(r["wrong"] for r in rows) else 0


def save_json(path: str, env: dict, args, rows: list[dict], *, seconds: float) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "args": vars(args), "seconds": seconds, "rows": rows}, f, indent=1)


def report(rows: list[dict], env: dict, args, *, seconds: float) -> None:
    link = env["link"]["summary"]
    print(f"{env['ranks']} x {env['device']}, link {link}, torch {env['torch']}"
          + (f", NCCL {env['nccl']}" if "nccl" in env else "") + f", transformers {env['transformers']}; "
          f"moe_fx inner backend {args.inner_backend}; bf16; µs, slowest rank's median of {args.iters} calls; "
          f"{seconds:.0f} s")
    print()
    print(table(rows))
    print()
    on_device = args.device == "cuda"
    print("Dispatch and combine (" + ("GPU kernel time under the moe_fx ops, busier rank" if on_device else
          "host time under the moe_fx ops: no GPU kernels on CPU") + f", {args.profile_calls} profiled calls):")
    print()
    print(split_table(rows, on_device=on_device))
    for line in notes(rows):
        print(f"- {line}")
    if args.json:
        save_json(args.json, env, args, rows, seconds=seconds)
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    sys.exit(main())
