"""All2AllV on Ascend (vllm-ascend's TokenDispatcherWithAll2AllV):

    npu_moe_token_permute (rows by global expert) -> per-expert counts (histc)
      -> count exchange -> all_to_all_single with host split sizes (rank-major rows)
      -> one spare row -> npu_moe_token_permute by local expert (expert-major, spare row last)
      -> npu_grouped_matmul (group_list_type 1) -> npu_swiglu -> npu_grouped_matmul
      -> npu_moe_token_unpermute (back to rank-major), spare row dropped -> all_to_all_single back
      -> npu_moe_token_unpermute with the router weights -> [T, H]

A rank may receive no rows. vllm-ascend calls the permute/unpermute only when shape[0] > 0
(token_dispatcher.py, TokenDispatcherWithAll2AllV); a traced graph has no branch on data, so the
received rows get one spare row instead: the permute, grouped matmuls, swiglu (whose doc refuses
empty tensors) and unpermute never see an empty tensor, and the spare row is never counted.

NOTE: host sync: the split sizes are read on the host, so this path cannot be captured in a graph
(vllm-ascend's own note); it moves the fewest rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_fx.lowering.base import Strategy
from moe_fx.lowering.base import arange
from moe_fx.lowering.npu.base import NpuDispatched, NpuLocalLowering, npu_ops


@dataclass(frozen=True, kw_only=True)
class ExchangedTokens(NpuDispatched):
    send_index: fx.Proxy  # [T*K] int32 row of each (t, k) entry in the expert-sorted send buffer
    send_counts: fx.Proxy  # [E] rows sent to each (rank, local expert)
    recv_counts: fx.Proxy  # [E] rows received from each (source rank, local expert)
    regroup_index: fx.Proxy  # [R + 1] int32 expert-major row of each received (rank-major) row, spare row last


class NpuAll2AllVLowering(NpuLocalLowering):
    strategy = Strategy.ALL2ALLV

    def dispatch(self, hidden_TH, topk_ids_TK, topk_weights_TK) -> ExchangedTokens:
        p, npu = self.plan, npu_ops()
        e = p.num_local_experts
        sent, send_index = _unpack2(npu.npu_moe_token_permute(hidden_TH, topk_ids_TK.to(torch.int32)))
        send_counts = torch.histc(topk_ids_TK.float(), bins=p.num_experts, min=0, max=p.num_experts - 1).long()
        recv_counts = torch.ops.moe_fx.exchange_counts(send_counts, p.group_name)
        received = torch.ops.moe_fx.all_to_all_rows(sent, send_counts, recv_counts, p.group_name)
        # Received rows are (source rank, local expert)-major; regroup them expert-major.
        local_expert = arange(recv_counts, e).repeat(p.ep_size).repeat_interleave(recv_counts)
        # The spare row (see the module doc) goes to "expert" e, past every local one: sorted last.
        received = torch.nn.functional.pad(received, (0, 0, 0, 1))
        local_expert = torch.nn.functional.pad(local_expert, (0, 1), value=e)
        tokens, regroup_index = _unpack2(npu.npu_moe_token_permute(received, local_expert.to(torch.int32)))
        return ExchangedTokens(
            tokens=tokens, group_list=recv_counts.view(p.ep_size, e).sum(0), group_list_type=1,
            send_index=send_index, send_counts=send_counts, recv_counts=recv_counts, regroup_index=regroup_index,
        )

    def combine(self, out_RH, dispatched, topk_weights_TK) -> fx.Proxy:
        assert isinstance(dispatched, ExchangedTokens)
        p, npu = self.plan, npu_ops()
        rank_major = npu.npu_moe_token_unpermute(out_RH, dispatched.regroup_index)[:-1]  # without the spare row
        returned = torch.ops.moe_fx.all_to_all_rows(
            rank_major, dispatched.recv_counts, dispatched.send_counts, p.group_name
        )
        return npu.npu_moe_token_unpermute(returned, dispatched.send_index, probs=topk_weights_TK)


def _unpack2(outputs: fx.Proxy) -> tuple[fx.Proxy, fx.Proxy]:
    return outputs[0], outputs[1]
