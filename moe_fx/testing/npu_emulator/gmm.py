"""Compute ops: npu_grouped_matmul (the split_item=2/3, group_type=0 "split along M" form that
vllm-ascend uses) and npu_swiglu.

Refused (ContractError), from Ascend/op-plugin docs/en/custom_APIs/torch_npu/ (26.1.0):
torch_npu-npu_grouped_matmul.md: unquantized x / weight float16, bfloat16 or float32 (the same
dtype), group_list int64, at most 1024 groups; (beta)torch_npu-npu_swiglu.md: float32, float16 or
bfloat16, "empty tensors are not supported".

Not enforced: the grouped-matmul doc asks the group sizes to cover x's rows exactly; vllm-ascend
passes statically shaped x with fewer routed rows (MC2's A rows) and the rows past the total come
back undefined (NaN here), which is what moe_fx relies on.
"""

from __future__ import annotations

import torch

from moe_fx.testing.npu_emulator.common import ContractError, check_dtype, define, garbage_like, unsupported

_GMM_DOC = "torch_npu doc of npu_grouped_matmul"
_SWIGLU_DOC = "torch_npu doc of npu_swiglu"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)

GROUPED_MATMUL = (
    "npu_grouped_matmul(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor? group_list=None, "
    "int split_item=0, int? group_type=None, int group_list_type=0, int act_type=0, "
    "ScalarType? output_dtype=None) -> Tensor[]"
)
SWIGLU = "npu_swiglu(Tensor x, int dim=-1) -> Tensor"


def group_sizes(group_list: torch.Tensor, group_list_type: int) -> list[int]:
    """group_list -> rows of each group. Type 0: cumulative ends; 1: counts."""
    values = group_list.to(torch.int64)
    if group_list_type == 0:
        return torch.diff(values, prepend=values.new_zeros(1)).tolist()
    if group_list_type == 1:
        return values.tolist()
    raise unsupported("npu_grouped_matmul", f"group_list_type={group_list_type}")


def grouped_matmul(x, weight, *, bias=None, group_list=None, split_item=0, group_type=None,
                   group_list_type=0, act_type=0, output_dtype=None):
    """x=[h [M, K]], weight=[w [E, K, N]] -> [y [M, N]]; rows of group e are h_e @ w[e] (+ bias[e]).
    Rows past the sum of the group sizes are left undefined (NaN)."""
    op = "npu_grouped_matmul"
    if len(x) != 1 or len(weight) != 1 or split_item not in (2, 3) or group_type != 0:
        raise unsupported(op, f"{len(x)} x / {len(weight)} weights, split_item={split_item}, group_type={group_type}")
    if act_type != 0:
        raise unsupported(op, f"act_type={act_type}")
    (h,), (w,) = x, weight
    _check_gmm(h, w, group_list)
    sizes = group_sizes(group_list, group_list_type)
    if len(sizes) != w.shape[0] or min(sizes, default=0) < 0 or sum(sizes) > h.shape[0]:
        raise ValueError(f"{op}: group sizes {sizes} do not fit x {tuple(h.shape)} and weight {tuple(w.shape)}")
    dtype = output_dtype or h.dtype
    out = garbage_like(h.shape[0], h.new_empty((1, w.shape[2]), dtype=dtype))
    start = 0
    for g, rows in enumerate(sizes):
        if rows:
            y = h[start : start + rows].float() @ w[g].float()
            if bias is not None:
                y = y + bias[0][g].float()
            out[start : start + rows] = y.to(dtype)
        start += rows
    return [out]


def _check_gmm(h, w, group_list) -> None:
    op = "npu_grouped_matmul"
    check_dtype(op, "x", h, _FLOATS, _GMM_DOC)
    check_dtype(op, "weight", w, (h.dtype,), _GMM_DOC)
    check_dtype(op, "group_list", group_list, (torch.int64,), _GMM_DOC)
    if w.shape[0] > 1024:
        raise ContractError(op, f"{w.shape[0]} groups > 1024", _GMM_DOC)


def _grouped_matmul_fake(x, weight, *, bias=None, group_list=None, split_item=0, group_type=None,
                         group_list_type=0, act_type=0, output_dtype=None):
    (h,), (w,) = x, weight
    _check_gmm(h, w, group_list)
    torch._check(h.shape[1] == w.shape[1], lambda: f"npu_grouped_matmul: x {h.shape} vs weight {w.shape}")
    return [h.new_empty((h.shape[0], w.shape[2]), dtype=output_dtype or h.dtype)]


def swiglu(x, dim=-1):
    """silu(first half) * second half along ``dim``."""
    check_dtype("npu_swiglu", "x", x, _FLOATS, _SWIGLU_DOC)
    if x.numel() == 0:
        raise ContractError("npu_swiglu", f"x is empty {tuple(x.shape)}: empty tensors are not supported", _SWIGLU_DOC)
    gate, up = x.chunk(2, dim=dim)
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(x.dtype)


def _swiglu_fake(x, dim=-1):
    check_dtype("npu_swiglu", "x", x, _FLOATS, _SWIGLU_DOC)
    shape = list(x.shape)
    shape[dim] //= 2
    return x.new_empty(shape)


def register() -> None:
    define(GROUPED_MATMUL, grouped_matmul, _grouped_matmul_fake)
    define(SWIGLU, swiglu, _swiglu_fake)
