"""Data-parallel wrappers next to expert parallelism: which parameters to leave alone, and the
factor expert gradients need.

    moe_fx.shard_experts(model)
    names = [n for n, _ in moe_fx.expert_parallel_parameters(model)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    moe_fx.average_expert_gradients(model)
    model = DistributedDataParallel(model)

Sharded expert parameters differ per rank (rank r holds experts [r*e, (r+1)*e)): a wrapper that
averaged their gradients, or sharded them again, would mix different experts.

The factor. Each rank r backpropagates its own loss L_r. DDP averages every other parameter's
gradient over its group of N ranks: (1/N) sum_r dL_r/dtheta, the gradient of the mean loss. An
expert's rows come from every rank of the EP group, and the combine's backward sends each row's
gradient back to the expert's owner, so an expert parameter's gradient arrives already summed
over the EP group: sum_r dL_r/dW (tests/test_training.py checks this). The mean loss needs
(1/N) of that, so ``average_expert_gradients`` divides each expert gradient by N as it arrives
(a tensor hook, so gradient accumulation over micro-batches stays right). Optimizers that
normalize the step (Adam) hide a missing factor almost entirely; SGD, gradient clipping and weight
decay do not.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from moe_fx.errors import MoEFxError
from moe_fx.shard import expert_shard


def expert_parallel_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter of ``model`` that ``moe_fx.shard_experts`` (or
    ``moe_fx.load_sharded``) made expert-parallel; names as ``model.named_parameters()`` gives
    them. Empty for an unsharded model (ep == 1: every parameter is replicated)."""
    return [(n, p) for n, p in model.named_parameters() if expert_shard(p) is not None]


def average_expert_gradients(model: nn.Module, dp_size: int | None = None) -> list[RemovableHandle]:
    """Divide every expert-parallel parameter's gradient by ``dp_size`` as it is computed, so it
    is the gradient of the mean of the ranks' losses, as DDP makes the other gradients.

    ``dp_size``: the size of the data-parallel wrapper's group, the N DDP divides by; None means
    the default group's size. It must equal the EP group's size: ranks holding the same experts
    (world = replicas * ep) would also need their expert gradients summed over the replica group,
    which this helper does not do. Returns the hook handles.
    """
    params = expert_parallel_parameters(model)
    if not params:
        raise MoEFxError("average_expert_gradients: the model has no sharded expert parameters "
                         "(call moe_fx.shard_experts first)")
    if dp_size is None:
        dp_size = dist.get_world_size() if dist.is_initialized() else 1
    ep = {expert_shard(p).ep_size for _, p in params}
    if ep != {dp_size}:
        raise MoEFxError(
            f"average_expert_gradients: experts are sharded over {sorted(ep)} ranks but the data-parallel "
            f"group has {dp_size}; expert replicas across EP groups are not supported (their gradients "
            "would also need a sum over the replica group)"
        )
    scale = 1.0 / dp_size
    # Stubs of other ranks' experts (a prepared block's ModuleList) take no gradient.
    return [p.register_hook(lambda g: g * scale) for _, p in params if p.requires_grad]

