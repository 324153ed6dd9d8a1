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


class _GateModule(nn.Module):
    """HunYuan's router: an fp32 Linear inside a module that flattens [B, S, H] and casts to fp32."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.wg = nn.Linear(hidden, num_experts, bias=False, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        return self.wg(x.reshape(-1, h).float())


class GateModuleBlock(nn.Module):
    """HunYuan-MoE-V1 4.x: the router Linear inside a gate module; softmax, top-k, renormalized; a
    loop over the experts hit; an ungated shared MLP added at the end."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = _GateModule(hidden, num_experts)
        self.experts = _experts(hidden, intermediate, num_experts)
        self.shared_mlp = ExpertMLP(hidden, intermediate, gated=True, bias=False, act="silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_mlp(x)
        logits = self.gate(x)
        x_TH = x.view(-1, x.shape[-1])
        w, ids = torch.topk(F.softmax(logits, dim=1, dtype=torch.float), self.top_k, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x_TH)
        hit = (F.one_hot(ids, len(self.experts)).sum(dim=(0, 1)) > 0).nonzero()
        for e in hit.flatten().tolist():
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, self.experts[e](x_TH[tok]) * w[tok, slot, None])
        return out.reshape(x.shape) + shared


class _Correction(nn.Module):
    """ERNIE-4.5's score-correction bias, added by a module of its own."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, num_experts), requires_grad=False)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.e_score_correction_bias.squeeze()


class CorrectedRoutingBlock(nn.Module):
    """ERNIE-4.5-MoE 4.x: an fp32 router on x.float(); experts chosen on the softmax plus a
    correction bias, weights gathered from the uncorrected softmax and renormalized with a floor; a
    loop over the experts hit; an ungated shared expert; returns (out, router_logits). The bias is
    random here (a trained model's), so a top-k without it picks other experts."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k, self.norm_min = top_k, 1e-12
        self.moe_statics = _Correction(num_experts)
        with torch.no_grad():
            self.moe_statics.e_score_correction_bias.normal_(0, 0.5)
        self.gate = nn.Linear(hidden, num_experts, bias=False, dtype=torch.float32)
        self.experts = _experts(hidden, intermediate, num_experts)
        self.shared_experts = ExpertMLP(hidden, intermediate, gated=True, bias=False, act="silu")

    def forward(self, x: torch.Tensor):
        x_TH = x.view(-1, x.shape[-1])
        shared = self.shared_experts(x_TH)
        logits = self.gate(x_TH.float())
        w_TE = F.softmax(logits, dim=1, dtype=torch.float)
        _, ids = torch.topk(self.moe_statics(w_TE), self.top_k, dim=-1)
        w = torch.gather(w_TE, dim=-1, index=ids)
        w = (w / torch.clamp(w.sum(dim=-1, keepdim=True), min=self.norm_min)).to(x.dtype)
        out = torch.zeros_like(x_TH)
        hit = (F.one_hot(ids, len(self.experts)).sum(dim=(0, 1)) > 0).nonzero()
        for e in hit.flatten().tolist():
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, self.experts[e](x_TH[tok]) * w[tok, slot, None])
        return (out + shared).reshape(x.shape), logits


class _GluWeights(nn.Module):
    """DBRX's expert weights: w1, v1, w2 as 2-D [E * I, H] parameters; its GLU on one expert's slices."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int):
        super().__init__()
        self.hidden_size, self.ffn_hidden_size, self.moe_num_experts = hidden, intermediate, num_experts
        self.w1 = nn.Parameter(torch.randn(num_experts * intermediate, hidden) * hidden**-0.5)
        self.v1 = nn.Parameter(torch.randn(num_experts * intermediate, hidden) * hidden**-0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts * intermediate, hidden) * intermediate**-0.5)
        self.activation_fn = nn.SiLU()

    def forward(self, x, w1, v1, w2):
        return (self.activation_fn(x.matmul(w1.t())) * x.matmul(v1.t())).matmul(w2)


class GluLoopExperts(nn.Module):
    """DBRX 4.x experts: the weights viewed per expert and chunked, a loop over range(E) that skips
    empty experts (``if token_idx.shape[0] == 0: continue``)."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int):
        super().__init__()
        self.moe_num_experts = num_experts
        self.mlp = _GluWeights(hidden, intermediate, num_experts)

    def forward(self, x, weights, top_weights, top_experts):
        b, s, h = x.shape
        x = x.view(-1, h)
        out = torch.zeros_like(x)
        mask = F.one_hot(top_experts, num_classes=self.moe_num_experts).permute(2, 1, 0)
        shape = (self.moe_num_experts, self.mlp.ffn_hidden_size, h)
        w1s, v1s, w2s = ([w.squeeze(0) for w in p.view(shape).chunk(self.moe_num_experts, dim=0)]
                         for p in (self.mlp.w1, self.mlp.v1, self.mlp.w2))
        for e in range(self.moe_num_experts):
            slot, tok = torch.where(mask[e])
            if tok.shape[0] == 0:
                continue
            y = self.mlp(x[None, tok].reshape(-1, h), w1s[e], v1s[e], w2s[e]) * top_weights[tok, slot, None]
            out.index_add_(0, tok, y)
        return out.reshape(b, s, h)


class GluLoopBlock(nn.Module):
    """DBRX 4.x FFN: softmax router, top-k, weights normalized, then the experts module."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = GluLoopExperts(hidden, intermediate, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.router(x.reshape(-1, x.shape[-1])).softmax(dim=-1, dtype=torch.float32)
        top_weights, top_experts = torch.topk(weights, self.top_k, dim=-1)
        top_weights = (top_weights / top_weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        return self.experts(x, weights, top_weights, top_experts)
