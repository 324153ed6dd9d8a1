"""``moe_fx.load_sharded``: build a transformers MoE model on the meta device and read from its
safetensors checkpoint only what this rank keeps.

    loaded = moe_fx.load_sharded("/ckpt/Qwen3-30B-A3B", dtype=torch.bfloat16)
    model = torch.compile(loaded.model, backend=moe_fx.backend, fullgraph=True)

Steps: (1) the model is built with every parameter on the meta device (buffers stay real: rotary
tables are computed, not loaded); (2) ``moe_fx.shard_experts`` shrinks every experts module to this
rank's block, still on meta; (3) each parameter is read from the checkpoint: shared layers whole,
routed experts only rows [start, start + e). The full model never exists on one rank.

Checkpoints come in two layouts, and ``save_pretrained`` writes either, depending on the model:
fused 3-D tensors (``...experts.gate_up_proj`` [E, ...]: GPT-OSS, GraniteMoE), read with
``safe_open(...).get_slice(key)[start:stop]``, or one tensor per expert and projection
(``...experts.3.gate_proj.weight``: Mixtral, Qwen2/3-MoE, DeepSeek-V3, OLMoE), of which only the
local experts' keys are read. The mapping from checkpoint keys to the model's fused parameters is
transformers' own conversion mapping (``get_model_conversion_mapping``): renamings, then stacking
the per-expert tensors (MergeModulelist) and joining gate and up (Concatenate). Other conversion
operations are refused with an error rather than guessed.

Every tensor read is recorded in ``ShardedLoad.reads`` (key, file, rows), so callers and tests can
check that no other expert's bytes were touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moe_fx.errors import MoEFxError
from moe_fx.shard import ExpertShard, ShardedBlock, expert_shard, replace_param, shard_experts


@dataclass(frozen=True, kw_only=True)
class TensorRead:
    """One tensor (or rows of one) read from the checkpoint."""

    key: str  # name in the checkpoint
    file: str  # safetensors file, relative to the checkpoint directory
    rows: tuple[int, int] | None  # [start, stop) along dim 0 when only part was read
    nbytes: int


@dataclass(kw_only=True)
class ShardedLoad:
    model: nn.Module
    sharded: list[ShardedBlock]
    reads: list[TensorRead] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class _Whole:
    """A model tensor stored under one checkpoint key, in the model's layout."""

    key: str


@dataclass(kw_only=True)
class _PerExpert:
    """A fused model tensor stored as one checkpoint tensor per expert and source pattern."""

    converter: object  # transformers WeightConverter
    keys: dict[str, dict[int, str]] = field(default_factory=dict)  # source pattern -> expert -> key


def load_sharded(
    model_dir: str, *, ep_group: dist.ProcessGroup | str | None = None, dtype: torch.dtype | None = None,
    **config_kwargs,
) -> ShardedLoad:
    """Build the transformers model saved in ``model_dir`` (``save_pretrained`` output, safetensors)
    with only this rank's experts, reading nothing else of the routed experts.

    ``ep_group`` as in ``moe_fx.shard_experts``; ``dtype`` casts floating tensors as they are read;
    ``config_kwargs`` override the saved config (e.g. ``experts_implementation="grouped_mm"``).
    """
    try:
        import safetensors  # noqa: F401
        import transformers
    except ImportError as exc:
        raise MoEFxError(f"moe_fx.load_sharded needs transformers and safetensors: pip install 'moe_fx[hf]' ({exc})") from exc

    config = transformers.AutoConfig.from_pretrained(model_dir, **config_kwargs)
    architectures = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    if model_cls is None:
        raise MoEFxError(f"{model_dir}: config.json names no transformers architecture ({architectures!r})")
    with _parameters_on_meta():
        model = model_cls(config)
    sharded = shard_experts(model, ep_group)
    loaded = ShardedLoad(model=model, sharded=sharded)
    _materialize(model, model_dir, dtype, loaded.reads)
    model.eval()
    return loaded


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is moved to the meta device as it is registered
    (so the model's weight initialisation runs on meta); buffers are left where they are built."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _checkpoint_files(model_dir: str) -> dict[str, str]:
    """checkpoint key -> safetensors file (relative), from the index when the checkpoint is split."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise MoEFxError(f"{model_dir}: no *.safetensors checkpoint (save it with save_pretrained)")
    out = {}
    for name in files:
        with safe_open(os.path.join(model_dir, name), "pt") as f:  # reads the header only
            out.update(dict.fromkeys(f.keys(), name))
    return out


def _source_plan(model: nn.Module, keys: list[str]) -> dict[str, _Whole | _PerExpert]:
    """model tensor name -> where it is stored, through transformers' conversion mapping."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    plan: dict[str, _Whole | _PerExpert] = {}
    for key in keys:
        renamed, _ = rename_source_key(key, renamings, [])
        target, pattern = rename_source_key(renamed, [], converters, model.base_model_prefix, meta_state)
        if pattern is None:
            plan[target] = _Whole(key=key)
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), renamed)
        if expert is None:
            raise MoEFxError(f"checkpoint key {key!r} matches {pattern!r} but names no expert index")
        entry = plan.setdefault(target, _PerExpert(converter=converter))
        entry.keys.setdefault(pattern, {})[int(expert.group(1))] = key
    return plan


class _Reader:
    """Open safetensors files, reading whole tensors or rows of them, and recording each read."""

    def __init__(self, model_dir: str, files: dict[str, str], reads: list[TensorRead], stack: contextlib.ExitStack):
        self.model_dir, self.files, self.reads, self.stack = model_dir, files, reads, stack
        self.handles: dict[str, object] = {}

    def _handle(self, key: str):
        from safetensors import safe_open

        name = self.files[key]
        if name not in self.handles:
            self.handles[name] = self.stack.enter_context(safe_open(os.path.join(self.model_dir, name), "pt"))
        return self.handles[name]

    def whole(self, key: str) -> torch.Tensor:
        tensor = self._handle(key).get_tensor(key)
        self.reads.append(TensorRead(key=key, file=self.files[key], rows=None, nbytes=tensor.nbytes))
        return tensor

    def rows(self, key: str, shard: ExpertShard) -> torch.Tensor:
        part = self._handle(key).get_slice(key)
        if part.get_shape()[0] != shard.num_experts:
            raise MoEFxError(
                f"MoE block {shard.block!r}: checkpoint tensor {key!r} has shape {part.get_shape()}, "
                f"expected {shard.num_experts} experts along dim 0"
            )
        # safetensors hands back a view into a map of the whole tensor: only these rows' pages are
        # read, but the view would keep the whole tensor mapped. Copy the rows out.
        tensor = part[shard.start : shard.stop].clone()
        rows = (shard.start, shard.stop)
        self.reads.append(TensorRead(key=key, file=self.files[key], rows=rows, nbytes=tensor.nbytes))
        return tensor


def _read_per_expert(reader: _Reader, name: str, source: _PerExpert, shard: ExpertShard | None, size: int) -> torch.Tensor:
    """Stack this rank's experts of each source pattern, then join the patterns (gate, up)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = source.converter.operations
    merge_ok = bool(ops) and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
    concat = ops[1] if len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim != 0 else None
    if not merge_ok or len(ops) > 1 + (concat is not None):
        raise MoEFxError(
            f"{name}: the checkpoint stores it per expert with conversion {ops!r}; moe_fx reads only "
            "MergeModulelist(dim=0) optionally followed by Concatenate(dim>0). Load the full model instead."
        )
    num_experts = shard.num_experts if shard is not None else size
    experts = range(shard.start, shard.stop) if shard is not None else range(size)
    parts = []
    for pattern in source.converter.source_patterns:
        by_expert = source.keys.get(pattern, {})
        if sorted(by_expert) != list(range(num_experts)):
            raise MoEFxError(
                f"{name}: the checkpoint has {pattern!r} tensors for experts {sorted(by_expert)}, expected "
                f"0..{num_experts - 1}"
            )
        parts.append(torch.stack([reader.whole(by_expert[e]) for e in experts]))
    return torch.cat(parts, dim=concat.dim) if concat is not None else parts[0]


def _materialize(model: nn.Module, model_dir: str, dtype: torch.dtype | None, reads: list[TensorRead]) -> None:
    files = _checkpoint_files(model_dir)
    plan = _source_plan(model, list(files))
    buffers = dict(model.named_buffers())
    with contextlib.ExitStack() as stack:
        reader = _Reader(model_dir, files, reads, stack)
        for name, meta in [*model.named_parameters(), *((n, b) for n, b in buffers.items() if n in plan)]:
            source = plan.get(name)
            if source is None:
                continue  # tied weights are tied below; anything else is reported as missing
            shard = expert_shard(meta)
            if isinstance(source, _PerExpert):
                value = _read_per_expert(reader, name, source, shard, meta.shape[0])
            elif shard is not None:
                value = reader.rows(source.key, shard)
            else:
                value = reader.whole(source.key)
            if tuple(value.shape) != tuple(meta.shape):
                raise MoEFxError(f"{name}: the checkpoint gives shape {list(value.shape)}, the model expects {list(meta.shape)}")
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            if name in buffers:
                module._buffers[leaf] = value
            else:
                replace_param(module, leaf, value, shard)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise MoEFxError(f"{model_dir}: the checkpoint holds no tensor for {missing[:8]} ({len(missing)} in all)")
