"""The Ascend lowering, run on CPU over gloo against the torch_npu op emulator
(moe_fx.testing.npu_emulator): every strategy on three tiny transformers models matches eager,
the rewritten regions hold the torch.ops.npu calls (snapshots), MC2's kernel limits give the
documented error (forced) or fallback (auto), and the torchair hand-off fails clearly off Ascend.

ep=2 and ep=4 each run all three models (mixtral and deepseek_v3 in fp32, qwen3_moe in bf16) x all
three strategies.
"""

from __future__ import annotations

import functools

import expecttest
import pytest
import torch

import moe_fx
from moe_fx.errors import MoEFxError
from moe_fx.lowering.base import Strategy
from moe_fx.lowering.npu.select import choose_npu_strategy
from moe_fx.lowering.select import choose_lowering
from tests.dist_pool import get_pool
from tests.tolerances import within

STRATEGIES = ("allgather", "all2allv", "mc2")
MODELS = {"mixtral": "float32", "qwen3_moe": "bfloat16", "deepseek_v3": "float32"}


@functools.cache
def _run(ep: int, key: str, dtype: str, lowerings: tuple[str, ...] = STRATEGIES, impl: str = "grouped_mm") -> list[dict]:
    return get_pool(ep).run("tests.npu_jobs:npu_model_case", key=key, dtype=dtype, lowerings=lowerings, impl=impl)


def _assert_matches_eager(results: list[dict], dtype: str) -> None:
    for rank, res in enumerate(results):
        for lowering, r in res.items():
            assert r["strategies"] == [lowering], (rank, lowering, r["strategies"])
            assert within(r, dtype), f"rank {rank} {lowering}: max |diff| {r['diff']:.3g} of {r['scale']:.3g}"


@pytest.mark.parametrize("key", MODELS)
@pytest.mark.parametrize("ep", (2, 4))
def test_npu_models_match_eager(ep, key):
    _assert_matches_eager(_run(ep, key, MODELS[key]), MODELS[key])


def test_npu_local_ep1_matches_eager():
    """No process group: init_routing_v2 over every expert, grouped matmuls, unpermute."""
    from tests.npu_jobs import npu_model_case

    res = npu_model_case(key="mixtral", dtype="float32", lowerings=("auto",))["auto"]
    assert res["strategies"] == ["local"] and within(res, "float32"), res
    assert "npu.npu_moe_init_routing_v2" in res["rendering"] and "npu.npu_swiglu" in res["rendering"]


def test_npu_biased_experts_replay_the_traced_activation():
    """GPT-OSS (biases, clamped interleaved gate): generic grouped matmuls, its own activation."""
    results = _run(2, "gpt_oss", "bfloat16", ("allgather",), "batched_mm")
    _assert_matches_eager(results, "bfloat16")
    rendering = results[0]["allgather"]["rendering"]
    assert "npu_swiglu" not in rendering and "sigmoid" in rendering and "getitem(gate_up_proj_bias" in rendering


def _plain(config_patch: dict, **kw) -> list[dict]:
    return get_pool(2).run("tests.npu_jobs:npu_plain_case", lowerings=("mc2",), num_experts=8,
                           config_patch=config_patch, **kw)


def test_forced_mc2_beyond_its_limits_raises():
    for res in _plain({"npu.soc": "A3"}, hidden=32):
        assert ("lowering='mc2' on Ascend is beyond the MC2 kernels' limits: hidden size 32 not in 1024..8192 on A3"
                in res["mc2"]["error"])
    for res in _plain({"npu.soc": "A2", "max_tokens_per_rank": 300}, hidden=32):
        assert "max_tokens_per_rank=300 > 256 on A2" in res["mc2"]["error"]


def test_mc2_v1_ops_when_configured():
    """config.npu.mc2_version="v1": npu_moe_distribute_dispatch/combine (torch_npu without v2)."""
    for rank, res in enumerate(_plain({"npu.mc2_version": "v1"}, hidden=32)):
        assert "error" not in res["mc2"], res["mc2"]
        assert [s for _, s in res["mc2"]["blocks"]] == ["mc2"] and within(res["mc2"], "float32"), (rank, res)


@pytest.mark.parametrize("soc,ep,experts,hidden,tokens,expected", [
    ("A2", 16, 256, 7168, 128, Strategy.MC2),        # vllm-ascend A2 decode: ep >= 16, 16 experts/rank
    ("A2", 8, 64, 4096, 128, Strategy.ALLGATHER),    # ep < 16
    ("A2", 16, 512, 4096, 128, Strategy.ALLGATHER),  # 32 experts/rank > 24
    ("A2", 16, 256, 4096, 300, Strategy.ALLGATHER),  # above the A2 fullmesh MC2 limit of 256 tokens
    ("A3", 4, 64, 4096, 512, Strategy.MC2),
    ("A3", 4, 64, 4096, None, Strategy.ALL2ALLV),    # no token bound: may be a large prefill
    ("A3", 4, 64, 64, 16, Strategy.ALL2ALLV),        # hidden size below the A3 kernel's 1024
    (None, 4, 64, 4096, 16, Strategy.ALLGATHER),     # SoC unknown
])
def test_auto_on_npu_follows_vllm_ascend(soc, ep, experts, hidden, tokens, expected):
    strategy, reason = choose_npu_strategy(soc=soc, ep_size=ep, num_experts=experts, top_k=8, hidden_size=hidden,
                                           max_tokens_per_rank=tokens)
    assert strategy is expected, reason


def test_select_hook_uses_the_npu_rules():
    import dataclasses

    from moe_fx.lowering.select import BlockFacts

    facts = BlockFacts(block="b", ep_size=2, num_experts=8, top_k=2, hidden_size=64, dtype=torch.float32,
                       device_type="npu", soc="A3", token_bound=16)
    choice = choose_lowering(facts)
    assert choice.strategy is Strategy.ALL2ALLV and "hidden size 64 not in 1024..8192 on A3" in choice.reason
    # The same block on CPU follows the generic rule: a known bound of 16 tokens gives mc2.
    assert choose_lowering(dataclasses.replace(facts, device_type="cpu", soc=None)).strategy is Strategy.MC2


def test_torchair_without_torch_npu_is_a_clear_error():
    from tests.ep_jobs import build_plain

    model = build_plain("batched", hidden=16, intermediate=8, num_experts=4, top_k=2, dtype="float32")
    torch._dynamo.reset()
    with moe_fx.config.patch(inner_backend="torchair"), pytest.raises(Exception) as info:
        torch.compile(model, backend=moe_fx.backend, fullgraph=True)(torch.randn(3, 16))
    error = getattr(info.value, "inner_exception", info.value)  # dynamo wraps backend errors
    assert isinstance(error, MoEFxError), info.value
    assert "inner_backend='torchair' needs torch_npu and torchair" in str(error)


def test_every_moe_fx_op_has_a_fake_implementation():
    import moe_fx.runtime  # noqa: F401
    from torch._library.simple_registry import singleton

    names = [n for n in dir(torch.ops.moe_fx) if not n.startswith("_") and n not in ("name", "loaded_ops")]
    assert {"gather_tokens", "scatter_tokens", "exchange_counts", "all_to_all_rows", "mc2_dispatch"} <= set(names)
    missing = [n for n in names if singleton.find(f"moe_fx::{n}").fake_impl.kernel is None]
    assert not missing, missing


class NpuRegionSnapshots(expecttest.TestCase):
    """The rewritten region of mixtral (ep=2, rank 0) for each strategy: the torch.ops.npu calls."""

    def _rendering(self, lowering: str) -> str:
        return _run(2, "mixtral", "float32")[0][lowering]["rendering"]

    def test_allgather(self):
        self.assertExpectedInline(self._rendering("allgather"), """\
v0 = moe_fx.gather_tokens(hidden, topk_ids, topk_weights, '0')
v1 = getitem(v0, 0)
v2 = getitem(v0, 1)
v3 = getitem(v0, 2)
v4 = to(v2, int32)
v5 = npu.npu_moe_init_routing_v2(v1, v4, expert_num=8, expert_tokens_num_type=1, expert_tokens_num_flag=True, active_expert_range=[0, 4], quant_mode=-1)
v6 = getitem(v5, 0)
v7 = getitem(v5, 2)
v8 = getitem(v5, 1)
v9 = size(hidden, 0)
v10 = getitem(gate_up_proj, 0:4)
v11 = transpose(v10, 1, 2)
v12 = npu.npu_grouped_matmul([v6], [v11], group_list=v7, split_item=2, group_type=0, group_list_type=1)
v13 = getitem(v12, 0)
v14 = npu.npu_swiglu(v13, dim=-1)
v15 = getitem(down_proj, 0:4)
v16 = transpose(v15, 1, 2)
v17 = npu.npu_grouped_matmul([v14], [v16], group_list=v7, split_item=2, group_type=0, group_list_type=1)
v18 = getitem(v17, 0)
v19 = sum(v7)
v20 = size(v18, 0)
v21 = getattr(v18, 'device')
v22 = arange(v20, device=v21)
v23 = lt(v22, v19)
v24 = unsqueeze(v23, 1)
v25 = where(v24, v18, 0)
v26 = lt(v8, 0)
v27 = view_as(v26, v3)
v28 = where(v27, 0, v3)
v29 = clamp(v8, min=0)
v30 = npu.npu_moe_token_unpermute(v25, v29, probs=v28)
v31 = moe_fx.scatter_tokens(v30, v9, '0')""")

    def test_all2allv(self):
        self.assertExpectedInline(self._rendering("all2allv"), """\
v0 = to(topk_ids, int32)
v1 = npu.npu_moe_token_permute(hidden, v0)
v2 = getitem(v1, 0)
v3 = getitem(v1, 1)
v4 = float(topk_ids)
v5 = histc(v4, bins=8, min=0, max=7)
v6 = long(v5)
v7 = moe_fx.exchange_counts(v6, '0')
v8 = moe_fx.all_to_all_rows(v2, v6, v7, '0')
v9 = getattr(v7, 'device')
v10 = arange(4, device=v9)
v11 = repeat(v10, 2)
v12 = repeat_interleave(v11, v7)
v13 = to(v12, int32)
v14 = npu.npu_moe_token_permute(v8, v13)
v15 = getitem(v14, 0)
v16 = getitem(v14, 1)
v17 = view(v7, 2, 4)
v18 = sum(v17, 0)
v19 = getitem(gate_up_proj, 0:4)
v20 = transpose(v19, 1, 2)
v21 = npu.npu_grouped_matmul([v15], [v20], group_list=v18, split_item=2, group_type=0, group_list_type=1)
v22 = getitem(v21, 0)
v23 = npu.npu_swiglu(v22, dim=-1)
v24 = getitem(down_proj, 0:4)
v25 = transpose(v24, 1, 2)
v26 = npu.npu_grouped_matmul([v23], [v25], group_list=v18, split_item=2, group_type=0, group_list_type=1)
v27 = getitem(v26, 0)
v28 = npu.npu_moe_token_unpermute(v27, v16)
v29 = moe_fx.all_to_all_rows(v28, v7, v6, '0')
v30 = npu.npu_moe_token_unpermute(v29, v3, probs=topk_weights)""")

    def test_mc2(self):
        self.assertExpectedInline(self._rendering("mc2"), """\
v0 = size(hidden, 0)
v1 = le(v0, 16)
v2 = aten._assert_scalar.default(v1, "MoE block 'model.layers.0.mlp.experts': more tokens than the mc2 capacity moe_fx.config.max_tokens_per_rank=16")
v3 = sub(16, v0)
v4 = to(topk_ids, int32)
v5 = pad(v4, (0, 0, 0, v3), mode='constant', value=None)
v6 = getattr(hidden, 'device')
v7 = arange(16, device=v6)
v8 = lt(v7, v0)
v9 = pad(hidden, (0, 0, 0, v3), mode='constant', value=None)
v10 = npu.npu_moe_distribute_dispatch_v2(v9, v5, 'emulated_hccl:0', 2, 0, 8, x_active_mask=v8, expert_token_nums_type=0)
v11 = getitem(v10, 0)
v12 = getitem(v10, 3)
v13 = float(topk_weights)
v14 = pad(v13, (0, 0, 0, v3), mode='constant', value=None)
v15 = getitem(v10, 2)
v16 = getitem(v10, 4)
v17 = getitem(v10, 5)
v18 = getitem(gate_up_proj, 0:4)
v19 = transpose(v18, 1, 2)
v20 = npu.npu_grouped_matmul([v11], [v19], group_list=v12, split_item=2, group_type=0, group_list_type=0)
v21 = getitem(v20, 0)
v22 = npu.npu_swiglu(v21, dim=-1)
v23 = getitem(down_proj, 0:4)
v24 = transpose(v23, 1, 2)
v25 = npu.npu_grouped_matmul([v22], [v24], group_list=v12, split_item=2, group_type=0, group_list_type=0)
v26 = getitem(v25, 0)
v27 = npu.npu_moe_distribute_combine_v2(v26, v5, v15, v16, v14, 'emulated_hccl:0', 2, 0, 8, tp_send_counts=v17, x_active_mask=v8)
v28 = getitem(v27, :v0)""")
