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


class ContractError(RuntimeError):
    """A call real torch_npu / CANN would refuse, or that the op's documentation forbids. A
    RuntimeError, as torch_npu's TORCH_CHECK and failed aclnn calls raise; the message is theirs
    where their source shows one (``source`` names it), else the documented rule."""

    def __init__(self, op: str, message: str, source: str):
        super().__init__(f"{op}: {message} [npu_emulator; {source}]")


# The emulated device's SoC family: "A2" (910B) or "A3" (910_93). Real torch_npu reads it from the
# hardware; tests set it to the one they configure moe_fx for (moe_fx.config.npu.soc).
_SOC = "A2"


def set_soc(soc: str) -> None:
    if soc not in ("A2", "A3"):
        raise ValueError(f"npu_emulator.set_soc: {soc!r} is not 'A2' or 'A3'")
    global _SOC
    _SOC = soc


def soc() -> str:
    return _SOC


# Data type names as the two layers print them: torch_npu's host code (c10::toString) and CANN's
# tiling (Ops::Base::ToString of the ge::DataType).
TORCH_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
               torch.int32: "Int", torch.int64: "Long", torch.bool: "Bool"}
CANN_NAMES = {torch.float32: "DT_FLOAT", torch.float64: "DT_DOUBLE", torch.float16: "DT_FLOAT16",
              torch.bfloat16: "DT_BF16", torch.int32: "DT_INT32", torch.int64: "DT_INT64", torch.bool: "DT_BOOL"}


def check_rows(op: str, name: str, t: torch.Tensor, source: str) -> None:
    """The op is not called on an empty tensor (vllm-ascend guards ``shape[0] > 0``)."""
    if t.shape[0] == 0:
        raise ContractError(op, f"{name} has 0 rows {tuple(t.shape)}; the kernel is not called with empty inputs", source)


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...], source: str) -> None:
    if t.dtype not in allowed:
        raise ContractError(op, f"{name} dtype {t.dtype} is not one of {[str(d) for d in allowed]}", source)
