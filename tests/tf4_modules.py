"""Plain-PyTorch MoE blocks written the way transformers 4.x writes them: experts run behind a
data-dependent step (a loop over the ``nonzero()`` experts hit, or an empty-expert ``continue``),
so dynamo breaks the graph there. ``moe_fx.prepare`` input for tests/test_prepare.py; no
transformers needed. All take hidden states [B, S, H] (or [T, H] for ``moe``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.form_modules import ExpertMLP
from tests.moe_modules import _Router


def _experts(hidden: int, intermediate: int, num_experts: int) -> nn.ModuleList:
    return nn.ModuleList(ExpertMLP(hidden, intermediate, gated=True, bias=False, act="silu") for _ in range(num_experts))


class HitLoopBlock(nn.Module):
    """Mixtral / Qwen2-MoE / Qwen3-MoE 4.x: softmax, top-k, optional renormalization inline; a loop
    over the experts hit; returns (out, router_logits)."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *, norm_topk_prob: bool = True,
                 shared: bool = False):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = _experts(hidden, intermediate, num_experts)
        if shared:  # Qwen2-MoE: a shared expert scaled by a sigmoid gate
            self.shared_expert = ExpertMLP(hidden, intermediate, gated=True, bias=False, act="silu")
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor):
        x_TH = x.reshape(-1, x.shape[-1])
        logits = self.gate(x_TH)
        w, ids = torch.topk(F.softmax(logits, dim=1, dtype=torch.float), self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        w = w.to(x.dtype)
        out = torch.zeros_like(x_TH)
        hit = (F.one_hot(ids, len(self.experts)).sum(dim=(0, 1)) > 0).nonzero()
        for e in hit.flatten().tolist():
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, self.experts[e](x_TH[tok]) * w[tok, slot, None])
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x_TH)) * self.shared_expert(x_TH)
        return out.view_as(x), logits


class SigmoidSkipBlock(HitLoopBlock):
    """Sigmoid scores, top-k, no renormalization, and an empty-expert ``continue``: a routing
    prepare does not rebuild, so no replacement agrees with it."""

    def forward(self, x: torch.Tensor):
        x_TH = x.reshape(-1, x.shape[-1])
        w, ids = torch.topk(self.gate(x_TH).sigmoid(), self.top_k, dim=-1)
        out = torch.zeros_like(x_TH)
        for e in range(len(self.experts)):
            tok, slot = torch.where(ids == e)
            if tok.shape[0] == 0:
                continue
            out.index_add_(0, tok, self.experts[e](x_TH[tok]) * w[tok, slot, None])
        return out.view_as(x)


class MethodLoopMoE(nn.Module):
    """DeepSeek-V3 4.x: a router module, a ``moe(hidden, ids, weights)`` method skipping empty
    experts and accumulating in the weights' dtype, a shared expert added afterwards."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.gate = _Router(hidden, num_experts, top_k)
        self.experts = _experts(hidden, intermediate, num_experts)
        self.shared_experts = ExpertMLP(hidden, intermediate, gated=True, bias=False, act="silu")

    def moe(self, x_TH: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x_TH, dtype=w.dtype)
        for e in range(len(self.experts)):
            tok, slot = torch.where(ids == e)
            if tok.numel() > 0:
                out.index_add_(0, tok, self.experts[e](x_TH[tok]) * w[tok, slot].unsqueeze(-1))
        return out.type(x_TH.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TH = x.reshape(-1, x.shape[-1])
        ids, w = self.gate(x_TH)
        return self.moe(x_TH, ids, w).view_as(x) + self.shared_experts(x)


class ScaledMethodMoE(MethodLoopMoE):
    """Like MethodLoopMoE, but its ``moe`` doubles the result: the static loop disagrees."""

    def moe(self, x_TH: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x_TH)
        for e in ids.unique().tolist():
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, 2 * self.experts[e](x_TH[tok]) * w[tok, slot].unsqueeze(-1))
        return out


class StackedLoopExperts(nn.Module):
    """GPT-OSS 4.x experts: [E, H, 2I] interleaved gate|up with biases, clamped SwiGLU, [E, I, H]
    down, [T, E] router scores; a loop over the experts hit."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, hidden, 2 * intermediate) * hidden**-0.5)
        self.gate_up_proj_bias = nn.Parameter(torch.randn(num_experts, 2 * intermediate) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(num_experts, intermediate, hidden) * intermediate**-0.5)
        self.down_proj_bias = nn.Parameter(torch.randn(num_experts, hidden) * 0.1)
        self.alpha, self.limit = 1.702, 7.0

    def forward(self, x: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        x_TH = x.reshape(-1, self.gate_up_proj.shape[1])
        out = torch.zeros_like(x_TH)
        for e in router_indices.unique().tolist():
            tok, _ = torch.where(router_indices == e)
            gate_up = x_TH[tok] @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
            gate, up = gate_up[..., ::2].clamp(max=self.limit), gate_up[..., 1::2].clamp(-self.limit, self.limit)
            y = ((up + 1) * gate * torch.sigmoid(gate * self.alpha)) @ self.down_proj[e] + self.down_proj_bias[e]
            out.index_add_(0, tok, y * routing_weights[tok, e, None])
        return out.view(x.shape[0], -1, x_TH.shape[-1])


class StackedLoopBlock(nn.Module):
    """GPT-OSS 4.x MLP: top-k of biased logits, softmax over the k, scattered into [T, E] scores."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts)
        self.experts = StackedLoopExperts(hidden, intermediate, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x.reshape(-1, x.shape[-1]))
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        scores = torch.zeros_like(logits).scatter_(1, ids, top.softmax(dim=1))
        return self.experts(x, router_indices=ids, routing_weights=scores)
