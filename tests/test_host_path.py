"""What a compiled EP block costs the host per call, beyond its kernels (moe_fx/backend.py)."""

from __future__ import annotations

from tests.tolerances import within


def test_a_graph_compiled_with_grad_off_skips_the_python_autograd_wrapper(rank_pool):
    """torch registers its functional collectives' autograd in Python: each call would pass through
    that wrapper (about 12 µs of host time per op on an H200's host). Graphs compiled with grad off
    run below autograd, with the same output, a normal tensor; left out, the wrapper is called."""
    below = rank_pool(2).run("tests.ep_jobs:autograd_wrapper_case")
    through = rank_pool(2).run("tests.ep_jobs:autograd_wrapper_case", below_autograd=False)
    for rank, (res, plain) in enumerate(zip(below, through)):
        assert res["wrapper_calls"] == 0 and plain["wrapper_calls"] > 0, (rank, res, plain)
        assert within(res, "float32") and within(plain, "float32"), (rank, res, plain)
        assert not res["inference_tensor"] and not res["requires_grad"], (rank, res)
