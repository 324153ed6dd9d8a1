"""The CPU emulator of torch_npu's MoE ops (moe_fx.testing.npu_emulator), on its own: each op
against the documented contract (torch_npu docs' numpy references, the golden tests), worked by
hand on small inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_fx.testing import npu_emulator

npu_emulator.install()
npu = torch.ops.npu

NAN = math.nan
# 4 tokens, top-2 over 4 experts; token t's hidden row is [t, t, t].
X = torch.arange(4.0).view(4, 1).repeat(1, 3)
IDS = torch.tensor([[2, 0], [1, 2], [3, 1], [0, 3]], dtype=torch.int32)
# Flattened entries f = t*K + k: experts [2, 0, 1, 2, 3, 1, 0, 3]. Stable sort by expert:
# e0: f1 f6 | e1: f2 f5 | e2: f0 f3 | e3: f4 f7  -> source tokens [0, 3, 1, 2, 0, 1, 2, 3]
SORTED_TOKENS = [0.0, 3.0, 1.0, 2.0, 0.0, 1.0, 2.0, 3.0]
DEST_ROW = [4, 0, 2, 5, 6, 3, 1, 7]  # destination row of each entry f


def _routing(**kw):
    return npu.npu_moe_init_routing_v2(X, IDS, expert_num=4, **kw)


def test_init_routing_v2_all_experts():
    expanded_x, row_idx, counts, _ = _routing(expert_tokens_num_type=1)
    assert expanded_x[:, 0].tolist() == SORTED_TOKENS
    assert row_idx.dtype == torch.int32 and row_idx.tolist() == DEST_ROW  # row_idx_type 0: gather
    assert counts.dtype == torch.int64 and counts.tolist() == [2, 2, 2, 2]
    _, source_of_row, cumsum, _ = _routing(expert_tokens_num_type=0, row_idx_type=1)
    assert source_of_row.tolist() == [1, 6, 2, 5, 0, 3, 4, 7]  # row_idx_type 1: scatter
    assert cumsum.tolist() == [2, 4, 6, 8]


def test_init_routing_v2_active_expert_range():
    """Experts [1, 3) only: other entries get -1, rows past the 4 routed ones are undefined (NaN)."""
    expanded_x, row_idx, counts, _ = _routing(expert_tokens_num_type=1, active_expert_range=[1, 3])
    assert expanded_x[:4, 0].tolist() == [1.0, 2.0, 0.0, 1.0]  # e1: f2 f5, e2: f0 f3
    assert expanded_x[4:].isnan().all()
    assert row_idx.tolist() == [2, -1, 0, 3, -1, 1, -1, -1]
    assert counts.tolist() == [2, 2]
    _, _, pairs, _ = npu.npu_moe_init_routing_v2(X, IDS.clamp(max=1), expert_num=4, expert_tokens_num_type=2)
    assert pairs.tolist() == [[0, 2], [1, 6], [0, 0], [0, 0]]  # (id, count), non-zero counts first


def test_token_permute_matches_init_routing_convention():
    permuted, sorted_indices = npu.npu_moe_token_permute(X, IDS)
    assert permuted[:, 0].tolist() == SORTED_TOKENS
    assert sorted_indices.dtype == torch.int32 and sorted_indices.tolist() == DEST_ROW
    top1, idx1 = npu.npu_moe_token_permute(X, IDS[:, 0], num_out_tokens=3)  # [N] indices, K = 1
    assert top1[:, 0].tolist() == [3.0, 1.0, 0.0] and idx1.tolist() == [2, 1, 3, 0]


def test_token_unpermute_weights_and_minus_one():
    permuted, sorted_indices = npu.npu_moe_token_permute(X, IDS)
    probs = torch.tensor([[0.5, 0.25], [1.0, 0.0], [0.1, 0.9], [2.0, 1.0]])
    out = npu.npu_moe_token_unpermute(permuted, sorted_indices, probs=probs)
    torch.testing.assert_close(out, X * probs.sum(1, keepdim=True))
    assert torch.equal(npu.npu_moe_token_unpermute(permuted, sorted_indices[::2].contiguous()), X)  # K = 1
    dropped = sorted_indices.clone()
    dropped[0] = -1  # token 0's first entry contributes 0
    assert npu.npu_moe_token_unpermute(permuted, dropped, probs=probs)[0, 0].item() == 0.0
    dropped[0] = 8
    with pytest.raises(IndexError, match=r"outside \[-1, 8\)"):
        npu.npu_moe_token_unpermute(permuted, dropped, probs=probs)


@pytest.mark.parametrize("group_list_type,group_list", [(1, [1, 0, 2]), (0, [1, 1, 3])])
def test_grouped_matmul_group_list_types(group_list_type, group_list):
    """Groups of 1, 0 and 2 rows over 5 rows: rows 3..4 lie past the total and are undefined."""
    x = torch.randn(5, 4)
    w = torch.randn(3, 4, 2)
    bias = torch.randn(3, 2)
    (y,) = npu.npu_grouped_matmul([x], [w], bias=[bias], group_list=torch.tensor(group_list), split_item=2,
                                  group_type=0, group_list_type=group_list_type)
    torch.testing.assert_close(y[0], x[0] @ w[0] + bias[0])
    torch.testing.assert_close(y[1:3], x[1:3] @ w[2] + bias[2])
    assert y[3:].isnan().all()
    with pytest.raises(ValueError, match="do not fit"):
        npu.npu_grouped_matmul([x], [w], group_list=torch.tensor([3, 3, 3]), split_item=2, group_type=0,
                               group_list_type=1)


def test_swiglu():
    x = torch.randn(3, 8)
    torch.testing.assert_close(npu.npu_swiglu(x), torch.nn.functional.silu(x[:, :4]) * x[:, 4:])


def test_fake_shapes_are_static_upper_bounds():
    with FakeTensorMode() as mode:
        x, ids = mode.from_tensor(X), mode.from_tensor(IDS)
        expanded_x, row_idx, counts, scale = npu.npu_moe_init_routing_v2(
            x, ids, expert_num=4, expert_tokens_num_type=1, active_expert_range=[1, 3])
        assert [t.shape for t in (expanded_x, row_idx, counts, scale)] == [(8, 3), (8,), (2,), (8,)]
        permuted, idx = npu.npu_moe_token_permute(x, ids)
        assert permuted.shape == (8, 3) and npu.npu_moe_token_unpermute(permuted, idx, probs=ids.float()).shape == (4, 3)
        (y,) = npu.npu_grouped_matmul([permuted], [x.new_empty((4, 3, 6))], group_list=counts, split_item=2,
                                      group_type=0, group_list_type=1)
        assert y.shape == (8, 6) and npu.npu_swiglu(y).shape == (8, 3)
        x32 = mode.from_tensor(torch.zeros(4, 32, dtype=torch.bfloat16))
        out = npu.npu_moe_distribute_dispatch_v2(x32, ids, "g", 2, 0, 4)
        # A = BS * ep * min(L, K) = 4 * 2 * 2 rows; assist_info A * 128; counts [L]; ep_recv_counts
        # [ep * L]; tp_recv_counts [tp_world_size] = [0]
        assert [tuple(t.shape) for t in out] == [(16, 32), (16,), (2048,), (2,), (4,), (0,), (16,)]
        combined = npu.npu_moe_distribute_combine_v2(out[0], ids, out[2], out[4], ids.float(), "g", 2, 0, 4,
                                                     expand_scales=out[6])
        assert combined.shape == (4, 32)


@pytest.mark.parametrize("version", ("v2", "v1"))
def test_mc2_dispatch_combine_over_gloo(rank_pool, version):
    for rank, res in enumerate(rank_pool(2).run("tests.npu_jobs:mc2_ops_case", version=version)):
        assert res["rows"] == 5 * 2 * 2, rank
        assert res["counts"] and res["expand_x"] and res["past_total_nan"] and res["expand_scales"], (rank, res)
        assert res["combine_diff"] <= 8e-3 * res["combine_scale"], (rank, res)  # one bf16 rounding of the sum
        assert "global_bs=0 needs the same BS on every rank, got [5, 4]" in res["uneven"], (rank, res)


# ---------------------------------------------------------------------------------------------
# The emulator refuses each rule broken on purpose (the rules: moe_fx/testing/npu_emulator/mc2_rules.py).
# ---------------------------------------------------------------------------------------------

BF = torch.ones(4, 32, dtype=torch.bfloat16)
W = torch.full((4, 2), 0.5)


def _dispatch(x=BF, ids=IDS, *, soc="A2", experts=4, **kw):
    npu_emulator.set_soc(soc)
    try:
        return npu.npu_moe_distribute_dispatch_v2(x, ids, "g", 2, 0, experts, **kw)
    finally:
        npu_emulator.set_soc("A2")


def _combine(expand_x=None, ids=IDS, *, soc="A2", **kw):
    npu_emulator.set_soc(soc)
    rows = torch.zeros(16, BF.shape[1] if expand_x is None else expand_x.shape[1], dtype=torch.bfloat16)
    try:
        return npu.npu_moe_distribute_combine_v2(rows if expand_x is None else expand_x, ids,
                                                 torch.zeros(2048, dtype=torch.int32), torch.zeros(4, dtype=torch.int32),
                                                 W, "g", 2, 0, 4, **kw)
    finally:
        npu_emulator.set_soc("A2")


X_A3 = torch.ones(4, 1024, dtype=torch.bfloat16)
SCALES = torch.zeros(16)

# (rule broken, the call, the refusal's text: torch_npu's / CANN's where their source has one)
REFUSALS = {
    "dispatch fp32 x": (lambda: _dispatch(BF.float()),
                        "x dataType is invalid, dataType should be bf16 or float16, but is DT_FLOAT."),
    "dispatch int64 ids": (lambda: _dispatch(ids=IDS.long()),
                           "expertId dataType is invalid, dataType should be int32, but is DT_INT64."),
    "dispatch 1-D x": (lambda: _dispatch(BF[0]), "The x and expert_ids should be 2D"),
    "dispatch rank id": (lambda: npu.npu_moe_distribute_dispatch_v2(BF, IDS, "g", 2, 2, 4),
                         "ep_rank_id should be in [0, ep_world_size), but got ep_world_size: 2, ep_rank_id: 2."),
    "combine fp32 expand_x": (lambda: _combine(torch.zeros(16, 32), expand_scales=SCALES),
                              "dtype of expand_x should be BFloat16, Float16 or Int, but got Float"),
    "combine int64 ids": (lambda: _combine(ids=IDS.long(), expand_scales=SCALES),
                          "dtype of expert_ids should be Int, but got Long"),
    "A2 combine without expand_scales": (lambda: _combine(), "expand_scales is required on A2"),
    "A2 combine tp_send_counts": (lambda: _combine(expand_scales=SCALES, tp_send_counts=torch.zeros(0, dtype=torch.int32)),
                                  "tp_send_counts is reserved on A2"),
    "A2 tp_world_size": (lambda: _dispatch(tp_world_size=1), "A2 has no TP domain"),
    "A2 group_tp": (lambda: _dispatch(group_tp="other"), "group_tp='other' on A2 must be"),
    "A2 shared experts": (lambda: _dispatch(shared_expert_num=0), "not supported on A2, leave the defaults"),
    "A2 hidden size": (lambda: _dispatch(torch.ones(4, 48, dtype=torch.bfloat16)),
                       "H=48 not a multiple of 32 in (0, 7168] on A2"),
    "A2 comm_alg": (lambda: _dispatch(comm_alg="fullmesh_v1"), "commAlg is not support"),
    "A3 group_tp == group_ep": (lambda: _dispatch(X_A3, soc="A3", group_tp="g"), "on A3 they must differ"),
    "A3 expert_scales": (lambda: _dispatch(X_A3, soc="A3", expert_scales=W), "expert_scales is not supported on A3"),
    "A3 top-k 16 with comm_alg \"\"": (lambda: _dispatch(X_A3, torch.arange(16, dtype=torch.int32).repeat(4, 1),
                                                          soc="A3", experts=16),
                                        "K=16 not in (0, min(12, moe_expert_num=16)]"),
    "A3 combine without tp_send_counts": (lambda: _combine(torch.zeros(16, 1024, dtype=torch.bfloat16), soc="A3"),
                                          "tpSendCounts is null."),
    "A3 combine expand_scales": (lambda: _combine(torch.zeros(16, 1024, dtype=torch.bfloat16), soc="A3",
                                                  tp_send_counts=torch.zeros(0, dtype=torch.int32), expand_scales=SCALES),
                                 "expand_scales is not supported on A3"),
    "A3 comm_alg": (lambda: _dispatch(X_A3, soc="A3", comm_alg="fullmesh"),
                    "Attr commAlg is invalid, current only support fullmesh_v1 and fullmesh_v2, but got commAlg = fullmesh."),
    "GMM fp64": (lambda: npu.npu_grouped_matmul([torch.ones(2, 4, dtype=torch.float64)],
                                                [torch.ones(1, 4, 2, dtype=torch.float64)],
                                                group_list=torch.tensor([2]), split_item=2, group_type=0,
                                                group_list_type=1),
                 "x dtype torch.float64 is not one of"),
    "GMM int32 group_list": (lambda: npu.npu_grouped_matmul([torch.ones(2, 4)], [torch.ones(1, 4, 2)],
                                                            group_list=torch.tensor([2], dtype=torch.int32),
                                                            split_item=2, group_type=0, group_list_type=1),
                             "group_list dtype torch.int32 is not one of ['torch.int64']"),
    "swiglu empty": (lambda: npu.npu_swiglu(torch.ones(0, 8)), "empty tensors are not supported"),
    "init_routing int64 ids": (lambda: npu.npu_moe_init_routing_v2(X, IDS.long(), expert_num=4),
                               "expert_idx dtype torch.int64 is not one of ['torch.int32']"),
    "permute 0 rows": (lambda: npu.npu_moe_token_permute(X[:0], IDS[:0]), "tokens has 0 rows"),
    "unpermute 0 rows": (lambda: npu.npu_moe_token_unpermute(X[:0], torch.zeros(0, dtype=torch.int32)),
                         "permuted_tokens has 0 rows"),
}


@pytest.mark.parametrize("rule", REFUSALS)
def test_emulator_refuses(rule):
    call, message = REFUSALS[rule]
    try:
        with pytest.raises(npu_emulator.ContractError) as info:
            call()
    finally:
        npu_emulator.set_soc("A2")
    assert message in str(info.value), info.value


@pytest.mark.parametrize("soc,have_mb,message", [
    ("A2", 4, "HCCL_BUFFSIZE is too small, min required HCCL_BUFFSIZE (2 * (maxBs * epWorldSize * "
              "min(localMoeExpertNum, k) * (h * dtypeBytes + scalePayloadBytes) / 1MB + 2MB)) = 5MB, "
              "actual HCCL_BUFFSIZE = 4MB"),
    ("A3", 0, "HCCL_BUFFSIZE is too SMALL, maxBs = 4, h = 1024, epWorldSize = 2, localMoeExpertNum = 2, "
              "sharedExpertNum = 1, tokenNeedSizeDispatch = 2560, tokenNeedSizeCombine = 2048, k = 2"),
])
def test_emulator_refuses_a_small_hccl_buffer(monkeypatch, soc, have_mb, message):
    monkeypatch.setenv("HCCL_BUFFSIZE", str(have_mb))
    with pytest.raises(npu_emulator.ContractError) as info:
        _dispatch(BF if soc == "A2" else X_A3, soc=soc)
    assert message in str(info.value), info.value
    monkeypatch.setenv("HCCL_BUFFSIZE", str(have_mb + 1))  # one MB more is enough (the fake checks it too)
    with FakeTensorMode() as mode:
        _dispatch(mode.from_tensor(BF if soc == "A2" else X_A3), mode.from_tensor(IDS), soc=soc)


def test_mc2_refusals_over_gloo(rank_pool):
    """The rules that need the values or the group's history: repeated ids in a row (one rank's;
    every rank stops), a mask with True after False, another collective on MC2's domain."""
    for rank, res in enumerate(rank_pool(2).run("tests.npu_jobs:mc2_refusals_case")):
        expected_repeat = "expert_ids row 2 repeats an expert [2, 2]" if rank == 1 else "rank(s) [1] of group_ep refused"
        assert expected_repeat in res["repeated_ids"], (rank, res)
        assert "all True values must precede any False values" in res["mask_order"], (rank, res)
        assert res["clean"] == "no error" and res["after_refusal"] == "no error", (rank, res)
        assert "carried 1 other collective(s) since its last MC2 op" in res["shared_domain"], (rank, res)
        assert "other collective(s)" in res["world"] and "emulated_hccl:0" in res["world"], (rank, res)
