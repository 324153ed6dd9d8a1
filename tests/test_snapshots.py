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
v0 = moe_fx.guard(topk_ids, [1074106077, 8, 64, 2, 0, 0, -1, 1, -1], 'model.layers.0.mlp.experts', None, 30000, True, False)
v1 = reshape(v0, -1)
v2 = to(v1, int16)
v3 = sort(v2, stable=True)
v4 = getitem(v3, 0)
v5 = getitem(v3, 1)
v6 = arange(8, device=device(type='cpu'), dtype=int16)
v7 = searchsorted(v4, v6, right=True)
v8 = to(v7, int32)
v9 = floordiv(v5, 2)
v10 = index_select(hidden, 0, v9)
v11 = transpose(gate_up_proj, -2, -1)
v12 = moe_fx.grouped_mm(v10, v11, v8)
v13 = chunk(v12, 2, dim=-1)
v14 = getitem(v13, 0)
v15 = getitem(v13, 1)
v16 = silu(v14)
v17 = mul(v16, v15)
v18 = to(v17, float32)
v19 = transpose(down_proj, -2, -1)
v20 = moe_fx.grouped_mm(v18, v19, v8)
v21 = arange(14, device=device(type='cpu'))
v22 = empty_like(v5)
v23 = index_copy_(v22, 0, v5, v21)
v24 = moe_fx.unsort_weighted_sum(v20, v23, topk_weights, None)"""
        )

    def test_allgather_mixtral_grouped_fp32(self):
        rendering = get_pool(2).run("tests.ep_jobs:render_case", key="mixtral", impl="grouped_mm",
                                    dtype="float32", lowering="allgather")[0]
        self.assertExpectedInline(rendering, """\
v0 = moe_fx.guard(topk_ids, [1074106077, 8, 64, 2, 0, 1, -1, 2, -1], 'model.layers.0.mlp.experts', 'moe_fx(0)', 30000, True, False)
v1 = moe_fx.allgather_dispatch(hidden, v0, topk_weights, 0, 4, 'moe_fx(0)')
v2 = getitem(v1, 0)
v3 = getitem(v1, 2)
v4 = getitem(v1, 3)
v5 = getitem(v1, 4)
v6 = getitem(v1, 5)
v7 = narrow(gate_up_proj, 0, 0, 4)
v8 = transpose(v7, -2, -1)
v9 = moe_fx.grouped_mm(v2, v8, v5)
v10 = chunk(v9, 2, dim=-1)
v11 = getitem(v10, 0)
v12 = getitem(v10, 1)
v13 = silu(v11)
v14 = mul(v13, v12)
v15 = to(v14, float32)
v16 = narrow(down_proj, 0, 0, 4)
v17 = transpose(v16, -2, -1)
v18 = moe_fx.grouped_mm(v15, v17, v5)
v19 = unsqueeze(v3, -1)
v20 = mul(v18, v19)
v21 = moe_fx.allgather_combine(v20, v4, v6, 2, 7, 'moe_fx(0)', None)""")

    def test_all2allv_gpt_oss_batched_bf16(self):
        rendering = get_pool(2).run("tests.ep_jobs:render_case", key="gpt_oss", impl="batched_mm",
                                    dtype="bfloat16", lowering="all2allv")[0]
        self.assertExpectedInline(rendering, """\
v0 = moe_fx.guard(topk_ids, [1074106077, 8, 64, 2, 1, 2, -1, 2, -1], 'model.layers.0.mlp.experts', 'moe_fx(0)', 30000, True, False)
v1 = moe_fx.all2allv_dispatch(hidden, v0, 8, 'moe_fx(0)')
v2 = getitem(v1, 0)
v3 = getitem(v1, 1)
v4 = getitem(v1, 2)
v5 = getitem(v1, 3)
v6 = getitem(v1, 4)
v7 = getitem(v1, 5)
v8 = getitem(v1, 6)
v9 = narrow(gate_up_proj, 0, 0, 4)
v10 = _grouped_mm(v2, v9, offs=v4)
v11 = long(v3)
v12 = getitem(gate_up_proj_bias, v11)
v13 = add_(v10, v12)
v14 = getitem(v10, (..., ::2))
v15 = getitem(v10, (..., 1::2))
v16 = clamp(v14, min=None, max=7)
v17 = clamp(v15, min=-7, max=7)
v18 = mul(v16, 1.702)
v19 = sigmoid(v18)
v20 = mul(v16, v19)
v21 = add(v17, 1)
v22 = mul(v21, v20)
v23 = narrow(down_proj, 0, 0, 4)
v24 = _grouped_mm(v22, v23, offs=v4)
v25 = getitem(down_proj_bias, v11)
v26 = add_(v24, v25)
v27 = moe_fx.all2allv_combine(v24, v5, v6, v7, v8, 'moe_fx(0)')
v28 = reshape(topk_weights, -1, 1)
v29 = mul(v27, v28)
v30 = view(v29, 7, 2, 64)
v31 = sum(v30, dim=1)""")

    def test_mc2_qwen3_grouped_fp32(self):
        rendering = get_pool(2).run("tests.ep_jobs:render_case", key="qwen3_moe", impl="grouped_mm",
                                    dtype="float32", lowering="mc2",
                                    config_patch={"max_tokens_per_rank": 16})[0]
        self.assertExpectedInline(rendering, """\
v0 = moe_fx.guard(topk_ids, [1074106077, 8, 64, 2, 0, 3, 16, 2, 16], 'model.layers.0.mlp.experts', 'moe_fx(0)', 30000, True, False)
v1 = moe_fx.mc2_dispatch(hidden, v0, 8, 16, 'moe_fx(0)', 'model.layers.0.mlp.experts')
v2 = getitem(v1, 0)
v3 = getitem(v1, 2)
v4 = getitem(v1, 3)
v5 = getitem(v1, 4)
v6 = narrow(gate_up_proj, 0, 0, 4)
v7 = transpose(v6, -2, -1)
v8 = moe_fx.grouped_mm(v2, v7, v3)
v9 = chunk(v8, 2, dim=-1)
v10 = getitem(v9, 0)
v11 = getitem(v9, 1)
v12 = silu(v10)
v13 = mul(v12, v11)
v14 = to(v13, float32)
v15 = narrow(down_proj, 0, 0, 4)
v16 = transpose(v15, -2, -1)
v17 = moe_fx.grouped_mm(v14, v16, v3)
v18 = moe_fx.mc2_combine(v17, v4, v5, 'moe_fx(0)')
v19 = reshape(topk_weights, -1, 1)
v20 = mul(v18, v19)
v21 = view(v20, 7, 2, 64)
v22 = sum(v21, dim=1)""")
