"""Per-rank jobs for the Ascend lowering, run against the CPU emulator of torch_npu's ops
(moe_fx.testing.npu_emulator, installed in the rank processes by each job)."""

from __future__ import annotations

from moe_fx.testing import npu_emulator
from tests import ep_jobs

# The emulated Ascend target: an A2 (910B) accepts the tiny models' hidden size 64 for MC2.
NPU = {"npu.force": True, "npu.soc": "A2", "max_tokens_per_rank": 16}


def npu_model_case(*, config_patch: dict | None = None, **kw) -> dict:
    npu_emulator.install()
    return ep_jobs.hf_model_case(config_patch={**NPU, **(config_patch or {})}, **kw)


def npu_render_case(*, config_patch: dict | None = None, **kw) -> str:
    npu_emulator.install()
    return ep_jobs.render_case(config_patch={**NPU, **(config_patch or {})}, **kw)


def npu_plain_case(*, config_patch: dict | None = None, **kw) -> dict:
    npu_emulator.install()
    return ep_jobs.plain_case(config_patch={**NPU, **(config_patch or {})}, **kw)
