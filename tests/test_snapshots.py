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
v0 = reshape(topk_ids, -1)
v1 = to(v0, int16)
v2 = sort(v1, stable=True)
v3 = getitem(v2, 0)
v4 = getitem(v2, 1)
v5 = arange(8, device=device(type='cpu'), dtype=int16)
v6 = searchsorted(v3, v5, right=True)
v7 = to(v6, int32)
v8 = floordiv(v4, 2)
v9 = index_select(hidden, 0, v8)
v10 = transpose(gate_up_proj, -2, -1)
v11 = moe_fx.grouped_mm(v9, v10, v7)
v12 = chunk(v11, 2, dim=-1)
v13 = getitem(v12, 0)
v14 = getitem(v12, 1)
v15 = silu(v13)
v16 = mul(v15, v14)
v17 = to(v16, float32)
v18 = transpose(down_proj, -2, -1)
v19 = moe_fx.grouped_mm(v17, v18, v7)
v20 = arange(14, device=device(type='cpu'))
v21 = empty_like(v4)
v22 = index_copy_(v21, 0, v4, v20)
v23 = moe_fx.unsort_weighted_sum(v19, v22, topk_weights, None)"""
        )

    def test_allgather_mixtral_grouped_fp32(self):
        rendering = get_pool(2).run("tests.ep_jobs:render_case", key="mixtral", impl="grouped_mm",
                                    dtype="float32", lowering="allgather")[0]
        self.assertExpectedInline(rendering, """\
v0 = moe_fx.allgather_dispatch(hidden, topk_ids, topk_weights, 0, 4, '0')
v1 = getitem(v0, 0)
v2 = getitem(v0, 2)
v3 = getitem(v0, 3)
v4 = getitem(v0, 4)
v5 = getitem(v0, 5)
v6 = narrow(gate_up_proj, 0, 0, 4)
v7 = transpose(v6, -2, -1)
v8 = moe_fx.grouped_mm(v1, v7, v4)
v9 = chunk(v8, 2, dim=-1)
v10 = getitem(v9, 0)
v11 = getitem(v9, 1)
v12 = silu(v10)
v13 = mul(v12, v11)
v14 = to(v13, float32)
v15 = narrow(down_proj, 0, 0, 4)
v16 = transpose(v15, -2, -1)
v17 = moe_fx.grouped_mm(v14, v16, v4)
v18 = unsqueeze(v2, -1)
v19 = mul(v17, v18)
v20 = moe_fx.allgather_combine(v19, v3, v5, 2, 7, '0', None)""")

    def test_all2allv_gpt_oss_batched_bf16(self):
        rendering = get_pool(2).run("tests.ep_jobs:render_case", key="gpt_oss", impl="batched_mm",
                                    dtype="bfloat16", lowering="all2allv")[0]
        self.assertExpectedInline(rendering, """\
v0 = moe_fx.all2allv_dispatch(hidden, topk_ids, 8, '0')
v1 = getitem(v0, 0)
v2 = getitem(v0, 1)
v3 = getitem(v0, 2)
v4 = getitem(v0, 3)
v5 = getitem(v0, 4)
v6 = getitem(v0, 5)
v7 = getitem(v0, 6)
v8 = narrow(gate_up_proj, 0, 0, 4)
v9 = _grouped_mm(v1, v8, offs=v3)
v10 = long(v2)
v11 = getitem(gate_up_proj_bias, v10)
v12 = add_(v9, v11)
v13 = getitem(v9, (..., ::2))
v14 = getitem(v9, (..., 1::2))
v15 = clamp(v13, min=None, max=7)
v16 = clamp(v14, min=-7, max=7)
v17 = mul(v15, 1.702)
v18 = sigmoid(v17)
v19 = mul(v15, v18)
v20 = add(v16, 1)
v21 = mul(v20, v19)
v22 = narrow(down_proj, 0, 0, 4)
v23 = _grouped_mm(v21, v22, offs=v3)
v24 = getitem(down_proj_bias, v10)
v25 = add_(v23, v24)
v26 = moe_fx.all2allv_combine(v23, v4, v5, v6, v7, '0')
v27 = reshape(topk_weights, -1, 1)
v28 = mul(v26, v27)
v29 = view(v28, 7, 2, 64)
v30 = sum(v29, dim=1)""")

    def test_mc2_qwen3_grouped_fp32(self):
        rendering = get_pool(2).run("tests.ep_jobs:render_case", key="qwen3_moe", impl="grouped_mm",
                                    dtype="float32", lowering="mc2",
                                    config_patch={"max_tokens_per_rank": 16})[0]
        self.assertExpectedInline(rendering, """\
v0 = moe_fx.mc2_dispatch(hidden, topk_ids, 8, 16, '0', 'model.layers.0.mlp.experts')
v1 = getitem(v0, 0)
v2 = getitem(v0, 2)
v3 = getitem(v0, 3)
v4 = getitem(v0, 4)
v5 = narrow(gate_up_proj, 0, 0, 4)
v6 = transpose(v5, -2, -1)
v7 = moe_fx.grouped_mm(v1, v6, v2)
v8 = chunk(v7, 2, dim=-1)
v9 = getitem(v8, 0)
v10 = getitem(v8, 1)
v11 = silu(v9)
v12 = mul(v11, v10)
v13 = to(v12, float32)
v14 = narrow(down_proj, 0, 0, 4)
v15 = transpose(v14, -2, -1)
v16 = moe_fx.grouped_mm(v13, v15, v2)
v17 = moe_fx.mc2_combine(v16, v3, v4, '0')
v18 = reshape(topk_weights, -1, 1)
v19 = mul(v17, v18)
v20 = view(v19, 7, 2, 64)
v21 = sum(v20, dim=1)""")
