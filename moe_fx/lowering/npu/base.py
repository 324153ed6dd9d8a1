"""The Ascend (torch_npu) lowerings' contract, and ep == 1.

    [router] -> topk_ids [T, K], topk_weights [T, K]            (left as traced)
        |
    dispatch   communication + npu routing op -> NpuDispatched: tokens [R, H] grouped by local
        |      expert, group_list [e] (counts: type 1, cumulative ends: type 0)
    experts    npu_grouped_matmul -> npu_swiglu (plain SwiGLU) or the traced activation replayed
        |      -> npu_grouped_matmul
    combine    npu unpermute / MC2 combine, router weights, sum over top-k -> [T, H]

Like every lowering (moe_fx/lowering/base.py), these emit: the rewritten region holds the
torch.ops.npu calls themselves, so torchair converts them and tests can read them.

Rows past a group_list total are undefined on Ascend (padded, statically shaped outputs); nothing
here reads them except through the op that owns them, and combine zeroes them where an op could.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

import moe_fx.runtime  # noqa: F401  (registers torch.ops.moe_fx)
from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering.base import EPPlan, LocalLowering, Strategy, arange, size


@dataclass(frozen=True, kw_only=True)
class BlockShape:
    """The static sizes of one block that the npu ops take as attributes."""

    top_k: int
    hidden_size: int
    dtype: torch.dtype


@dataclass(frozen=True, kw_only=True)
class NpuDispatched:
    """What an NPU dispatch hands to the experts stage and, as the handle, to combine."""

    tokens: fx.Proxy  # [R, H] rows grouped by local expert (R may be a static upper bound)
    group_list: fx.Proxy  # [e] int64 in the form of group_list_type
    group_list_type: int  # 0: cumulative ends, 1: counts (npu_grouped_matmul's convention)


def npu_ops():
    """torch.ops.npu, with a clear error when neither torch_npu nor the emulator provides it."""
    if not hasattr(torch.ops.npu, "npu_grouped_matmul"):
        raise UnsupportedMoEError(
            "moe_fx: the Ascend lowering needs torch_npu's ops (torch.ops.npu.npu_grouped_matmul is missing): "
            "`import torch_npu` on an Ascend machine, or in tests call moe_fx.testing.npu_emulator.install()"
        )
    return torch.ops.npu



class NpuLocalLowering(LocalLowering):
    """ep == 1 on Ascend: npu_moe_init_routing_v2 over every expert, grouped matmuls, unpermute."""

    strategy = Strategy.LOCAL
    folds_out_dtype = False

    def __init__(self, plan: EPPlan, shape: BlockShape):
        self.plan = self.ep = plan
        self.shape = shape

    def unsupported(self, region) -> str | None:
        reason = None
        if region.shard is not None:
            reason = "weights sharded by moe_fx.shard_experts"
        elif region.side_up or region.up.bias is not None or region.down.bias is not None:
            reason = "separate w1/w3 projections or nn.Linear biases"
        elif region.base is not None or region.last_update is not None:
            reason = "an expert loop accumulating in place"
        elif region.weights_on_input or region.dense_scores:
            reason = "router weights on the experts' input or a dense score matrix"
        return None if reason is None else f"{reason} is not supported by the Ascend (NPU) lowering yet"

    @property
    def render_name(self) -> str:
        return f"npu_{self.strategy.value}"

    def __repr__(self) -> str:
        return f"npu_{super().__repr__()}"

    # -- experts ---------------------------------------------------------------------------------

    def expert_matmul(self, x: fx.Proxy, weight: fx.Proxy, dispatched: NpuDispatched, *, layout: str) -> fx.Proxy:
        """x [R, K] grouped by local expert, weight [e, N, K] ("out_in") or [e, K, N] (this rank's
        block) -> [R, N]."""
        w_KN = weight.transpose(1, 2) if layout == "out_in" else weight
        return npu_ops().npu_grouped_matmul(
            [x], [w_KN], group_list=dispatched.group_list, split_item=2, group_type=0,
            group_list_type=dispatched.group_list_type,
        )[0]

    def swiglu(self, h: fx.Proxy) -> fx.Proxy:
        """silu(h[:, :N/2]) * h[:, N/2:], fused."""
        return npu_ops().npu_swiglu(h, dim=-1)

    def row_expert(self, dispatched: NpuDispatched) -> fx.Proxy:
        """[R] global expert id of each row (for biases replayed as ``bias[row_expert]``); rows past
        the total read the last local expert, a valid index."""
        p = self.plan
        ends = dispatched.group_list if dispatched.group_list_type == 0 else dispatched.group_list.cumsum(0)
        rows = arange(dispatched.tokens, size(dispatched.tokens, 0))
        local = torch.searchsorted(ends, rows, right=True).clamp(max=p.num_local_experts - 1)
        return local + p.expert_start if p.expert_start else local

    # -- dispatch / combine -----------------------------------------------------------------------

    def dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> NpuDispatched:
        return self._route(hidden_TH, topk_ids_TK, topk_weights_TK)

    def combine(self, out_RH, dispatched, topk_weights_TK) -> fx.Proxy:
        assert isinstance(dispatched, RoutedTokens)
        return self._unroute(out_RH, dispatched)

    def _route(self, hidden_NH, topk_ids_NK, topk_weights_NK) -> "RoutedTokens":
        """npu_moe_init_routing_v2 keeping this rank's experts: rows grouped by local expert,
        counts as group_list (type 1), and each (n, k) entry's row (-1: another rank's expert)."""
        p = self.plan
        # active_num stays at its default (no limit): vllm-ascend passes N*K, the same bound, but
        # N is data-dependent after the all-gather and the schema takes a plain int.
        routed = npu_ops().npu_moe_init_routing_v2(
            hidden_NH, topk_ids_NK.to(torch.int32),
            expert_num=p.num_experts, expert_tokens_num_type=1, expert_tokens_num_flag=True,
            active_expert_range=[p.expert_start, p.expert_start + p.num_local_experts], quant_mode=-1,
        )  # (expanded_x, expanded_row_idx, expert_tokens_num, expanded_scale)
        return RoutedTokens(tokens=routed[0], group_list=routed[2], group_list_type=1, row_idx=routed[1],
                            weights=topk_weights_NK)

    def _unroute(self, out_RH, routed: "RoutedTokens") -> fx.Proxy:
        """[N, H]: sum_k weight * out[row of (n, k)], foreign entries contributing 0.

        The unpermute kernel wants indices in range (vllm-ascend passes abs(row_idx) with the
        foreign weights zeroed): -1 becomes row 0, read with weight 0. Rows past the local total are
        undefined and 0 * NaN is NaN, so they are zeroed first (vllm-ascend PR #10579's NaN).
        With ep == 1 every entry has a row and every row is routed: nothing to mask."""
        if self.plan.ep_size == 1:
            return npu_ops().npu_moe_token_unpermute(out_RH, routed.row_idx, probs=routed.weights)
        total = routed.group_list.sum()
        valid = (arange(out_RH, size(out_RH, 0)) < total).unsqueeze(1)
        out_RH = torch.where(valid, out_RH, 0)
        foreign = routed.row_idx < 0
        weights = torch.where(foreign.view_as(routed.weights), 0, routed.weights)
        return npu_ops().npu_moe_token_unpermute(out_RH, routed.row_idx.clamp(min=0), probs=weights)


@dataclass(frozen=True, kw_only=True)
class RoutedTokens(NpuDispatched):
    row_idx: fx.Proxy  # [N*K] int32 destination row of each (n, k) entry, -1 for other ranks' experts
    weights: fx.Proxy  # [N, K] router weights of the routed tokens

