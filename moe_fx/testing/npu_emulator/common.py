"""Helpers shared by the emulated ops."""

from __future__ import annotations

import torch

NAMESPACE = "npu"
# torch_npu's schemas have kwarg-only tensors, which torch.library.custom_op refuses: the ops are
# defined on a Library fragment instead (kept alive here for the life of the process).
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def define(schema: str, impl, fake) -> None:
    """Define ``torch.ops.npu.<name>`` from a torch_npu schema, with a CPU kernel and a fake."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)


def garbage_like(rows: int, like: torch.Tensor) -> torch.Tensor:
    """Rows whose contents the contract leaves undefined: NaN, so any read of them shows."""
    if like.is_floating_point():
        return like.new_full((rows, *like.shape[1:]), float("nan"))
    return like.new_full((rows, *like.shape[1:]), torch.iinfo(like.dtype).min)


def fill_past(t: torch.Tensor, valid: int) -> torch.Tensor:
    """``t`` with every row from ``valid`` on replaced by garbage."""
    if valid >= t.shape[0]:
        return t
    return torch.cat([t[:valid], garbage_like(t.shape[0] - valid, t)])


def unsupported(op: str, what: str) -> NotImplementedError:
    return NotImplementedError(f"npu_emulator: {op} with {what} is not emulated")
