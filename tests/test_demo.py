"""The main job, as the README runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_fx", "demo", *args], cwd=_ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("args", [(), ("--model", "builtin", "--lowering", "all2allv", "--inner-backend", "aot_eager")],
                         ids=["readme-default", "builtin-all2allv"])
def test_demo_ranks_match(args):
    done = _demo(*args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "OK: every rank matches its reference" in out
    assert out.count("max |moe_fx - reference|") == 2  # both ranks reported
    assert "rewrote 2 MoE block(s)" in out and "moe_fx.guard(topk_ids" in out and "_dispatch(hidden, v0" in out
