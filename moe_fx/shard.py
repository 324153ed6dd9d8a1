"""``moe_fx.shard_experts``: keep only this rank's block of every MoE block's expert weights.

    model = build_my_moe_model()
    moe_fx.shard_experts(model)                       # rank r keeps experts [r*E/ep, (r+1)*E/ep)
    model = torch.compile(model, backend=moe_fx.backend, fullgraph=True)

Which parameters are expert parameters: a module whose direct parameters include at least two 3-D
tensors with the same leading size E >= 2 (gate_up [E, 2I, H] and down [E, H, I], in any layout)
is an experts module; every direct parameter of it whose leading size is E and that has 2 or more
dimensions (weights [E, N, K], biases [E, N]) is replaced by a new Parameter holding rows
[start, start + e) of it, e = E / ep, copied out so the full tensor's storage is freed (unless
something else, e.g. an optimizer, still holds it). Each new Parameter carries an ``ExpertShard``
record; the backend reads it from the graph's placeholders, uses E from the record (the router
still produces global ids in [0, E)) and feeds the local block to the grouped matmuls unsliced.
A sharded parameter that the backend cannot rewrite is an error at compile time, never a guess.

transformers experts modules keep a ``num_experts`` attribute that their traced code uses as the
number of weight groups (``histc(bins=num_experts)``); it is set to e, as transformers' own expert
parallelism does, so the traced code still type-checks against the [e, ...] weights.

Modules whose code reads ``num_experts`` as the router's id range are refused before anything
changes: an expert loop (``one_hot(ids, num_classes=num_experts)``, ``for e in range(num_experts)``,
transformers' ``experts_implementation="eager"``), a dense or split form. With e there, the loop's
``one_hot`` would fail on the ids >= e the router still produces (or index experts the rank lacks);
with E, it would index rows [e, E) of the [e, ...] weights. moe_fx rewrites such blocks
expert-parallel unsharded (every rank holds every expert, computes its own).

A block ``moe_fx.prepare`` gave its loop over an ``nn.ModuleList`` of experts keeps this rank's
experts; the others' parameters become one-element stubs expanded to their shapes (the traced
loop still sees every expert; the rewrite stacks the local ones only). Prepared stacked experts
(GPT-OSS) are refused: their loop indexes all E.

After sharding the eager model raises ``MoEFxError`` (its experts code would need every expert):
only the model compiled with ``moe_fx.backend`` runs. Shard before compiling.
"""

from __future__ import annotations

from dataclasses import dataclass

import inspect
import logging

import torch
import torch.distributed as dist
from torch import nn

from moe_fx.errors import MoEFxError, UnsupportedMoEError

SHARD_ATTR = "_moe_fx_expert_shard"
PREPARED_ATTR = "_moe_fx_prepared"  # moe_fx.prepare's plan on a module (moe_fx/prepare.py imports shard's names, not back)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ExpertShard:
    """The block of experts a sharded parameter holds: rows [start, stop) of E."""

    block: str  # module path of the experts module
    num_experts: int  # E, the router's id range
    start: int
    num_local: int  # e = E / ep
    ep_size: int
    # The block is a transformers experts module whose ``num_experts`` shard_experts set from E to e:
    # its traced code reads e where the model reads E (histc's bins, the EP sentinel guards ids >= E).
    local_count: bool = False

    @property
    def stop(self) -> int:
        return self.start + self.num_local

    def describe(self) -> str:
        return f"experts {self.start}..{self.stop - 1} of {self.num_experts}"


@dataclass(frozen=True, kw_only=True)
class ShardedBlock:
    block: str
    shard: ExpertShard
    params: tuple[str, ...]  # names of the sharded parameters in the experts module
    bytes_before: int  # expert bytes this rank held before (measured)
    bytes_after: int  # expert bytes this rank holds now (measured)


def expert_shard(tensor: object) -> ExpertShard | None:
    """The ``ExpertShard`` of a parameter made by ``shard_experts``, else None."""
    return getattr(tensor, SHARD_ATTR, None)


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``: what they really keep alive (a view of a
    full tensor counts the full storage)."""
    seen: dict[tuple, int] = {}
    for t in tensors:
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def find_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module, int, tuple[str, ...]]]:
    """(path, module, E, names of its per-expert parameters) of every experts module (rule above)."""
    found = []
    for path, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        leading = [p.shape[0] for p in params.values() if p.dim() == 3]
        candidates = {e for e in leading if leading.count(e) >= 2 and e >= 2}
        if len(candidates) != 1:
            continue
        e = candidates.pop()
        names = tuple(n for n, p in params.items() if p.dim() >= 2 and p.shape[0] == e)
        found.append((path or "<root module>", module, e, names))
    return found


def _group_rank_and_size(ep_group: dist.ProcessGroup | str | None) -> tuple[int, int]:
    if isinstance(ep_group, str):
        from moe_fx.runtime.comm import resolve_group

        ep_group = resolve_group(ep_group)
    if ep_group is None:
        from moe_fx.runtime.comm import current_ep_group

        ep_group = current_ep_group()
    if ep_group is None:
        return 0, 1
    return ep_group.rank(), ep_group.size()


def shard_experts(model: nn.Module, ep_group: dist.ProcessGroup | str | None = None) -> list[ShardedBlock]:
    """Keep only this rank's block of experts in every experts module of ``model`` (in place).

    ``ep_group``: a process group or its name; None means ``moe_fx.config.ep_group``, else the
    default group. It must be the group the model is compiled with. Without one (ep == 1) nothing
    changes. Works on meta-device models too (``moe_fx.load_sharded`` shards before it loads).
    Returns one ``ShardedBlock`` per experts module.
    """
    rank, ep = _group_rank_and_size(ep_group)
    if ep == 1:
        return []
    found = find_experts_modules(model)
    lists = _prepared_expert_lists(model)
    if not found and not lists:
        log.warning(
            "moe_fx.shard_experts: %s holds no experts module (two or more [E, ...] parameters, E >= 2), so "
            "nothing was sharded. Experts kept as an nn.ModuleList of modules stay whole on every rank (moe_fx "
            "still runs them expert-parallel), unless moe_fx.prepare gave their block its loop.", type(model).__name__,
        )
    for path, module, e, names in found:  # every block is checked before any is changed
        if any(expert_shard(getattr(module, n)) is not None for n in names):
            raise MoEFxError(f"MoE block {path!r} is already sharded (moe_fx.shard_experts was called twice)")
        refusal = _reads_expert_count(module, e)
        if refusal is not None:
            why, fix = refusal
            raise UnsupportedMoEError(
                f"MoE block {path!r} ({type(module).__name__}): {why}. With {e // ep} of its {e} experts on this "
                f"rank that code would see router ids it holds no experts for, so moe_fx.shard_experts refuses it "
                f"(nothing was sharded). {fix}"
            )
        if e % ep:
            raise UnsupportedMoEError(
                f"MoE block {path!r}: {e} experts cannot be split evenly over an expert-parallel group of "
                f"{ep} ranks ({e} % {ep} = {e % ep}). Use a group whose size divides {e}."
            )
    for path, _, experts in lists:
        if any(expert_shard(p) is not None for p in experts.parameters()):
            raise MoEFxError(f"MoE block {path!r} is already sharded (moe_fx.shard_experts was called twice)")
        if len(experts) % ep:
            raise UnsupportedMoEError(
                f"MoE block {path!r}: {len(experts)} experts cannot be split evenly over an expert-parallel group "
                f"of {ep} ranks ({len(experts)} % {ep} = {len(experts) % ep}). Use a group whose size divides it."
            )
    done = [_shard_expert_list(path, block, experts, rank, ep) for path, block, experts in lists]
    for path, module, e, names in found:
        local = e // ep
        count = isinstance(getattr(module, "num_experts", None), int) and module.num_experts == e
        shard = ExpertShard(block=path, num_experts=e, start=rank * local, num_local=local, ep_size=ep,
                            local_count=count and _is_hf_experts(module))
        before = held_bytes(getattr(module, n) for n in names)
        for name in names:
            full = getattr(module, name)
            with torch.no_grad():
                block = full.detach()[shard.start : shard.stop].clone()  # a copy: the full storage is freed
            replace_param(module, name, block, shard)
        if count:
            module.num_experts = local
        module.register_forward_pre_hook(_EagerGuard(shard))
        done.append(ShardedBlock(block=path, shard=shard, params=names, bytes_before=before,
                                 bytes_after=held_bytes(getattr(module, n) for n in names)))
    return done


def _prepared_expert_lists(model: nn.Module) -> list[tuple[str, nn.Module, nn.ModuleList]]:
    """(path of the experts, block, experts) of every block ``moe_fx.prepare`` gave a loop over an
    nn.ModuleList: moe_fx rewrites that loop and reads only the local experts (stacked per call)."""
    out = []
    for path, module in model.named_modules():
        plan = getattr(module, PREPARED_ATTR, None)
        if plan is not None and plan.experts:
            out.append((f"{path}.{plan.experts}" if path else plan.experts, module, getattr(module, plan.experts)))
    return out


def _shard_expert_list(path: str, block: nn.Module, experts: nn.ModuleList, rank: int, ep: int) -> ShardedBlock:
    """Keep this rank's experts of a prepared block's ModuleList; every other expert's parameters
    become stubs of one element expanded to their shape (the traced loop still sees every expert's
    shapes; the rewrite never reads them). All carry the ExpertShard record: the backend checks the
    compile-time group against it, and data-parallel wrappers leave them alone."""
    e = len(experts)
    local = e // ep
    shard = ExpertShard(block=path, num_experts=e, start=rank * local, num_local=local, ep_size=ep)
    before = held_bytes(experts.parameters())
    names = []
    for j, expert in enumerate(experts):
        for name, param in list(expert.named_parameters()):
            owner = expert.get_submodule(name.rpartition(".")[0]) if "." in name else expert
            leaf = name.rpartition(".")[2]
            if shard.start <= j < shard.stop:
                setattr(param, SHARD_ATTR, shard)
            else:
                stub = torch.zeros((), dtype=param.dtype, device=param.device).expand(param.shape)
                owner._parameters[leaf] = nn.Parameter(stub, requires_grad=False)
                setattr(owner._parameters[leaf], SHARD_ATTR, shard)
            names.append(f"{j}.{name}")
    block.register_forward_pre_hook(_EagerGuard(shard))
    return ShardedBlock(block=path, shard=shard, params=tuple(names), bytes_before=before,
                        bytes_after=held_bytes(experts.parameters()))


# transformers' experts implementations whose code moe_fx rewrites whole (hf_experts.py); "eager"
# is an expert loop over one_hot(num_classes=num_experts + 1), kernels ("deepgemm", ...) index every expert.
_HF_SHARDABLE = ("grouped_mm", "batched_mm")


def _hf_experts_implementation(module: nn.Module) -> str | None:
    """The ``experts_implementation`` of a transformers experts module (``@use_experts_implementation``)."""
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
    return impl if impl is not None and hasattr(type(module).forward, "__wrapped__") else None


def _is_hf_experts(module: nn.Module) -> bool:
    """A transformers experts module in a form moe_fx rewrites whole (hf_experts.py)."""
    return _hf_experts_implementation(module) in _HF_SHARDABLE


def _reads_expert_count(module: nn.Module, e: int) -> tuple[str, str] | None:
    """(why, what to do) if ``module``'s own code would break with fewer than its e experts, else None.
    It does when it reads ``num_experts`` as the router's id range, unless it is a transformers
    experts module in a form moe_fx rewrites whole."""
    if hasattr(module, PREPARED_ATTR):
        return (f"moe_fx.prepare gave it a static loop over all {e} experts (a loop cannot run on a block of them)",
                "Compile it unsharded: moe_fx still runs it expert-parallel, each rank computing its own experts.")
    impl = _hf_experts_implementation(module)
    if impl is not None:
        if impl in _HF_SHARDABLE:
            return None
        return (f"its transformers experts_implementation={impl!r} runs its own loop or kernel over all {e} experts",
                f"Set experts_implementation to one of {list(_HF_SHARDABLE)} before sharding.")
    if getattr(module, "num_experts", None) != e:
        return None
    unsharded = "Compile it unsharded: moe_fx still runs it expert-parallel, each rank computing its own experts."
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return f"its forward's source cannot be read to check how it uses num_experts={e}", unsharded
    if "num_experts" in source:
        return (f"its forward reads num_experts={e} (e.g. one_hot(num_classes=num_experts), histc(bins=num_experts) "
                "or a `for e in range(num_experts)` expert loop)", unsharded)
    return None


def replace_param(module: nn.Module, name: str, value: torch.Tensor, shard: ExpertShard | None) -> None:
    """Replace parameter ``name`` of ``module`` by a new Parameter holding ``value`` (and the shard
    record, if any), keeping its requires_grad."""
    old = module._parameters[name]
    param = nn.Parameter(value, requires_grad=old.requires_grad)
    if shard is not None:
        setattr(param, SHARD_ATTR, shard)
    module._parameters[name] = param


class _EagerGuard:
    """Forward pre-hook of a sharded experts module: the eager forward would index experts this
    rank no longer holds. Under dynamo (the moe_fx backend rewrites the block) it does nothing."""

    def __init__(self, shard: ExpertShard):
        self.shard = shard

    def __call__(self, module: nn.Module, args) -> None:
        if torch.compiler.is_compiling():
            return
        s = self.shard
        raise MoEFxError(
            f"MoE block {s.block!r} holds only {s.describe()} on this rank (moe_fx.shard_experts, ep "
            f"{s.ep_size}); its eager forward needs every expert. Run the model compiled: "
            "torch.compile(model, backend=moe_fx.backend)"
        )
