"""moe_fx/passes/direct_collectives.py: the EP groups' functional all-gathers and reduce-scatters
become their ``_out`` variants (one NCCL collective each, not a coalesced group of one), on CUDA
with static shapes only; other groups, other devices and symbolic shapes keep theirs. The speed
it buys is measured on GPUs (README, "Multi-GPU benchmark"); here, the rewrite itself."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import moe_fx  # noqa: F401  (registers the ops)
from moe_fx.passes.direct_collectives import DirectCollectives, use_direct_collectives

c10d = torch.ops._c10d_functional


def _graph(device: str, *, group: str = "ep", symbolic: bool = False) -> fx.Graph:
    mode = FakeTensorMode(shape_env=ShapeEnv()) if symbolic else FakeTensorMode()
    with mode:
        rows = mode.shape_env.create_unbacked_symint() if symbolic else 8
        x = torch.empty(rows, 4, device=device, dtype=torch.bfloat16)
        gathered = torch.empty(2 * rows, 4, device=device, dtype=torch.bfloat16)
        scattered = torch.empty(rows if symbolic else 4, 4, device=device, dtype=torch.bfloat16)
    graph = fx.Graph()
    inp = graph.placeholder("x")
    inp.meta["val"] = x
    ag = graph.call_function(c10d.all_gather_into_tensor.default, (inp, 2, group))
    ag.meta["val"] = gathered
    rs = graph.call_function(c10d.reduce_scatter_tensor.default, (inp, "sum", 2, group))
    rs.meta["val"] = scattered
    waits = [graph.call_function(c10d.wait_tensor.default, (n,)) for n in (ag, rs)]
    graph.output(tuple(waits))
    return graph


def _targets(graph: fx.Graph) -> list:
    return [n.target for n in graph.nodes if n.op == "call_function"]


def test_ep_collectives_on_cuda_become_out_variants():
    graph = _graph("cuda")
    assert use_direct_collectives(graph, frozenset({"ep"})) == 2
    targets = _targets(graph)
    assert c10d.all_gather_into_tensor.default not in targets and c10d.reduce_scatter_tensor.default not in targets
    for op, shape in ((c10d.all_gather_into_tensor_out.default, [16, 4]), (c10d.reduce_scatter_tensor_out.default, [4, 4])):
        (node,) = [n for n in graph.nodes if n.target == op]
        buffer = node.kwargs["out"]
        assert buffer.target == torch.ops.aten.empty.memory_format and buffer.args == (shape,)
        assert buffer.kwargs["dtype"] == torch.bfloat16 and buffer.kwargs["device"].type == "cuda"
        # the waits now read the out variant's result
        assert [u.target for u in node.users] == [c10d.wait_tensor.default]
    graph.lint()


def test_other_groups_devices_and_symbolic_shapes_are_left_alone():
    for graph, groups in ((_graph("cuda", group="tp"), {"ep"}), (_graph("cpu"), {"ep"}),
                          (_graph("cuda", symbolic=True), {"ep"})):
        before = _targets(graph)
        assert use_direct_collectives(graph, frozenset(groups)) == 0
        assert _targets(graph) == before


def test_the_pass_runs_after_the_users_own_and_keys_the_cache_by_both():
    seen = []

    def users_pass(graph):
        seen.append(len(graph.nodes))

    graph = _graph("cuda")
    chained = DirectCollectives(frozenset({"ep"}), before=users_pass)
    chained(graph)
    assert seen == [6] and c10d.all_gather_into_tensor_out.default in _targets(graph)
    alone = DirectCollectives(frozenset({"ep"}))
    assert alone.uuid() == DirectCollectives(frozenset({"ep"})).uuid()
    assert alone.uuid() != chained.uuid() != DirectCollectives(frozenset({"other"})).uuid()
