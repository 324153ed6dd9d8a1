"""torch.ops.moe_fx.unsort_weighted_sum: the local lowering's fused unsort + weighted sum.

Its CUDA kernel is checked on the GPU by scripts/cuda_unsort_check.py; here the op's contract,
fake implementation and autograd formula."""

from __future__ import annotations

import pytest
import torch

import moe_fx  # noqa: F401  (registers torch.ops.moe_fx)


def _case(tokens: int, top_k: int, hidden: int, y_dtype: torch.dtype, w_dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(tokens * top_k, hidden, generator=gen).to(y_dtype)
    w = torch.rand(tokens, top_k, generator=gen).to(w_dtype)
    return y, torch.randperm(tokens * top_k, generator=gen), w


@pytest.mark.parametrize("y_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16)])
def test_matches_unsort_then_weighted_sum(y_dtype, w_dtype):
    y, position, w = _case(5, 3, 7, y_dtype, w_dtype)
    out = torch.ops.moe_fx.unsort_weighted_sum(y, position, w)
    # Written out: row t*K + k of the (t, k)-ordered rows is y[position[t*K + k]].
    # (w[t, k:k+1] keeps the weight 1-d, so bf16 rows times fp32 weights promote as in the model.)
    want = torch.stack([torch.stack([y[position[t * 3 + k]] * w[t, k : k + 1] for k in range(3)]).sum(0)
                        for t in range(5)])
    assert out.dtype == torch.promote_types(y_dtype, w_dtype)
    torch.testing.assert_close(out, want.to(out.dtype))


def test_gradients_and_op_contract():
    y, position, w = _case(4, 2, 6, torch.float64, torch.float64)
    y.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(lambda y, w: torch.ops.moe_fx.unsort_weighted_sum(y, position, w), (y, w))
    torch.library.opcheck(torch.ops.moe_fx.unsort_weighted_sum, _case(3, 2, 4, torch.bfloat16, torch.float32))


def test_no_tokens():
    y, position, w = _case(0, 2, 4, torch.float32, torch.float32)
    assert torch.ops.moe_fx.unsort_weighted_sum(y, position, w).shape == (0, 4)


def test_output_dtype_is_the_models_cast_folded_in():
    """out_dtype=bf16 gives the bits of the fp32 result cast to bf16, and the same gradients."""
    y, position, w = _case(6, 4, 9, torch.bfloat16, torch.float32, seed=3)
    folded = torch.ops.moe_fx.unsort_weighted_sum(y, position, w, torch.bfloat16)
    two_step = torch.ops.moe_fx.unsort_weighted_sum(y, position, w).to(torch.bfloat16)
    assert folded.dtype == torch.bfloat16 and torch.equal(folded, two_step)
    probe = torch.randn(folded.shape).to(torch.bfloat16)
    grads = []
    for fn in (lambda y, w: torch.ops.moe_fx.unsort_weighted_sum(y, position, w, torch.bfloat16),
               lambda y, w: torch.ops.moe_fx.unsort_weighted_sum(y, position, w).to(torch.bfloat16)):
        yi, wi = y.clone().requires_grad_(), w.clone().requires_grad_()
        (fn(yi, wi).float() * probe.float()).sum().backward()
        grads.append((yi.grad, wi.grad))
    for got, want in zip(*grads):
        assert torch.equal(got, want)
    torch.library.opcheck(torch.ops.moe_fx.unsort_weighted_sum, (*_case(3, 2, 4, torch.bfloat16, torch.float32),
                                                                   torch.bfloat16))


def test_the_models_output_cast_moves_into_the_combine():
    """transformers' experts sum bf16 rows times fp32 router weights in fp32 and the model casts
    back to bf16: the rewrite hands that dtype to the local combine and drops the separate cast;
    the output stays bit-identical to eager."""
    from tests.ep_jobs import output_cast_case

    result = output_cast_case()
    assert result == {"separate_cast": False, "dtype": "torch.bfloat16", "diff": 0.0, "strategy": "local"}


@pytest.mark.parametrize("lowering,patch", [("allgather", {"max_tokens_per_rank": 16}), ("allgather", {}),
                                            ("all2allv", {}), ("mc2", {"max_tokens_per_rank": 16})])
def test_ep_strategies_fold_the_output_cast(rank_pool, lowering, patch):
    """Every EP strategy produces the model's dtype itself (the cast happens inside its combine,
    or right on its weighted sum where inductor fuses it): no separate cast of the region's result
    is left, and the result matches eager within bf16's rounding."""
    for result in rank_pool(2).run("tests.ep_jobs:output_cast_case", lowering=lowering, config_patch=patch):
        assert result["strategy"] == lowering and result["dtype"] == "torch.bfloat16"
        assert not result["separate_cast"], result
        assert result["diff"] < 0.05, result
