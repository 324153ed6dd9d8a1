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
        out = npu.npu_moe_distribute_dispatch_v2(x, ids, "g", 2, 0, 4)
        # A = BS * ep * min(L, K) = 4 * 2 * 2 rows; assist_info A * 128; counts [L]; ep_recv_counts [ep * L]
        assert [tuple(t.shape) for t in out] == [(16, 3), (16,), (2048,), (2,), (4,), (1,), (16,)]
        assert npu.npu_moe_distribute_combine_v2(out[0], ids, out[2], out[4], ids.float(), "g", 2, 0, 4).shape == (4, 3)


@pytest.mark.parametrize("version", ("v2", "v1"))
def test_mc2_dispatch_combine_over_gloo(rank_pool, version):
    for rank, res in enumerate(rank_pool(2).run("tests.npu_jobs:mc2_ops_case", version=version)):
        assert res["rows"] == 5 * 2 * 2, rank
        assert res["counts"] and res["expand_x"] and res["past_total_nan"], (rank, res)
        assert res["combine_diff"] <= 1e-6, (rank, res)
        assert "global_bs=0 needs the same BS on every rank, got [5, 4]" in res["uneven"], (rank, res)
