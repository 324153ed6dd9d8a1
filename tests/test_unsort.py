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
