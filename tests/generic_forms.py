"""MoE blocks that none of moe_fx's recognizers matches, for the generic path (moe_fx/passes/generic.py):
each computes out[t] = sum_k w[t, k] * f(x[t]; theta[ids[t, k]]) in a spelling of its own. Same
interface as tests/handwritten_forms.py: (hidden, intermediate, E, K), ``num_experts``,
``expert_parameters()``, [T, H] -> [T, H]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.form_modules import ExpertMLP
from tests.handwritten_forms import _StackedExperts
from tests.moe_modules import _Router


class _Experts(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, experts: list[nn.Module]):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = _Router(hidden, num_experts, top_k)
        self.experts = nn.ModuleList(experts)

    def expert_parameters(self) -> list[list[torch.Tensor]]:
        return [list(e.parameters()) for e in self.experts]


class NormedExpert(nn.Module):
    """An expert with its own LayerNorm and biases (not a Linear MLP: expert_loop refuses it)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, intermediate)
        self.down = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(self.norm(x))))


class NormedExpertLoop(_Experts):
    """A where/index_add_ loop over experts that normalize their rows."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__(hidden, num_experts, top_k, [NormedExpert(hidden, intermediate) for _ in range(num_experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, w = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None].to(x.dtype))
        return out


class NonzeroSlotLoop(_Experts):
    """Slots chosen by ``nonzero`` over the flat ids, tokens by a ``repeat_interleave``d index."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__(hidden, num_experts, top_k,
                         [ExpertMLP(hidden, intermediate, gated=True, bias=False, act="silu") for _ in range(num_experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, w = self.router(x)
        flat_ids, flat_w = ids.flatten(), w.flatten()
        token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        out = x.new_zeros(x.shape)
        for e, expert in enumerate(self.experts):
            sel = (flat_ids == e).nonzero().squeeze(1)
            tok = token_of[sel]
            out.index_add_(0, tok, expert(x[tok]) * flat_w[sel].unsqueeze(1).to(x.dtype))
        return out


class DenseGateLoop(_Experts):
    """Every expert on every token, weighted by its gate (zero where not chosen): a dense form the
    generic path refuses, since expert parallelism would not divide its work."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__(hidden, num_experts, top_k,
                         [ExpertMLP(hidden, intermediate, gated=True, bias=False, act="silu") for _ in range(num_experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, w = self.router(x)
        out = 0
        for e, expert in enumerate(self.experts):
            gate = (w * (ids == e)).sum(-1, keepdim=True).to(x.dtype)
            out = out + gate * expert(x)
        return out


class CappedLoop(_Experts):
    """A where/index_add_ loop that keeps at most ``capacity`` slots per expert (a capacity no
    recognizer knows): what it drops depends on how many tokens an expert gets, so computing an
    expert on every rank's tokens at once would drop others. The generic path must refuse it."""

    capacity = 12

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__(hidden, num_experts, top_k,
                         [ExpertMLP(hidden, intermediate, gated=True, bias=False, act="silu") for _ in range(num_experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, w = self.router(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            tok, slot = tok[:self.capacity], slot[:self.capacity]
            out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None].to(x.dtype))
        return out


class TopKCapacityGate(_StackedExperts):
    """A DeepSpeed-style top-k gate with a capacity, on [E, C, H] buffers: slots past an expert's
    capacity are dropped by queue position. The ``capacity_gate`` recognizer names it, and the
    generic path must not take its top-k router as a candidate."""

    capacity = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, w = self.router(x)
        mask_TE = F.one_hot(ids, self.num_experts).sum(dim=1)
        position_TE = torch.cumsum(mask_TE, dim=0) - 1
        mask_TE = mask_TE * (position_TE < self.capacity)
        gates_TE = torch.zeros(mask_TE.shape, dtype=w.dtype).scatter(1, ids, w) * mask_TE
        dispatch_TEC = mask_TE[:, :, None] * F.one_hot(position_TE * mask_TE, self.capacity)
        x_ECH = torch.einsum("tec,th->ech", dispatch_TEC.to(x.dtype), x)
        h_ECI = F.silu(torch.einsum("ech,eih->eci", x_ECH, self.w1)) * torch.einsum("ech,eih->eci", x_ECH, self.w3)
        y_ECH = torch.einsum("eci,ehi->ech", h_ECI, self.w2)
        return torch.einsum("tec,ech->th", (gates_TE[:, :, None] * dispatch_TEC).to(x.dtype), y_ECH)
