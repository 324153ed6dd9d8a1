"""Exceptions moe_fx raises. Messages name the MoE block, the sizes involved and the fix."""


class MoEFxError(Exception):
    """Base class of every error moe_fx raises on purpose."""


class UnsupportedMoEError(MoEFxError, ValueError):
    """An MoE block cannot be rewritten as configured (sizes, group, form)."""


class ConfigError(MoEFxError, ValueError):
    """A ``moe_fx.config`` option set to a value outside its allowed values; names the option."""


class ConfigTypeError(ConfigError, TypeError):
    """A ``moe_fx.config`` option set to a value of the wrong type (also a ``ConfigError``)."""


class CheckpointError(MoEFxError, ValueError):
    """``moe_fx.load_sharded`` cannot use a checkpoint (missing, unreadable, or not the model's
    shapes); names the file and the tensor."""


class RoutingError(MoEFxError, ValueError):
    """A rank fed an MoE block expert ids outside [0, E). Raised on every rank of the EP group
    after the ranks' agreement exchange, before any row is exchanged; names the block, the rank,
    the bad id and the valid range."""


class RankMismatchError(MoEFxError, RuntimeError):
    """The ranks of an EP group called an MoE block with different facts (block, call number, E,
    hidden size, top-k, dtype, strategy, capacity, ep). Raised on every rank, before any row is
    exchanged; names the block, the field and each rank's value. (A token count over a static
    capacity raises UnsupportedMoEError, on every rank too.)"""


class CollectiveTimeoutError(MoEFxError, TimeoutError):
    """A peer did not reach an MoE block's agreement exchange within
    ``moe_fx.config.collective_timeout_s``; names the block and the ranks that did not arrive.
    moe_fx's groups are unusable afterwards: end the job on every rank."""


class OutOfStepError(MoEFxError, RuntimeError):
    """An earlier call of a compiled graph raised on this rank after one of its MoE blocks passed
    its entry check, so this rank's exchanges may no longer pair with its peers' (a peer may still
    wait in the exchange this rank left). Raised at this rank's next call of any compiled graph with
    an expert-parallel block, before any collective, instead of exchanging out of step (on CUDA,
    where later calls skip the host check, the exchanges would otherwise pair with the wrong
    calls). End the job on every rank and restart it."""
