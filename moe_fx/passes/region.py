"""Typed records between the recognizers and the lowering.

A recognizer returns an ``MoERegion`` (everything the rewrite needs; lowering never looks at the
original nodes again) or a falsy ``NoMatch`` carrying the reason for explain().
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from moe_fx.passes.graph_utils import is_expert_gather
from moe_fx.shard import ExpertShard


@dataclass(frozen=True, kw_only=True)
class RowFn:
    """A row-wise piece of the traced experts code, replayed on the rewritten rows.

    ``nodes`` (in graph order) compute ``output`` from ``input`` [rows, N]; per-expert
    parameters (biases) are read as ``param[row_ids]``. Nothing else may depend on the row order,
    which the recognizer checks.
    """

    input: fx.Node
    output: fx.Node
    row_ids: fx.Node
    nodes: tuple[fx.Node, ...]
    label: str  # human-readable summary, e.g. "silu(gate) * up"
    plain_swiglu: bool = False  # silu(x[:, :N/2]) * x[:, N/2:] and nothing else: a fused kernel may replace it
    side_inputs: tuple[fx.Node, ...] = ()  # further matmul outputs it reads (separate w1 / w3)
    passthrough: tuple[fx.Node, ...] = ()  # proven identities (sentinel guards): replayed as their input

    def replay(
        self, graph: fx.Graph, new_input: fx.Node, new_row_ids: fx.Node, new_side_inputs: tuple[fx.Node, ...] = (),
        block_row_ids: fx.Node | None = None, on_copy: Callable[[fx.Node], None] | None = None,
    ) -> fx.Node:
        """Copy the nodes at the graph's insertion point, reading ``new_input`` / ``new_row_ids``
        (and ``new_side_inputs`` for ``side_inputs``). With ``block_row_ids`` (the region's
        parameters hold only this rank's block of experts), ``param[row_ids]`` reads
        ``param[block_row_ids]`` instead; every other use of the ids still sees the global ids.
        ``on_copy`` sees each new node (the rewrite sets its example value)."""
        env: dict[fx.Node, fx.Node] = {self.input: new_input, self.row_ids: new_row_ids}
        env.update(zip(self.side_inputs, new_side_inputs, strict=True))
        for node in sorted((*self.nodes, *self.passthrough)):  # fx nodes sort in graph order
            if node in self.passthrough:
                env[node] = env.get(node.args[0], node.args[0])
                continue
            ids = new_row_ids
            if block_row_ids is not None and is_expert_gather(node, self.row_ids):
                ids = block_row_ids
            env[node] = graph.node_copy(node, lambda n: ids if n is self.row_ids else env.get(n, n))
            if on_copy is not None:
                on_copy(env[node])
        return env.get(self.output, new_input)

    def expert_params(self) -> list[fx.Node]:
        """The per-expert parameters the nodes gather by row (biases)."""
        return [n.args[0] for n in self.nodes if is_expert_gather(n, self.row_ids)]


@dataclass(frozen=True, kw_only=True)
class ExpertProjection:
    """One per-expert weight: [E, N, K] ("out_in", nn.Linear style) or [E, K, N] ("in_out").

    ``weight`` is one stacked parameter, or one 2-D parameter per expert (a ModuleList of
    nn.Linear), which the lowering stacks for its local experts. ``bias`` likewise: [E, N] or
    one [N] per expert; the rewrite adds ``bias[row_expert]`` to the matmul's rows.
    """

    weight: fx.Node | tuple[fx.Node, ...]
    layout: str
    bias: fx.Node | tuple[fx.Node, ...] | None = None

    @property
    def num_experts(self) -> int:
        return len(self.weight) if isinstance(self.weight, tuple) else self._shape()[0]

    def _shape(self) -> tuple[int, ...]:
        first = self.weight[0] if isinstance(self.weight, tuple) else self.weight
        return tuple(first.meta["example_value"].shape)

    @property
    def dtype(self) -> torch.dtype:
        first = self.weight[0] if isinstance(self.weight, tuple) else self.weight
        return first.meta["example_value"].dtype

    def features(self) -> tuple[int, int]:
        """(in, out) features."""
        shape = self._shape()[-2:]
        return (shape[1], shape[0]) if self.layout == "out_in" else (shape[0], shape[1])


@dataclass(frozen=True, kw_only=True)
class MoERegion:
    """The experts computation of one MoE block: (hidden, topk_ids, topk_weights) -> [T, H]."""

    block: str  # module path of the experts, e.g. "model.layers.0.mlp.experts"
    form: str  # recognizer name, e.g. "hf_grouped_mm"
    hidden: fx.Node  # [T, H]
    topk_ids: fx.Node  # [T, K]
    topk_weights: fx.Node  # [T, K], applied to the expert outputs
    up: ExpertProjection
    activation: RowFn  # up output -> down input (biases, gate, casts)
    down: ExpertProjection
    post: RowFn | None  # down output -> weighted rows (biases, post-expert norm)
    output: fx.Node  # the [T, H] sum over top-k that the rewrite replaces
    nodes: frozenset[fx.Node]  # every node of the traced experts code (erased when dead)
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype  # expert weight dtype
    shard: ExpertShard | None = None  # set when the expert parameters hold only this rank's block

    # Further projections of the same dispatched rows that the activation reads (separate w1 and
    # w3 instead of a fused gate_up), in the order of ``activation.side_inputs``.
    side_up: tuple[ExpertProjection, ...] = ()
    # The traced experts code accumulated into ``base`` (a shared expert's output): the rewrite
    # returns ``base + combined``. None: it accumulated into zeros.
    base: fx.Node | None = None
    # Last node of the traced experts code when ``output`` is an accumulator updated in place
    # (``out.index_add_`` in a loop): the rewrite goes after it and replaces only later uses.
    last_update: fx.Node | None = None
    # What dynamo must be told to capture this form as one graph (shown by explain()).
    requires: str = ""
    # The router weights scale the experts' input rows (torchtitan's score_before_experts, Llama 4)
    # instead of their outputs: each (token, slot) row is then dispatched as a token of its own.
    weights_on_input: bool = False
    # ``topk_weights`` is a [T, E] score matrix, zero outside ``topk_ids`` (dense all-experts
    # forms): the rewrite reads it at ``topk_ids``.
    dense_scores: bool = False

    def expert_params(self) -> list[fx.Node]:
        """Every per-expert parameter of the region: the projections' weights and biases, then the
        biases the activation and post-expert code read by row."""
        params: list[fx.Node] = []
        for projection in (self.up, *self.side_up, self.down):
            for value in (projection.weight, projection.bias):
                params += value if isinstance(value, tuple) else [] if value is None else [value]
        params += self.activation.expert_params()
        return params + (self.post.expert_params() if self.post is not None else [])

    @property
    def num_tokens(self):
        return self.hidden.meta["example_value"].shape[0]


# Long enough for a reason and its fix; the cap keeps a runaway message (a node list) readable.
_REASON_CAP = 400


@dataclass(frozen=True)
class NoMatch:
    """Why a candidate is not a rewritable MoE region. Falsy; the message is built lazily."""

    block: str
    form: str
    _reason: Callable[[], str] | str = field(repr=False)
    # the node the miss was found at (a recognizer's anchor, a router's topk): a rewrite that
    # replaces it answers the miss
    anchor: fx.Node | None = field(default=None, repr=False, compare=False)

    def __bool__(self) -> bool:
        return False

    @property
    def reason(self) -> str:
        text = self._reason() if callable(self._reason) else self._reason
        return text if len(text) <= _REASON_CAP else text[:_REASON_CAP - 3] + "..."
