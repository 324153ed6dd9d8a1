"""Every MoE family of transformers 4.57 through moe_fx: explain(), prepare, compile, compare.

For each family a tiny fp32 model (one or two layers, H 64, 4 experts, top-2) is run eagerly,
explained (before prepare), prepared (``moe_fx.prepare``), compiled with ``moe_fx.backend``
(inner backend ``eager``; fullgraph where the model allows, else with the capture flags explain()
uses) and compared with the eager output. One markdown row per family; then every reason in full.

    PYTHONPATH=~/.cache/moe_fx/transformers-4.57.1:. python scripts/tf4_models.py [--only mixtral,dbrx]

Verdicts: ``rewritten`` (blocks rewritten, output equal to eager within 1e-5), ``explained`` (not
rewritten, and explain() or prepare's report says why), ``SILENT`` (neither: a bug to fix).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the repo, after transformers 4.57

import torch  # noqa: E402
import transformers  # noqa: E402

import moe_fx  # noqa: E402
from tests.tiny_models import _COMMON, _model_kwargs, _reinit_, make_input_ids  # noqa: E402
from tests.tolerances import FP32_ATOL  # noqa: E402

E, K, TOKENS = 4, 2, 12
_MOE = dict(num_experts_per_tok=K)


def _hf(key: str, **extra) -> dict:
    """tests/tiny_models.py's kwargs of a family it knows, at E experts."""
    kwargs = {**_COMMON, **_model_kwargs(key, 1), **_MOE, **extra}
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if name in kwargs:
            kwargs[name] = E
    return kwargs


_DEEPSEEK = dict(moe_intermediate_size=32, n_routed_experts=E, n_shared_experts=1, first_k_dense_replace=0,
                 n_group=2, topk_group=1, norm_topk_prob=True, **_MOE)
_SEQ2SEQ = dict(vocab_size=128, d_model=64, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)

# family -> (config class, model class, config kwargs). The model class's output [0] is compared.
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", _hf("olmoe")),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", _hf("granitemoe")),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         _hf("granitemoe", shared_intermediate_size=32)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                         _hf("granitemoe", shared_intermediate_size=32, layer_types=["attention"])),
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM", _hf("jetmoe", num_local_experts=E)),
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM", _hf("llama4_text", num_local_experts=E)),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM", _hf("olmoe")),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", _hf("mixtral")),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", _hf("qwen2_moe")),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", _hf("qwen3_moe")),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", _hf("deepseek_v2", n_routed_experts=E)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", _hf("deepseek_v3")),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", {**_COMMON, **_MOE, "intermediate_size": 32,
                                                     "num_local_experts": E}),
    "dbrx": ("DbrxConfig", "DbrxForCausalLM", dict(
        d_model=64, n_heads=4, n_layers=1, max_seq_len=128, vocab_size=128, attn_config=dict(kv_n_heads=2),
        ffn_config=dict(ffn_hidden_size=32, moe_num_experts=E, moe_top_k=K), pad_token_id=0)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {}),  # tests/tf4_jobs.py's 4.x spelling, below
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM", {**_COMMON, **_MOE, "intermediate_size": 32, "head_dim": 16,
                                                        "num_local_experts": E, "layer_types": ["full_attention"]}),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", {**_COMMON, **_DEEPSEEK, "intermediate_size": 64}),
    "dots1": ("Dots1Config", "Dots1ForCausalLM", {**_COMMON, **_DEEPSEEK, "intermediate_size": 64}),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", {
        **_COMMON, "intermediate_size": 64, "moe_intermediate_size": 32, "moe_num_experts": E, "moe_k": K,
        "moe_num_shared_experts": 1, "moe_layer_start_index": 0}),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", {
        **_COMMON, "intermediate_size": 32, "head_dim": 16, "num_experts": E, "moe_topk": K}),
    "jamba": ("JambaConfig", "JambaForCausalLM", _hf("jamba", num_experts=E)),
    "longcat_flash": ("LongcatFlashConfig", "LongcatFlashForCausalLM", {
        **_COMMON, "num_layers": 1, "num_key_value_heads": 4, "ffn_hidden_size": 64, "expert_ffn_hidden_size": 32,
        "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "head_dim": 8, "n_routed_experts": E, "zero_expert_num": 2, "moe_topk": K}),
    "qwen3_vl_moe": ("Qwen3VLMoeTextConfig", "Qwen3VLMoeTextModel", {
        **_COMMON, "intermediate_size": 64, "moe_intermediate_size": 32, "head_dim": 16, "num_experts": E,
        **_MOE, "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3]}}),
    "nllb_moe": ("NllbMoeConfig", "NllbMoeModel", dict(
        **_SEQ2SEQ, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=4, decoder_attention_heads=4, num_experts=E, expert_capacity=TOKENS,
        encoder_sparse_step=2, decoder_sparse_step=2, max_position_embeddings=128)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", {
        **_COMMON, "intermediate_size": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
        "head_dim": 16, "num_experts": E, **_MOE, "layer_types": ["full_attention"]}),
    "aria_text": ("AriaTextConfig", "AriaTextForCausalLM", {
        **_COMMON, "intermediate_size": 32, "head_dim": 16, "moe_num_experts": E, "moe_topk": K,
        "moe_num_shared_experts": 1}),
    # expert_capacity >= tokens: no token is dropped (the "no-capacity path")
    "switch_transformers": ("SwitchTransformersConfig", "SwitchTransformersModel", dict(
        **_SEQ2SEQ, d_kv=16, d_ff=32, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1, num_heads=4, num_experts=E, expert_capacity=TOKENS)),
}


def _gpt_oss_kwargs() -> dict:
    kwargs = _hf("gpt_oss")
    kwargs["rope_scaling"] = {**kwargs.pop("rope_parameters"), "original_max_position_embeddings": 4}
    kwargs["rope_theta"] = kwargs["rope_scaling"].pop("rope_theta")
    return kwargs


def build(family: str) -> torch.nn.Module:
    config_name, model_name, kwargs = FAMILIES[family]
    if family == "gpt_oss":
        kwargs = _gpt_oss_kwargs()
    config = getattr(transformers, config_name)(**kwargs)
    config.use_cache = False
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    _reinit_(model, 0)
    return model.eval()


def inputs(family: str) -> dict[str, torch.Tensor]:
    ids = make_input_ids(TOKENS, seed=1)
    if family in ("nllb_moe", "switch_transformers"):
        return {"input_ids": ids, "decoder_input_ids": make_input_ids(TOKENS, seed=2)}
    return {"input_ids": ids}


def _first(out) -> torch.Tensor:
    return (out.to_tuple() if hasattr(out, "to_tuple") else out)[0].float()


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass(kw_only=True)
class Row:
    family: str
    rewritten: list[str] = field(default_factory=list)  # "block: form"
    prepared: list[str] = field(default_factory=list)  # "block (layout)"
    refused: list[str] = field(default_factory=list)  # "block: reason"
    near_misses: list[str] = field(default_factory=list)  # explain() before prepare: "block (form): reason"
    compile_misses: list[str] = field(default_factory=list)  # the backend's near-misses after prepare
    graphs: int = 0
    fullgraph: str = "yes"
    diff: float = float("nan")
    error: str = ""
    graphs_seen: list | None = None  # moe_fx.recording() of a compile without fullgraph

    @property
    def verdict(self) -> str:
        if self.error:
            return "error"
        if self.rewritten and self.diff <= FP32_ATOL:
            return "rewritten" + (" (+ reasons)" if self.refused or self.compile_misses else "")
        if self.refused or self.near_misses or self.compile_misses:
            return "explained"
        return "SILENT"


def _compile_with_breaks(model: torch.nn.Module, kwargs: dict, row: Row) -> torch.Tensor:
    """Compile without fullgraph, with the flags explain() captures with (README: the static
    loop's torch.where needs capture_dynamic_output_shape_ops, split_experts' .tolist()
    capture_scalar_outputs); where a flag turns another break into an error, with fewer."""
    both = dict(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)
    for flags in (both, dict(capture_dynamic_output_shape_ops=True), {}):
        torch._dynamo.reset()
        try:
            with torch._dynamo.config.patch(**flags), moe_fx.recording() as graphs:
                out = _first(torch.compile(model, backend=moe_fx.backend)(**kwargs))
        except Exception as exc:  # noqa: BLE001
            row.fullgraph += f"; with {flags}: {type(exc).__name__}"
            continue
        row.graphs_seen = graphs
        row.fullgraph += f"; compiled with {flags or 'dynamo defaults'}"
        return out
    raise RuntimeError(f"compile failed: {row.fullgraph}")


def run_family(family: str) -> Row:
    row = Row(family=family)
    try:
        model = build(family)
    except Exception as exc:  # noqa: BLE001  (a config this script spells wrong: say so, go on)
        row.error = f"build: {type(exc).__name__}: {exc}"
        return row
    kwargs = inputs(family)
    with torch.no_grad():
        ref = _first(model(**kwargs))
        report = moe_fx.explain(model, **kwargs)
    row.near_misses = [f"{m.block} ({m.form}): {m.reason}" for m in report.near_misses]
    moe_fx.prepare(model)
    prepared = moe_fx.prepare_report(model)
    row.prepared = [f"{b.path} ({b.layout})" for b in prepared.prepared]
    row.refused = [f"{b.path}: {b.reason}" for b in prepared.refused]
    torch._dynamo.reset()
    with moe_fx.config.patch(inner_backend="eager"), torch.no_grad():
        try:
            with moe_fx.recording() as graphs:
                out = _first(torch.compile(model, backend=moe_fx.backend, fullgraph=True)(**kwargs))
        except Exception as exc:  # noqa: BLE001  (a graph break elsewhere in the model: compile without fullgraph)
            row.fullgraph = f"no: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
            out = _compile_with_breaks(model, kwargs, row)
    torch._dynamo.reset()
    graphs = row.graphs_seen if row.graphs_seen is not None else graphs
    row.graphs = len(graphs)
    row.rewritten = [f"{b.region.block}: {b.region.form}" for g in graphs for b in g.report.blocks]
    row.compile_misses = [f"{m.block} ({m.form}): {m.reason}" for g in graphs for m in g.report.misses]
    row.diff = (out - ref).abs().max().item()
    return row


def _forms(row: Row) -> str:
    forms = sorted({r.split(": ")[1] for r in row.rewritten})
    return f"{len(row.rewritten)} × {', '.join(forms)}" if row.rewritten else "0"


# The most specific of a family's explain() lines first: what in the code prevents the rewrite.
_SPECIFIC = ("(moe_fx.prepare)", "(capacity_gate)", "(dense_bmm)", "(split_experts)",
             "runs its experts behind a data-dependent step", "Python branch", "read on the host",
             "reach per-expert code", "(graph break)", "")


def _key_reason(lines: list[str]) -> str:
    for marker in _SPECIFIC:
        found = [line for line in lines if marker in line]
        if found:
            more = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
            return _short(found[0]) + more
    return "-"


def print_table(rows: list[Row]) -> None:
    print("| family | verdict | rewritten | prepared | refused by prepare | explain() before prepare (most specific line) "
          "| graphs (fullgraph) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.error:
            print(f"| {r.family} | error | | | | {_short(r.error)} | | |")
            continue
        fullgraph = "yes" if r.fullgraph == "yes" else "no"
        print(f"| {r.family} | {r.verdict} | {_forms(r)} | {len(r.prepared)} | {_key_reason(r.refused)} | "
              f"{_key_reason(r.near_misses)} | {r.graphs} ({fullgraph}) | {r.diff:.2g} |")
    print()
    for r in rows:
        for kind, lines in (("explain", r.near_misses), ("prepare refused", r.refused),
                            ("compile near-miss", r.compile_misses)):
            for line in lines:
                print(f"{r.family}: {kind}: {' '.join(line.split())}")
        if r.fullgraph != "yes":
            print(f"{r.family}: fullgraph: {_short(r.fullgraph, 300)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated families (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    families = args.only.split(",") if args.only else list(FAMILIES)
    rows = []
    for family in families:
        start = time.perf_counter()
        try:
            rows.append(run_family(family))
        except Exception as exc:  # noqa: BLE001  (one family failing must not hide the others)
            torch._dynamo.reset()
            rows.append(Row(family=family, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"))
        print(f"# {family}: {rows[-1].verdict} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
