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
