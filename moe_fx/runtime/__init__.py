"""Runtime ops: the communication and data-dependent steps of the EP lowerings.

Each is a ``torch.library`` custom op in the ``moe_fx`` namespace with a fake implementation and
an autograd formula, so inductor (and torchair) see one opaque kernel with the right output shapes
and a training step stays expert-parallel. One module per strategy; importing this package
registers them all.
"""

from moe_fx.runtime import (  # noqa: F401  (registers torch.ops.moe_fx.*)
    all2allv, allgather, gather, grouped_mm, guard, mc2, row_collectives, switch, symm_mem, unsort,
)
