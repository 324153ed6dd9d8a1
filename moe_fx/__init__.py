"""moe_fx: turn single-device Mixture-of-Experts models into expert-parallel ones, by a
torch.compile pass.

    model = torch.compile(model, backend=moe_fx.backend)
"""

from moe_fx import config
from moe_fx.backend import RecordedGraph, backend, recording
from moe_fx.checkpoint import ShardedLoad, TensorRead, load_sharded
from moe_fx.errors import MoEFxError, UnsupportedMoEError
from moe_fx.explain import ExplainReport, explain
from moe_fx.parallel import average_expert_gradients, expert_parallel_parameters
from moe_fx.shard import ExpertShard, shard_experts

__all__ = [
    "ExpertShard",
    "ExplainReport",
    "MoEFxError",
    "RecordedGraph",
    "ShardedLoad",
    "TensorRead",
    "UnsupportedMoEError",
    "average_expert_gradients",
    "backend",
    "config",
    "expert_parallel_parameters",
    "explain",
    "load_sharded",
    "recording",
    "shard_experts",
]
