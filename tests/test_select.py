"""The lowering choice as a function of one BlockFacts record (no graph, no ranks)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moe_fx
from moe_fx.lowering import DEVICE_RULES, BlockFacts, LoweringChoice, Strategy, choose_lowering

FACTS = BlockFacts(block="model.layers.0.mlp.experts", ep_size=4, num_experts=8, top_k=2, hidden_size=64,
                   dtype=torch.bfloat16, device_type="cuda", soc=None, token_bound=None)


def _choose(**changes) -> LoweringChoice:
    return choose_lowering(dataclasses.replace(FACTS, **changes))


@pytest.mark.parametrize(
    "changes,strategy,capacity,reason",
    [
        ({"ep_size": 1}, "local", None, "ep=1"),
        ({"token_bound": 16, "token_bound_source": "config.max_tokens_per_rank"}, "mc2", 16,
         "at most 16 tokens per rank (config.max_tokens_per_rank) <= auto_mc2_max_tokens=256"),
        ({"token_bound": 256}, "mc2", 256, "CUDA-graph capturable"),
        # ep <= top_k: allgather at every size, static with a bound (2 H200s: fastest at 8, 128, 4096)
        ({"token_bound": 16, "ep_size": 2}, "allgather", 16, "bounded by 16 tokens per rank"),
        ({"ep_size": 2}, "allgather", None, "ep=2 <= top_k*1=2"),
        ({"token_bound": 4096, "ep_size": 2}, "allgather", 4096, "ep=2 <= top_k*1=2"),
        ({}, "mc2|all2allv", 256, "no token bound: per call, mc2 while the largest rank's token count"),
        ({"token_bound": 257}, "all2allv", None, "bound 257 > auto_mc2_max_tokens=256"),
        ({"top_k": 8, "ep_size": 8, "num_experts": 64}, "allgather", None, "ep=8 <= top_k*1=8"),
        ({"top_k": 8, "ep_size": 8, "num_experts": 64, "token_bound": 8}, "allgather", 8, "static shapes"),
    ],
)
def test_auto_rule(changes, strategy, capacity, reason):
    choice = _choose(**changes)
    assert (choice.strategy.value, choice.capacity_tokens) == (strategy, capacity), choice
    assert reason in choice.reason


def test_thresholds_come_from_config():
    with moe_fx.config.patch(auto_mc2_max_tokens=8):
        assert _choose(token_bound=9).strategy is Strategy.ALL2ALLV
        assert _choose().capacity_tokens == 8
    with moe_fx.config.patch(auto_runtime_switch=False):
        choice = _choose()
        assert choice.strategy is Strategy.ALL2ALLV and "no token bound" in choice.reason
    with moe_fx.config.patch(auto_allgather_ep_per_topk=2.0):
        assert _choose().strategy is Strategy.ALLGATHER


def test_forced_strategies_carry_their_capacity():
    with moe_fx.config.patch(lowering="mc2"):
        assert _choose(token_bound=12).capacity_tokens == 12
        assert _choose().capacity_tokens is None  # Mc2Lowering then raises and names the setting
    with moe_fx.config.patch(lowering="mc2|all2allv", auto_mc2_max_tokens=32):
        choice = _choose(token_bound=4096)
        assert (choice.strategy, choice.capacity_tokens, choice.reason) == (
            Strategy.TOKEN_SWITCH, 32, "forced by config.lowering")


def test_explain_names_the_mc2_transport():
    with moe_fx.config.patch(lowering="mc2", mc2_transport="symm_mem"):
        assert _choose(token_bound=12).reason == "forced by config.lowering; rows move over mc2_transport='symm_mem'"
        assert _choose(token_bound=12, device_type="npu").reason == "forced by config.lowering"


def test_device_rules_take_over_their_device_only():
    """The seam for device-specific rules (the Ascend rules register "npu")."""
    DEVICE_RULES["npu"] = lambda f: LoweringChoice(strategy=Strategy.ALL2ALLV, reason=f"npu rule, soc {f.soc}")
    try:
        assert _choose(device_type="npu", soc="250").reason == "npu rule, soc 250"
        assert _choose(device_type="npu", ep_size=1).strategy is Strategy.LOCAL
        with moe_fx.config.patch(lowering="allgather"):
            assert _choose(device_type="npu").strategy is Strategy.ALLGATHER
        assert _choose().strategy is Strategy.TOKEN_SWITCH
    finally:
        del DEVICE_RULES["npu"]


@pytest.mark.parametrize("strategy, capacity, hidden, device, bulk", [
    (Strategy.ALLGATHER, 4096, 2048, "cuda", True),   # 16 MiB per rank
    (Strategy.ALLGATHER, 128, 2048, "cuda", False),   # 512 KiB: NCCL's own pick
    (Strategy.MC2, 128, 2048, "cuda", True),          # C*K rows: 4 MiB
    (Strategy.ALLGATHER, None, 2048, "cuda", False),  # sized at run time
])
def test_large_static_exchanges_take_the_bulk_protocol_group(monkeypatch, strategy, capacity, hidden, device, bulk):
    """config.ep_nccl_protocol / ep_nccl_bulk_bytes: which blocks run their collectives on the
    communicator started with the bulk protocol (moe_fx/runtime/comm.timed_sibling)."""
    from moe_fx.lowering import EPPlan
    from moe_fx.passes import plan as plan_module

    asked = []
    monkeypatch.setattr(plan_module, "resolve_group", lambda name: name)
    monkeypatch.setattr(plan_module, "timed_sibling", lambda group, timeout_s, protocol: asked.append(
        (group, timeout_s, protocol)) or type("G", (), {"group_name": "bulk"}))
    region = type("Region", (), {"top_k": 8, "hidden_size": hidden, "dtype": torch.bfloat16})
    ep = EPPlan(block="b", num_experts=16, ep_size=2, ep_rank=0, group_name="ep")
    got = plan_module.exchange_group(ep, region, strategy, capacity, device)
    assert got.group_name == ("bulk" if bulk else "ep") and asked == ([("ep", 30.0, "Simple")] if bulk else [])
    with moe_fx.config.patch(ep_nccl_protocol=None):
        assert plan_module.exchange_group(ep, region, strategy, capacity, device) is ep


@pytest.mark.parametrize("strategy,capacity", [(Strategy.ALLGATHER, 8), (Strategy.ALLGATHER, None), (Strategy.MC2, 8),
                                               (Strategy.ALL2ALLV, None)])
def test_cpu_exchanges_take_a_group_with_moe_fx_timeout(monkeypatch, strategy, capacity):
    """On gloo every strategy's collectives run on moe_fx's own group, which fails after
    config.collective_timeout_s (a peer that raised inside a block stops the others in time)."""
    from moe_fx.lowering import EPPlan
    from moe_fx.passes import plan as plan_module

    asked = []
    monkeypatch.setattr(plan_module, "resolve_group", lambda name: name)
    monkeypatch.setattr(plan_module, "timed_sibling", lambda group, timeout_s, protocol: asked.append(
        (group, timeout_s, protocol)) or type("G", (), {"group_name": "timed"}))
    region = type("Region", (), {"top_k": 2, "hidden_size": 16, "dtype": torch.float32})
    with moe_fx.config.patch(collective_timeout_s=7.5):
        got = plan_module.exchange_group(EPPlan(block="b", num_experts=4, ep_size=2, ep_rank=0, group_name="ep"),
                                          region, strategy, capacity, "cpu")
    assert got.group_name == "timed" and asked == [("ep", 7.5, None)]
    one = EPPlan(block="b", num_experts=4, ep_size=1, ep_rank=0, group_name="ep")
    assert plan_module.exchange_group(one, region, strategy, capacity, "cpu") is one
