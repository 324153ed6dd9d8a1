"""One compile of a tiny MoE block with moe_fx + inductor, run as its own process by
tests/test_graph_ops.py: prints the AOTAutograd cache counters as JSON on the last line."""

from __future__ import annotations

import json
import sys

import torch
from torch._dynamo.utils import counters

import moe_fx
from tests.moe_modules import BatchedMoE


def main(strategy: str) -> None:
    torch.manual_seed(0)
    model = BatchedMoE(hidden=16, intermediate=8, num_experts=4, top_k=2)
    x = torch.randn(6, 16)
    with torch.no_grad(), moe_fx.config.patch(inner_backend="inductor", lowering=strategy):
        out = torch.compile(model, backend=moe_fx.backend, fullgraph=True)(x)
        torch.testing.assert_close(out, model(x))
    print(json.dumps({k: v for k, v in counters["aot_autograd"].items()} |
                     {"rewritten": counters["moe_fx"]["regions_rewritten"]}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "auto")
