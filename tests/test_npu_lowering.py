"""The Ascend lowering, run on CPU over gloo against the torch_npu op emulator
(moe_fx.testing.npu_emulator): every strategy on three tiny transformers models matches eager,
the rewritten regions hold the torch.ops.npu calls (snapshots), MC2's kernel limits give the
documented error (forced) or fallback (auto), and the torchair hand-off fails clearly off Ascend.

ep=2 and ep=4 each run all three models (mixtral and deepseek_v3 in fp32, qwen3_moe in bf16) x all
three strategies; MC2 takes bf16/fp16 only (torch_npu doc), so for the fp32 models a forced mc2 is
refused at compile time with that reason.
"""

from __future__ import annotations

import functools
import re

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


MC2_DTYPE_REFUSAL = "the MC2 ops take bfloat16/float16 tokens, not torch.float32"


def _assert_matches_eager(results: list[dict], dtype: str) -> None:
    for rank, res in enumerate(results):
        for lowering, r in res.items():
            if lowering == "mc2" and dtype == "float32":
                assert MC2_DTYPE_REFUSAL in r.get("error", ""), (rank, r)
                continue
            assert "error" not in r, (rank, lowering, r["error"])
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
    for res in _plain({"npu.soc": "A3"}, hidden=32, dtype="bfloat16"):
        assert ("lowering='mc2' on Ascend is beyond the MC2 kernels' limits: hidden size 32 not in 1024..8192 on A3"
                in res["mc2"]["error"])
    for res in _plain({"npu.soc": "A2", "max_tokens_per_rank": 300}, hidden=32, dtype="bfloat16"):
        assert "max_tokens_per_rank=300 not in 1..256 on A2" in res["mc2"]["error"]


def test_mc2_v1_ops_when_configured():
    """config.npu.mc2_version="v1": npu_moe_distribute_dispatch/combine (torch_npu without v2)."""
    for rank, res in enumerate(_plain({"npu.mc2_version": "v1"}, hidden=32, dtype="bfloat16")):
        assert "error" not in res["mc2"], res["mc2"]
        assert [s for _, s in res["mc2"]["blocks"]] == ["mc2"] and within(res["mc2"], "bfloat16"), (rank, res)


def test_mc2_on_a3_matches_eager():
    """A3's arguments (tp_send_counts, no expert_scales / expand_scales, group_tp "") pass the
    emulator's A3 rules; A3 needs a hidden size of 1024..8192."""
    for rank, res in enumerate(_plain({"npu.soc": "A3"}, hidden=1024, intermediate=16, dtype="bfloat16")):
        assert "error" not in res["mc2"], res["mc2"]
        assert [s for _, s in res["mc2"]["blocks"]] == ["mc2"] and within(res["mc2"], "bfloat16"), (rank, res)


def test_mc2_group_must_not_be_the_ep_group():
    for res in _plain({"npu.mc2_group": "0"}, hidden=32, dtype="bfloat16"):  # "0": WORLD, the EP group
        assert "moe_fx.config.npu.mc2_group='0' is the expert-parallel group itself" in res["mc2"]["error"], res


def test_all2allv_rank_receiving_no_rows():
    """Every token goes to expert 0 and 1 (rank 0's): rank 1 receives no rows, and the permute,
    grouped matmuls, swiglu and unpermute still never see an empty tensor (the emulator refuses one)."""
    for rank, res in enumerate(get_pool(2).run("tests.npu_jobs:npu_plain_case", lowerings=("all2allv",),
                                               num_experts=8, hidden=32, routing="one_expert")):
        assert "error" not in res["all2allv"], res["all2allv"]
        assert within(res["all2allv"], "float32"), (rank, res)


def test_mc2_hccl_buffer_checked_up_front(monkeypatch):
    """The HCCL_BUFFSIZE the doc's formula needs, checked when the block is lowered: the error
    names the block, the sizes and the variable to set; "auto" falls back instead."""
    from moe_fx.errors import UnsupportedMoEError
    from moe_fx.lowering.base import EPPlan
    from moe_fx.lowering.npu import BlockShape
    from moe_fx.lowering.npu.mc2 import NpuMc2Lowering

    # A2 fullmesh: 2 * (256 tokens * 16 ranks * min(16, 8) * 7168 * 2 bytes + 2 MB) = 900 MB
    plan = EPPlan(block="model.layers.3.mlp", num_experts=256, ep_size=16, ep_rank=0, group_name="unused")
    shape = BlockShape(top_k=8, hidden_size=7168, dtype=torch.bfloat16)
    monkeypatch.setenv("HCCL_BUFFSIZE", "899")
    with moe_fx.config.patch(max_tokens_per_rank=256), pytest.raises(UnsupportedMoEError) as info:
        NpuMc2Lowering(plan, shape, soc="A2", device=torch.device("cpu"))
    assert ("MoE block 'model.layers.3.mlp': lowering='mc2' on Ascend is beyond the MC2 kernels' limits: "
            "HCCL_BUFFSIZE=899 MB < the 900 MB the torch_npu doc requires on A2 for max_tokens_per_rank=256, ep=16, "
            "16 experts/rank, top_k=8, hidden size 7168: set the environment variable HCCL_BUFFSIZE=900") in str(info.value)
    strategy, reason = choose_npu_strategy(soc="A2", ep_size=16, num_experts=256, top_k=8, hidden_size=7168,
                                           max_tokens_per_rank=256, dtype=torch.bfloat16)
    assert strategy is Strategy.ALLGATHER and "HCCL_BUFFSIZE=899 MB" in reason
    monkeypatch.setenv("HCCL_BUFFSIZE", "900")
    assert choose_npu_strategy(soc="A2", ep_size=16, num_experts=256, top_k=8, hidden_size=7168,
                               max_tokens_per_rank=256, dtype=torch.bfloat16)[0] is Strategy.MC2


BF16, FP32 = torch.bfloat16, torch.float32


def test_a2_group_tp_in_graph_mode_only():
    """DISPATCH doc, A2 group_tp: the default in eager mode, group_ep in (torchair GE) graph mode."""
    from types import SimpleNamespace

    from moe_fx.lowering.npu.mc2 import _ge_graph_mode

    assert not _ge_graph_mode()  # aot_eager / inductor run the ops one by one
    with moe_fx.config.patch(inner_backend="torchair"):
        assert _ge_graph_mode()  # torchair's default mode, max-autotune, is GE graph mode
    with moe_fx.config.patch({"inner_backend": "torchair", "npu.compiler_config": SimpleNamespace(mode="reduce-overhead")}):
        assert not _ge_graph_mode()  # aclgraph: captured, but the ops still run as single ops


def test_float64_is_refused_by_the_ascend_lowering():
    from moe_fx.errors import UnsupportedMoEError
    from moe_fx.lowering.base import EPPlan
    from moe_fx.lowering.npu import BlockShape, make_npu_lowering

    shape = BlockShape(top_k=2, hidden_size=64, dtype=torch.float64)
    with pytest.raises(UnsupportedMoEError, match=r"MoE block 'b': .* take torch.bfloat16, torch.float16, "
                                                  r"torch.float32, not torch.float64"):
        make_npu_lowering(Strategy.ALLGATHER, EPPlan(block="b", num_experts=8), shape, torch.device("cpu"))


@pytest.mark.parametrize("soc,ep,experts,top_k,hidden,tokens,dtype,expected", [
    ("A2", 16, 256, 8, 7168, 128, BF16, Strategy.MC2),        # vllm-ascend A2 decode: ep >= 16, 16 experts/rank
    ("A2", 8, 64, 8, 4096, 128, BF16, Strategy.ALLGATHER),    # ep < 16
    ("A2", 16, 512, 8, 4096, 128, BF16, Strategy.ALLGATHER),  # 32 experts/rank > 24
    ("A2", 16, 256, 8, 4096, 300, BF16, Strategy.ALLGATHER),  # above the A2 fullmesh MC2 limit of 256 tokens
    ("A2", 16, 256, 8, 7168, 128, FP32, Strategy.ALLGATHER),  # MC2 takes bf16/fp16 only
    ("A3", 4, 64, 8, 4096, 512, BF16, Strategy.MC2),
    ("A3", 4, 64, 8, 4096, None, BF16, Strategy.ALL2ALLV),    # no token bound: may be a large prefill
    ("A3", 4, 64, 8, 64, 16, BF16, Strategy.ALL2ALLV),        # hidden size below the A3 kernel's 1024
    ("A3", 4, 64, 16, 4096, 16, BF16, Strategy.ALL2ALLV),     # top-k 16 > 12 with A3's default comm_alg
    ("A3", 4, 64, 8, 4096, 16, FP32, Strategy.ALL2ALLV),      # MC2 takes bf16/fp16 only
    (None, 4, 64, 8, 4096, 16, BF16, Strategy.ALLGATHER),     # SoC unknown
])
def test_auto_on_npu_follows_vllm_ascend(monkeypatch, soc, ep, experts, top_k, hidden, tokens, dtype, expected):
    # A2 decode at 128 tokens, ep 16, H 7168 needs 452 MB of HCCL buffer (above the 200 MB default):
    # deployments set HCCL_BUFFSIZE; test_mc2_hccl_buffer_checked_up_front covers the check.
    monkeypatch.setenv("HCCL_BUFFSIZE", "1024")
    strategy, reason = choose_npu_strategy(soc=soc, ep_size=ep, num_experts=experts, top_k=top_k, hidden_size=hidden,
                                           max_tokens_per_rank=tokens, dtype=dtype)
    assert strategy is expected, reason


def test_select_hook_uses_the_npu_rules():
    import dataclasses

    from moe_fx.lowering.select import BlockFacts

    facts = BlockFacts(block="b", ep_size=2, num_experts=8, top_k=2, hidden_size=64, dtype=torch.float32,
                       device_type="npu", soc="A3", token_bound=16)
    choice = choose_lowering(facts)
    assert choice.strategy is Strategy.ALL2ALLV and "hidden size 64 not in 1024..8192 on A3" in choice.reason
    # The same block on CPU follows the generic rule: ep=2 <= top_k=2 gives allgather, static with the bound.
    generic = choose_lowering(dataclasses.replace(facts, device_type="cpu", soc=None))
    assert (generic.strategy, generic.capacity_tokens) == (Strategy.ALLGATHER, 16)


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

    def _rendering_bf16(self, lowering: str) -> str:
        # MC2's own group: a hashed name that depends on how many groups the process made before.
        rendering = _run(2, "qwen3_moe", "bfloat16")[0][lowering]["rendering"]
        return re.sub(r"'emulated_hccl:[0-9a-f]{40}'", "'<mc2 group>'", rendering)

    def test_allgather(self):
        self.assertExpectedInline(self._rendering("allgather"), """\
v0 = moe_fx.guard(topk_ids, [1074106077, 8, 64, 2, 0, 1, 16, 2, 16], 'model.layers.0.mlp.experts', '0', 30000, True, True)
v1 = moe_fx.gather_tokens(hidden, v0, topk_weights, '0')
v2 = getitem(v1, 0)
v3 = getitem(v1, 1)
v4 = getitem(v1, 2)
v5 = to(v3, int32)
v6 = npu.npu_moe_init_routing_v2(v2, v5, expert_num=8, expert_tokens_num_type=1, expert_tokens_num_flag=True, active_expert_range=[0, 4], quant_mode=-1)
v7 = getitem(v6, 0)
v8 = getitem(v6, 2)
v9 = getitem(v6, 1)
v10 = size(hidden, 0)
v11 = narrow(gate_up_proj, 0, 0, 4)
v12 = transpose(v11, 1, 2)
v13 = npu.npu_grouped_matmul([v7], [v12], group_list=v8, split_item=2, group_type=0, group_list_type=1)
v14 = getitem(v13, 0)
v15 = npu.npu_swiglu(v14, dim=-1)
v16 = narrow(down_proj, 0, 0, 4)
v17 = transpose(v16, 1, 2)
v18 = npu.npu_grouped_matmul([v15], [v17], group_list=v8, split_item=2, group_type=0, group_list_type=1)
v19 = getitem(v18, 0)
v20 = sum(v8)
v21 = size(v19, 0)
v22 = arange(v21, device=device(type='cpu'))
v23 = lt(v22, v20)
v24 = unsqueeze(v23, 1)
v25 = where(v24, v19, 0)
v26 = lt(v9, 0)
v27 = view_as(v26, v4)
v28 = where(v27, 0, v4)
v29 = clamp(v9, min=0)
v30 = npu.npu_moe_token_unpermute(v25, v29, probs=v28)
v31 = moe_fx.scatter_tokens(v30, v10, '0')""")

    def test_all2allv(self):
        self.assertExpectedInline(self._rendering("all2allv"), """\
v0 = moe_fx.guard(topk_ids, [1074106077, 8, 64, 2, 0, 2, -1, 2, -1], 'model.layers.0.mlp.experts', '0', 30000, True, True)
v1 = to(v0, int32)
v2 = npu.npu_moe_token_permute(hidden, v1)
v3 = getitem(v2, 0)
v4 = getitem(v2, 1)
v5 = float(v0)
v6 = histc(v5, bins=8, min=0, max=7)
v7 = long(v6)
v8 = moe_fx.exchange_counts(v7, '0')
v9 = moe_fx.all_to_all_rows(v3, v7, v8, '0')
v10 = arange(4, device=device(type='cpu'))
v11 = repeat(v10, 2)
v12 = repeat_interleave(v11, v8)
v13 = pad(v9, (0, 0, 0, 1), mode='constant', value=None)
v14 = pad(v12, (0, 1), mode='constant', value=4)
v15 = to(v14, int32)
v16 = npu.npu_moe_token_permute(v13, v15)
v17 = getitem(v16, 0)
v18 = getitem(v16, 1)
v19 = view(v8, 2, 4)
v20 = sum(v19, 0)
v21 = narrow(gate_up_proj, 0, 0, 4)
v22 = transpose(v21, 1, 2)
v23 = npu.npu_grouped_matmul([v17], [v22], group_list=v20, split_item=2, group_type=0, group_list_type=1)
v24 = getitem(v23, 0)
v25 = npu.npu_swiglu(v24, dim=-1)
v26 = narrow(down_proj, 0, 0, 4)
v27 = transpose(v26, 1, 2)
v28 = npu.npu_grouped_matmul([v25], [v27], group_list=v20, split_item=2, group_type=0, group_list_type=1)
v29 = getitem(v28, 0)
v30 = npu.npu_moe_token_unpermute(v29, v18)
v31 = getitem(v30, :-1)
v32 = moe_fx.all_to_all_rows(v31, v8, v7, '0')
v33 = npu.npu_moe_token_unpermute(v32, v4, probs=topk_weights)""")

    def test_mc2(self):
        """qwen3_moe in bf16 (MC2 refuses fp32) on A2: expert_scales / expand_scales, comm_alg
        "fullmesh", padding rows routed to experts 0..K-1, MC2's own group (not WORLD's '0')."""
        self.assertExpectedInline(self._rendering_bf16("mc2"), """\
v0 = moe_fx.guard(topk_ids, [1074106077, 8, 64, 2, 1, 3, 16, 2, 16], 'model.layers.0.mlp.experts', '0', 30000, False, True)
v1 = size(hidden, 0)
v2 = le(v1, 16)
v3 = aten._assert_scalar.default(v2, "MoE block 'model.layers.0.mlp.experts': more tokens than the mc2 capacity moe_fx.config.max_tokens_per_rank=16")
v4 = sub(16, v1)
v5 = arange(2, device=device(type='cpu'))
v6 = to(v5, int32)
v7 = expand(v6, v4, 2)
v8 = to(v0, int32)
v9 = cat([v8, v7])
v10 = arange(16, device=device(type='cpu'))
v11 = lt(v10, v1)
v12 = float(topk_weights)
v13 = pad(v12, (0, 0, 0, v4), mode='constant', value=None)
v14 = pad(hidden, (0, 0, 0, v4), mode='constant', value=None)
v15 = npu.npu_moe_distribute_dispatch_v2(v14, v9, '<mc2 group>', 2, 0, 8, x_active_mask=v11, expert_token_nums_type=0, comm_alg='fullmesh', expert_scales=v13)
v16 = getitem(v15, 0)
v17 = getitem(v15, 3)
v18 = getitem(v15, 2)
v19 = getitem(v15, 4)
v20 = getitem(v15, 6)
v21 = narrow(gate_up_proj, 0, 0, 4)
v22 = transpose(v21, 1, 2)
v23 = npu.npu_grouped_matmul([v16], [v22], group_list=v17, split_item=2, group_type=0, group_list_type=0)
v24 = getitem(v23, 0)
v25 = npu.npu_swiglu(v24, dim=-1)
v26 = narrow(down_proj, 0, 0, 4)
v27 = transpose(v26, 1, 2)
v28 = npu.npu_grouped_matmul([v25], [v27], group_list=v17, split_item=2, group_type=0, group_list_type=0)
v29 = getitem(v28, 0)
v30 = npu.npu_moe_distribute_combine_v2(v29, v9, v18, v19, v13, '<mc2 group>', 2, 0, 8, x_active_mask=v11, comm_alg='fullmesh', expand_scales=v20)
v31 = getitem(v30, :v1)""")
