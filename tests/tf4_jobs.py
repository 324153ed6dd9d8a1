"""One rank of the transformers 4.x check (tests/test_prepare.py starts one process per rank with
transformers 4.57 first on PYTHONPATH): tiny 4.x MoE models, ``moe_fx.prepare``, then moe_fx at
ep = world size over gloo, each rank on its own tokens, foreign experts zeroed after the eager
reference. Writes a JSON list of per-model results to ``--out``.

    PYTHONPATH=<transformers 4.57>:<repo> python -m tests.tf4_jobs --rank 0 --world 2 --port 29555 --out r0.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402

import moe_fx  # noqa: E402
from moe_fx.prepare import PLAN_ATTR  # noqa: E402
from tests.ep_jobs import TOKENS_PER_RANK  # noqa: E402
from tests.tiny_models import _COMMON, _NUM_EXPERTS_KEY, _model_kwargs, _reinit_, make_input_ids  # noqa: E402

# Models whose prepared experts are also sharded (moe_fx.shard_experts, after zeroing): their
# ModuleList keeps this rank's experts, the others become zero stubs.
SHARDED = ("mixtral", "deepseek_v3")
# model key -> (class-name prefix, lowering): one compile per model, the lowerings spread over them.
MODELS = {
    "mixtral": ("Mixtral", "allgather"),
    "qwen3_moe": ("Qwen3Moe", "all2allv"),
    "deepseek_v3": ("DeepseekV3", "allgather"),
    "gpt_oss": ("GptOss", "all2allv"),
    "phimoe": ("Phimoe", "mc2"),
    "qwen2_moe": ("Qwen2Moe", "mc2"),
    "ernie4_5_moe": ("Ernie4_5_Moe", "allgather"),
    "hunyuan_v1_moe": ("HunYuanMoEV1", "all2allv"),
    "dbrx": ("Dbrx", "mc2"),
}
NUM_EXPERTS = 4  # few: dynamo unrolls every expert of the loop, and compile time is what this test costs
# Families tests/tiny_models.py does not build (transformers 5.x renamed or dropped them): their 4.x config keys.
_FOUR_X_ONLY = {
    "ernie4_5_moe": dict(intermediate_size=64, moe_intermediate_size=32, moe_num_experts=NUM_EXPERTS, moe_k=2,
                         moe_num_shared_experts=1, moe_layer_start_index=0),
    "hunyuan_v1_moe": dict(intermediate_size=32, head_dim=16, num_experts=NUM_EXPERTS, moe_topk=2),
}
# DBRX spells its config apart: no _COMMON keys.
_DBRX = dict(d_model=64, n_heads=4, n_layers=1, max_seq_len=128, vocab_size=128, attn_config=dict(kv_n_heads=2),
             ffn_config=dict(ffn_hidden_size=32, moe_num_experts=NUM_EXPERTS, moe_top_k=2), pad_token_id=0)


def build_tiny4(key: str) -> torch.nn.Module:
    """The tiny one-layer model of tests/tiny_models.py, with the 4.x config spellings."""
    kwargs = dict(_COMMON)
    if key == "dbrx":
        kwargs = dict(_DBRX)
    elif key == "phimoe":
        kwargs.update(intermediate_size=32, num_local_experts=NUM_EXPERTS, num_experts_per_tok=2)
    elif key in _FOUR_X_ONLY:
        kwargs.update(_FOUR_X_ONLY[key])
    else:
        kwargs.update(_model_kwargs(key, 1))
        kwargs[_NUM_EXPERTS_KEY[key]] = NUM_EXPERTS
    if key == "gpt_oss":  # 4.x names the rope settings rope_scaling
        kwargs["rope_scaling"] = {**kwargs.pop("rope_parameters"), "original_max_position_embeddings": 4}
        kwargs["rope_theta"] = kwargs["rope_scaling"].pop("rope_theta")
    prefix = MODELS[key][0]
    config = getattr(transformers, prefix + "Config")(**kwargs)
    config.use_cache = False
    torch.manual_seed(0)
    model = getattr(transformers, prefix + "ForCausalLM")(config)
    _reinit_(model, 0)
    return model.eval()


def zero_foreign_experts(model: torch.nn.Module, rank: int, world: int) -> int:
    """Zero the experts rank does not own in every prepared block; returns the tensors touched."""
    per_rank = NUM_EXPERTS // world
    foreign = [e for e in range(NUM_EXPERTS) if e // per_rank != rank]
    touched = 0
    with torch.no_grad():
        for module in model.modules():
            plan = getattr(module, PLAN_ATTR, None)
            if plan is None:
                continue
            if plan.experts:
                tensors = [p for e in foreign for p in getattr(module, plan.experts)[e].parameters()]
                for p in tensors:
                    p.zero_()
            elif plan.layout.value == "glu_experts":  # DBRX: expert e is rows [e*I, (e+1)*I) of w1, v1, w2
                tensors = [module.mlp.w1, module.mlp.v1, module.mlp.w2]
                for p in tensors:
                    p.view(NUM_EXPERTS, -1, p.shape[-1])[foreign] = 0
            else:
                tensors = [p for p in module.parameters(recurse=False) if p.shape[0] == NUM_EXPERTS]
                for p in tensors:
                    p[foreign] = 0
            touched += len(tensors)
    return touched


def run_model(key: str, rank: int, world: int) -> dict:
    model = build_tiny4(key)
    ids = make_input_ids(TOKENS_PER_RANK[rank], seed=100 + rank)
    with torch.no_grad():
        ref = model(ids).logits.float()
    moe_fx.prepare(model)
    report = moe_fx.prepare_report(model)
    touched = zero_foreign_experts(model, rank, world)
    sharded = [(b.block, b.bytes_before, b.bytes_after) for b in moe_fx.shard_experts(model)] if key in SHARDED else []
    lowering = MODELS[key][1]
    torch._dynamo.reset()
    settings = dict(lowering=lowering, inner_backend="eager", max_tokens_per_rank=max(TOKENS_PER_RANK))
    with moe_fx.config.patch(**settings), moe_fx.recording() as graphs, torch.no_grad():
        out = torch.compile(model, backend=moe_fx.backend, fullgraph=True)(ids).logits.float()
    return {
        "key": key, "rank": rank, "tokens": ids.shape[1], "touched": touched,
        "prepared": [(b.path, b.layout) for b in report.prepared],
        "refused": [(b.path, b.reason) for b in report.refused],
        "sharded": sharded,
        "graphs": len(graphs),
        "blocks": [(b.region.block, b.region.form, b.choice.strategy.value) for g in graphs for b in g.report.blocks],
        "misses": [m.reason for g in graphs for m in g.report.misses],
        "diff": (out - ref).abs().max().item(), "scale": ref.abs().max().item(),
        "transformers": transformers.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=args.rank, world_size=args.world, init_method=f"tcp://127.0.0.1:{args.port}",
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = [run_model(key, args.rank, args.world) for key in args.models.split(",")]
    finally:
        dist.destroy_process_group()
    with open(args.out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
