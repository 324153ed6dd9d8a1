"""Runtime ops: the communication and data-dependent steps of the EP lowerings.

Each is a ``torch.library`` custom op in the ``moe_fx`` namespace with a fake implementation, so
inductor (and torchair) see one opaque kernel with the right output shapes. Importing this package
registers them.
"""

from moe_fx.runtime import ops  # noqa: F401  (registers torch.ops.moe_fx.*)
