"""``python -m moe_fx.bench``: one MoE layer (router included) on one GPU, side by side.

For each layer shape and token count it times, in one process and on the same weights:

- transformers' experts implementations "eager", "batched_mm" and "grouped_mm", each in a
  ``MixtralSparseMoeBlock`` of the shape compiled with inductor (the eager form graph-breaks in its
  data-dependent expert loop; that is how it compiles);
- moe_fx at ep = 1 (inductor), also with CUDA graphs (``inner_mode="reduce-overhead"``), next to
  transformers' grouped_mm with CUDA graphs (``mode="reduce-overhead"``);
- the roofline: max(bytes of the router and of the experts the routing touched / HBM bandwidth,
  FLOPs / bf16 peak), from datasheet figures (``--hbm-tbps``, ``--peak-tflops``).

Times are medians of CUDA-event timings of back-to-back calls after warm-up, in microseconds, taken in
interleaved rounds (every variant, then all again in reverse order, ...) so that clock drift and
the GPU's power limit do not favour one variant.
"GEMMs alone" times the layer's two ``torch._grouped_mm`` calls on rows already sorted by expert:
the ceiling for any implementation built on that kernel (moe_fx with CUDA graphs runs its own
Triton kernel where experts get few rows, so it can go below it). "random" routing uses a
random router on random tokens; "skewed" biases the router so that a few experts receive most rows
(the share of rows on the busiest expert is printed).

    python -m moe_fx.bench                        # the full table (about 3 minutes on an H100)
    python -m moe_fx.bench --shapes qwen3 --tokens 1 16 --png bench.png

With ``--ep N`` (under ``torchrun --nproc-per-node N``) it runs the multi-GPU benchmark instead:
moe_fx/bench_ep.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters

import moe_fx


@dataclass(frozen=True, kw_only=True)
class LayerShape:
    name: str
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int

    def expert_bytes(self, dtype_bytes: int = 2) -> int:
        return 3 * self.hidden * self.intermediate * dtype_bytes

    def router_bytes(self, dtype_bytes: int = 2) -> int:
        return self.hidden * self.num_experts * dtype_bytes

    def flops(self, tokens: int) -> int:
        """Expert GEMM FLOPs (gate, up, down) plus the router GEMM."""
        experts = 2 * tokens * self.top_k * 3 * self.hidden * self.intermediate
        return experts + 2 * tokens * self.hidden * self.num_experts


SHAPES = {
    "mixtral": LayerShape(name="Mixtral-8x7B", hidden=4096, intermediate=14336, num_experts=8, top_k=2),
    "qwen3": LayerShape(name="Qwen3-30B-A3B", hidden=2048, intermediate=768, num_experts=128, top_k=8),
    "deepseek_v3": LayerShape(name="DeepSeek-V3", hidden=7168, intermediate=2048, num_experts=256, top_k=8),
    "gpt_oss": LayerShape(name="GPT-OSS-20B", hidden=2880, intermediate=2880, num_experts=32, top_k=4),
}
TOKENS = (1, 16, 128, 1024, 8192)
HF_IMPLS = ("eager", "batched_mm", "grouped_mm")
# batched_mm gathers a full weight copy per routed row; past this it would not fit next to the rest.
BATCHED_MM_MAX_GATHER_BYTES = 20 * 2**30


@dataclass(frozen=True, kw_only=True)
class Hardware:
    hbm_bytes_per_s: float
    bf16_flops_per_s: float

    def roofline_us(self, shape: LayerShape, tokens: int, touched_experts: int) -> float:
        weight_bytes = touched_experts * shape.expert_bytes() + shape.router_bytes()
        return 1e6 * max(weight_bytes / self.hbm_bytes_per_s, shape.flops(tokens) / self.bf16_flops_per_s)


@dataclass(frozen=True, kw_only=True)
class Row:
    shape: LayerShape
    tokens: int
    routing: str
    touched_experts: int
    busiest_share: float  # fraction of routed rows on the most loaded expert
    roofline_us: float
    times_us: dict[str, float | None]  # variant -> median time, None where skipped


# ------------------------------------------------------------------------------------------
# Building the layer
# ------------------------------------------------------------------------------------------


def _mixtral_config(shape: LayerShape, impl: str):
    from transformers import MixtralConfig

    return MixtralConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        experts_implementation=impl,
    )


def build_blocks(shape: LayerShape, *, device: str, seed: int = 0,
                 impls: tuple[str, ...] = HF_IMPLS) -> dict[str, torch.nn.Module]:
    """One ``MixtralSparseMoeBlock`` per transformers experts implementation in ``impls``, sharing
    one set of bf16 weights."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    gen = torch.Generator(device=device).manual_seed(seed)
    scale = shape.hidden**-0.5
    weights = {
        "gate.weight": torch.randn(shape.num_experts, shape.hidden, device=device, generator=gen) * scale,
        "experts.gate_up_proj": torch.randn(
            shape.num_experts, 2 * shape.intermediate, shape.hidden, device=device, generator=gen) * scale,
        "experts.down_proj": torch.randn(
            shape.num_experts, shape.hidden, shape.intermediate, device=device, generator=gen) * shape.intermediate**-0.5,
    }
    # Expert e's router row leans on the all-ones direction by a Zipf-like amount: zero-mean tokens
    # barely see it (random routing), tokens shifted along it (make_tokens' skew) favor the first experts.
    lean = 4.0 / torch.arange(1, shape.num_experts + 1, device=device, dtype=torch.float32)
    weights["gate.weight"] += lean[:, None] / shape.hidden
    weights = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    blocks = {}
    for impl in impls:
        with torch.device("meta"):
            block = MixtralSparseMoeBlock(_mixtral_config(shape, impl))
        block.load_state_dict(weights, assign=True)
        blocks[impl] = block.eval()
    return blocks


def make_tokens(shape: LayerShape, tokens: int, *, skew: bool, device: str, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed + tokens)
    x = torch.randn(1, tokens, shape.hidden, device=device, generator=gen)
    if skew:
        x += 1.0
    return x.to(torch.bfloat16)


def routing_stats(block: torch.nn.Module, x: torch.Tensor) -> tuple[int, float]:
    """(experts touched, share of routed rows on the busiest expert) for ``x``."""
    with torch.no_grad():
        _, _, ids = block.gate(x.view(-1, x.shape[-1]))
    counts = torch.bincount(ids.reshape(-1), minlength=block.experts.num_experts)
    return int((counts > 0).sum()), float(counts.max() / counts.sum())


def grouped_gemm_floor(block: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """The two ``torch._grouped_mm`` calls of the layer alone, on rows already sorted by expert
    for ``x``'s routing: what the GEMM kernel itself takes (no router, sort, activation or combine),
    i.e. the best any implementation built on it can do."""
    with torch.no_grad():
        _, _, ids = block.gate(x.view(-1, x.shape[-1]))
        experts = block.experts
        sorted_ids, order = torch.sort(ids.reshape(-1))
        rows = x.view(-1, x.shape[-1])[order // ids.shape[1]]
        offsets = torch.cumsum(torch.bincount(sorted_ids, minlength=experts.num_experts), 0).to(torch.int32)
        gate_up = experts.gate_up_proj.transpose(-2, -1)
        down = experts.down_proj.transpose(-2, -1)
        middle = torch.empty(rows.shape[0], down.shape[1], device=x.device, dtype=x.dtype).normal_()
    return lambda: (torch._grouped_mm(rows, gate_up, offs=offsets), torch._grouped_mm(middle, down, offs=offsets))


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------


def timed_us(fn: Callable[[], object], *, warmup: int, iters: int) -> list[float]:
    """Per-call times. Calls are issued back to back with an event pair around each and one
    synchronization at the end, as in a model's forward: the host may run ahead of the GPU, and a
    call whose host-side work is slower than its kernels is timed at the host's pace."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) * 1e3 for start, end in events]


def median_us(fn: Callable[[], object], *, warmup: int, iters: int) -> float:
    return statistics.median(timed_us(fn, warmup=warmup, iters=iters))


def interleaved_medians(fns: dict[str, Callable[[], object]], *, warmup: int, iters: int, rounds: int,
                        timer: Callable[..., list[float]] | None = None,
                        before_each: Callable[[], None] | None = None) -> dict[str, float]:
    """Median per-call time of each function, timed in ``rounds`` interleaved rounds of
    ``iters // rounds`` calls, alternately in forward and reverse order: clocks that drift as the
    GPU heats up over a row shift every variant alike instead of favouring one. ``timer`` replaces
    :func:`timed_us` (the host clock on CPU); ``before_each`` runs before each function's calls
    (the multi-GPU benchmark lines its ranks up there)."""
    timer = timer or timed_us
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(rounds):
        # Every other round runs in reverse order: under the GPU's power limit the clocks can depend
        # on what ran just before, and a fixed order would always hand that effect to the same variant.
        order = list(fns.items()) if round_ % 2 == 0 else list(reversed(fns.items()))
        for name, fn in order:
            # Blocks cached for another variant's sizes would make this one free and re-allocate
            # (a synchronizing cudaFree) inside the timed loop.
            torch.cuda.empty_cache()
            if before_each is not None:
                before_each()
            with torch.no_grad():
                samples[name] += timer(fn, warmup=warmup, iters=max(1, iters // rounds))
    return {name: statistics.median(values) for name, values in samples.items()}


def configured_backend(**settings) -> Callable:
    """moe_fx.backend under ``settings``, as its own backend object: dynamo caches compiled code
    per backend, and the settings must hold while a (re)compilation runs."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        with moe_fx.config.patch(**settings):
            return moe_fx.backend(gm, example_inputs)

    return backend


def variants_for(blocks: dict[str, torch.nn.Module]) -> dict[str, Callable]:
    """Every timed variant, compiled on first call and reused for all token counts (dynamo makes
    the token dimension dynamic on the second size). CUDA-graph variants start a new step per call,
    since a replay overwrites the previous call's outputs."""
    grouped = blocks["grouped_mm"]
    variants = {f"hf_{impl}": torch.compile(blocks[impl], backend="inductor") for impl in HF_IMPLS}
    variants["moe_fx"] = torch.compile(grouped, backend=configured_backend())
    graphs = {
        "hf_grouped_mm_cudagraphs": torch.compile(grouped, backend="inductor", mode="reduce-overhead"),
        "moe_fx_cudagraphs": torch.compile(grouped, backend=configured_backend(inner_mode="reduce-overhead")),
    }
    for name, fn in graphs.items():
        variants[name] = lambda x, fn=fn: (torch.compiler.cudagraph_mark_step_begin(), fn(x))[1]
    return variants


def check_against_reference(variants: dict[str, Callable], reference: torch.nn.Module, x: torch.Tensor,
                            *, shape: LayerShape, label: str) -> None:
    """Refuse to time a variant that computes something else: every output must be within the bf16
    bound of the tests (2e-2 of max |eager|) of transformers' uncompiled grouped_mm block."""
    with torch.no_grad():
        want = reference(x).float()
        bound = 2e-2 * want.abs().max().item()
        for name, fn in variants.items():
            if _skipped(name, shape, x.shape[1]):
                continue
            diff = (fn(x).float() - want).abs().max().item()
            if not diff <= bound:
                raise AssertionError(f"{label}: {name} differs from eager by {diff:.3g} (bound {bound:.3g})")


def _skipped(name: str, shape: LayerShape, tokens: int) -> bool:
    return name == "hf_batched_mm" and tokens * shape.top_k * shape.expert_bytes() > BATCHED_MM_MAX_GATHER_BYTES


def bench_shape(shape: LayerShape, *, tokens: tuple[int, ...], routings: tuple[str, ...], hw: Hardware,
                device: str, warmup: int, iters: int, rounds: int, log: Callable[[str], None]) -> list[Row]:
    rows = []
    blocks = build_blocks(shape, device=device)
    variants = variants_for(blocks)
    rewritten_before = counters["moe_fx"]["regions_rewritten"]
    for routing in routings:
        skew = routing == "skewed"
        for t in tokens:
            x = make_tokens(shape, t, skew=skew, device=device)
            touched, busiest = routing_stats(blocks["grouped_mm"], x)
            check_against_reference(variants, blocks["grouped_mm"], x, shape=shape, label=f"{shape.name} T={t} {routing}")
            started = time.perf_counter()
            timed = {name: (lambda fn=fn: fn(x)) for name, fn in variants.items() if not _skipped(name, shape, t)}
            timed[GEMM_FLOOR] = grouped_gemm_floor(blocks["grouped_mm"], x)
            measured = interleaved_medians(timed, warmup=warmup, iters=iters, rounds=rounds)
            times: dict[str, float | None] = {name: measured.get(name) for name in (*variants, GEMM_FLOOR)}
            log(f"  {shape.name} T={t} {routing}: " + ", ".join(f"{n} {v:.0f}" for n, v in measured.items())
                + f" us ({time.perf_counter() - started:.1f} s)")
            rows.append(Row(shape=shape, tokens=t, routing=routing, touched_experts=touched, busiest_share=busiest,
                            roofline_us=hw.roofline_us(shape, t, touched), times_us=times))
    if counters["moe_fx"]["regions_rewritten"] == rewritten_before:
        raise AssertionError(f"{shape.name}: moe_fx rewrote no MoE region; its column would time plain inductor")
    del blocks, variants
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------

HF_COLUMNS = ("hf_eager", "hf_batched_mm", "hf_grouped_mm")
GEMM_FLOOR = "grouped_gemm_floor"  # a reference, not a variant: see grouped_gemm_floor()
HF_GRAPH_COLUMNS = ("hf_grouped_mm_cudagraphs",)


def best_of(row: Row, names: tuple[str, ...]) -> float:
    return min(v for n in names if (v := row.times_us.get(n)) is not None)


def best_moe_fx(row: Row) -> float:
    return best_of(row, ("moe_fx", "moe_fx_cudagraphs"))


def table(rows: list[Row]) -> str:
    """Markdown table. "vs best HF": fastest transformers form compiled with inductor (default
    mode) over moe_fx's faster variant; "vs best HF incl. graphs" lets transformers use CUDA
    graphs too. "GEMMs alone": the layer's two torch._grouped_mm calls on pre-sorted rows, the
    ceiling for any implementation built on that kernel."""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    header = ("shape", "T", "routing", "experts hit", "roofline", "HF eager", "HF batched_mm", "HF grouped_mm",
              "HF grouped_mm +graphs", "moe_fx", "moe_fx +graphs", "vs best HF", "vs best HF incl. graphs",
              "roofline / moe_fx", "GEMMs alone", "roofline / GEMMs alone")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        t, ours = r.times_us, best_moe_fx(r)
        routing = r.routing if r.routing == "random" else f"skewed ({r.busiest_share:.0%} on one)"
        lines.append("| " + " | ".join((
            r.shape.name, str(r.tokens), routing, str(r.touched_experts), fmt(r.roofline_us),
            fmt(t["hf_eager"]), fmt(t["hf_batched_mm"]), fmt(t["hf_grouped_mm"]), fmt(t["hf_grouped_mm_cudagraphs"]),
            fmt(t["moe_fx"]), fmt(t["moe_fx_cudagraphs"]), f"{best_of(r, HF_COLUMNS) / ours:.2f}",
            f"{best_of(r, HF_COLUMNS + HF_GRAPH_COLUMNS) / ours:.2f}", f"{r.roofline_us / ours:.2f}",
            fmt(t[GEMM_FLOOR]), f"{r.roofline_us / t[GEMM_FLOOR]:.2f}",
        )) + " |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r.shape.name for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, name in zip(axes[0], shapes):
        mine = [r for r in rows if r.shape.name == name and r.routing == "random"]
        ts = [r.tokens for r in mine]
        ax.plot(ts, [r.roofline_us / best_of(r, HF_COLUMNS + HF_GRAPH_COLUMNS) for r in mine], "o-",
                label="best transformers")
        ax.plot(ts, [r.roofline_us / best_moe_fx(r) for r in mine], "o-", label="moe_fx")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.05)
        ax.set_title(name)
        ax.set_xlabel("tokens")
        ax.set_ylabel("fraction of roofline")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--ep" or a.startswith("--ep=") for a in argv):
        from moe_fx import bench_ep  # the multi-GPU benchmark, under torchrun

        return bench_ep.main(argv)
    parser = argparse.ArgumentParser(prog="python -m moe_fx.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ep", type=int, help="expert-parallel over N processes (torchrun): see moe_fx/bench_ep.py")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--routing", nargs="+", choices=("random", "skewed"), default=["random", "skewed"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds per row (iters split among them)")
    parser.add_argument("--hbm-tbps", type=float, default=3.35, help="HBM bandwidth, TB/s (H100 SXM: 3.35)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak, TFLOP/s (H100 SXM: 989)")
    parser.add_argument("--png", help="also plot fraction of roofline vs tokens to this file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    # Fail now, not after minutes of timing.
    for module, why in (("transformers", "building the layers"), *((("matplotlib", "--png"),) if args.png else ())):
        try:
            __import__(module)
        except ImportError:
            parser.error(f"{why} needs {module}: pip install 'moe_fx[bench]'")
    torch.set_float32_matmul_precision("high")
    # Six compiled variants of one forward (each static at T=1, then dynamic) exceed dynamo's
    # default per-code-object recompile limit, past which it would silently run eagerly.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    hw = Hardware(hbm_bytes_per_s=args.hbm_tbps * 1e12, bf16_flops_per_s=args.peak_tflops * 1e12)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    started = time.perf_counter()
    rows: list[Row] = []
    for key in args.shapes:
        rows += bench_shape(SHAPES[key], tokens=tuple(sorted(args.tokens)), routings=tuple(args.routing), hw=hw,
                            device="cuda", warmup=args.warmup, iters=args.iters, rounds=args.rounds, log=log)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"transformers {__import__('transformers').__version__}; bf16; median us; "
          f"roofline from {args.hbm_tbps} TB/s and {args.peak_tflops} TFLOP/s; "
          f"{time.perf_counter() - started:.0f} s")
    print(table(rows))
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
