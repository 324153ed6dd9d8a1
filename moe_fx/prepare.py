"""``moe_fx.prepare``: give graph-breaking MoE blocks (transformers 4.x) a forward dynamo captures whole.

    model = moe_fx.prepare(model)                 # in place; before torch.compile
    model = torch.compile(model, backend=moe_fx.backend, fullgraph=True)

transformers 4.x MoE blocks loop over the experts that were hit (``for e in expert_hit`` from
``nonzero()``) or skip empty ones (``if top_x.shape[0] == 0: continue``): dynamo breaks the graph
there, so moe_fx never sees the block whole. ``prepare`` finds such modules by structure and gives
each a forward in the static expert-loop form moe_fx recognizes (moe_fx/passes/expert_loop.py),
computed from the module's own parameters and expert modules:

    for e in range(E):                                          # every expert, unconditionally
        tok, slot = torch.where(ids_TK == e)
        out_TH.index_add_(0, tok, expert_e(x_TH[tok]) * w_TK[tok, slot, None])

Four layouts (``Layout``), recognized by what the module holds and the attribute names
transformers gives it (``moe``, ``shared_expert``, GPT-OSS's parameter names), never a class name:

- ``routed_block``: a router ``nn.Linear`` H -> E (a child, or the one Linear of a child gate
  module, called as the module calls it: HunYuan) and an ``nn.ModuleList`` of E alike experts, the
  routing inline in ``forward`` (Mixtral, Qwen3-MoE, PhiMoE; Qwen2-MoE with its sigmoid-gated
  ``shared_expert``; ERNIE-4.5 and HunYuan with an ungated shared expert added). The routing is
  rebuilt: the first of ``ROUTINGS`` whose outputs equal the module's on the probes is kept.
- ``experts_method``: the router is a child module and the experts loop is a method
  ``moe(hidden, topk_ids, topk_weights)`` (DeepSeek-V2/V3, GLM-4-MoE, dots1): only that method is
  replaced; the router and the shared experts keep their own code.
- ``stacked_experts``: GPT-OSS's experts module (``gate_up_proj`` [E, H, 2I] interleaved,
  ``down_proj`` [E, I, H], their biases, ``alpha``, ``limit``), called with the router's ids and
  its [T, E] scores: only its forward is replaced; the expert function is GPT-OSS's clamped SwiGLU.
- ``glu_experts``: DBRX's experts module (an ``mlp`` child holding ``w1``, ``v1``, ``w2`` as 2-D
  [E * I, H] parameters), called with the router's scores, weights and ids: only its forward is
  replaced; expert e is the GLU on the per-expert slices of the weights.

A module is a candidate only when the code being replaced contains a data-dependent step
(``_BREAKS``); the replacement is swapped in only when it equals the module's own code on probe
inputs (random hidden states, and one routing that sends tokens to every expert) within the
dtype's tolerance. Anything else is left exactly as it was and recorded with the reason.

``moe_fx.shard_experts`` afterwards keeps this rank's experts of a prepared ModuleList (the
others become stubs, moe_fx/shard.py) and refuses prepared stacked experts (the loop indexes all E).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moe_fx.shard import PREPARED_ATTR

log = logging.getLogger(__name__)

# Attribute holding a module's plan (on prepared modules; moe_fx.shard_experts reads it) and the
# model's report (on the root).
PLAN_ATTR = PREPARED_ATTR
REPORT_ATTR = "_moe_fx_prepare_report"

# Source fragments of data-dependent steps dynamo cannot capture in one graph.
# A false positive costs only the probes: a replacement is kept only where it equals the module's code.
_BREAKS = ("nonzero(", ".numel()", ".shape[0] == 0", "== 0:", ".tolist()", ".item()", "expert_hit")

# Relative tolerance of the probe check per dtype (of max(1, max |reference|)): a few roundings.
_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}

# Training-time input noise of transformers 4.x blocks: prepared forwards defer to the module's
# own forward while it applies (random, so no probe can check a rebuilt one).
_INPUT_JITTER = ("jitter_noise", "input_jitter_noise")

_FIX = ("write the experts computation as a static `for e in range(E)` loop without data-dependent "
        "branches (README, form expert_loop), or with transformers >= 5 set experts_implementation=\"grouped_mm\"")


class Layout(enum.Enum):
    ROUTED_BLOCK = "routed_block"
    EXPERTS_METHOD = "experts_method"
    STACKED_EXPERTS = "stacked_experts"
    GLU_EXPERTS = "glu_experts"


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """What a prepared module's new code reads (on the module as ``PLAN_ATTR``; constants to dynamo)."""

    layout: Layout
    num_experts: int
    top_k: int = 0  # routed_block: the router's K
    gate: str = ""  # routed_block: name of the router: an nn.Linear, or a module holding one (called on [B, S, H])
    router_dtype: torch.dtype | None = None  # routed_block: the router's dtype where it differs (fp32 routers)
    experts: str = ""  # routed_block / experts_method: name of the ModuleList
    shared: str = ""  # routed_block: Qwen2-MoE's shared expert, added as sigmoid(shared_gate(x)) * shared(x)
    ungated_shared: str = ""  # routed_block: a shared expert added as it is (ERNIE-4.5, HunYuan)
    correction: str = ""  # routed_block: the child adding a score-correction bias before the top-k (ERNIE-4.5)
    routing: str = ""  # routed_block: key of ROUTINGS
    returns_logits: bool = False  # routed_block: forward returns (out, router_logits)
    sparsemixer: Callable | None = None  # routed_block "sparsemixer": the model file's own function
    original: Callable | None = None  # the replaced function, for training-time jitter


@dataclass(frozen=True, kw_only=True)
class PreparedBlock:
    path: str
    module: str  # class name
    layout: str
    num_experts: int
    routing: str  # routed_block: the routing rule kept; else "the module's own router"
    max_diff: float  # largest |replacement - own forward| over the probes


@dataclass(frozen=True, kw_only=True)
class RefusedBlock:
    path: str
    module: str
    reason: str
    fix: str


@dataclass(kw_only=True)
class PrepareReport:
    prepared: list[PreparedBlock] = field(default_factory=list)
    refused: list[RefusedBlock] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"prepared {b.path} ({b.module}, {b.layout}, E {b.num_experts}, routing: {b.routing}; "
               f"probes agree to {b.max_diff:.2g})" for b in self.prepared]
        out += [f"not prepared {b.path} ({b.module}): {b.reason}; fix: {b.fix}" for b in self.refused]
        return out

    def __str__(self) -> str:
        head = f"moe_fx.prepare: {len(self.prepared)} block(s) prepared, {len(self.refused)} refused"
        return "\n".join([head, *("  " + line for line in self.lines())])


# ------------------------------------------------------------------------------------------
# Routings a routed_block may use: (module, logits_TE float or model dtype, K) -> (w_TK, ids_TK)
# ------------------------------------------------------------------------------------------


def _softmax_topk(module: nn.Module, logits_TE: torch.Tensor, k: int, renorm: bool):
    w_TE = F.softmax(logits_TE, dim=1, dtype=torch.float)
    w_TK, ids_TK = torch.topk(w_TE, k, dim=-1)
    if renorm:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
    return w_TK.to(logits_TE.dtype), ids_TK


def _sparsemixer(module: nn.Module, logits_TE: torch.Tensor, k: int):
    # PhiMoE's own routing function, from the module's file: nothing re-implemented.
    fn = getattr(module, PLAN_ATTR).sparsemixer
    return fn(logits_TE, jitter_eps=module.router_jitter_noise, training=module.training)


def _corrected_softmax_topk(module: nn.Module, logits_TE: torch.Tensor, k: int):
    # ERNIE-4.5: experts chosen on the scores plus the module's correction bias (its own child
    # module adds it), weights from the uncorrected scores, renormalized with a floor.
    w_TE = F.softmax(logits_TE, dim=1, dtype=torch.float)
    _, ids_TK = torch.topk(getattr(module, getattr(module, PLAN_ATTR).correction)(w_TE), k, dim=-1)
    w_TK = torch.gather(w_TE, dim=-1, index=ids_TK)
    w_TK = w_TK / torch.clamp(w_TK.sum(dim=-1, keepdim=True), min=getattr(module, "norm_min", 0.0))
    return w_TK.to(logits_TE.dtype), ids_TK


_SPARSEMIXER = "sparsemixer (the model's own)"
_CORRECTED = "softmax, top-k of the bias-corrected scores, renormalized"
ROUTINGS: dict[str, Callable] = {
    "softmax, top-k, renormalized": lambda m, z, k: _softmax_topk(m, z, k, renorm=True),
    "softmax, top-k": lambda m, z, k: _softmax_topk(m, z, k, renorm=False),
    _SPARSEMIXER: _sparsemixer,
    _CORRECTED: _corrected_softmax_topk,
}


# ------------------------------------------------------------------------------------------
# The replacement code
# ------------------------------------------------------------------------------------------


def _expert_loop(x_TH: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor, expert: Callable, num_experts: int,
                 acc_dtype: torch.dtype) -> torch.Tensor:
    """The static loop moe_fx's expert_loop recognizer matches: every expert runs, empty or not."""
    out_TH = torch.zeros(x_TH.shape, dtype=acc_dtype, device=x_TH.device)
    for e in range(num_experts):
        tok, slot = torch.where(ids_TK == e)
        y = expert(e, x_TH[tok]) * w_TK[tok, slot, None]
        out_TH.index_add_(0, tok, y.to(acc_dtype))
    return out_TH


def _jittering(module: nn.Module) -> bool:
    return module.training and any(getattr(module, name, 0) > 0 for name in _INPUT_JITTER)


def _routed_block_forward(self: nn.Module, hidden_states: torch.Tensor):
    plan: _Plan = getattr(self, PLAN_ATTR)
    if _jittering(self):
        return plan.original(self, hidden_states)
    x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
    gate = getattr(self, plan.gate)
    router_in = x_TH if isinstance(gate, nn.Linear) else hidden_states  # a gate module reshapes itself
    if plan.router_dtype is not None:
        router_in = router_in.to(plan.router_dtype)
    logits_TE = gate(router_in).reshape(-1, plan.num_experts)
    w_TK, ids_TK = ROUTINGS[plan.routing](self, logits_TE, plan.top_k)
    if plan.router_dtype is not None:
        w_TK = w_TK.to(x_TH.dtype)  # as the fp32 routers' blocks cast their weights back
    experts = getattr(self, plan.experts)
    out_TH = _expert_loop(x_TH, ids_TK, w_TK, lambda e, rows: experts[e](rows), plan.num_experts, x_TH.dtype)
    if plan.shared:
        shared_gate = getattr(self, plan.shared + "_gate")
        out_TH = out_TH + F.sigmoid(shared_gate(x_TH)) * getattr(self, plan.shared)(x_TH)
    if plan.ungated_shared:
        out_TH = out_TH + getattr(self, plan.ungated_shared)(x_TH)
    out = out_TH.view(hidden_states.shape)
    return (out, logits_TE) if plan.returns_logits else out


def _experts_method(self: nn.Module, hidden_states: torch.Tensor, topk_indices: torch.Tensor,
                    topk_weights: torch.Tensor) -> torch.Tensor:
    # DeepSeek accumulates in the router weights' dtype and casts back: kept.
    plan: _Plan = getattr(self, PLAN_ATTR)
    experts = getattr(self, plan.experts)
    out_TH = _expert_loop(hidden_states, topk_indices, topk_weights, lambda e, rows: experts[e](rows),
                          plan.num_experts, topk_weights.dtype)
    return out_TH.type(hidden_states.dtype)


def _gpt_oss_expert(module: nn.Module, e: int, rows: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's expert e: interleaved gate|up, clamped SwiGLU with alpha and limit, biased down."""
    gate_up = F.linear(rows, module.gate_up_proj[e].t(), module.gate_up_proj_bias[e])
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=module.limit)
    up = up.clamp(min=-module.limit, max=module.limit)
    glu = gate * torch.sigmoid(gate * module.alpha)
    return F.linear((up + 1) * glu, module.down_proj[e].t(), module.down_proj_bias[e])


def _stacked_experts_forward(self: nn.Module, hidden_states: torch.Tensor, router_indices: torch.Tensor,
                             routing_weights: torch.Tensor) -> torch.Tensor:
    plan: _Plan = getattr(self, PLAN_ATTR)
    h = self.gate_up_proj.shape[1]
    x_TH = hidden_states.reshape(-1, h)
    # The [T, E] scores are zero outside the top-k: the [T, K] weights are their values at the ids.
    w_TK = routing_weights.gather(1, router_indices)
    out_TH = _expert_loop(x_TH, router_indices, w_TK, lambda e, rows: _gpt_oss_expert(self, e, rows),
                          plan.num_experts, x_TH.dtype)
    return out_TH.view(hidden_states.shape[0], -1, h)


def _glu_experts_forward(self: nn.Module, x: torch.Tensor, weights: torch.Tensor, top_weights: torch.Tensor,
                         top_experts: torch.Tensor) -> torch.Tensor:
    """DBRX's experts module: w1, v1, w2 are [E * I, H] parameters of its ``mlp`` child, viewed per
    expert; expert e is its ``mlp``'s GLU on those slices (act(x w1ᵀ) * x v1ᵀ, times w2), spelled
    with F.linear as the expert_loop recognizer reads projections."""
    plan: _Plan = getattr(self, PLAN_ATTR)
    mlp = self.mlp
    shape = (plan.num_experts, mlp.ffn_hidden_size, mlp.hidden_size)
    w1, v1, w2 = mlp.w1.view(shape), mlp.v1.view(shape), mlp.w2.view(shape)

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        return F.linear(mlp.activation_fn(F.linear(rows, w1[e])) * F.linear(rows, v1[e]), w2[e].t())

    x_TH = x.reshape(-1, x.shape[-1])
    out_TH = _expert_loop(x_TH, top_experts, top_weights, expert, plan.num_experts, x_TH.dtype)
    return out_TH.reshape(x.shape)


_REPLACED = {Layout.ROUTED_BLOCK: ("forward", _routed_block_forward),
             Layout.EXPERTS_METHOD: ("moe", _experts_method),
             Layout.STACKED_EXPERTS: ("forward", _stacked_experts_forward),
             Layout.GLU_EXPERTS: ("forward", _glu_experts_forward)}

_PREPARED_CLASSES: dict[tuple[type, Layout], type] = {}


def _prepared_class(cls: type, layout: Layout) -> type:
    """A subclass of ``cls`` with the replaced method: isinstance checks and hooks keep working,
    and ``type(module).forward`` is the code that runs (moe_fx.shard_experts reads it)."""
    key = (cls, layout)
    if key not in _PREPARED_CLASSES:
        name, fn = _REPLACED[layout]
        _PREPARED_CLASSES[key] = type(f"Prepared{cls.__name__}", (cls,), {name: fn, "__module__": __name__})
    return _PREPARED_CLASSES[key]


# ------------------------------------------------------------------------------------------
# Finding candidates
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Candidate:
    layout: Layout
    num_experts: int
    hidden_size: int
    gate: str = ""
    experts: str = ""
    shared: str = ""
    ungated_shared: str = ""
    correction: str = ""


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def _breaks(fn) -> bool:
    source = _source(fn)
    return any(marker in source for marker in _BREAKS)


def _alike_experts(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList child of >= 2 experts of one type and parameter shapes."""
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList) and len(child) >= 2:
            shapes = {(type(m), tuple(tuple(p.shape) for p in m.parameters())) for m in child}
            if len(shapes) == 1 and next(iter(shapes))[1]:
                return name, child
    return None


def _candidate(module: nn.Module) -> _Candidate | None:
    cls = type(module)
    if all(hasattr(module, n) for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias",
                                        "alpha", "limit")) and _breaks(cls.forward):
        w = module.gate_up_proj
        if w.dim() == 3 and module.down_proj.dim() == 3:
            return _Candidate(layout=Layout.STACKED_EXPERTS, num_experts=w.shape[0], hidden_size=w.shape[1])
    glu = _glu_experts(module)
    if glu is not None:
        return glu
    found = _alike_experts(module)
    if found is None:
        return None
    name, experts = found
    if callable(getattr(cls, "moe", None)) and _breaks(cls.moe):
        linear = next((m for m in experts[0].modules() if isinstance(m, nn.Linear)), None)
        if linear is None:
            return None
        return _Candidate(layout=Layout.EXPERTS_METHOD, num_experts=len(experts), hidden_size=linear.in_features,
                          experts=name)
    if not _breaks(cls.forward):
        return None
    gate = _router_name(module, len(experts), name)
    if not gate:
        return _Candidate(layout=Layout.ROUTED_BLOCK, num_experts=len(experts), hidden_size=0, experts=name)
    shared_gate = getattr(module, "shared_expert_gate", None)
    shared = isinstance(shared_gate, nn.Linear) and shared_gate.out_features == 1 and hasattr(module, "shared_expert")
    ungated = next((n for n in _UNGATED_SHARED if isinstance(getattr(module, n, None), nn.Module)), "")
    correction = next((n for n, c in module.named_children()
                       if isinstance(getattr(c, "e_score_correction_bias", None), torch.Tensor)), "")
    return _Candidate(layout=Layout.ROUTED_BLOCK, num_experts=len(experts),
                      hidden_size=_router_linear(module, gate).in_features, gate=gate, experts=name,
                      shared="shared_expert" if shared else "", ungated_shared="" if shared else ungated,
                      correction=correction)


def _glu_experts(module: nn.Module) -> _Candidate | None:
    """DBRX's experts: an ``mlp`` child with 2-D ``w1``, ``v1``, ``w2`` of [E * I, H] (its
    ``moe_num_experts``, ``ffn_hidden_size``, ``hidden_size``), and a forward that breaks."""
    mlp = getattr(module, "mlp", None)
    e, i, h = (getattr(mlp, n, None) for n in ("moe_num_experts", "ffn_hidden_size", "hidden_size"))
    if not all(isinstance(v, int) and v > 0 for v in (e, i, h)):
        return None
    params = [getattr(mlp, n, None) for n in ("w1", "v1", "w2")]
    if not all(isinstance(p, torch.Tensor) and tuple(p.shape) == (e * i, h) for p in params):
        return None
    if not _breaks(type(module).forward):
        return None
    return _Candidate(layout=Layout.GLU_EXPERTS, num_experts=e, hidden_size=h)


# Names transformers 4.x gives a shared expert that is added without a gate.
_UNGATED_SHARED = ("shared_experts", "shared_mlp")


def _router_name(module: nn.Module, num_experts: int, experts: str) -> str:
    """The child that computes the router logits: the one nn.Linear child with E outputs, else the one
    child module (not the experts) whose only E-output Linear is inside it; "" if neither is unique."""
    linears = [n for n, c in module.named_children() if isinstance(c, nn.Linear) and c.out_features == num_experts]
    if linears:
        return linears[0] if len(linears) == 1 else ""
    holders = [n for n, c in module.named_children() if n != experts and not isinstance(c, nn.Linear)
               and [m for m in c.modules() if isinstance(m, nn.Linear) and m.out_features == num_experts]]
    if len(holders) != 1:
        return ""
    inner = [m for m in getattr(module, holders[0]).modules() if isinstance(m, nn.Linear)]
    return holders[0] if len(inner) == 1 else ""


def _router_linear(module: nn.Module, gate: str) -> nn.Linear:
    """The router's nn.Linear: the child ``gate`` itself or the one Linear inside it."""
    child = getattr(module, gate)
    return child if isinstance(child, nn.Linear) else next(m for m in child.modules() if isinstance(m, nn.Linear))


def _top_k(module: nn.Module) -> int | None:
    for name in ("top_k", "num_experts_per_tok"):
        k = getattr(module, name, None)
        if isinstance(k, int):
            return k
    k = getattr(getattr(module, "config", None), "num_experts_per_tok", None)
    return k if isinstance(k, int) else None


# ------------------------------------------------------------------------------------------
# Probes
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Probe:
    name: str
    args: tuple


class _Refused(Exception):
    def __init__(self, reason: str, fix: str = _FIX):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


def _every_expert_ids(t: int, e: int, k: int, device) -> torch.Tensor:
    """[T, K] distinct ids per row covering every expert: row t picks t % E and K-1 others."""
    first = torch.arange(t, device=device) % e
    offsets = 1 + (torch.arange(t, device=device)[:, None] // e + torch.arange(k - 1, device=device)) % (e - 1)
    return torch.cat([first[:, None], (first[:, None] + offsets) % e], dim=1) if k > 1 else first[:, None]


def _probes(module: nn.Module, cand: _Candidate, dtype: torch.dtype, device, gen: torch.Generator) -> list[_Probe]:
    e, h = cand.num_experts, cand.hidden_size
    t = 4 * e
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    if cand.layout is Layout.ROUTED_BLOCK:
        gate = _router_linear(module, cand.gate)
        # Hidden states whose router logits favour expert t % E: least squares through the router.
        target = torch.randn(t, e, generator=gen) + 4.0 * F.one_hot(torch.arange(t) % e, e)
        steer = torch.linalg.lstsq(gate.weight.detach().float().cpu(), target.T).solution.T
        steer = steer / steer.norm(dim=-1, keepdim=True).clamp(min=1e-6) * h**0.5
        return [_Probe("random", (rand(1, t, h),)), _Probe("random, scaled", (3 * rand(2, t // 2, h),)),
                _Probe("every expert", (steer.to(device=device, dtype=dtype)[None],))]
    k = min(2, e)
    probes = []
    for name in ("random", "every expert"):
        ids = (torch.rand(t, e, generator=gen).topk(k, dim=-1)[1] if name == "random"
               else _every_expert_ids(t, e, k, "cpu")).to(device)
        w = torch.rand(t, k, generator=gen).to(device)
        if cand.layout is Layout.EXPERTS_METHOD:
            probes.append(_Probe(name, (rand(t, h), ids, w.float())))
        elif cand.layout is Layout.GLU_EXPERTS:
            scores = torch.zeros(t, e, device=device).scatter(1, ids, w).to(dtype)
            probes.append(_Probe(name, (rand(1, t, h), scores, w.to(dtype), ids)))
        else:
            scores = torch.zeros(t, e, device=device).scatter(1, ids, w.softmax(-1)).to(dtype)
            probes.append(_Probe(name, (rand(1, t, h), ids, scores)))
    return probes


def _max_diff(got, want) -> float:
    """Largest |got - want| relative to max(1, |want|) over the (nested) outputs; inf on a structure mismatch."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return float("inf")
        scale = max(1.0, want.float().abs().max().item()) if want.numel() else 1.0
        return (got.float() - want.float()).abs().max().item() / scale if want.numel() else 0.0
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return float("inf")
        return max((_max_diff(g, w) for g, w in zip(got, want)), default=0.0)
    return 0.0 if got == want else float("inf")


def _references(module: nn.Module, method: str, probes: list[_Probe]) -> list:
    """The module's own ``method`` on every probe."""
    own = getattr(type(module), method)
    wants = []
    for probe in probes:
        try:
            wants.append(own(module, *probe.args))
        except Exception as exc:  # noqa: BLE001  (the module's own code on our probes: refuse, say why)
            raise _Refused(f"its own {method} raised on the probe inputs ({type(exc).__name__}: {exc})") from exc
    return wants


def _plans(module: nn.Module, cand: _Candidate) -> list[_Plan]:
    """The replacements to try, in order."""
    name, _ = _REPLACED[cand.layout]
    base = dict(layout=cand.layout, num_experts=cand.num_experts, experts=cand.experts,
                original=getattr(type(module), name))
    if cand.layout is not Layout.ROUTED_BLOCK:
        return [_Plan(**base)]
    if not cand.gate:
        raise _Refused(f"no router: not exactly one nn.Linear child with {cand.num_experts} outputs, nor one child "
                       "module holding a single such Linear")
    k = _top_k(module)
    if k is None:
        raise _Refused("no top_k / num_experts_per_tok attribute to read the router's K from")
    mixer = getattr(sys.modules.get(type(module).__module__), "sparsemixer", None)
    own_mixer = callable(mixer) and "sparsemixer(" in _source(type(module).forward)
    routings = [r for r in ROUTINGS if (own_mixer or r != _SPARSEMIXER) and (cand.correction or r != _CORRECTED)]
    if getattr(module, "norm_topk_prob", True) is False:
        routings.sort(key=lambda r: r != "softmax, top-k")
    if cand.correction:  # tried first: with a zero bias the plain top-k agrees too, but not once it is trained
        routings.sort(key=lambda r: r != _CORRECTED)
    router = _router_linear(module, cand.gate).weight.dtype
    experts_dtype = next(getattr(module, cand.experts).parameters()).dtype
    return [_Plan(**base, top_k=k, gate=cand.gate, shared=cand.shared, ungated_shared=cand.ungated_shared,
                  correction=cand.correction, routing=r, router_dtype=router if router != experts_dtype else None,
                  sparsemixer=mixer if own_mixer else None) for r in routings]


def _prepare_one(module: nn.Module, cand: _Candidate, gen: torch.Generator) -> tuple[_Plan, float]:
    """Swap the first replacement that agrees with the module's own code on the probes into
    ``module``: (its plan, its largest relative difference); else raise ``_Refused``."""
    params = list(module.parameters())
    if not params or params[0].device.type == "meta":
        raise _Refused("its parameters are on the meta device: nothing to probe", "call prepare after loading weights")
    # the experts' dtype: a router kept in fp32 (ERNIE-4.5, HunYuan) does not set the probes'
    experts = getattr(module, cand.experts, None) if cand.experts else None
    dtype = next(experts.parameters()).dtype if experts is not None else params[0].dtype
    device = params[0].device
    tol = _TOLERANCE.get(dtype, 1e-2)
    name, replacement = _REPLACED[cand.layout]
    plans = _plans(module, cand)
    probes = _probes(module, cand, dtype, device, gen)
    tried = []
    was_training = module.training
    module.train(False)  # probes compare deterministic code (no jitter, no sampling)
    try:
        with torch.no_grad():
            wants = _references(module, name, probes)
            # A routed block returning (out, router_logits) gets the same structure back.
            returns_logits = isinstance(wants[0], tuple) and len(wants[0]) == 2
            for plan in plans:
                plan = dataclasses.replace(plan, returns_logits=returns_logits)
                setattr(module, PLAN_ATTR, plan)
                try:
                    diffs = [(_max_diff(replacement(module, *p.args), want), p.name) for p, want in zip(probes, wants)]
                except Exception as exc:  # noqa: BLE001  (a routing that does not fit this block: try the next)
                    tried.append(f"{plan.routing or 'the loop'}: raised {type(exc).__name__}: {exc}")
                    continue
                worst, where = max(diffs)
                if worst <= tol:
                    module.__class__ = _prepared_class(type(module), cand.layout)
                    return plan, worst
                tried.append(f"{plan.routing + ': ' if plan.routing else ''}max relative |diff| {worst:.3g} "
                             f"on the {where!r} probe")
    finally:
        module.train(was_training)
    if hasattr(module, PLAN_ATTR):
        delattr(module, PLAN_ATTR)
    raise _Refused(f"the static expert loop built from its parameters differs from its own {name} "
                   f"(tolerance {tol:g}; {'; '.join(tried)})")


def find_candidates(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(path, module, layout) of every block ``prepare`` would try, by structure alone (no probes);
    a routed block without a router Linear is left out (prepare refuses it)."""
    return [(path or "<root module>", m, c.layout.value) for path, m in model.named_modules()
            if not hasattr(m, PLAN_ATTR) and (c := _candidate(m)) is not None
            and (c.gate or c.layout is not Layout.ROUTED_BLOCK)]


def prepare(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Give every graph-breaking MoE block of ``model`` a static expert-loop forward (in place).

    A block is changed only if the new code equals its own on probe inputs; every block found is
    in the report (``prepare_report(model)``, logged, and shown by ``moe_fx.explain``). Returns
    ``model``. Call it before ``torch.compile`` and before ``moe_fx.shard_experts``.
    """
    report = PrepareReport()
    gen = torch.Generator().manual_seed(seed)
    for path, module in model.named_modules():
        if hasattr(module, PLAN_ATTR):
            continue  # prepared before
        cand = _candidate(module)
        if cand is None:
            continue
        where = path or "<root module>"
        cls = type(module)
        try:
            plan, diff = _prepare_one(module, cand, gen)
        except _Refused as refused:
            report.refused.append(RefusedBlock(path=where, module=type(module).__name__, reason=refused.reason,
                                               fix=refused.fix))
            log.warning("moe_fx.prepare: %s (%s) left as it is: %s; fix: %s", where, type(module).__name__,
                        refused.reason, refused.fix)
            continue
        report.prepared.append(PreparedBlock(path=where, module=cls.__name__, layout=cand.layout.value,
                                             num_experts=cand.num_experts, max_diff=diff,
                                             routing=plan.routing or "the module's own router"))
    previous = getattr(model, REPORT_ATTR, None)
    if previous is not None:
        report.prepared[:0] = previous.prepared
    setattr(model, REPORT_ATTR, report)
    log.info("%s", report)
    return model


def prepare_report(model: nn.Module) -> PrepareReport | None:
    """The report of ``moe_fx.prepare(model)``, or None if it was not called on ``model``."""
    return getattr(model, REPORT_ATTR, None)
