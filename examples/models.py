"""The transformers MoE models the examples build: the published widths of four families, with
fewer layers and random weights (nothing is downloaded).

    model = build_model("qwen3_moe", layers=8, dtype=torch.bfloat16, device="cuda")

``tiny=True`` keeps each family's structure (experts, top-k, router, attention kind) at widths a
CPU runs in seconds: hidden 64, 8 experts, top-2, a 128-token vocabulary.
"""

from __future__ import annotations

import torch
import transformers

# Published config.json values (hidden, intermediate sizes, experts, top-k, heads, vocab, rope).
REAL = {
    "qwen3_moe": ("Qwen3Moe", dict(  # Qwen/Qwen3-30B-A3B
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "gpt_oss": ("GptOss", dict(  # openai/gpt-oss-20b
        hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088,
        sliding_window=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                             beta_slow=1.0, truncate=False, original_max_position_embeddings=4096))),
    "deepseek_v3": ("DeepseekV3", dict(  # deepseek-ai/DeepSeek-V3 (first 3 layers dense)
        hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        norm_topk_prob=True, first_k_dense_replace=3, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        vocab_size=129280, max_position_embeddings=4096, rms_norm_eps=1e-6)),
    "mixtral": ("Mixtral", dict(  # mistralai/Mixtral-8x7B-v0.1
        hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
}

# Widths replaced by tiny=True (the rest of each family's config stays).
_TINY_COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                    max_position_embeddings=256, num_experts_per_tok=2)
_TINY = {
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8, head_dim=16),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=8, head_dim=16, sliding_window=16,
                    rope_parameters=dict(REAL["gpt_oss"][1]["rope_parameters"],
                                         original_max_position_embeddings=256 // 32)),
    "deepseek_v3": dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, n_group=2,
                        topk_group=1, first_k_dense_replace=1, num_key_value_heads=4, q_lora_rank=24,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "mixtral": dict(intermediate_size=32, num_local_experts=8),
}
MODELS = tuple(REAL)


def model_config(name: str, *, layers: int, tiny: bool = False) -> transformers.PretrainedConfig:
    prefix, kwargs = REAL[name]
    kwargs = dict(kwargs, num_hidden_layers=layers)
    if tiny:
        kwargs.update(_TINY_COMMON, **_TINY[name])
    if name == "gpt_oss":  # alternating sliding-window and full attention, as published
        kwargs["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    # No EOS and no pad token: generate() then always runs max_new_tokens steps (the lockstep rule).
    kwargs.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return getattr(transformers, prefix + "Config")(**kwargs, experts_implementation="grouped_mm")


def build_model(name: str, *, layers: int, dtype: torch.dtype, device: str | torch.device,
                tiny: bool = False, seed: int = 0) -> transformers.PreTrainedModel:
    """The ``*ForCausalLM`` with random weights: the same seed gives the same weights on every rank
    of one device type, which sharding relies on (each rank keeps its block of the same experts)."""
    config = model_config(name, layers=layers, tiny=tiny)
    cls = getattr(transformers, REAL[name][0] + "ForCausalLM")
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    if tiny:  # an untrained tiny router scores experts almost alike; spread it (O(1) activations)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5 * (4.0 if p.shape[0] == config.vocab_size else 1.6))
    return model


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (meta parameters count as if materialized)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
