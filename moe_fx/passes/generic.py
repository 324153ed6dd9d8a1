"""Recognition by meaning: an MoE block that no recognizer's spelling matched, rewritten from what
it computes.

Every MoE computes ``out[t] = sum_k w[t, k] * f(x[t]; theta[ids[t, k]])``: routing slot (t, k)
can be computed by whichever rank holds expert ``ids[t, k]``, and the partial results summed.
So the experts code does not have to be understood, only delimited:

- **candidate**: a top-k router whose ids reach per-expert code (passes/unclaimed.py) and that no
  recognized region reads;
- **the block's code** ``R``: every node the block's result needs that the router and the hidden
  states do not compute (the result: the first [T, H] value after which nothing else computed
  from the routing is read; an accumulator updated in place counts from its last update);
- **rewrite** (the bounded AllGather): gather every rank's tokens and top-k values and ids, mark
  the slots of other ranks' experts with id -1 (which no expert matches, so their rows are never
  computed), run a copy of ``R`` on the gathered rows, reduce-scatter the partial sums;
- **proof**: the copy is only a claim. The backend runs it at compile time, for every rank of the
  group, on probe tokens and routings, and rewrites only when the sum over ranks equals the traced
  block and the ranks together compute no more than the block did (passes/probe.py
  ``prove_generic``). A block whose code computes every expert for every token (a dense form) or
  that cannot take a dropped slot is refused with the reason.

The copy runs ``R`` on ``ep * C`` rows, where the traced code was specialized to this rank's ``T``:
sizes equal to T (and T*K) in the size arguments of views and factories are rebound (a T used
otherwise, ``narrow(0, 0, T)`` say, is not, and the probe refuses the block); a T equal to another
of the block's sizes refuses it. ``C`` is ``config.max_tokens_per_rank``, else T (then every rank
must feed T tokens: the guard checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from moe_fx import config
from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering.allgather import AllGatherLowering, ScatterIssued
from moe_fx.lowering.base import EPPlan, LoweringPlan, Strategy
from moe_fx.lowering.collectives import start_reduce_scatter_rows
from moe_fx.lowering.guard import GuardPlan, emit_guard
from moe_fx.lowering.select import LoweringChoice
from moe_fx.passes.dataflow import needed, view_source
from moe_fx.passes.emit import EmittingTracer
from moe_fx.passes.graph_utils import (
    expert_shard_of, fake, int_value, is_graph_input, is_state_input, module_path, op_name, size_guards,
)
from moe_fx.passes.plan import exchange_group, token_layout
from moe_fx.passes.region import MoERegion, NoMatch
from moe_fx.passes.rewrite import erase_dead, nodes_between
from moe_fx.passes.rowwise import mutates
from moe_fx.passes.unclaimed import LEAVES_GRAPH, find_router, read_by_regions, router_block, router_input, where_ids_go

FORM = "generic"

# Ops whose integer arguments are sizes: a size equal to T (or T*K) counts tokens and is rebound.
_SIZED = ("view", "reshape", "expand", "new_zeros", "new_empty", "new_ones", "new_full", "zeros", "empty",
          "ones", "full", "arange", "broadcast_to")
# Uninitialized buffers become zeros in the copy: rows of dropped slots are then 0, not garbage.
_EMPTY = {torch.empty: torch.zeros, torch.empty_like: torch.zeros_like, "new_empty": "new_zeros"}


@dataclass(frozen=True, kw_only=True)
class GenericRegion:
    """An MoE block's code delimited by its inputs: (hidden, the router's top-k) -> [T, H]."""

    block: str  # the module holding the router and its experts
    router: str  # the router's weight, for messages
    hidden: fx.Node  # [T, H]: the tokens
    aliases: frozenset[fx.Node]  # nodes that are ``hidden`` (views of one source, same shape and dtype)
    topk: fx.Node
    ids: fx.Node  # topk's indices [T, K]
    values: fx.Node | None  # topk's values [T, K], when the code reads them
    output: fx.Node  # the block's [T, H] result
    last_update: fx.Node | None  # the last in-place write when ``output`` is an accumulator
    nodes: tuple[fx.Node, ...]  # the block's code, in graph order
    # dynamo's checks on the unbacked sizes the code produces (``u0 <= 20`` after a nonzero):
    # erased with it, not copied (the copy's sizes have other bounds)
    guards: frozenset[fx.Node]
    num_experts: int
    top_k: int
    num_tokens: int
    hidden_size: int
    dtype: torch.dtype  # the hidden states' dtype
    form: str = FORM

    def replay(self, graph: fx.Graph, hidden: fx.Node, ids: fx.Node, values: fx.Node | None, rows: int,
               on_copy: Callable[[fx.Node], None] | None = None) -> fx.Node:
        """Copy the block's code at the graph's insertion point, reading ``hidden`` [rows, H],
        ``ids`` and ``values`` [rows, K] instead of this rank's; returns the copy's result."""
        env: dict[fx.Node, fx.Node] = dict.fromkeys(self.aliases, hidden)
        env[self.ids] = ids
        if self.values is not None:
            env[self.values] = values
        tokens = {self.num_tokens: rows, self.num_tokens * self.top_k: rows * self.top_k}
        for node in self.nodes:
            copy = graph.node_copy(node, lambda n: env.get(n, n))
            if op_name(node) in _SIZED:
                copy.args, copy.kwargs = _rebind(copy.args, tokens), _rebind(copy.kwargs, tokens)
            if node.target in _EMPTY:
                copy.target = _EMPTY[node.target]
            env[node] = copy
            if on_copy is not None:
                on_copy(copy)
        return env[self.output]


def find_generic(graph: fx.Graph, regions: list[MoERegion]) -> list[GenericRegion | NoMatch]:
    """The block of every router whose ids reach per-expert code that no region reads: its
    ``GenericRegion``, or why it cannot be delimited."""
    found: list[GenericRegion | NoMatch] = []
    for node in graph.nodes:
        router = find_router(node)
        if router is None or read_by_regions(node, regions):
            continue
        weight, num_experts = router
        reaches = where_ids_go(node, num_experts, "")
        if reaches is None or LEAVES_GRAPH in reaches:  # a graph break after the router: explained there
            continue
        found.append(_delimit(node, weight, num_experts))
    return found


def _delimit(topk: fx.Node, weight: fx.Node, num_experts: int) -> GenericRegion | NoMatch:
    block, router = router_block(weight), module_path(weight)

    def miss(reason: str) -> NoMatch:
        return NoMatch(block, FORM, f"no recognizer matched the block of the router {router}, and moe_fx cannot "
                                    f"delimit its experts code: {reason}", anchor=topk)

    ids = next((u for u in topk.users if op_name(u) == "getitem" and u.args[1] == 1), None)
    values = next((u for u in topk.users if op_name(u) == "getitem" and u.args[1] == 0), None)
    top_k = int_value(fake(ids).shape[-1]) if fake(ids) is not None else None
    hidden = router_input(topk)
    value = fake(hidden)
    if ids is None or top_k is None or value is None or value.dim() != 2 or fake(ids).dim() != 2:
        return miss("its router does not read [T, H] hidden states into [T, K] expert ids")
    num_tokens, hidden_size = int_value(value.shape[0]), int_value(value.shape[1])
    if num_tokens is None or hidden_size is None:
        return miss(f"the token count is symbolic ({value.shape[0]}); the generic path needs static shapes")
    source = view_source(hidden)
    aliases = frozenset(n for n in hidden.graph.nodes if view_source(n) is source and fake(n) is not None
                        and fake(n).shape == value.shape and fake(n).dtype == value.dtype)
    result = _result(topk, num_tokens, hidden_size)
    if isinstance(result, str):
        return miss(result)
    output, last_update = result
    stops = {topk: None, ids: None, **dict.fromkeys(aliases), **({values: None} if values is not None else {})}
    targets = [output] + ([last_update] if last_update is not None else [])
    code = needed(targets, stops)
    nodes = sorted(n for n in code if n not in stops and not is_graph_input(n))
    for node in nodes:
        for read in node.all_input_nodes:
            if read in stops or read in code and not is_graph_input(read):
                if read is topk:
                    return miss(f"{node.name} reads the router's top-k other than by its values and ids")
                continue
            if not is_state_input(read):
                shape = tuple(fake(read).shape) if fake(read) is not None else "?"
                return miss(f"{node.name} reads {read.name} {shape}, which is neither the hidden states, the "
                            "router's top-k nor a parameter")
            if expert_shard_of(read) is not None:
                return miss(f"{read.name} holds only this rank's experts (moe_fx.shard_experts); the generic path "
                            "needs every expert's parameters")
    if message := _token_uses(nodes, num_tokens, top_k, num_experts, hidden_size):
        return miss(message)
    guards = frozenset().union(*(size_guards(n) for n in nodes)) - set(nodes)
    return GenericRegion(
        block=block, router=router, hidden=hidden, aliases=aliases, topk=topk, ids=ids,
        values=values if values in code else None, output=output, last_update=last_update, nodes=tuple(nodes),
        guards=guards,
        num_experts=num_experts, top_k=top_k, num_tokens=num_tokens, hidden_size=hidden_size, dtype=value.dtype)


def _result(topk: fx.Node, num_tokens: int, hidden_size: int) -> tuple[fx.Node, fx.Node | None] | str:
    """The block's result: the first [T, H] floating value that, once code after the router read a
    parameter, is the only value computed from the routing still to be read (with the last
    in-place write into it, if any)."""
    graph_nodes = list(topk.graph.nodes)
    after = graph_nodes[graph_nodes.index(topk) + 1:]
    dependent, last_write = {topk}, {}
    for node in after:
        if any(i in dependent for i in node.all_input_nodes):
            dependent.add(node)
            if mutates(node) and node.args and isinstance(node.args[0], fx.Node):
                dest = view_source(node.args[0])
                dependent.add(dest)
                last_write[dest] = node
    last_read = {d: max(d.users, default=d) for d in dependent}
    live: set[fx.Node] = set()
    read_params = False
    for node in after:
        live = {d for d in live if last_read[d] > node}
        read_params = read_params or any(is_state_input(i) and fake(i) is not None for i in node.all_input_nodes)
        if node in dependent:
            if last_read[node] > node:
                live.add(node)
            if node in last_write.values():
                dest = view_source(node.args[0])
                if last_read[dest] > node:
                    live.add(dest)
        if read_params and len(live) == 1:
            (value,) = live
            meta = fake(value)
            if (meta is not None and meta.is_floating_point() and meta.dim() == 2
                    and tuple(int_value(s) for s in meta.shape) == (num_tokens, hidden_size)):
                return value, last_write.get(value)
    return "no single [T, H] result follows the experts code (the routing is still read after it, or the " \
           "result has another shape)"


def _token_uses(nodes: list[fx.Node], num_tokens: int, top_k: int, num_experts: int, hidden_size: int) -> str | None:
    """Why the code's token count cannot be rebound, or None."""
    token_sizes = {num_tokens, num_tokens * top_k}
    other_sizes = {hidden_size, top_k, num_experts}
    for node in nodes:
        for value in (fake(i) for i in node.all_input_nodes if is_state_input(i)):
            if value is not None:
                other_sizes.update(int_value(s) for s in value.shape)
    if clash := token_sizes & other_sizes:
        return (f"its token count ({num_tokens}; {num_tokens} x top-{top_k} = {num_tokens * top_k}) equals another "
                f"of its sizes ({sorted(clash)}), so the sizes that count tokens cannot be told apart (another "
                "token count compiles)")
    return None


def _rebind(value, tokens: dict[int, int]):
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return tokens.get(value, value)
    if isinstance(value, tuple):
        return tuple(_rebind(v, tokens) for v in value)
    if isinstance(value, list):
        return [_rebind(v, tokens) for v in value]
    if isinstance(value, dict):
        return {k: _rebind(v, tokens) for k, v in value.items()}
    return value


def drop_foreign_slots(ids_TK, start: int, count: int):
    """``ids`` with every slot outside experts [start, start + count) set to -1 (no expert's id:
    the block's code computes nothing for it). Tensors and fx Proxies alike."""
    return torch.where((ids_TK >= start) & (ids_TK < start + count), ids_TK, -1)


def generic_blocker(region: GenericRegion) -> str | None:
    """Why the generic path leaves ``region`` as traced under any EP group; None if it may not."""
    if fake(region.hidden).device.type == "npu":
        return "the generic path has no Ascend lowering"
    if token_layout() != "per_rank":
        return "the generic path gathers per-rank tokens only (moe_fx.config.tokens='per_rank')"
    if torch.is_grad_enabled() and any(getattr(fake(n), "requires_grad", False)
                                       for node in region.nodes for n in node.all_input_nodes):
        return "a training graph: the generic path rewrites inference graphs only"
    return None


def plan_generic(region: GenericRegion, ep: EPPlan) -> tuple[LoweringPlan, LoweringChoice] | str:
    """The bounded AllGather plan of ``region`` at ``ep``, or why the block stays as traced."""
    device_type = fake(region.hidden).device.type
    bound = config.max_tokens_per_rank
    capacity = region.num_tokens if bound is None else bound
    if capacity < region.num_tokens:  # as the recognized AllGather does: an error, never one rank's refusal
        raise UnsupportedMoEError(f"MoE block {region.block!r} (generic): {region.num_tokens} tokens on rank "
                                  f"{ep.ep_rank} exceed moe_fx.config.max_tokens_per_rank={bound}; raise the bound")
    if reason := generic_blocker(region):
        return reason
    source = "config.max_tokens_per_rank" if bound is not None else "this rank's token count (set " \
             "moe_fx.config.max_tokens_per_rank when ranks hold different counts)"
    choice = LoweringChoice(strategy=Strategy.ALLGATHER, capacity_tokens=capacity,
                            reason=f"generic path: AllGather bounded by {source} = {capacity}")
    ep = exchange_group(ep, region, Strategy.ALLGATHER, capacity, device_type)
    plan = LoweringPlan(ep=ep, strategy=Strategy.ALLGATHER, top_k=region.top_k, capacity_tokens=capacity,
                        device_type=device_type)
    return plan, choice


def rewrite_generic(graph: fx.Graph, region: GenericRegion, plan: LoweringPlan, guard: GuardPlan) -> list[fx.Node]:
    """Replace ``region`` by: the guard, the all-gather of tokens and routing, the block's code on
    the gathered rows with other ranks' slots dropped, the reduce-scatter of the partial sums.
    Returns the new nodes in order."""
    lowering = AllGatherLowering(plan)
    insert_before = region.last_update.next if region.last_update is not None else region.output
    first_new = insert_before.prev
    tracer = EmittingTracer(graph)
    proxy = tracer.proxy
    try:
        with graph.inserting_before(insert_before):
            hidden, ids = proxy(region.hidden), proxy(region.ids)
            values = proxy(region.values) if region.values is not None else ids.to(torch.float32)
            issued = lowering.start_dispatch(hidden, emit_guard(guard, ids), values)
            x_all, ids_all, values_all = lowering.gathered(issued)
            ep = plan.ep
            kept = drop_foreign_slots(ids_all, ep.expert_start, ep.num_local_experts).to(fake(region.ids).dtype)
            partial = region.replay(graph, x_all.node, kept.node, values_all.node, ep.ep_size * plan.capacity_tokens,
                                    on_copy=tracer.propagate)
            scattered = start_reduce_scatter_rows(proxy(partial), plan)
            out = lowering.finish_combine(ScatterIssued(scattered=scattered, num_tokens=region.num_tokens)).node
    except BaseException:  # no half-emitted region stays behind
        for node in reversed(nodes_between(first_new, insert_before)):
            graph.erase_node(node)
        raise
    new_nodes = nodes_between(first_new, insert_before)
    created, traced = set(new_nodes), set(region.nodes)
    region.output.replace_all_uses_with(out, delete_user_cb=lambda u: u not in created and u not in traced)
    # the traced code's unbacked sizes must not outlive it: inductor would bind the copy's sizes
    # and the original's to one name (a 2 x H200 run wrote past a buffer that way)
    erase_dead(set(region.nodes) | region.guards | {region.output})
    return [n for n in new_nodes if n.graph is graph and (n.users or n is out)]
