"""The torch.library namespace of moe_fx's ops, and helpers for their fake implementations.

Shape legend for every op: T tokens on this rank, K top-k, S = T*K routed rows, H hidden, N output
features, E experts, e local experts, ep group size, R rows routed to this rank's experts.

Row orders: "expert-major" groups rows by expert, ascending, with ``offsets[j]`` the end of expert
j's rows; "(t, k) order" puts token t's k-th routing choice at row t*K + k, as
``topk_ids.reshape(-1)`` does.
"""

from __future__ import annotations

import torch

from moe_fx.errors import UnsupportedMoEError

LIB = "moe_fx"


def kernel_op(name: str, has_triton: bool):
    """Decorator for an op whose CUDA path is Triton kernels called through
    ``torch.library.wrap_triton`` and whose other devices run torch ops in the same function.

    With Triton, a ``triton_op``: the compiler sees the kernels and launches them from its own
    code, without a Python op call per use (host time per call is what moe_fx.bench_ep showed
    EP layers losing). Without (CPU-only installs), a plain custom op over the same function."""

    def define(fn):
        if has_triton:
            return torch.library.triton_op(f"{LIB}::{name}", mutates_args=())(fn)
        op = torch.library.custom_op(f"{LIB}::{name}", mutates_args=())(fn)
        op.register_fake(fn)  # the torch branch runs on fake tensors too
        return op

    return define


_LIBRARY = torch.library.Library(LIB, "FRAGMENT")


def host_op(name: str):
    """Decorator for an op whose Python body runs on every call, on every device, and never needs
    a gradient (the guard): defined from the function's annotations and registered directly with
    the dispatcher. ``torch.library.custom_op`` wraps each call in Python layers of its own that
    cost about 20 µs of host time per call (30 against 10 for the same body on CPU)."""

    def define(fn):
        _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=()))
        _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")
        return fn

    return define


def fake_rows() -> int:
    """A fresh unbacked size for the data-dependent number of rows routed to this rank."""
    return torch.library.get_ctx().new_dynamic_size()


def check_capacity(block: str, tokens: int, capacity_tokens: int, rank: int, strategy: str = "mc2") -> None:
    """A rank with more tokens than a static buffer holds raises: a dropped row would be a
    silently wrong answer."""
    if tokens > capacity_tokens:
        raise UnsupportedMoEError(capacity_message(block, tokens, capacity_tokens, rank, strategy))


def capacity_message(block: str, tokens, capacity_tokens: int, rank: int, strategy: str) -> str:
    return (f"MoE block {block!r}: {tokens} tokens on rank {rank} exceed the {strategy} capacity "
            f"moe_fx.config.max_tokens_per_rank={capacity_tokens}; raise the bound or use lowering='all2allv'")


def sum_over_slots(rows_SH: torch.Tensor, tokens: int, top_k: int) -> torch.Tensor:
    """[T*K, H] rows in (t, k) order -> [T, H]: the gradient of sending each token to its K slots.
    The width is spelled out: ``view(t, k, -1)`` cannot infer it when a rank has 0 tokens."""
    return rows_SH.view(tokens, top_k, rows_SH.shape[-1]).sum(1)
