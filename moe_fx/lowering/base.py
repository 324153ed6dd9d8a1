"""The contract every lowering implements, and ep == 1.

    [router] -> topk_ids [T, K], topk_weights [T, K]          (left as traced)
        |
    dispatch   hidden [T, H] -> Dispatched: tokens [R, H] grouped by local expert,
        |      offsets [e] (communication + permutation)
    experts    grouped matmul (gate_up) -> activation as traced -> grouped matmul (down)
        |      (``expert_matmul``; the activation is copied from the original graph)
    combine    expert outputs [R, H] -> out [T, H]   (inverse of dispatch, router weights,
                                                      sum over top-k)

Legend: T tokens on this rank, K top-k, S = T*K routed rows, H hidden, E experts, e = E/ep local
experts, R rows this rank's experts process (data-dependent under EP, or a static bound).

A lowering *emits*: the rewrite calls its methods once, at compile time, on ``fx.Proxy`` values,
and what they compute lands in the graph as op calls (``torch.ops.moe_fx.*``, ``torch.ops.npu.*``,
aten and torch functions, tensor methods). Nothing of the lowering object is left in the graph:
the ``Dispatched`` record holds proxies and exists only while the region is emitted. Write the
methods with what a Proxy supports: tensor methods and torch functions, ``x.size(d)`` (not
``x.shape``), ``narrow`` (not slices), and Python ints from the plan.

ep == 1 is the base class (``LocalLowering``): sort, grouped matmul, unsort. The EP strategies
refine dispatch and combine.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

import moe_fx.runtime  # noqa: F401  (registers torch.ops.moe_fx)
from moe_fx.runtime.grouped_mm import native_grouped_mm_ok
from moe_fx.runtime.permute import sort_by_expert


class Strategy(enum.Enum):
    LOCAL = "local"
    ALLGATHER = "allgather"
    ALL2ALLV = "all2allv"
    MC2 = "mc2"
    TOKEN_SWITCH = "mc2|all2allv"  # decided on every call from the largest rank's token count


@dataclass(frozen=True, kw_only=True)
class EPPlan:
    """Where this rank sits in the expert-parallel group, for one MoE block."""

    block: str  # module path of the experts, for messages
    num_experts: int
    ep_size: int = 1
    ep_rank: int = 0
    group_name: str | None = None  # None only when ep_size == 1

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def expert_start(self) -> int:
        return self.ep_rank * self.num_local_experts

    @property
    def local_experts(self) -> range:
        return range(self.expert_start, self.expert_start + self.num_local_experts)


@dataclass(frozen=True, kw_only=True)
class LoweringPlan:
    """Everything a lowering reads, resolved once per block by the pass (moe_fx/passes/plan.py).
    Nothing below the pass reads ``moe_fx.config``."""

    ep: EPPlan
    strategy: Strategy
    top_k: int  # routing slots per token as dispatched (1 when router weights scale the input)
    capacity_tokens: int | None = None  # mc2: buffer size in tokens per rank; switch: its switch point
    transport: str = "all_to_all"  # mc2 off Ascend: "all_to_all" or "symm_mem"
    device_type: str = "cpu"
    cuda_graphs: bool = False  # the inner compiler records CUDA graphs (inductor's cudagraphs)
    training: bool = False  # the graph computes gradients of the experts' inputs or weights
    # token chunks whose exchanges overlap other chunks' experts (the bounded AllGather; 1: none)
    overlap_chunks: int = 1

    @property
    def capacity_rows(self) -> int | None:
        """Routed rows each rank may send per destination (mc2's buffer): C * K."""
        return None if self.capacity_tokens is None else self.capacity_tokens * self.top_k


@dataclass(frozen=True, kw_only=True)
class Dispatched:
    """What dispatch hands to the experts stage and, as the handle, to combine (emit time only)."""

    tokens: fx.Proxy  # [R, H] rows grouped by local expert (expert-major)
    offsets: fx.Proxy  # [e] int32, cumulative end row of each local expert
    expert_ids: fx.Proxy  # [R] global expert id of each row (any integer dtype)


@dataclass(frozen=True, kw_only=True)
class LocalDispatched(Dispatched):
    order: fx.Proxy  # [S] routed row (t*K + k) that each sorted row came from


class LocalLowering:
    """ep == 1: one sort by expert, grouped matmuls, one unsort. No communication."""

    strategy = Strategy.LOCAL
    # combine(..., out_dtype=) returns the model's dtype itself (one pass over [T, H] fewer).
    folds_out_dtype = True

    def __init__(self, plan: LoweringPlan):
        self.plan = plan
        self.ep = plan.ep

    @property
    def render_name(self) -> str:
        return self.strategy.value

    def __repr__(self) -> str:
        p = self.ep
        chunks = f", {self.overlap_chunks} overlapped chunks" if self.overlap_chunks > 1 else ""
        return (f"{self.render_name}(experts {p.expert_start}..{p.expert_start + p.num_local_experts - 1} of "
                f"{p.num_experts}, ep {p.ep_rank}/{p.ep_size}{chunks})")

    @property
    def overlap_chunks(self) -> int:
        """Token chunks the region is emitted in, each chunk's exchanges beside another chunk's
        experts (passes/pipeline.py; the lowering then has split_tokens, start_/finish_dispatch,
        start_/finish_combine and join_tokens). 1: one dispatch and one combine."""
        return 1

    def unsupported(self, region) -> str | None:
        """Why this lowering cannot emit ``region`` (an MoERegion), or None."""
        return None

    # -- experts ---------------------------------------------------------------------------------

    def local_weights(self, weight: fx.Proxy | tuple[fx.Proxy, ...]) -> fx.Proxy:
        """[E, ...] -> this rank's contiguous block [e, ...] (a view). One tensor per expert (a
        ModuleList of nn.Linear): only the local ones are stacked (a copy per call)."""
        p = self.ep
        if isinstance(weight, (list, tuple)):
            return torch.stack(list(weight[p.expert_start : p.expert_start + p.num_local_experts]))
        if p.ep_size == 1:
            return weight
        return weight.narrow(0, p.expert_start, p.num_local_experts)

    def expert_matmul(self, x: fx.Proxy, weight: fx.Proxy, dispatched: Dispatched, *, layout: str) -> fx.Proxy:
        """x [R, K] expert-major, weight [e, N, K] ("out_in", nn.Linear style) or [e, K, N]
        ("in_out"), already this rank's block -> [R, N]."""
        w_KN = weight.transpose(-2, -1) if layout == "out_in" else weight
        w_meta, x_meta = example_value(weight), example_value(x)
        if x_meta is not None and w_meta is not None and x_meta.dtype != w_meta.dtype:
            x = x.to(w_meta.dtype)
        if self._native_grouped_mm(w_meta, layout):
            return torch._grouped_mm(x, w_KN, offs=dispatched.offsets)
        # moe_fx's op picks its kernel per call (moe_fx/runtime/grouped_mm.py): in bf16, a Triton
        # kernel for few rows per expert inside a CUDA graph capture.
        return torch.ops.moe_fx.grouped_mm(x, w_KN, dispatched.offsets)

    def _native_grouped_mm(self, w_meta: torch.Tensor | None, layout: str) -> bool:
        """torch._grouped_mm where it computes this projection; not in CUDA-graph inference graphs,
        whose few rows per expert run faster on moe_fx's Triton kernel (a training graph keeps the
        native op for its backward, which reads no offsets on the host)."""
        if w_meta is None:
            return False
        w_KN = w_meta.transpose(-2, -1) if layout == "out_in" else w_meta
        if not native_grouped_mm_ok(w_KN.new_empty((0, w_KN.shape[-2])), w_KN):
            return False
        return not (self.plan.device_type == "cuda" and self.plan.cuda_graphs and not self.plan.training)

    def swiglu(self, h: fx.Proxy) -> fx.Proxy | None:
        """A fused silu(h[:, :N/2]) * h[:, N/2:], or None: the traced activation is replayed."""
        return None

    def row_expert(self, dispatched: Dispatched) -> fx.Proxy:
        """[R] global expert id (int64) of each row, for biases read as ``bias[row_expert]``."""
        return dispatched.expert_ids.long()

    # -- dispatch / combine -----------------------------------------------------------------------

    def dispatch(self, hidden_TH: fx.Proxy, topk_ids_TK: fx.Proxy, topk_weights_TK: fx.Proxy) -> Dispatched:
        sorted_ids, order = sort_by_expert(topk_ids_TK, self.ep.num_experts)
        # offsets[j] = number of rows routed to experts <= j (static shape, no host sync)
        bounds = arange(sorted_ids, self.ep.num_experts, dtype=example_value(sorted_ids).dtype)
        offsets = torch.searchsorted(sorted_ids, bounds, right=True).to(torch.int32)
        tokens = hidden_TH.index_select(0, order // self.plan.top_k)
        return LocalDispatched(tokens=tokens, offsets=offsets, expert_ids=sorted_ids, order=order)

    def combine(self, out_RH: fx.Proxy, dispatched: Dispatched, topk_weights_TK: fx.Proxy,
                out_dtype: torch.dtype | None = None) -> fx.Proxy:
        """``out_dtype``: the dtype the model casts the result to, folded into the same pass."""
        assert isinstance(dispatched, LocalDispatched)
        # Unsort through the inverse permutation (a scatter of S indices, not of S rows), fused
        # with the weighted sum over top-k (moe_fx/runtime/unsort.py).
        return torch.ops.moe_fx.unsort_weighted_sum(out_RH, inverse_permutation(dispatched.order), topk_weights_TK,
                                                    out_dtype)


def inverse_permutation(order: fx.Proxy) -> fx.Proxy:
    """position[order[i]] = i."""
    positions = arange(order, size(order, 0))
    return torch.empty_like(order).index_copy_(0, order, positions)


def weighted_sum_over_topk(rows_SH: fx.Proxy, topk_weights_TK: fx.Proxy,
                           out_dtype: torch.dtype | None = None) -> fx.Proxy:
    """Rows in (t, k) order -> [T, H]: the same product and sum the traced experts code did, so
    the result keeps its dtype promotion (bf16 outputs times fp32 weights sum in fp32)."""
    weighted_SH = rows_SH * topk_weights_TK.reshape(-1, 1)
    # The width spelled out: a rank with 0 tokens has nothing to infer -1 from.
    out = weighted_SH.view(size(topk_weights_TK, 0), size(topk_weights_TK, 1), size(rows_SH, 1)).sum(dim=1)
    return out if out_dtype is None else out.to(out_dtype)


def pad_rows_to(t: fx.Proxy, total: int | fx.Proxy, value: float = 0) -> fx.Proxy:
    """2-D ``t`` padded with rows of ``value`` to ``total`` rows (``t`` itself when it has them).
    A symbolic row count (dynamic shapes) writes ``t`` over the first rows of a buffer of
    ``value``: F.pad would need a symbolic pad, which its fake kernel refuses, and a padding
    size dynamo would specialize at 1."""
    rows = size(t, 0)
    if isinstance(rows, int) and isinstance(total, int):
        return t if rows == total else F.pad(t, (0, 0, 0, total - rows), value=value)
    return t.new_full((total, size(t, 1)), value).slice_scatter(t, 0, 0, rows)


def arange(like: fx.Proxy, n: int | fx.Proxy, dtype: torch.dtype | None = None) -> fx.Proxy:
    """torch.arange(n) on ``like``'s device, emitted into the graph (a call with no Proxy argument
    would run now and put a constant in the graph)."""
    kwargs = {"device": _device(like), **({"dtype": dtype} if dtype is not None else {})}
    return like.tracer.create_proxy("call_function", torch.arange, (n,), kwargs)


def size(proxy: fx.Proxy, dim: int) -> int | fx.Proxy:
    """``proxy.size(dim)``: a Python int when the example value's size is static, so the graph
    holds the constant rather than a size call."""
    meta = example_value(proxy)
    static = meta.shape[dim] if meta is not None else None
    return static if isinstance(static, int) else proxy.size(dim)


def example_value(proxy: fx.Proxy) -> torch.Tensor | None:
    """The example value of a proxy's node (set on the graph's own nodes, and on emitted ones by
    the rewrite's propagation), or None."""
    value = proxy.node.meta.get("example_value") if isinstance(proxy, fx.Proxy) else None
    return value if isinstance(value, torch.Tensor) else None


def _device(proxy: fx.Proxy) -> torch.device:
    meta = example_value(proxy)
    if meta is None:
        raise AssertionError(f"moe_fx: no example value on {proxy.node.format_node()}")
    return meta.device
