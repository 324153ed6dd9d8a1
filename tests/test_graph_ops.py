"""The rewritten graph holds only ops: what the pass checks on every region it emits
(moe_fx/passes/verify.py), that the check can fail, and what it buys (AOTAutograd's cache)."""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys

import pytest
import torch
import torch.fx as fx

from moe_fx.passes.verify import check_only_ops, op_only_violation

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _graph_with(target, *args):
    graph = fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(target, (x, *args))
    graph.output(node)
    return node


def test_ops_and_literals_pass():
    assert op_only_violation(_graph_with(torch.ops.moe_fx.grouped_mm, 1)) is None
    assert op_only_violation(_graph_with(operator.getitem, (Ellipsis, slice(None, None, 2)))) is None
    assert op_only_violation(_graph_with(torch.arange, torch.device("cpu"), torch.int16)) is None


class _Handle:
    tokens = None


def test_python_targets_and_objects_fail():
    assert "not an op" in op_only_violation(_graph_with(getattr, "tokens"))
    assert "not an op" in op_only_violation(_graph_with(check_only_ops, "block"))
    assert "not a literal" in op_only_violation(_graph_with(torch.add, _Handle()))
    with pytest.raises(AssertionError, match="emitted non-op nodes"):
        check_only_ops([_graph_with(getattr, "tokens")], "model.layers.0.mlp.experts")


def _compile_in_fresh_process(cache_dir: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "PYTHONPATH": _REPO}
    done = subprocess.run([sys.executable, "-m", "tests.cache_job"], cwd=_REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_hits_aot_autograd_cache(tmp_path):
    first = _compile_in_fresh_process(str(tmp_path))
    assert first["rewritten"] == 1 and first.get("autograd_cache_miss", 0) >= 1, first
    assert first.get("autograd_cache_bypass", 0) == 0, first
    second = _compile_in_fresh_process(str(tmp_path))
    assert second["rewritten"] == 1 and second.get("autograd_cache_hit", 0) >= 1, second
