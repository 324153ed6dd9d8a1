"""MoE blocks as public repositories write them by hand (issue 20's eleven forms), each written
afresh from the op sequence of its original. Every class takes (hidden, intermediate, E, K),
exposes ``num_experts`` and ``expert_parameters()`` (per expert, its tensors: what the "zero the
experts this rank does not own" check zeroes) and maps [T, H] -> [T, H].

Which forms moe_fx rewrites and which it refuses (with the reason explain() gives) is
tests/test_handwritten_forms.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.form_modules import ExpertMLP
from tests.moe_modules import _Router


class _ModuleListExperts(nn.Module):
    """A router and a ModuleList of gated SiLU MLP experts (nn.Linear, no bias)."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = _Router(hidden, num_experts, top_k)
        self.experts = nn.ModuleList(
            ExpertMLP(hidden, intermediate, gated=True, bias=False, act="silu") for _ in range(num_experts))

    def expert_parameters(self) -> list[list[torch.Tensor]]:
        return [list(e.parameters()) for e in self.experts]


class _StackedExperts(nn.Module):
    """A router and stacked expert weights w1, w3 [E, I, H], w2 [E, H, I]."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = _Router(hidden, num_experts, top_k)
        self.w1 = nn.Parameter(torch.randn(num_experts, intermediate, hidden) * hidden**-0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, intermediate) * intermediate**-0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, intermediate, hidden) * hidden**-0.5)

    def expert_parameters(self) -> list[list[torch.Tensor]]:
        return [[self.w1[e], self.w2[e], self.w3[e]] for e in range(self.num_experts)]


# 1. DeepSeek's HF remote code (training path), DeepSeek-MoE, MiniMind.
class MaskedAssignMoE(_ModuleListExperts):
    """Each token repeated K times; expert i writes the rows whose flat id is i; weighted sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids_TK, w_TK = self.router(x)
        flat_ids = ids_TK.view(-1)
        x_rep = x.repeat_interleave(self.top_k, dim=0)
        y = torch.empty_like(x_rep)
        for i, expert in enumerate(self.experts):
            y[flat_ids == i] = expert(x_rep[flat_ids == i]).to(y.dtype)
        return (y.view(*ids_TK.shape, -1) * w_TK.unsqueeze(-1)).sum(dim=1).to(x.dtype)


# 2. DeepSeek's HF remote code, moe_infer (inference path).
class SortedInferMoE(_ModuleListExperts):
    """Rows sorted by expert, counts read on the host, experts without tokens skipped, outputs
    concatenated and scattered back through the sort order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids_TK, w_TK = self.router(x)
        counts = torch.bincount(ids_TK.view(-1), minlength=self.num_experts).cpu().numpy()
        order = ids_TK.view(-1).argsort()
        rows = x[order // self.top_k]
        outputs, start = [], 0
        for i, n in enumerate(counts):
            end = start + n
            if n == 0:
                continue
            outputs.append(self.experts[i](rows[start:end]))
            start = end
        outs = torch.cat(outputs, dim=0)
        back = torch.empty_like(outs)
        back[order] = outs
        return (back.view(*ids_TK.shape, -1).float() * w_TK.unsqueeze(-1)).sum(dim=1).to(x.dtype)


# 3. makeMoE: a noisy top-k router's sparse softmax over all experts, a boolean mask per expert.
class FlatMaskMoE(_ModuleListExperts):
    """gates_TE = softmax(top-k logits scattered into -inf); per expert the tokens that picked it
    (``(ids == i).any(-1)``), ``index_add_`` of the expert output times ``gates_TE[tok, i]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.router.weight)
        top, ids_TK = logits.topk(self.top_k, dim=-1)
        gates_TE = F.softmax(torch.full_like(logits, float("-inf")).scatter(-1, ids_TK, top), dim=-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            flat_mask = (ids_TK == i).any(dim=-1)
            tok = torch.where(flat_mask)[0]
            out.index_add_(0, tok, expert(x[tok]) * gates_TE[tok, i].unsqueeze(1))
        return out


# 4. Megatron-LM's SequentialMLP behind its token permutation by a [T, E] routing map.
class SequentialMLPMoE(_ModuleListExperts):
    """probs_TE / routing_map_TE scattered from top-k; tokens permuted expert-major by
    ``masked_select``; ``split(tokens_per_expert.tolist())``; one MLP per expert; ``cat``;
    outputs times the permuted probabilities, ``scatter_add`` back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids_TK, w_TK = self.router(x)
        t, h = x.shape
        probs_TE = torch.zeros(t, self.num_experts, dtype=w_TK.dtype).scatter(1, ids_TK, w_TK)
        routing_map_TE = torch.zeros(t, self.num_experts, dtype=torch.bool).scatter(1, ids_TK, True)
        tokens_per_expert = routing_map_TE.sum(dim=0)
        map_ET = routing_map_TE.T.contiguous()
        sorted_tok = torch.arange(t).unsqueeze(0).expand(self.num_experts, -1).masked_select(map_ET)
        sorted_probs = probs_TE.T.contiguous().masked_select(map_ET)
        rows = x.index_select(0, sorted_tok)
        parts = torch.split(rows, tokens_per_expert.tolist())
        y = torch.cat([expert(part) for expert, part in zip(self.experts, parts)], dim=0)
        y = y * sorted_probs.unsqueeze(-1).to(y.dtype)
        return torch.zeros_like(x).scatter_add(0, sorted_tok.unsqueeze(1).expand(-1, h), y)


# 5. Dense all-experts einsums, weighted by a scattered [T, E] score matrix.
class DenseEinsumMoE(nn.Module):
    """Every expert on every token: ``th,ehf->etf`` up (gate|up fused, [E, H, 2I]), SwiGLU,
    ``eti,eih->eth`` down, ``eth,te->th`` with the scores, zero outside each token's top-k."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.router = _Router(hidden, num_experts, top_k)
        self.w_up = nn.Parameter(torch.randn(num_experts, hidden, 2 * intermediate) * hidden**-0.5)
        self.w_down = nn.Parameter(torch.randn(num_experts, intermediate, hidden) * intermediate**-0.5)

    def expert_parameters(self) -> list[list[torch.Tensor]]:
        return [[self.w_up[e], self.w_down[e]] for e in range(self.num_experts)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids_TK, w_TK = self.router(x)
        scores_TE = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype).scatter(1, ids_TK, w_TK.to(x.dtype))
        gate, up = torch.einsum("th,ehf->etf", x, self.w_up).chunk(2, dim=-1)
        y_ETH = torch.einsum("eti,eih->eth", F.silu(gate) * up, self.w_down)
        return torch.einsum("eth,te->th", y_ETH, scores_TE)


# 6. OpenAI gpt-oss's reference MLPBlock (torch implementation).
class GptOssReferenceMoE(nn.Module):
    """Weights and biases gathered by expert index, ``beck,bk->bec``, interleaved SwiGLU with
    clamp and limit, ``beck,bek->bec``, ``bec,be->bc`` with the softmax of the top-k logits."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int,
                 *, limit: float = 7.0, alpha: float = 1.702):
        super().__init__()
        self.num_experts, self.top_k, self.limit, self.alpha = num_experts, top_k, limit, alpha
        self.gate = nn.Linear(hidden, num_experts)
        self.mlp1_weight = nn.Parameter(torch.randn(num_experts, 2 * intermediate, hidden) * hidden**-0.5)
        self.mlp1_bias = nn.Parameter(torch.randn(num_experts, 2 * intermediate) * 0.1)
        self.mlp2_weight = nn.Parameter(torch.randn(num_experts, hidden, intermediate) * intermediate**-0.5)
        self.mlp2_bias = nn.Parameter(torch.randn(num_experts, hidden) * 0.1)

    def expert_parameters(self) -> list[list[torch.Tensor]]:
        return [[p[e] for p in (self.mlp1_weight, self.mlp1_bias, self.mlp2_weight, self.mlp2_bias)]
                for e in range(self.num_experts)]

    def _swiglu(self, t: torch.Tensor) -> torch.Tensor:
        glu, lin = t[..., ::2], t[..., 1::2]
        glu = glu.clamp(min=None, max=self.limit)
        lin = lin.clamp(min=-self.limit, max=self.limit)
        return glu * torch.sigmoid(self.alpha * glu) * (lin + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = torch.topk(self.gate(x), k=self.top_k, dim=-1, sorted=True)
        weights, ids = F.softmax(top.values, dim=1), top.indices
        t = torch.einsum("beck,bk->bec", self.mlp1_weight[ids, ...], x) + self.mlp1_bias[ids, ...]
        t = self._swiglu(t)
        t = torch.einsum("beck,bek->bec", self.mlp2_weight[ids, ...], t)
        t += self.mlp2_bias[ids, ...]
        return torch.einsum("bec,be->bc", t, weights)


# 7. The test reference torch_moe of vLLM and of kernel repositories.
class TorchMoERef(_StackedExperts):
    """Tokens repeated K times by ``view(B, -1, D).repeat(1, K, 1)``; per expert ``mask = ids == i``
    and ``if mask.sum():``; ``out[mask] = silu_and_mul(a[mask] @ w13[i].T) @ w2[i].T``."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__(hidden, intermediate, num_experts, top_k)
        self.w13 = nn.Parameter(torch.randn(num_experts, 2 * intermediate, hidden) * hidden**-0.5)
        del self.w1, self.w3

    def expert_parameters(self) -> list[list[torch.Tensor]]:
        return [[self.w13[e], self.w2[e]] for e in range(self.num_experts)]

    def _expert(self, i: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = (rows @ self.w13[i].transpose(0, 1)).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w2[i].transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d = x.shape
        ids_TK, w_TK = self.router(x)
        a = x.view(b, -1, d).repeat(1, self.top_k, 1).reshape(-1, d)
        out = torch.zeros(b * self.top_k, self.w2.shape[1], dtype=x.dtype)
        flat_w, flat_ids = w_TK.view(-1), ids_TK.view(-1)
        for i in range(self.num_experts):
            mask = flat_ids == i
            if mask.sum():
                out[mask] = self._expert(i, a[mask])
        return (out.view(b, -1, self.w2.shape[1]) * flat_w.view(b, -1, 1).to(out.dtype)).sum(dim=1)


class TorchMoERefFixed(TorchMoERef):
    """torch_moe with the fix explain() gives for it: the ``if mask.sum():`` branch removed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d = x.shape
        ids_TK, w_TK = self.router(x)
        a = x.view(b, -1, d).repeat(1, self.top_k, 1).reshape(-1, d)
        out = torch.zeros(b * self.top_k, self.w2.shape[1], dtype=x.dtype)
        flat_w, flat_ids = w_TK.view(-1), ids_TK.view(-1)
        for i in range(self.num_experts):
            mask = flat_ids == i
            out[mask] = self._expert(i, a[mask])
        return (out.view(b, -1, self.w2.shape[1]) * flat_w.view(b, -1, 1).to(out.dtype)).sum(dim=1)


# 8. torchtitan's current moe.py: counts summed from a boolean routing map, rows x[order // K].
class TitanCurrentMoE(_StackedExperts):
    """``zeros_like(scores, bool).scatter_(-1, ids, True).sum(0)`` counts, stable argsort,
    ``x[order // K]``, three grouped matmuls, scores on the outputs, ``scatter_add`` back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.router.weight).float()
        scores_TE = logits.softmax(dim=-1)
        top, ids_TK = torch.topk(scores_TE, self.top_k, dim=-1)
        counts_E = torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(-1, ids_TK, True).sum(dim=0)
        order = torch.argsort(ids_TK.view(-1), stable=True)
        scores_sorted = top.view(-1)[order]
        token_of = order // self.top_k
        rows = x[token_of]
        offs = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        h = F.silu(torch._grouped_mm(rows.bfloat16(), self.w1.bfloat16().transpose(-2, -1), offs=offs))
        h = h * torch._grouped_mm(rows.bfloat16(), self.w3.bfloat16().transpose(-2, -1), offs=offs)
        y = torch._grouped_mm(h, self.w2.bfloat16().transpose(-2, -1), offs=offs).type_as(x)
        y = (y.to(torch.float32) * scores_sorted.reshape(-1, 1)).to(y.dtype)
        index = token_of.reshape(-1, 1).expand(-1, x.shape[-1])
        return torch.zeros_like(x).scatter_add(0, index, y)


# 9. Megatron-LM's legacy GroupedMLP: expert weights are 2-D parameters viewed as [E, ...].
class GroupedMLP2D(nn.Module):
    """weight1 [H, E*2I] viewed as [E, H, 2I], weight2 [E*I, H] viewed as [E, I, H]; rows sorted
    by expert, histc offsets, two grouped matmuls, weights, unsort, sum over top-k."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k, self.hidden = num_experts, top_k, hidden
        self.router = _Router(hidden, num_experts, top_k)
        self.weight1 = nn.Parameter(torch.randn(hidden, num_experts * 2 * intermediate) * hidden**-0.5)
        self.weight2 = nn.Parameter(torch.randn(num_experts * intermediate, hidden) * intermediate**-0.5)

    def expert_parameters(self) -> list[list[torch.Tensor]]:
        w1 = self.weight1.view(self.num_experts, self.hidden, -1)
        w2 = self.weight2.view(self.num_experts, -1, self.hidden)
        return [[w1[e], w2[e]] for e in range(self.num_experts)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids_TK, w_TK = self.router(x)
        t, k = ids_TK.shape
        sorted_ids, perm = torch.sort(ids_TK.reshape(-1))
        rows = x[perm // k]
        offs = torch.cumsum(torch.histc(sorted_ids.float(), bins=self.num_experts, min=0,
                                        max=self.num_experts - 1), dim=0).to(torch.int32)
        w1 = self.weight1.view(self.num_experts, self.hidden, -1)
        w2 = self.weight2.view(self.num_experts, -1, self.hidden)
        gate, up = torch._grouped_mm(rows, w1, offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, w2, offs=offs)
        y = y * w_TK.reshape(-1)[perm].unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        return y[inv].view(t, k, -1).sum(dim=1).to(x.dtype)


# 10. SGLang's torch-native fused MoE: w13 gathered by expert ids, chunked into w1 and w3.
class FusedW13EinsumMoE(nn.Module):
    """``w13[ids]`` chunked in two along the out dim; ``ti,taoi->tao`` with each half, SiLU gate,
    ``tao,taio->tai`` with ``w2[ids]``, ``tai,ta->ti`` with the router weights."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.router = _Router(hidden, num_experts, top_k)
        self.w13_weight = nn.Parameter(torch.randn(num_experts, 2 * intermediate, hidden) * hidden**-0.5)
        self.w2_weight = nn.Parameter(torch.randn(num_experts, hidden, intermediate) * intermediate**-0.5)

    def expert_parameters(self) -> list[list[torch.Tensor]]:
        return [[self.w13_weight[e], self.w2_weight[e]] for e in range(self.num_experts)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids_TK, w_TK = self.router(x)
        w1, w3 = torch.chunk(self.w13_weight[ids_TK], 2, dim=2)
        x1 = F.silu(torch.einsum("ti,taoi -> tao", x, w1))
        x3 = torch.einsum("ti, taoi -> tao", x, w3)
        y = torch.einsum("tao, taio -> tai", x1 * x3, self.w2_weight[ids_TK])
        return torch.einsum("tai,ta -> ti", y, w_TK.to(y.dtype))


# 11. A torchtitan-like block gathering its rows with x[order // K] (histc counts).
class TitanIndexRowsMoE(_StackedExperts):
    """torchtitan's GroupedExperts with ``x[order // K]`` rows and the expanded index built
    separately for ``scatter_add``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids_TK, scores_TK = self.router(x)
        counts = torch.histc(ids_TK.view(-1).float(), bins=self.num_experts, min=0, max=self.num_experts)
        order = torch.argsort(ids_TK.view(-1), stable=True)
        scores_sorted = scores_TK.view(-1)[order]
        rows = x[order // self.top_k]
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        h = F.silu(torch._grouped_mm(rows.bfloat16(), self.w1.bfloat16().transpose(-2, -1), offs=offs))
        h = h * torch._grouped_mm(rows.bfloat16(), self.w3.bfloat16().transpose(-2, -1), offs=offs)
        y = torch._grouped_mm(h, self.w2.bfloat16().transpose(-2, -1), offs=offs).type_as(x)
        y = (y.to(torch.float32) * scores_sorted.reshape(-1, 1)).to(x.dtype)
        index = (order // self.top_k).reshape(-1, 1).expand(-1, x.shape[-1])
        return torch.zeros_like(x).scatter_add(0, index, y)


# Form number (issue 20's list) -> class name.
FORMS = {1: "MaskedAssignMoE", 2: "SortedInferMoE", 3: "FlatMaskMoE", 4: "SequentialMLPMoE", 5: "DenseEinsumMoE",
         6: "GptOssReferenceMoE", 7: "TorchMoERef", 8: "TitanCurrentMoE", 9: "GroupedMLP2D",
         10: "FusedW13EinsumMoE", 11: "TitanIndexRowsMoE"}
