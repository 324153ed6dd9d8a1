"""Plain-PyTorch MoE modules in the other shapes MoE code takes (moe_fx/passes/expert_loop.py,
titan_experts.py, weight_gather.py): static expert loops, torchtitan's grouped experts, gpt-fast's
weight gather. Each takes an optional explicit routing (``route_ids``, ``route_weights``) like
tests/moe_modules.py, and exposes ``num_experts`` and ``expert_parameters()`` (the per-expert
tensors, for the "zero the experts this rank does not own" check).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.moe_modules import _Router

_ACTS = {"silu": F.silu, "gelu": F.gelu}


class ExpertMLP(nn.Module):
    """One expert: w2(act(w1 x) * w3 x) when gated, else w2(act(w1 x)); nn.Linear, optional bias."""

    def __init__(self, hidden: int, intermediate: int, *, gated: bool, bias: bool, act: str):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=bias)
        self.w2 = nn.Linear(intermediate, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, intermediate, bias=bias) if gated else None
        self.act = _ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.w1(x))
        return self.w2(h * self.w3(x) if self.w3 is not None else h)


class LoopMoE(nn.Module):
    """The static ``for e in range(E)`` loop of Mixtral in transformers 4.x, mistral-inference and
    research code.

    experts: "modulelist" (an nn.ModuleList of ExpertMLP) or "params" (3-D w1/w3 [E, I, H], w2 [E, H, I]);
    select: "one_hot" (``where(one_hot(ids, E).permute(2, 1, 0)[e])``) or "eq" (``where(ids == e)``);
    accumulate: "index_add" (``out.index_add_``), "setitem" (``out[t] += ...``) or
    "index_put" (``out.index_put_((t,), ..., accumulate=True)``);
    shared: a shared expert whose output the routed experts are added into.
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *, experts: str = "modulelist",
                 gated: bool = True, bias: bool = False, act: str = "silu", select: str = "one_hot",
                 accumulate: str = "index_add", shared: bool = False, skew: float = 0.0):
        super().__init__()
        self.num_experts, self.select, self.accumulate, self.act = num_experts, select, accumulate, _ACTS[act]
        self.router = _Router(hidden, num_experts, top_k, skew)
        if experts == "modulelist":
            self.experts = nn.ModuleList(
                ExpertMLP(hidden, intermediate, gated=gated, bias=bias, act=act) for _ in range(num_experts)
            )
        else:
            self.experts = None
            self.w1 = nn.Parameter(torch.randn(num_experts, intermediate, hidden) * hidden**-0.5)
            self.w3 = nn.Parameter(torch.randn(num_experts, intermediate, hidden) * hidden**-0.5) if gated else None
            self.w2 = nn.Parameter(torch.randn(num_experts, hidden, intermediate) * intermediate**-0.5)
        self.shared = ExpertMLP(hidden, intermediate, gated=True, bias=False, act="silu") if shared else None

    def expert_parameters(self) -> list[list[torch.Tensor]]:
        """Per expert, its tensors."""
        if self.experts is not None:
            return [list(e.parameters()) for e in self.experts]
        params = [p for p in (self.w1, self.w3, self.w2) if p is not None]
        return [[p[e] for p in params] for e in range(self.num_experts)]

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.experts is not None:
            return self.experts[e](x)
        h = self.act(x @ self.w1[e].T)
        if self.w3 is not None:
            h = h * (x @ self.w3[e].T)
        return h @ self.w2[e].T

    def forward(self, x: torch.Tensor, route_ids=None, route_weights=None) -> torch.Tensor:
        x_TH = x.reshape(-1, x.shape[-1])
        ids_TK, w_TK = self.router(x_TH) if route_ids is None else (route_ids, route_weights)
        w_TK = w_TK.to(x.dtype)
        out = self.shared(x_TH) if self.shared is not None else torch.zeros_like(x_TH)
        if self.select == "one_hot":
            mask_EKT = F.one_hot(ids_TK, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            if self.select == "one_hot":
                slot, tok = torch.where(mask_EKT[e])
            else:
                tok, slot = torch.where(ids_TK == e)
            y = self._expert(e, x_TH[None, tok].reshape(-1, x_TH.shape[-1])) * w_TK[tok, slot, None]
            if self.accumulate == "index_add":
                out.index_add_(0, tok, y.to(x.dtype))
            elif self.accumulate == "setitem":
                out[tok] += y
            else:
                out.index_put_((tok,), y, accumulate=True)
        return out.view_as(x)


class BranchyLoopMoE(LoopMoE):
    """Almost a static loop: it skips experts no token picked, a data-dependent Python branch."""

    def forward(self, x: torch.Tensor, route_ids=None, route_weights=None) -> torch.Tensor:
        ids_TK, w_TK = self.router(x)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            tok, slot = torch.where(ids_TK == e)
            if tok.numel() == 0:
                continue
            out.index_add_(0, tok, self._expert(e, x[tok]) * w_TK[tok, slot, None])
        return out


class PartialLoopMoE(LoopMoE):
    """Almost a static loop: the loop skips the last expert (its tokens would be lost)."""

    def forward(self, x: torch.Tensor, route_ids=None, route_weights=None) -> torch.Tensor:
        ids_TK, w_TK = self.router(x)
        out = torch.zeros_like(x)
        for e in range(self.num_experts - 1):
            tok, slot = torch.where(ids_TK == e)
            out.index_add_(0, tok, self._expert(e, x[tok]) * w_TK[tok, slot, None])
        return out


class TitanMoE(nn.Module):
    """torchtitan's GroupedExperts: stable argsort by expert, histc counts, gather, three
    torch._grouped_mm (w1, w3, w2 [E, out, in]), scatter_add. ``score_before_experts`` scales
    the routed rows instead of the expert outputs. bf16: what torch 2.13 compiles."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *,
                 score_before_experts: bool = False, shared: bool = False, skew: float = 0.0):
        super().__init__()
        self.num_experts, self.top_k, self.score_before_experts = num_experts, top_k, score_before_experts
        self.router = _Router(hidden, num_experts, top_k, skew)
        self.w1 = nn.Parameter(torch.randn(num_experts, intermediate, hidden) * hidden**-0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, intermediate) * intermediate**-0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, intermediate, hidden) * hidden**-0.5)
        self.shared = ExpertMLP(hidden, intermediate, gated=True, bias=False, act="silu") if shared else None

    def expert_parameters(self) -> list[list[torch.Tensor]]:
        return [[self.w1[e], self.w2[e], self.w3[e]] for e in range(self.num_experts)]

    def forward(self, x: torch.Tensor, route_ids=None, route_weights=None) -> torch.Tensor:
        x_TH = x.reshape(-1, x.shape[-1])
        ids_TK, scores_TK = self.router(x_TH) if route_ids is None else (route_ids, route_weights)
        e, dim = self.num_experts, x_TH.shape[-1]
        counts = torch.histc(ids_TK.view(-1).float(), bins=e, min=0, max=e)
        order = torch.argsort(ids_TK.view(-1), stable=True)
        scores_sorted = scores_TK.view(-1)[order]
        token_idx = (order // self.top_k).reshape(-1, 1).expand(-1, dim)
        routed_in = torch.gather(x_TH, dim=0, index=token_idx)
        if self.score_before_experts:
            routed_in = (routed_in.to(torch.float32) * scores_sorted.reshape(-1, 1)).to(x.dtype)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        h = F.silu(torch._grouped_mm(routed_in.bfloat16(), self.w1.bfloat16().transpose(-2, -1), offs=offs))
        h = h * torch._grouped_mm(routed_in.bfloat16(), self.w3.bfloat16().transpose(-2, -1), offs=offs)
        rows = torch._grouped_mm(h, self.w2.bfloat16().transpose(-2, -1), offs=offs).type_as(x)
        if not self.score_before_experts:
            rows = (rows.to(torch.float32) * scores_sorted.reshape(-1, 1)).to(x.dtype)
        out = self.shared(x_TH) if self.shared is not None else torch.zeros_like(x_TH)
        return out.scatter_add(dim=0, index=token_idx, src=rows).view_as(x)


class WeightGatherMoE(nn.Module):
    """gpt-fast's MOEFeedForward: every token gathers its experts' weights, einsums do the rest."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *, skew: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.router = _Router(hidden, num_experts, top_k, skew)
        self.w1 = nn.Parameter(torch.randn(num_experts, intermediate, hidden) * hidden**-0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, intermediate) * intermediate**-0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, intermediate, hidden) * hidden**-0.5)

    def expert_parameters(self) -> list[list[torch.Tensor]]:
        return [[self.w1[e], self.w2[e], self.w3[e]] for e in range(self.num_experts)]

    def forward(self, x: torch.Tensor, route_ids=None, route_weights=None) -> torch.Tensor:
        x_TH = x.reshape(-1, x.shape[-1])
        ids_TK, w_TK = self.router(x_TH) if route_ids is None else (route_ids, route_weights)
        w_TK = w_TK.to(x.dtype)
        x1 = F.silu(torch.einsum("ti,taoi -> tao", x_TH, self.w1[ids_TK]))
        x3 = torch.einsum("ti, taoi -> tao", x_TH, self.w3[ids_TK])
        y = torch.einsum("tao, taio -> tai", x1 * x3, self.w2[ids_TK])
        return torch.einsum("tai,ta -> ti", y, w_TK).view_as(x)


class DenseMoE(nn.Module):
    """Every expert on every token (bmm over [E, T, H]); a [T, E] score matrix, zero outside each
    token's top-k, weights the input (Llama 4: sigmoid of the top logits scattered into -inf) or
    the output (masked dense: softmax weights scattered into zeros; ``batch_view``: Qwen3-VL-MoE's
    4.x spelling, outputs and scores viewed [E, B, S, ...] and summed to [B, S, H]). Weights [E, in, out]."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *,
                 scores_on_input: bool = True, batch_view: bool = False, skew: float = 0.0):
        super().__init__()
        self.num_experts, self.top_k, self.scores_on_input = num_experts, top_k, scores_on_input
        self.batch_view = batch_view
        self.router = _Router(hidden, num_experts, top_k, skew)
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, hidden, 2 * intermediate) * hidden**-0.5)
        self.down_proj = nn.Parameter(torch.randn(num_experts, intermediate, hidden) * intermediate**-0.5)

    def expert_parameters(self) -> list[list[torch.Tensor]]:
        return [[self.gate_up_proj[e], self.down_proj[e]] for e in range(self.num_experts)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TH = x.reshape(-1, x.shape[-1])
        e, dim = self.num_experts, x_TH.shape[-1]
        logits = F.linear(x_TH, self.router.weight)
        if self.scores_on_input:
            top, ids = torch.topk(logits, self.top_k, dim=1)
            scores_TE = torch.sigmoid(torch.full_like(logits, float("-inf")).scatter_(1, ids, top).float()).to(x.dtype)
            rows = x_TH.repeat(e, 1) * scores_TE.transpose(0, 1).reshape(-1, 1)
        else:
            ids, w = self.router(x_TH)
            scores_TE = torch.zeros_like(logits).scatter(1, ids, w.to(logits.dtype))
            rows = x_TH.repeat(e, 1)
        gate, up = torch.bmm(rows.view(e, -1, dim), self.gate_up_proj).chunk(2, dim=-1)
        y_ETH = torch.bmm(up * F.silu(gate), self.down_proj)
        if self.scores_on_input:
            return y_ETH.view(-1, dim).reshape(e, -1, dim).sum(dim=0).view_as(x)
        if self.batch_view:
            batch = 1 if x.dim() == 2 else x.shape[0]
            weighted = y_ETH.reshape(e, batch, -1, dim) * scores_TE.transpose(0, 1).view(e, batch, -1)[..., None]
            return weighted.sum(dim=0).view_as(x)
        return (y_ETH * scores_TE.transpose(0, 1).unsqueeze(-1)).sum(dim=0).view_as(x)


class SplitMoE(nn.Module):
    """JetMoE's way: sort the routed rows by expert, read the per-expert counts on the host,
    ``split``, one linear per expert, ``cat``; 3-D weights [E, out, in], fused gate|up."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *, skew: float = 0.0):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = _Router(hidden, num_experts, top_k, skew)
        self.w_in = nn.Parameter(torch.randn(num_experts, 2 * intermediate, hidden) * hidden**-0.5)
        self.w_out = nn.Parameter(torch.randn(num_experts, hidden, intermediate) * intermediate**-0.5)

    def expert_parameters(self) -> list[list[torch.Tensor]]:
        return [[self.w_in[e], self.w_out[e]] for e in range(self.num_experts)]

    def _per_expert(self, rows: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return torch.cat([F.linear(part, weight[e]) for e, part in enumerate(rows.split(counts, dim=0))], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TH = x.reshape(-1, x.shape[-1])
        ids_TK, w_TK = self.router(x_TH)
        onehot = torch.zeros(x_TH.shape[0], self.num_experts, dtype=w_TK.dtype).scatter(1, ids_TK, 1)
        counts = onehot.long().sum(0).tolist()
        _, perm = ids_TK.flatten().sort(0)
        tok = perm.div(self.top_k, rounding_mode="trunc")
        gate, up = self._per_expert(x_TH[tok], self.w_in, counts).chunk(2, dim=-1)
        y = self._per_expert(F.silu(gate) * up, self.w_out, counts)
        weighted = y * w_TK.to(x.dtype).flatten()[perm][:, None]
        return torch.zeros_like(x_TH).index_add(0, tok, weighted).view_as(x)


class CapacityMoE(nn.Module):
    """A Switch / GShard top-1 gate with capacity (DeepSpeed's einsum dispatch): tokens past an
    expert's capacity are dropped. moe_fx reports it and leaves it as traced."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *, capacity: int = 2):
        super().__init__()
        self.num_experts, self.capacity = num_experts, capacity
        self.router = _Router(hidden, num_experts, top_k)
        self.w1 = nn.Parameter(torch.randn(num_experts, intermediate, hidden) * hidden**-0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, intermediate) * intermediate**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs_TE = F.linear(x, self.router.weight).float().softmax(dim=-1)
        mask_TE = F.one_hot(probs_TE.argmax(dim=-1), self.num_experts)
        position_TE = torch.cumsum(mask_TE, dim=0) - 1
        mask_TE = mask_TE * (position_TE < self.capacity)
        gates_T = (probs_TE * mask_TE).sum(dim=-1)
        slot_T = (position_TE * mask_TE).sum(dim=-1)
        combine_TEC = gates_T[:, None, None] * mask_TE[:, :, None] * F.one_hot(slot_T, self.capacity)[:, None, :]
        x_ECH = torch.einsum("sec,sm->ecm", combine_TEC.bool().to(x.dtype), x)
        h = F.silu(torch.einsum("ecm,eim->eci", x_ECH, self.w1))
        y_ECH = torch.einsum("eci,emi->ecm", h, self.w2)
        return torch.einsum("sec,ecm->sm", combine_TEC.to(x.dtype), y_ECH)
