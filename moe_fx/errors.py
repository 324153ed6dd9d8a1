"""Exceptions moe_fx raises. Messages name the MoE block, the sizes involved and the fix."""


class MoEFxError(Exception):
    """Base class of every error moe_fx raises on purpose."""


class UnsupportedMoEError(MoEFxError, ValueError):
    """An MoE block cannot be rewritten as configured (sizes, group, form)."""
