"""Per-rank jobs for the Ascend lowering, run against the CPU emulator of torch_npu's ops
(moe_fx.testing.npu_emulator, installed in the rank processes by each job)."""

from __future__ import annotations

from moe_fx.testing import npu_emulator
from tests import ep_jobs

# The emulated Ascend target: an A2 (910B) accepts the tiny models' hidden size 64 for MC2.
NPU = {"npu.force": True, "npu.soc": "A2", "max_tokens_per_rank": 16}


def npu_model_case(*, rank: int = 0, world_size: int = 1, key: str, dtype: str, lowerings: tuple[str, ...],
                   impl: str = "grouped_mm", config_patch: dict | None = None) -> dict:
    """A tiny transformers model on this rank's tokens: eager (all experts) versus the Ascend
    lowering on the emulator (foreign experts zeroed) for each strategy, with the rendering of the
    rewritten region."""
    import torch

    import moe_fx
    from tests.tiny_models import build_tiny, make_input_ids

    npu_emulator.install()
    if world_size > 1:  # pool ranks share 2 cores; the pytest process keeps its threads
        torch.set_num_threads(1)
    model = build_tiny(key, experts_implementation=impl, dtype=getattr(torch, dtype))
    ids = make_input_ids(ep_jobs.TOKENS_PER_RANK[rank], seed=100 + rank)
    with torch.no_grad():
        ref = model(ids).logits.float()
    if world_size > 1:
        ep_jobs.zero_foreign_experts(model, 8)
    results = {}
    for lowering in lowerings:
        torch._dynamo.reset()
        settings = {**NPU, "lowering": lowering, "inner_backend": "aot_eager", **(config_patch or {})}
        with moe_fx.config.patch(settings), moe_fx.recording() as graphs, torch.no_grad():
            out = torch.compile(model, backend=moe_fx.backend, fullgraph=True)(ids).logits.float()
        blocks = [b for g in graphs for b in g.report.blocks]
        results[lowering] = {
            "diff": (out - ref).abs().max().item(), "scale": ref.abs().max().item(),
            "strategies": [b.choice.strategy.value for b in blocks], "rendering": blocks[0].rendering,
        }
    return results


def npu_plain_case(*, config_patch: dict | None = None, **kw) -> dict:
    npu_emulator.install()
    return ep_jobs.plain_case(config_patch={**NPU, **(config_patch or {})}, **kw)


def mc2_ops_case(*, rank: int, world_size: int, version: str) -> dict:
    """The emulated MC2 ops on their own: every rank dispatches BS=5 padded tokens (the last
    ``rank + 1`` inactive) with top-2 over 8 experts; checks against the doc's golden model (all
    ranks' active tokens in rank order, grouped by local expert) and a combine of 2*y."""
    import torch
    import torch.distributed as dist

    npu_emulator.install()
    bs, k, experts, hidden = 5, 2, 8, 4
    local = experts // world_size
    group_ep = dist.group.WORLD._get_backend(torch.device("cpu")).get_hccl_comm_name(rank)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(bs, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(bs)]).to(torch.int32)
    weights = torch.rand(bs, k, generator=gen)
    active = torch.arange(bs) < bs - (rank + 1)
    suffix = "_v2" if version == "v2" else ""
    dispatch = getattr(torch.ops.npu, f"npu_moe_distribute_dispatch{suffix}")
    combine = getattr(torch.ops.npu, f"npu_moe_distribute_combine{suffix}")
    expand_x, _, handle, token_nums, recv_counts, tp_counts, _ = dispatch(
        x, ids, group_ep, world_size, rank, experts, x_active_mask=active, expert_token_nums_type=1)
    # Golden: every rank's active (t, k) entries, rank-major, kept if the expert is ours, expert-major.
    xs = [torch.empty_like(x) for _ in range(world_size)]
    idss = [torch.empty_like(ids) for _ in range(world_size)]
    masks = [torch.empty_like(active, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(xs, x), dist.all_gather(idss, ids), dist.all_gather(masks, active.to(torch.uint8))
    expected_rows, expected_counts = [], []
    for e in range(rank * local, (rank + 1) * local):
        rows = [xs[r][t] for r in range(world_size) for t in range(bs) for j in range(k)
                if masks[r][t] and idss[r][t, j] == e]
        expected_rows += rows
        expected_counts.append(len(rows))
    n = sum(expected_counts)
    expected_out = torch.where(active.unsqueeze(1), 2 * (weights.unsqueeze(-1) * x.unsqueeze(1)).sum(1), 0.0)
    out = combine(2 * expand_x, ids, handle, recv_counts, weights, group_ep, world_size, rank, experts,
                  tp_send_counts=tp_counts, x_active_mask=active)
    try:
        dispatch(x[: bs - rank], ids[: bs - rank], group_ep, world_size, rank, experts)
        uneven = "no error"
    except ValueError as exc:
        uneven = str(exc)
    return {
        "rows": expand_x.shape[0],
        "counts": token_nums.tolist() == expected_counts,
        "expand_x": bool(torch.equal(expand_x[:n], torch.stack(expected_rows))),
        "past_total_nan": bool(expand_x[n:].isnan().all()),
        "combine_diff": (out - expected_out).abs().max().item(),
        "uneven": uneven,
    }
