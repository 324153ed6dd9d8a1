"""transformers 5.17's experts code, written out for the tests (the installed transformers is newer).

5.17 guards the ids its own expert parallelism marks as elsewhere (ids >= num_experts), always:

    batched_mm: ids = topk_ids.reshape(-1).clamp(0, num_experts - 1)
    grouped_mm: mask = (sorted_ids >= num_experts).unsqueeze(-1); sorted_ids.clamp_(max=num_experts - 1)
                rows.masked_fill_(mask, 0); gate_up rows and down rows .masked_fill(mask, 0)

moe_fx.shard_experts sets ``num_experts`` to e = E / ep, so in a sharded block every guard reads e
(rows of experts >= e would be zeroed if replayed on global ids). ``Sentinel517MoE`` is a router
plus such an experts module, registered through transformers' ``use_experts_implementation`` with
its own interface, so shard_experts treats it as the transformers module it mimics.
``guard_from=c`` makes the guards compare with c instead of num_experts: a real mask, which the
recognizers must keep or refuse.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ExpertsInterface, use_experts_implementation

from tests.moe_modules import _Router


def _matmul(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # as 5.17: torch's grouped matmul compiles in bf16 only, else transformers' own op
    if w.dtype == torch.bfloat16:
        return torch._grouped_mm(x.to(w.dtype), w, offs=offs)
    return torch.ops.transformers.grouped_mm_fallback(x.to(w.dtype), w, offs=offs)


def _grouped(self, hidden: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    t, k = ids_TK.shape
    guard = self.guard_from or self.num_experts
    ws = w_TK.reshape(-1)
    sorted_ids, perm = torch.sort(ids_TK.reshape(-1))
    rows = hidden[perm // k]
    ws = ws[perm]
    counts = torch.histc(sorted_ids.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    mask = (sorted_ids >= guard).unsqueeze(-1)
    sorted_ids.clamp_(max=guard - 1)
    rows.masked_fill_(mask, 0.0)
    h = _matmul(rows, self.gate_up_proj.transpose(-2, -1), offs)
    if self.gate_up_proj_bias is not None:
        h.add_(self.gate_up_proj_bias[sorted_ids])
    h = h.masked_fill(mask, 0.0)
    gate, up = h.chunk(2, dim=-1)
    y = _matmul(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offs)
    if self.down_proj_bias is not None:
        y.add_(self.down_proj_bias[sorted_ids])
    y = y.masked_fill(mask, 0.0)
    weighted = y * ws.unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.size(0), device=perm.device)
    return weighted[inv].view(t, k, -1).sum(dim=1).to(hidden.dtype)


def _batched(self, hidden: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    t, k = ids_TK.shape
    guard = self.guard_from or self.num_experts
    rows = hidden.repeat_interleave(k, dim=0)
    ws = w_TK.reshape(-1)
    ids = ids_TK.reshape(-1).clamp(0, guard - 1)
    h = torch.bmm(self.gate_up_proj[ids], rows.unsqueeze(-1)).squeeze(-1)
    if self.gate_up_proj_bias is not None:
        h = h + self.gate_up_proj_bias[ids]
    gate, up = h.chunk(2, dim=-1)
    y = torch.bmm(self.down_proj[ids], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
    if self.down_proj_bias is not None:
        y = y + self.down_proj_bias[ids]
    return (y * ws.unsqueeze(-1)).view(t, k, -1).sum(dim=1).to(hidden.dtype)


_INTERFACE = ExpertsInterface()  # a local mapping: transformers' own grouped_mm / batched_mm stay as they are
_INTERFACE["grouped_mm"] = _grouped
_INTERFACE["batched_mm"] = _batched


@use_experts_implementation(experts_interface=_INTERFACE)
class Experts517(nn.Module):
    def __init__(self, config, hidden: int, intermediate: int, *, bias: bool, guard_from: int | None):
        super().__init__()
        self.num_experts, self.guard_from = config.num_experts, guard_from
        e = config.num_experts
        self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * intermediate, hidden) * hidden**-0.5)
        self.down_proj = nn.Parameter(torch.randn(e, hidden, intermediate) * intermediate**-0.5)
        self.gate_up_proj_bias = nn.Parameter(0.1 * torch.randn(e, 2 * intermediate)) if bias else None
        self.down_proj_bias = nn.Parameter(0.1 * torch.randn(e, hidden)) if bias else None

    def forward(self, hidden, ids_TK, w_TK):  # replaced by the interface's function
        raise NotImplementedError


class Sentinel517MoE(nn.Module):
    """Router -> ``Experts517`` (``impl``: "grouped_mm" or "batched_mm")."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *, impl: str,
                 bias: bool = False, guard_from: int | None = None):
        super().__init__()
        config = types.SimpleNamespace(num_experts=num_experts, _experts_implementation=impl)
        self.num_experts = num_experts
        self.router = _Router(hidden, num_experts, top_k)
        self.experts = Experts517(config, hidden, intermediate, bias=bias, guard_from=guard_from)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TH = x.reshape(-1, x.shape[-1])
        ids_TK, w_TK = self.router(x_TH)
        return self.experts(x_TH, ids_TK, w_TK.to(x.dtype)).view_as(x)
