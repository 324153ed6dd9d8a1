"""A CPU emulator of the torch_npu ops that moe_fx's Ascend lowering emits (a TEST TOOL).

torch_npu cannot be imported without the CANN toolkit, so the NPU lowering is checked against
CPU implementations of the documented op contracts (../shared/reference/ascend_moe_ops.md,
torch_npu's op docs and numpy references). ``install()`` registers them under ``torch.ops.npu``
with the real ops' argument names, each with a fake implementation giving torch_npu's static
upper-bound shapes. Nothing in moe_fx imports this package: a test (or a user, explicitly) calls
``install()``; it refuses to run next to a real torch_npu.

Where the contracts leave values undefined (rows past the group totals, MC2's row order within an
expert, its combine handles), the emulator fills NaN or picks its own encoding, so a lowering that
reads them shows it. Where the contracts forbid a call (dtypes, arguments required or reserved per
SoC, repeated expert ids, a shared communication domain, a too small HCCL buffer, empty inputs),
the emulator raises ``ContractError``, with real torch_npu's / CANN's message where their source
shows one (mc2_rules.py lists the sources).

    from moe_fx.testing import npu_emulator
    npu_emulator.install()                      # torch.ops.npu.npu_moe_init_routing_v2, ...
    npu_emulator.set_soc("A2")                  # the SoC whose rules the ops enforce (A2 by default)
    with moe_fx.config.patch({"npu.force": True, "npu.soc": "A2"}):
        torch.compile(model, backend=moe_fx.backend)(x)   # CPU tensors, torch_npu ops, gloo
"""

from __future__ import annotations

import sys

from moe_fx.testing.npu_emulator.common import ContractError, set_soc, soc

_installed = False


def install() -> None:
    """Register the emulated ops under ``torch.ops.npu`` (idempotent)."""
    global _installed
    if _installed:
        return
    if "torch_npu" in sys.modules:
        raise RuntimeError("moe_fx.testing.npu_emulator: torch_npu is imported; the emulator would shadow its ops")
    from moe_fx.testing.npu_emulator import gmm, mc2, routing

    routing.register()
    gmm.register()
    mc2.register()
    mc2.emulate_hccl_comm_names()
    _installed = True


def installed() -> bool:
    return _installed


__all__ = ["ContractError", "install", "installed", "set_soc", "soc"]
