"""moe_fx: turn single-device Mixture-of-Experts models into expert-parallel ones, by a
torch.compile pass.

    model = torch.compile(model, backend=moe_fx.backend)
"""

from moe_fx import config
from moe_fx.backend import RecordedGraph, backend, recording
from moe_fx.checkpoint import ShardedLoad, TensorRead, load_sharded
from moe_fx.errors import (
    CollectiveTimeoutError, MoEFxError, OutOfStepError, RankMismatchError, RoutingError, UnsupportedMoEError,
)
from moe_fx.explain import ExplainReport, explain
from moe_fx.prepare import PrepareReport, prepare, prepare_report
from moe_fx.runtime.comm import destroy_process_group
from moe_fx.runtime.guard import reset_call_counts
from moe_fx.parallel import average_expert_gradients, expert_parallel_parameters
from moe_fx.shard import ExpertShard, shard_experts

__all__ = [
    "CollectiveTimeoutError",
    "ExpertShard",
    "ExplainReport",
    "MoEFxError",
    "OutOfStepError",
    "PrepareReport",
    "RankMismatchError",
    "RecordedGraph",
    "RoutingError",
    "ShardedLoad",
    "TensorRead",
    "UnsupportedMoEError",
    "average_expert_gradients",
    "backend",
    "config",
    "destroy_process_group",
    "expert_parallel_parameters",
    "explain",
    "load_sharded",
    "prepare",
    "prepare_report",
    "recording",
    "reset_call_counts",
    "shard_experts",
]
