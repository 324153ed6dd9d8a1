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

A checkpoint that cannot be used (no such directory, no config.json, a truncated or garbage
safetensors file, a tensor whose shape is not the model's) raises ``CheckpointError`` naming the
file, the checkpoint tensor and the shapes, before the tensor is read.
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

from moe_fx.errors import CheckpointError, MoEFxError
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

    config = _read_config(transformers, model_dir, config_kwargs)
    architectures = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    if model_cls is None:
        raise CheckpointError(f"{model_dir}: config.json names no transformers architecture ({architectures!r})")
    with _parameters_on_meta():
        model = model_cls(config)
    sharded = shard_experts(model, ep_group)
    loaded = ShardedLoad(model=model, sharded=sharded)
    _materialize(model, model_dir, dtype, loaded.reads)
    model.eval()
    return loaded


def _read_config(transformers, model_dir: str, config_kwargs: dict):
    """The saved config, read from the directory only (never the hub), with ``config_kwargs`` applied."""
    if not os.path.isdir(model_dir):
        raise CheckpointError(
            f"moe_fx.load_sharded: {model_dir!r} is not a directory (it reads the directory save_pretrained "
            "wrote: config.json and *.safetensors)"
        )
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file (load_sharded reads the directory save_pretrained wrote)")
    try:
        return transformers.AutoConfig.from_pretrained(model_dir, **config_kwargs)
    except (OSError, ValueError, KeyError) as exc:  # json errors are ValueErrors
        given = f" with {config_kwargs}" if config_kwargs else ""
        raise CheckpointError(f"{path}: transformers cannot build a config from it{given}: {exc}") from exc


@contextlib.contextmanager
def _reading(path: str, key: str | None = None) -> Iterator[None]:
    """File-system and safetensors errors inside the block -> ``CheckpointError`` naming the file
    (and checkpoint tensor ``key``); safetensors' own messages name neither."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as exc:
        what = f"checkpoint tensor {key!r} in " if key is not None else ""
        raise CheckpointError(f"cannot read {what}{path}: {exc}") from exc


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
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({type(exc).__name__}: {exc})") from exc
        for key, name in weight_map.items():
            if not os.path.isfile(os.path.join(model_dir, name)):
                raise CheckpointError(f"{os.path.join(model_dir, name)}: no such file ({index} names it for tensor {key!r})")
        return dict(weight_map)
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors checkpoint (save it with save_pretrained)")
    out = {}
    for name in files:
        path = os.path.join(model_dir, name)
        with _reading(path), safe_open(path, "pt") as f:  # reads the header only
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
            raise CheckpointError(f"checkpoint key {key!r} matches {pattern!r} but names no expert index")
        entry = plan.setdefault(target, _PerExpert(converter=converter))
        entry.keys.setdefault(pattern, {})[int(expert.group(1))] = key
    return plan


class _Reader:
    """Open safetensors files, reading whole tensors or rows of them, and recording each read."""

    def __init__(self, model_dir: str, files: dict[str, str], reads: list[TensorRead], stack: contextlib.ExitStack):
        self.model_dir, self.files, self.reads, self.stack = model_dir, files, reads, stack
        self.handles: dict[str, object] = {}

    def _path(self, key: str) -> str:
        return os.path.join(self.model_dir, self.files[key])

    def _slice(self, key: str, expected: list[int | None], target: str):
        """(open file, safetensors' lazy slice of ``key``), after checking its shape against
        ``expected`` (None: any size) for model tensor ``target``; none of its data is read yet."""
        from safetensors import safe_open

        path = self._path(key)
        with _reading(path, key):
            if path not in self.handles:
                self.handles[path] = self.stack.enter_context(safe_open(path, "pt"))
            part = self.handles[path].get_slice(key)
            found = list(part.get_shape())
        if len(found) != len(expected) or any(w is not None and w != f for w, f in zip(expected, found)):
            want = "[" + ", ".join("*" if w is None else str(w) for w in expected) + "]"
            raise CheckpointError(
                f"{path}: checkpoint tensor {key!r} has shape {found}, but the model's {target} needs {want}"
            )
        return self.handles[path], part

    def whole(self, key: str, expected: list[int | None], target: str) -> torch.Tensor:
        handle, _ = self._slice(key, expected, target)
        with _reading(self._path(key), key):
            tensor = handle.get_tensor(key)
        self.reads.append(TensorRead(key=key, file=self.files[key], rows=None, nbytes=tensor.nbytes))
        return tensor

    def rows(self, key: str, shard: ExpertShard, expected: list[int], target: str) -> torch.Tensor:
        _, part = self._slice(key, [shard.num_experts, *expected[1:]], f"{target} (MoE block {shard.block!r}, all experts)")
        # safetensors hands back a view into a map of the whole tensor: only these rows' pages are
        # read, but the view would keep the whole tensor mapped. Copy the rows out.
        with _reading(self._path(key), key):
            tensor = part[shard.start : shard.stop].clone()
        rows = (shard.start, shard.stop)
        self.reads.append(TensorRead(key=key, file=self.files[key], rows=rows, nbytes=tensor.nbytes))
        return tensor


def _read_per_expert(reader: _Reader, name: str, source: _PerExpert, shard: ExpertShard | None,
                     shape: list[int]) -> torch.Tensor:
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
    num_experts = shard.num_experts if shard is not None else shape[0]
    experts = range(shard.start, shard.stop) if shard is not None else range(shape[0])
    patterns = source.converter.source_patterns
    # one expert's tensor: the model's [e, ...] without e, the joined dim split evenly between the patterns
    expected: list[int | None] = list(shape[1:])
    if concat is not None:
        d = concat.dim - 1 if concat.dim > 0 else concat.dim
        expected[d] = expected[d] // len(patterns) if expected[d] % len(patterns) == 0 else None
    parts = []
    for pattern in patterns:
        by_expert = source.keys.get(pattern, {})
        if sorted(by_expert) != list(range(num_experts)):
            raise CheckpointError(
                f"{name}: the checkpoint has {pattern!r} tensors for experts {sorted(by_expert)}, expected "
                f"0..{num_experts - 1}"
            )
        parts.append(torch.stack([reader.whole(by_expert[e], expected, f"{name} (expert {e})") for e in experts]))
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
            shape = list(meta.shape)
            if isinstance(source, _PerExpert):
                value = _read_per_expert(reader, name, source, shard, shape)
            elif shard is not None:
                value = reader.rows(source.key, shard, shape, name)
            else:
                value = reader.whole(source.key, shape, name)
            if list(value.shape) != shape:  # the pieces fit but do not join to the model's shape
                raise CheckpointError(f"{name}: the checkpoint gives shape {list(value.shape)}, the model expects {shape}")
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
        raise CheckpointError(f"{model_dir}: the checkpoint holds no tensor for {missing[:8]} ({len(missing)} in all)")
