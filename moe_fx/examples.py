"""A plain-PyTorch MoE model for the demo when transformers is not installed.

Written the way single-device code usually is (router, top-k, per-row expert weights, weighted
sum over top-k); nothing in it knows about moe_fx or expert parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUExperts(nn.Module):
    """E experts with fused gate|up weights [E, 2I, H] and down weights [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * intermediate, hidden) * hidden**-0.5)
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden, intermediate) * intermediate**-0.5)

    def forward(self, x_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        t, k = ids_TK.shape
        x_SH = x_TH.repeat_interleave(k, dim=0)
        ids_S = ids_TK.reshape(-1)
        h = torch.bmm(self.gate_up_proj[ids_S], x_SH.unsqueeze(-1)).squeeze(-1)
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(self.down_proj[ids_S], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        return (y * weights_TK.reshape(-1).unsqueeze(-1)).view(t, k, -1).sum(dim=1)


class MoEBlock(nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = SwiGLUExperts(num_experts, hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TH = x.reshape(-1, x.shape[-1])
        probs = self.gate(x_TH).float().softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(x_TH, ids, weights).to(x.dtype).view_as(x)


class TinyMoEModel(nn.Module):
    """Embedding -> [norm -> MoE block, residual] x layers -> norm -> logits."""

    def __init__(self, vocab: int = 128, hidden: int = 64, intermediate: int = 32,
                 num_experts: int = 8, top_k: int = 2, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(layers))
        self.blocks = nn.ModuleList(MoEBlock(hidden, intermediate, num_experts, top_k) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        return self.head(x)
