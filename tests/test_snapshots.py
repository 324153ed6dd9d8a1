"""Snapshots of rewritten regions, in moe_fx's own rendering (stable across torch releases).

Regenerate with ``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_snapshots.py``.
"""

from __future__ import annotations

import expecttest

from tests.dist_pool import get_pool
from tests.ep_jobs import render_case


class RewrittenRegionSnapshots(expecttest.TestCase):
    def test_local_mixtral_grouped_fp32(self):
        self.assertExpectedInline(
            render_case(key="mixtral", impl="grouped_mm", dtype="float32", lowering="auto"), """\
v0 = local.dispatch(hidden, topk_ids, topk_weights)
v1 = getattr(v0, 'tokens')
v2 = getattr(v0, 'offsets')
v3 = getattr(v0, 'row_expert')
v4 = local.local_weights(gate_up_proj)
v5 = expert_matmul(v1, v4, v2, layout='out_in')
v6 = chunk(v5, 2, dim=-1)
v7 = getitem(v6, 0)
v8 = getitem(v6, 1)
v9 = silu(v7)
v10 = mul(v9, v8)
v11 = to(v10, float32)
v12 = local.local_weights(down_proj)
v13 = expert_matmul(v11, v12, v2, layout='out_in')
v14 = local.combine(v13, v0, topk_weights)"""
        )

    def test_allgather_mixtral_grouped_fp32(self):
        rendering = get_pool(2).run("tests.ep_jobs:render_case", key="mixtral", impl="grouped_mm",
                                    dtype="float32", lowering="allgather")[0]
        self.assertExpectedInline(rendering, """\
v0 = allgather.dispatch(hidden, topk_ids, topk_weights)
v1 = getattr(v0, 'tokens')
v2 = getattr(v0, 'offsets')
v3 = getattr(v0, 'row_expert')
v4 = allgather.local_weights(gate_up_proj)
v5 = expert_matmul(v1, v4, v2, layout='out_in')
v6 = chunk(v5, 2, dim=-1)
v7 = getitem(v6, 0)
v8 = getitem(v6, 1)
v9 = silu(v7)
v10 = mul(v9, v8)
v11 = to(v10, float32)
v12 = allgather.local_weights(down_proj)
v13 = expert_matmul(v11, v12, v2, layout='out_in')
v14 = allgather.combine(v13, v0, topk_weights)""")

    def test_all2allv_gpt_oss_batched_bf16(self):
        rendering = get_pool(2).run("tests.ep_jobs:render_case", key="gpt_oss", impl="batched_mm",
                                    dtype="bfloat16", lowering="all2allv")[0]
        self.assertExpectedInline(rendering, """\
v0 = all2allv.dispatch(hidden, topk_ids, topk_weights)
v1 = getattr(v0, 'tokens')
v2 = getattr(v0, 'offsets')
v3 = getattr(v0, 'row_expert')
v4 = all2allv.local_weights(gate_up_proj)
v5 = expert_matmul(v1, v4, v2, layout='in_out')
v6 = getitem(gate_up_proj_bias, v3)
v7 = add_(v5, v6)
v8 = getitem(v5, (..., ::2))
v9 = getitem(v5, (..., 1::2))
v10 = clamp(v8, min=None, max=7)
v11 = clamp(v9, min=-7, max=7)
v12 = mul(v10, 1.702)
v13 = sigmoid(v12)
v14 = mul(v10, v13)
v15 = add(v11, 1)
v16 = mul(v15, v14)
v17 = all2allv.local_weights(down_proj)
v18 = expert_matmul(v16, v17, v2, layout='in_out')
v19 = getitem(down_proj_bias, v3)
v20 = add_(v18, v19)
v21 = all2allv.combine(v18, v0, topk_weights)""")

    def test_mc2_qwen3_grouped_fp32(self):
        rendering = get_pool(2).run("tests.ep_jobs:render_case", key="qwen3_moe", impl="grouped_mm",
                                    dtype="float32", lowering="mc2",
                                    config_patch={"max_tokens_per_rank": 16})[0]
        self.assertExpectedInline(rendering, """\
v0 = mc2.dispatch(hidden, topk_ids, topk_weights)
v1 = getattr(v0, 'tokens')
v2 = getattr(v0, 'offsets')
v3 = getattr(v0, 'row_expert')
v4 = mc2.local_weights(gate_up_proj)
v5 = expert_matmul(v1, v4, v2, layout='out_in')
v6 = chunk(v5, 2, dim=-1)
v7 = getitem(v6, 0)
v8 = getitem(v6, 1)
v9 = silu(v7)
v10 = mul(v9, v8)
v11 = to(v10, float32)
v12 = mc2.local_weights(down_proj)
v13 = expert_matmul(v11, v12, v2, layout='out_in')
v14 = mc2.combine(v13, v0, topk_weights)""")
