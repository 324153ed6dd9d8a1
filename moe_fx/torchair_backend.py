"""``inner_backend="torchair"``: hand the rewritten graph to torchair, torch_npu's graph compiler.

    moe_fx.config.inner_backend = "torchair"
    moe_fx.config.npu.compiler_config = torchair.CompilerConfig()   # optional: mode, debug, ...

The rewritten regions hold torch.ops.npu calls (every one with a meta/fake implementation in
torch_npu) and moe_fx's own ops (fake implementations in moe_fx/runtime), so torchair's graph
modes trace them; GE mode additionally needs converters, which torchair ships for the routing,
grouped-matmul, swiglu and MC2 ops but not for npu_moe_token_permute/unpermute (All2AllV).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx

from moe_fx import config
from moe_fx.errors import MoEFxError


def torchair_compile(gm: fx.GraphModule, example_inputs: list) -> Callable:
    try:
        import torch_npu  # noqa: F401  (the npu device, torch.ops.npu, HCCL)
        import torchair
    except ImportError as exc:
        raise MoEFxError(
            "moe_fx.config.inner_backend='torchair' needs torch_npu and torchair (an Ascend machine with CANN: "
            f"pip install torch-npu; torchair ships with it): {exc}. Off Ascend use 'aot_eager' or 'inductor'."
        ) from exc
    compiler_config = config.npu.compiler_config or torchair.CompilerConfig()
    return torchair.get_npu_backend(compiler_config=compiler_config)(gm, example_inputs)
