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

    _install(config_patch)
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
        try:
            with moe_fx.config.patch(settings), moe_fx.recording() as graphs, torch.no_grad():
                out = torch.compile(model, backend=moe_fx.backend, fullgraph=True)(ids).logits.float()
        except Exception as exc:  # e.g. a forced mc2 refused for the model's dtype: the test reads it
            results[lowering] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        blocks = [b for g in graphs for b in g.report.blocks]
        results[lowering] = {
            "diff": (out - ref).abs().max().item(), "scale": ref.abs().max().item(),
            "strategies": [b.choice.strategy.value for b in blocks], "rendering": blocks[0].rendering,
        }
    return results


def _install(config_patch: dict | None) -> None:
    """The emulator, enforcing the rules of the SoC moe_fx is configured for."""
    npu_emulator.install()
    npu_emulator.set_soc({**NPU, **(config_patch or {})}["npu.soc"])


def npu_plain_case(*, config_patch: dict | None = None, **kw) -> dict:
    _install(config_patch)
    return ep_jobs.plain_case(config_patch={**NPU, **(config_patch or {})}, **kw)


_MC2_GROUP = []  # the ops tests' own MC2 group, created once per rank process


def _mc2_group_name(rank: int) -> str:
    """An HCCL-style name of a group that carries MC2 only (the torch_npu doc's rule)."""
    import torch
    import torch.distributed as dist

    if not _MC2_GROUP:
        _MC2_GROUP.append(dist.new_group(list(range(dist.get_world_size())), use_local_synchronization=True))
    return _MC2_GROUP[0]._get_backend(torch.device("cpu")).get_hccl_comm_name(rank)


def mc2_ops_case(*, rank: int, world_size: int, version: str) -> dict:
    """The emulated MC2 ops on their own (A2): every rank dispatches BS=5 padded bf16 tokens (the
    last ``rank + 1`` inactive) with top-2 over 8 experts; checks against the doc's golden model
    (all ranks' active tokens in rank order, grouped by local expert) and a combine of 2*y."""
    import torch
    import torch.distributed as dist

    _install(None)
    bs, k, experts, hidden = 5, 2, 8, 32
    local = experts // world_size
    group_ep = _mc2_group_name(rank)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(bs, hidden, generator=gen).bfloat16()
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(bs)]).to(torch.int32)
    weights = torch.rand(bs, k, generator=gen)
    active = torch.arange(bs) < bs - (rank + 1)
    suffix = "_v2" if version == "v2" else ""
    dispatch = getattr(torch.ops.npu, f"npu_moe_distribute_dispatch{suffix}")
    combine = getattr(torch.ops.npu, f"npu_moe_distribute_combine{suffix}")
    expand_x, _, handle, token_nums, recv_counts, _, expand_scales = dispatch(
        x, ids, group_ep, world_size, rank, experts, x_active_mask=active, expert_scales=weights,
        expert_token_nums_type=1)
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
    expected_out = torch.where(active.unsqueeze(1), 2 * (weights.unsqueeze(-1) * x.float().unsqueeze(1)).sum(1), 0.0)
    out = combine(2 * expand_x, ids, handle, recv_counts, weights, group_ep, world_size, rank, experts,
                  x_active_mask=active, expand_scales=expand_scales)
    try:
        dispatch(x[: bs - rank], ids[: bs - rank], group_ep, world_size, rank, experts)
        uneven = "no error"
    except ValueError as exc:
        uneven = str(exc)
    # expand_scales: each received row's router weight (it came along with the row).
    all_weights = [torch.empty_like(weights) for _ in range(world_size)]
    dist.all_gather(all_weights, weights)
    expected_scales = [all_weights[r][t, j] for e in range(rank * local, (rank + 1) * local)
                       for r in range(world_size) for t in range(bs) for j in range(k)
                       if masks[r][t] and idss[r][t, j] == e]
    return {
        "rows": expand_x.shape[0],
        "counts": token_nums.tolist() == expected_counts,
        "expand_x": bool(torch.equal(expand_x[:n], torch.stack(expected_rows))),
        "past_total_nan": bool(expand_x[n:].isnan().all()),
        "combine_diff": (out.float() - expected_out).abs().max().item(),
        "combine_scale": expected_out.abs().max().item(),
        "expand_scales": bool(torch.equal(expand_scales[:n], torch.stack(expected_scales))),
        "uneven": uneven,
    }


def mc2_refusals_case(*, rank: int, world_size: int) -> dict:
    """The MC2 rules that need the group's values or history, each broken on purpose; every rank
    reports the message it got."""
    import torch
    import torch.distributed as dist

    _install(None)
    group_ep = _mc2_group_name(rank)
    experts, k, bs = 4 * world_size, 2, 3
    x = torch.ones(bs, 32, dtype=torch.bfloat16)
    ids = torch.stack([torch.arange(k) + t for t in range(bs)]).to(torch.int32)  # distinct in each row
    weights = torch.full((bs, k), 0.5)
    dispatch, combine = torch.ops.npu.npu_moe_distribute_dispatch_v2, torch.ops.npu.npu_moe_distribute_combine_v2

    def refusal(call) -> str:
        try:
            call()
        except npu_emulator.ContractError as exc:
            return str(exc)
        return "no error"

    def mc2(ids=ids, mask=None, group=group_ep):
        out = dispatch(x, ids, group, world_size, rank, experts, x_active_mask=mask, expert_scales=weights)
        combine(out[0], ids, out[2], out[4], weights, group, world_size, rank, experts, x_active_mask=mask,
                expand_scales=out[6])

    repeated = ids.clone()
    if rank == 1:
        repeated[2, 1] = repeated[2, 0]  # one row on one rank names an expert twice
    results = {
        "repeated_ids": refusal(lambda: mc2(ids=repeated)),
        "mask_order": refusal(lambda: mc2(mask=torch.tensor([True, False, True]))),
        "clean": refusal(mc2),
    }
    dist.all_reduce(torch.ones(1), group=_MC2_GROUP[0])  # another collective on MC2's domain
    results["shared_domain"] = refusal(mc2)
    results["after_refusal"] = refusal(mc2)  # the refusal reset the record: the domain is clean again
    dist.barrier()
    world = dist.group.WORLD._get_backend(torch.device("cpu")).get_hccl_comm_name(rank)
    results["world"] = refusal(lambda: mc2(group=world))  # WORLD carried the barrier (and the harness's)
    return results
