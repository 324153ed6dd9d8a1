"""Plain-PyTorch MoE modules written for the tests, in the shapes single-device code takes.

``BatchedMoE`` gathers each routed row's expert weights and uses bmm (any dtype);
``GroupedMoE`` sorts rows by expert and uses torch._grouped_mm (bf16, as torch 2.13 compiles it).
Both accept an explicit routing (``route_ids``, ``route_weights``) so tests can force any layout:
every token to one expert, every token to another rank's experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, skew: float = 0.0):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.randn(num_experts, hidden) * hidden**-0.5)
        # skew > 0 favours the first experts (uneven loads, empty experts)
        self.register_buffer("bias", -skew * torch.arange(num_experts, dtype=torch.float32))

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x_TH, self.weight).float() + self.bias
        weights, ids = torch.topk(logits.softmax(dim=-1), self.top_k, dim=-1)
        return ids, weights / weights.sum(dim=-1, keepdim=True)


class BatchedMoE(nn.Module):
    """Router -> per-row weight gather + bmm -> weighted sum over top-k. Optional biases, GELU."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *,
                 gated: bool = True, bias: bool = False, skew: float = 0.0):
        super().__init__()
        self.gated = gated
        self.router = _Router(hidden, num_experts, top_k, skew)
        up = 2 * intermediate if gated else intermediate
        self.w_up = nn.Parameter(torch.randn(num_experts, up, hidden) * hidden**-0.5)
        self.w_down = nn.Parameter(torch.randn(num_experts, hidden, intermediate) * intermediate**-0.5)
        self.b_up = nn.Parameter(torch.randn(num_experts, up) * 0.1) if bias else None
        self.b_down = nn.Parameter(torch.randn(num_experts, hidden) * 0.1) if bias else None

    def forward(self, x: torch.Tensor, route_ids=None, route_weights=None) -> torch.Tensor:
        x_TH = x.reshape(-1, x.shape[-1])
        ids_TK, w_TK = self.router(x_TH) if route_ids is None else (route_ids, route_weights)
        t, k = ids_TK.shape
        ids_S = ids_TK.reshape(-1)
        x_SH = x_TH.repeat_interleave(k, dim=0)
        h = torch.bmm(self.w_up[ids_S], x_SH.unsqueeze(-1)).squeeze(-1)
        if self.b_up is not None:
            h = h + self.b_up[ids_S]
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            a = F.silu(gate) * up
        else:
            a = F.gelu(h)
        y = torch.bmm(self.w_down[ids_S], a.unsqueeze(-1)).squeeze(-1)
        if self.b_down is not None:
            y = y + self.b_down[ids_S]
        out = (y * w_TK.reshape(-1).unsqueeze(-1)).view(t, k, y.shape[-1]).sum(dim=1)
        return out.to(x.dtype).view_as(x)


class GroupedMoE(BatchedMoE):
    """The same experts, computed the transformers grouped_mm way (sort, histc, grouped matmul).

    ``mask_rows_from=c`` zeroes the rows of experts >= c after the down projection, as
    transformers 5.17 did with c = E to guard its own EP's sentinel ids."""

    def __init__(self, *args, mask_rows_from: int | None = None, **kw):
        super().__init__(*args, **kw)
        self.mask_rows_from = mask_rows_from

    def forward(self, x: torch.Tensor, route_ids=None, route_weights=None) -> torch.Tensor:
        x_TH = x.reshape(-1, x.shape[-1])
        ids_TK, w_TK = self.router(x_TH) if route_ids is None else (route_ids, route_weights)
        t, k = ids_TK.shape
        e = self.w_up.shape[0]
        sorted_ids, perm = torch.sort(ids_TK.reshape(-1))
        xs = x_TH[perm // k]
        offs = torch.cumsum(torch.histc(sorted_ids.float(), bins=e, min=0, max=e - 1), dim=0, dtype=torch.int32)
        h = torch._grouped_mm(xs, self.w_up.transpose(-2, -1), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm((F.silu(gate) * up).to(xs.dtype), self.w_down.transpose(-2, -1), offs=offs)
        if self.mask_rows_from is not None:
            y = y.masked_fill((sorted_ids >= self.mask_rows_from).unsqueeze(-1), 0.0)
        weighted = y * w_TK.reshape(-1)[perm].unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.shape[0], device=perm.device)
        return weighted[inv].view(t, k, -1).sum(dim=1).to(x.dtype).view_as(x)
