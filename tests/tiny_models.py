"""Tiny, offline-built transformers MoE models for moe_fx tests.

Every model is a ``*ForCausalLM`` with a 64-wide hidden state, 4 attention heads,
a 128-token vocabulary and (by default) one decoder layer holding one MoE block
with 8 experts and top-2 routing.  Nothing is downloaded: the models are built
from a config and then re-initialised with a seeded generator so that

* router logits are well spread (every test input hits several experts),
* expert outputs are O(1) (so numerical comparisons are meaningful),
* every bias-like tensor is non-zero (so a rewrite that drops a bias is caught).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import transformers

MODEL_KEYS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss", "granitemoe")
# Models whose MoE blocks take other forms, or the standard experts behind other routers (tests/test_forms.py).
FORM_MODEL_KEYS = ("llama4_text", "deepseek_v2", "jamba", "jetmoe")
# Models whose experts are not ``@use_experts_implementation``-decorated: built with "eager", which they ignore.
UNDECORATED = ("llama4_text", "jetmoe")

# key -> (transformers class-name prefix, name of the expert-count key, name of the top-k key)
_CLASS_PREFIX = {
    "mixtral": "Mixtral",
    "qwen2_moe": "Qwen2Moe",
    "qwen3_moe": "Qwen3Moe",
    "deepseek_v3": "DeepseekV3",
    "olmoe": "Olmoe",
    "gpt_oss": "GptOss",
    "granitemoe": "GraniteMoe",
    "llama4_text": "Llama4Text",
    "deepseek_v2": "DeepseekV2",
    "jamba": "Jamba",
    "jetmoe": "JetMoe",
}
_MODEL_CLASS = {"llama4_text": "Llama4ForCausalLM"}
_NUM_EXPERTS_KEY = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts",
    "deepseek_v3": "n_routed_experts",
    "olmoe": "num_experts",
    "gpt_oss": "num_local_experts",
    "granitemoe": "num_local_experts",
    "llama4_text": "num_local_experts",
    "deepseek_v2": "n_routed_experts",
    "jamba": "num_experts",
    "jetmoe": "num_local_experts",
}
_TOP_K_KEY = "num_experts_per_tok"  # same name for every supported family

_COMMON: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


# DeepSeek's multi-head latent attention: one KV head per query head.
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


def _model_kwargs(key: str, num_hidden_layers: int) -> dict[str, Any]:
    if key == "mixtral":
        return dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    if key == "qwen2_moe":
        return dict(
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
    if key == "qwen3_moe":
        return dict(head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    if key == "deepseek_v3":
        return dict(
            **_MLA,
            q_lora_rank=24,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=0,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        )
    if key == "olmoe":
        return dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    if key == "gpt_oss":
        return dict(
            head_dim=16,
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            layer_types=["full_attention"] * num_hidden_layers,
            sliding_window=16,
            # GPT-OSS defaults to YaRN with original_max_position_embeddings=4096, which is inconsistent with
            # max_position_embeddings=128 (transformers warns); keep YaRN but make the ratio match the factor.
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150000.0,
                factor=32.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=_COMMON["max_position_embeddings"] // 32,
            ),
        )
    if key == "granitemoe":
        return dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    if key == "llama4_text":
        return dict(head_dim=16, intermediate_size=32, intermediate_size_mlp=96, moe_layers=list(range(num_hidden_layers)))
    if key == "deepseek_v2":
        return dict(**_MLA, q_lora_rank=None, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=0,
                    topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5)
    if key == "jamba":
        return dict(expert_layer_period=1, expert_layer_offset=0, attn_layer_period=1, attn_layer_offset=0,
                    use_mamba_kernels=False, intermediate_size=32)
    if key == "jetmoe":
        return dict(kv_channels=16, intermediate_size=32)
    raise KeyError(f"unknown tiny model key {key!r}; expected one of {MODEL_KEYS}")


def tiny_config(
    key: str,
    *,
    experts_implementation: str = "grouped_mm",
    num_hidden_layers: int = 1,
    num_experts: int = 8,
    top_k: int = 2,
):
    """The ``<X>Config`` used by :func:`build_tiny` (exposed for tests that need the config alone)."""
    kwargs = dict(_COMMON)
    kwargs.update(_model_kwargs(key, num_hidden_layers))
    kwargs["num_hidden_layers"] = num_hidden_layers
    kwargs[_NUM_EXPERTS_KEY[key]] = num_experts
    kwargs[_TOP_K_KEY] = top_k
    if key == "deepseek_v3" and num_experts % kwargs["n_group"] != 0:
        raise ValueError(f"deepseek_v3 needs num_experts divisible by n_group={kwargs['n_group']}, got {num_experts}")
    if key == "deepseek_v3" and num_experts // kwargs["n_group"] < 2:
        raise ValueError("deepseek_v3 scores each group by its top-2 experts: needs >= 2 experts per group")
    if key == "deepseek_v3" and top_k > num_experts // kwargs["n_group"] * kwargs["topk_group"]:
        raise ValueError(f"deepseek_v3: top_k={top_k} exceeds the experts reachable through topk_group groups")
    config_cls = getattr(transformers, _CLASS_PREFIX[key] + "Config")
    config = config_cls(**kwargs, experts_implementation=experts_implementation)
    config.use_cache = False
    return config


def _is_norm_module(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or "Norm" in type(module).__name__


@torch.no_grad()
def _reinit_(model: torch.nn.Module, seed: int) -> None:
    """Seeded re-initialisation giving spread routing and O(1) activations.

    * norm weights  -> 1 + N(0, 0.1)      (close to identity scaling, but not exactly 1)
    * norm biases   -> N(0, 0.1)
    * embeddings    -> N(0, 1)
    * other weights -> N(0, 1.6 / sqrt(fan_in)), i.e. std 0.2 for the 64-wide inputs, so W @ x has std ~1.6
                       for RMS-1 inputs (router logits well spread, expert outputs O(1))
    * biases and other 0-d/1-d parameters (e.g. GPT-OSS attention sinks) -> N(0, 0.2), explicitly non-zero
    * DeepSeek-V3's ``e_score_correction_bias`` buffer -> N(0, 0.05) (it only shifts expert *selection*)
    """
    gen = torch.Generator().manual_seed(10_000 + seed)

    def normal_(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(std).add_(mean).to(t.dtype))

    norm_params: set[int] = set()
    embedding_params: set[int] = set()
    transposed_params: set[int] = set()  # stacked expert weights stored as [E, in, out]
    for module in model.modules():
        if _is_norm_module(module):
            norm_params.update(id(p) for p in module.parameters(recurse=False))
        elif isinstance(module, torch.nn.Embedding):
            embedding_params.add(id(module.weight))
        elif getattr(module, "is_transposed", False):
            transposed_params.update(id(p) for p in module.parameters(recurse=False) if p.dim() == 3)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if id(p) in norm_params:
            normal_(p, 0.1, mean=1.0 if leaf == "weight" else 0.0)
        elif id(p) in embedding_params:
            normal_(p, 1.0)
        elif p.dim() <= 1 or leaf.endswith("bias"):
            normal_(p, 0.2)
        else:
            # nn.Linear stores [out, in]; stacked expert weights are [E, out, in], or [E, in, out] when transposed.
            fan_in = p.shape[-2] if id(p) in transposed_params else p.shape[-1]
            normal_(p, 1.6 / math.sqrt(fan_in))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            normal_(b, 0.05)


def build_tiny(
    key: str,
    *,
    experts_implementation: str = "grouped_mm",
    dtype: torch.dtype = torch.float32,
    num_hidden_layers: int = 1,
    seed: int = 0,
    num_experts: int = 8,
    top_k: int = 2,
) -> torch.nn.Module:
    """Build the tiny ``<X>ForCausalLM`` for ``key`` (one of MODEL_KEYS): eval mode, CPU, ``dtype``,
    ``config.use_cache=False``, deterministic weights for a given (key, seed, sizes)."""
    config = tiny_config(
        key,
        experts_implementation=experts_implementation,
        num_hidden_layers=num_hidden_layers,
        num_experts=num_experts,
        top_k=top_k,
    )
    model_cls = getattr(transformers, _MODEL_CLASS.get(key, _CLASS_PREFIX[key] + "ForCausalLM"))
    torch.manual_seed(seed)
    model = model_cls(config)
    got = model.config._experts_implementation
    if got != experts_implementation:
        raise RuntimeError(f"{key}: asked for experts_implementation={experts_implementation!r}, model uses {got!r}")
    _reinit_(model, seed)
    model.to(dtype=dtype)
    model.config.use_cache = False
    model.eval()
    return model


def moe_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, module) of every MoE block: a module whose direct children include ``experts`` (or
    JetMoE's ``input_linear``) and ``gate`` or ``router``."""
    out = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        # JetMoE's attention (JetMoeMoA) mixes attention heads, not MLP experts: not an MoE block here.
        jetmoe_mlp = "input_linear" in children and "MoA" not in type(module).__name__
        if ("experts" in children or jetmoe_mlp) and ("gate" in children or "router" in children):
            out.append((name, module))
    return out


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, module) of the ``experts`` child of every MoE block (JetMoE: its two expert linears)."""
    out = []
    for name, block in moe_blocks(model):
        prefix = f"{name}." if name else ""
        children = ("experts",) if hasattr(block, "experts") else ("input_linear", "output_linear")
        out.extend((prefix + child, getattr(block, child)) for child in children)
    return out


def router_of(block: torch.nn.Module) -> torch.nn.Module:
    """The router child (``gate`` or ``router``) of a MoE block. All supported routers return
    ``(router_logits, top_k_weights, top_k_index)``."""
    children = dict(block.named_children())
    return children["gate"] if "gate" in children else children["router"]


def make_input_ids(num_tokens: int, seed: int, vocab_size: int = 128) -> torch.Tensor:
    """[1, num_tokens] int64 token ids drawn uniformly from [3, vocab_size) (skipping pad/bos/eos)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (1, num_tokens), generator=gen, dtype=torch.int64)
