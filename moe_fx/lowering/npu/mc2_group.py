"""MC2's own process group, and the HCCL communicator name its ops take as ``group_ep``.

torch_npu's doc of npu_moe_distribute_dispatch_v2 / combine_v2 ("Communication domain usage
constraints"): their EP communication domain "must not include other operators". moe_fx's EP group
(``config.ep_group``, WORLD by default) carries other collectives (the other lowerings, sharding,
the user's own), so MC2 runs on a group of its own with the same ranks, as vllm-ascend does (its
"mc2" group coordinator, vllm_ascend/distributed/parallel_state.py). ``config.npu.mc2_group`` names
one; otherwise moe_fx creates one, once per EP group, the first time a block is lowered to MC2.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_fx import config
from moe_fx.errors import UnsupportedMoEError
from moe_fx.lowering.base import EPPlan
from moe_fx.runtime.comm import resolve_group

# EP group name -> (the EP group object, its MC2 group). The object guards against a process group
# destroyed and re-created under the same name (a new WORLD is "0" again).
_CREATED: dict[str, tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}


def mc2_group(plan: EPPlan) -> dist.ProcessGroup:
    """The group MC2 runs on for ``plan``'s EP group: same ranks in the same order, nothing else on it."""
    ep_group = resolve_group(plan.group_name)
    ranks = dist.get_process_group_ranks(ep_group)
    if config.npu.mc2_group is not None:
        group = resolve_group(config.npu.mc2_group)
        if group is ep_group:
            raise UnsupportedMoEError(
                f"MoE block {plan.block!r}: moe_fx.config.npu.mc2_group={config.npu.mc2_group!r} is the "
                "expert-parallel group itself; MC2's group must carry no other collective (torch_npu doc): "
                "give it a group of its own with the same ranks, or leave it None for moe_fx to create one"
            )
        if dist.get_process_group_ranks(group) != ranks:
            raise UnsupportedMoEError(
                f"MoE block {plan.block!r}: moe_fx.config.npu.mc2_group={config.npu.mc2_group!r} has ranks "
                f"{dist.get_process_group_ranks(group)}, the expert-parallel group {ranks}; they must be equal"
            )
        return group
    cached = _CREATED.get(plan.group_name)
    if cached is not None and cached[0] is ep_group:
        return cached[1]
    # Only the EP group's ranks take part (use_local_synchronization): they all lower this block here.
    group = dist.new_group(ranks, backend=dist.get_backend(ep_group), use_local_synchronization=True)
    _CREATED[plan.group_name] = (ep_group, group)
    return group


def hccl_comm_name(group: dist.ProcessGroup, device: torch.device) -> str:
    """The HCCL communicator name of ``group`` on ``device`` (vllm-ascend's TokenDispatcherWithMC2:
    ``group._get_backend(npu).get_hccl_comm_name(rank in the group)``)."""
    backend = group._get_backend(device)
    get_name = getattr(backend, "get_hccl_comm_name", None)
    if get_name is None:
        raise UnsupportedMoEError(
            f"moe_fx: MC2 on Ascend needs an HCCL process group; group {group.group_name!r} has a "
            f"{type(backend).__name__} backend for {device} (init torch.distributed with backend='hccl')"
        )
    return get_name(dist.get_rank(group))
