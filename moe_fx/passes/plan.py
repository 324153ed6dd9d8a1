"""Deciding one block's lowering: config and the block's facts -> a ``LoweringPlan`` -> a lowering.

This is the only place below the backend that reads ``moe_fx.config`` for a block: the plan holds
every decision (strategy, capacity, transport, groups, device family, CUDA graphs, training), and
the lowering reads nothing else.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._dynamo.utils import counters

from moe_fx import config
from moe_fx.errors import CollectiveTimeoutError, UnsupportedMoEError
from moe_fx.lowering import LOWERINGS, BlockFacts, EPPlan, LocalLowering, LoweringChoice, LoweringPlan, Strategy
from moe_fx.lowering.guard import GuardPlan
from moe_fx.lowering.npu import BlockShape, is_npu_target, make_npu_lowering, npu_soc
from moe_fx.lowering.token_layout import ReplicatedTokens, TokenGroup
from moe_fx.passes.graph_utils import fake
from moe_fx.passes.region import MoERegion
from moe_fx.runtime import symm_mem
from moe_fx.runtime.comm import current_ep_group, resolve_group, timed_sibling

log = logging.getLogger(__name__)

MC2_TRANSPORTS = ("all_to_all", "symm_mem")


def ep_plan(region: MoERegion) -> EPPlan:
    """This rank's place for ``region`` in the configured EP group (ep == 1 without one)."""
    group = current_ep_group()
    if group is None or group.size() == 1:
        return EPPlan(block=region.block, num_experts=region.num_experts)
    ep, num_experts = group.size(), region.num_experts
    if num_experts % ep:
        raise UnsupportedMoEError(
            f"MoE block {region.block!r}: {num_experts} experts cannot be split evenly over an "
            f"expert-parallel group of {ep} ranks ({num_experts} % {ep} = {num_experts % ep}). "
            f"Use a group whose size divides {num_experts} (moe_fx.config.ep_group)."
        )
    return EPPlan(block=region.block, num_experts=num_experts, ep_size=ep, ep_rank=group.rank(),
                  group_name=group.group_name)


def block_facts(region: MoERegion, plan: EPPlan) -> BlockFacts:
    """The rank-invariant facts the lowering choice reads for ``region``."""
    device_type = _device_type(region)
    bound, source = _token_bound(region, plan)
    return BlockFacts(
        block=region.block,
        ep_size=plan.ep_size,
        num_experts=region.num_experts,
        top_k=region.top_k,
        hidden_size=region.hidden_size,
        dtype=region.dtype,
        device_type=device_type,
        soc=npu_soc() if device_type == "npu" else None,
        token_bound=bound,
        token_bound_source=source,
    )


def lowering_plan(region: MoERegion, ep: EPPlan, choice: LoweringChoice) -> LoweringPlan:
    """Every decision for ``region``, from the choice and config, checked against the block."""
    rows_per_token = 1 if region.weights_on_input else region.top_k  # input-side weights: K tokens per token
    capacity = choice.capacity_tokens
    if choice.strategy is Strategy.MC2:
        if capacity is None or capacity < 1:
            raise UnsupportedMoEError(
                f"MoE block {region.block!r}: lowering='mc2' sizes its buffers from a token bound, and "
                f"moe_fx.config.max_tokens_per_rank is {config.max_tokens_per_rank!r}. Set it to the largest "
                "number of tokens any rank feeds this block (the same value on every rank)."
            )
    if capacity is not None and region.weights_on_input:
        capacity *= region.top_k  # each (token, slot) row is dispatched as a token of its own
    device_type, cuda_graphs, training = _device_type(region), records_cuda_graphs(), _training(region)
    ep = exchange_group(ep, region, choice.strategy, capacity, device_type)
    return LoweringPlan(
        ep=ep, strategy=choice.strategy, top_k=rows_per_token, capacity_tokens=capacity,
        transport=_mc2_transport(region, ep, choice.strategy, device_type, cuda_graphs), device_type=device_type,
        cuda_graphs=cuda_graphs, training=training,
        overlap_chunks=_overlap_chunks(ep, choice.strategy, capacity, device_type, training),
    )


def guard_plan(region: MoERegion, plan: LoweringPlan, choice: LoweringChoice) -> GuardPlan:
    """The agreement check of ``region`` (moe_fx/runtime/guard.py): its fingerprint, the token
    limit it enforces on every rank at once, its group and timeout, and how often it reads the host."""
    strategy, capacity = plan.strategy, choice.capacity_tokens
    static = strategy is Strategy.MC2 or (strategy is Strategy.ALLGATHER and capacity is not None)
    per_rank = plan.ep.ep_size > 1 and token_layout() == "per_rank"
    # the Ascend AllGather reads the token counts on the host even with a bound (moe_fx::gather_tokens)
    syncs_anyway = plan.device_type == "cpu" or strategy in (Strategy.ALL2ALLV, Strategy.TOKEN_SWITCH) or (
        strategy is Strategy.ALLGATHER and (capacity is None or plan.device_type == "npu"))
    every_call = {"every_call": True, "first_call": False, "auto": syncs_anyway}[config.rank_check]
    return GuardPlan(
        block=region.block, num_experts=region.num_experts, hidden_size=region.hidden_size, top_k=region.top_k,
        dtype=region.dtype, strategy=strategy.value, capacity=capacity,
        limit=capacity if static and per_rank else None, ep_size=plan.ep.ep_size,
        group_name=plan.ep.group_name if plan.ep.ep_size > 1 else None,
        timeout_ms=max(1, round(config.collective_timeout_s * 1000)), every_call=every_call,
        # torchair compiles the Ascend graph: the check stays inside the op there
        check_in_graph=plan.device_type != "npu",
    )


def make_lowering(region: MoERegion, plan: LoweringPlan) -> LocalLowering:
    if plan.device_type == "npu":
        shape = BlockShape(top_k=region.top_k, hidden_size=region.hidden_size, dtype=region.dtype)
        return make_npu_lowering(plan.strategy, plan.ep, shape, fake(region.hidden).device)
    lowering = LOWERINGS[plan.strategy](plan)
    if plan.ep.ep_size > 1 and token_layout() == "replicated":
        return ReplicatedTokens(lowering, token_group(plan.ep))
    return lowering


def exchange_group(ep: EPPlan, region: MoERegion, strategy: Strategy, capacity: int | None,
                    device_type: str) -> EPPlan:
    """The group the strategy's collectives run on: a communicator of moe_fx's own over the EP
    ranks that fails after ``config.collective_timeout_s`` (moe_fx/runtime/comm.timed_sibling), so a
    peer that raised inside a block (after the guard) stops this rank within the timeout rather
    than the EP group's (30 min for gloo by default). On CUDA only for static exchanges of at
    least ``config.ep_nccl_bulk_bytes`` per rank, whose communicator also starts with
    ``config.ep_nccl_protocol``: a communicator costs GPU memory, and the others stay on the EP
    group (and its timeout). On 2 H200s NCCL picked LL for the bounded AllGather's 16 MB exchanges
    (Simple: Qwen3-30B-A3B's layer at 4096 tokens per rank 1.57x ep1 rather than 1.73x), while LL
    served the decode-sized ones better under CUDA graphs (GPT-OSS-20B at 128 tokens: 424 µs
    rather than 457); README, "Multi-GPU benchmark"."""
    if ep.ep_size == 1 or device_type == "npu":
        return ep
    if device_type == "cuda":
        if capacity is None or config.ep_nccl_protocol is None:
            return ep
        rows = capacity * (region.top_k if strategy is Strategy.MC2 else 1)  # MC2 sends C*K-row buffers
        if rows * region.hidden_size * region.dtype.itemsize < config.ep_nccl_bulk_bytes:
            return ep
        protocol = config.ep_nccl_protocol
    else:
        protocol = None
    parent = resolve_group(ep.group_name)
    try:
        group = timed_sibling(parent, config.collective_timeout_s, protocol)
    except dist.DistStoreError as exc:  # c10d's store barrier timed out: a peer never came to the set-up
        raise CollectiveTimeoutError(
            f"MoE block {region.block!r}: not every rank of EP group {ep.group_name!r} (global ranks "
            f"{dist.get_process_group_ranks(parent)}) came to set up moe_fx's exchange group within "
            f"collective_timeout_s={config.collective_timeout_s:g} s. A peer that left this block as traced "
            f"(its near-misses say why) or compiled another graph never comes; end the job on every rank. "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return dataclasses.replace(ep, group_name=group.group_name)


def _overlap_chunks(ep: EPPlan, strategy: Strategy, capacity: int | None, device_type: str,
                    training: bool) -> int:
    """How many token chunks the block's exchanges are cut into, to run beside the experts of other
    chunks (config.ep_overlap_chunks). Only the bounded AllGather of an inference graph over
    per-rank tokens chunks: its exchanges are static-shape collectives the graph can order freely.
    At most one chunk per token of the bound."""
    if (strategy is not Strategy.ALLGATHER or capacity is None or ep.ep_size == 1 or training
            or device_type == "npu" or token_layout() != "per_rank"):
        return 1
    return min(config.ep_overlap_chunks, capacity)


def token_layout() -> str:
    if config.tokens not in ("per_rank", "replicated"):
        raise ValueError(f"moe_fx.config.tokens={config.tokens!r} is not one of ['per_rank', 'replicated']")
    if config.tp_group is not None and config.tokens != "replicated":
        raise ValueError(f"moe_fx.config.tp_group={config.tp_group!r} names the ranks that hold the same tokens; "
                         "it needs moe_fx.config.tokens='replicated'")
    return config.tokens


def token_group(plan: EPPlan) -> TokenGroup:
    """``config.tp_group`` when set, else the EP group of ``plan``."""
    if config.tp_group is None:
        return TokenGroup(size=plan.ep_size, rank=plan.ep_rank, group_name=plan.group_name)
    group = resolve_group(config.tp_group)
    return TokenGroup(size=group.size(), rank=group.rank(), group_name=group.group_name)


def _device_type(region: MoERegion) -> str:
    device = fake(region.hidden).device
    return "npu" if is_npu_target(device) else device.type


def _token_bound(region: MoERegion, plan: EPPlan) -> tuple[int | None, str]:
    """Most tokens any rank feeds the block's dispatch, if known on every rank alike: the configured
    bound, or ceil(T/tp) for replicated tokens with a static T (every rank holds the same T)."""
    bound, source = config.max_tokens_per_rank, "config.max_tokens_per_rank"
    tokens = region.num_tokens
    if plan.ep_size > 1 and token_layout() == "replicated" and isinstance(tokens, int):
        tp = token_group(plan).size
        per_rank = -(-tokens // tp)
        if bound is None or per_rank < bound:
            bound, source = per_rank, f"tokens='replicated': ceil({tokens}/{tp})"
    return bound, source


def _mc2_transport(region: MoERegion, ep: EPPlan, strategy: Strategy, device_type: str, cuda_graphs: bool) -> str:
    """config.mc2_transport, after checking the block fits the symmetric-memory kernels' limits.
    Under CUDA graphs symm_mem falls back to all_to_all, logged: its capture fails on 2 H200s
    (torch 2.11: "Cannot copy between CPU and CUDA tensors during CUDA graph capture")."""
    transport = config.mc2_transport
    if transport not in MC2_TRANSPORTS:
        raise ValueError(f"moe_fx.config.mc2_transport={transport!r} is not one of {list(MC2_TRANSPORTS)}")
    if transport != "symm_mem" or strategy is not Strategy.MC2 or device_type == "npu":
        return "all_to_all"
    limits = ((ep.num_local_experts, symm_mem.MAX_EXPERTS_PER_RANK, "experts per rank"),
              (ep.ep_size, symm_mem.MAX_RANKS, "ranks"))
    for value, limit, what in limits:
        if value > limit:
            raise UnsupportedMoEError(
                f"MoE block {region.block!r}: mc2_transport='symm_mem' handles at most {limit} {what} "
                f"(torch's all_to_all_vdev_2d); this block has {value}. Use mc2_transport='all_to_all'."
            )
    if unavailable := symm_mem.unavailable_reason(device_type):
        raise UnsupportedMoEError(f"MoE block {region.block!r}: mc2_transport='symm_mem' cannot run: {unavailable}")
    if cuda_graphs and symm_mem.transport_name() == "nvshmem":
        counters["moe_fx"]["symm_mem_fallbacks"] += 1
        log.warning("moe_fx: MoE block %r: mc2_transport='symm_mem' cannot be captured in a CUDA graph "
                    "(a host-to-device copy during capture); using 'all_to_all' for this graph", region.block)
        return "all_to_all"
    if symm_mem.transport_name() == "nvshmem":
        log.warning("moe_fx: MoE block %r: mc2_transport='symm_mem' is experimental: one benchmark run on 2 H200s "
                    "returned a wrong answer with it (GPT-OSS-20B's shape, 8 tokens per rank, no CUDA graphs; "
                    "README, 'Multi-GPU benchmark'), not yet explained. Check its results, or use 'all_to_all'",
                    region.block)
    return transport


def records_cuda_graphs() -> bool:
    """Whether the graph being compiled will run as CUDA graphs: inductor's cudagraphs, set
    globally or by ``moe_fx.config.inner_mode = "reduce-overhead"`` (which the backend applies
    only when inductor compiles, after this pass: read from the mode's options here)."""
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options

    by_mode = config.inner_backend == "inductor" and config.inner_mode is not None and bool(
        list_mode_options(config.inner_mode).get("triton.cudagraphs"))
    return by_mode or bool(inductor_config.triton.cudagraphs)


def _training(region: MoERegion) -> bool:
    """Whether the graph will compute gradients through the experts (AOTAutograd builds a
    backward when grad mode is on and an input requires grad)."""
    if not torch.is_grad_enabled():
        return False
    inputs = [region.hidden, *_nodes(region.up.weight), *_nodes(region.down.weight)]
    return any(getattr(fake(n), "requires_grad", False) for n in inputs)


def _nodes(value) -> list[fx.Node]:
    return list(value) if isinstance(value, tuple) else [value]


__all__ = ["block_facts", "ep_plan", "exchange_group", "guard_plan", "lowering_plan", "make_lowering", "token_group", "token_layout"]
