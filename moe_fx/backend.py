"""The ``moe_fx`` dynamo backend: rewrite MoE blocks, then hand off to the inner compiler.

    torch.compile(model, backend=moe_fx.backend)   # or backend="moe_fx" (entry point)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx

from moe_fx import config
from moe_fx.errors import CollectiveTimeoutError, RankMismatchError, RoutingError, UnsupportedMoEError
from moe_fx.passes import PassReport, moe_ep_pass
from moe_fx.passes.plan import records_cuda_graphs
from moe_fx.runtime.guard import (
    check_in_step, entered_blocks, is_gloo_failure, mark_out_of_step, peer_failure_message,
)

# the entry check's verdicts: every rank raises the same one at the same block, nothing exchanged
AGREED = (RankMismatchError, RoutingError, UnsupportedMoEError)


@dataclass(frozen=True, kw_only=True)
class RecordedGraph:
    """One graph the backend compiled: before and after the rewrite, and what was done."""

    original: fx.GraphModule
    rewritten: fx.GraphModule
    report: PassReport


_recorders: list[list[RecordedGraph]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[RecordedGraph]]:
    """Collect every graph the backend compiles while the block runs (for tests and debugging)::

        with moe_fx.recording() as graphs:
            compiled(x)
        print(graphs[0].rewritten.code, graphs[0].report.blocks[0].rendering)
    """
    graphs: list[RecordedGraph] = []
    _recorders.append(graphs)
    try:
        yield graphs
    finally:
        # by identity: nested recordings hold equal lists (the same graphs)
        _recorders[:] = [r for r in _recorders if r is not graphs]


def backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """Dynamo backend: the MoE EP rewrite followed by ``config.inner_backend``."""
    original = copy.deepcopy(gm) if _recorders else None
    report = moe_ep_pass(gm, example_inputs)
    for graphs in _recorders:
        graphs.append(RecordedGraph(original=original, rewritten=gm, report=report))
    # inductor's peak-memory reordering would move a chunk's all-gather after another chunk's
    # experts, and with it the overlap the emitted order sets up (passes/pipeline.py)
    compiled = _inner_compile(gm, example_inputs, keep_order=any(b.overlap_chunks > 1 for b in report.blocks))
    exchanging = [b.region.block for b in report.blocks if b.output is not None and b.plan.ep_size > 1]
    if not exchanging:
        return compiled
    if not torch.is_grad_enabled() and not records_cuda_graphs():  # a graph's replay calls no op
        compiled = _below_autograd(compiled)
    return _in_step_with_peers(compiled, exchanging)


def _below_autograd(compiled: Callable) -> Callable:
    """``compiled``, run with the autograd dispatch keys excluded. torch registers the autograd of
    its functional collectives in Python (torch/_library/autograd.py), so each collective of the
    graph otherwise passes through a Python wrapper that only redispatches below autograd when
    grad is off. On one H200 (scripts/collective_host_cost.py, one NCCL rank, one run) an
    all-gather and a reduce-scatter compiled by inductor took 402 / 204 / 320 µs of host time per
    call at 8 / 128 / 4096 rows of 2048, and 327 / 155 / 153 µs below autograd; the same pointwise
    code without them 31-36 µs (README, "Host time without CUDA graphs"). Only for graphs compiled
    with grad off (dynamo guards the grad mode, so they run with grad off, where autograd records
    nothing anyway) and not recorded as CUDA graphs (a replay calls no op). The outputs stay
    normal tensors (``torch.inference_mode`` would make them inference tensors)."""

    def run(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return compiled(*args)

    return _called_like(compiled, run)


def _in_step_with_peers(compiled: Callable, blocks: list[str]) -> Callable:
    """``compiled``, raising ``CollectiveTimeoutError`` naming ``blocks`` where a gloo collective
    of the graph failed (moe_fx's exchanges time out after ``config.collective_timeout_s``: a
    peer raised inside a block, stopped calling or died). NCCL's timeouts end the process from
    its watchdog instead; nothing reaches Python there. A call that raises after a block's entry
    check with anything but the check's own verdict (raised on every rank alike) leaves this rank
    out of step: its next call raises ``OutOfStepError`` before any collective."""

    def run(*args):
        check_in_step(blocks)
        entered = entered_blocks()
        try:
            return compiled(*args)
        except BaseException as exc:
            if entered_blocks() != entered and not isinstance(exc, AGREED):
                mark_out_of_step(f"an earlier call raised after a block's entry check ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})")
            if isinstance(exc, RuntimeError) and is_gloo_failure(exc):
                raise CollectiveTimeoutError(peer_failure_message(blocks, exc)) from exc
            raise

    return _called_like(compiled, run)


def _called_like(compiled: Callable, wrapper: Callable) -> Callable:
    """``wrapper`` of ``compiled``, which dynamo must call the same way (boxed args alike)."""
    wrapper._boxed_call = getattr(compiled, "_boxed_call", False)
    return wrapper


def _inner_compile(gm: fx.GraphModule, example_inputs: list, *, keep_order: bool = False) -> Callable:
    name = config.inner_backend
    if name == "eager":
        return gm.forward
    if name == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = dict(list_mode_options(config.inner_mode)) if config.inner_mode else {}
        if keep_order:
            patches["reorder_for_peak_memory"] = False
        return compile_fx(gm, example_inputs, config_patches=patches or None)
    if name == "torchair":
        from moe_fx.torchair_backend import torchair_compile

        return torchair_compile(gm, example_inputs)
    if name == "moe_fx":
        raise ValueError("moe_fx.config.inner_backend cannot be 'moe_fx' itself")
    return torch._dynamo.lookup_backend(name)(gm, example_inputs)
