"""moe_fx.load_sharded on checkpoints it cannot use: each error names the file, the checkpoint tensor
and the shapes, instead of safetensors', the hub's or torch.stack's own messages (single process)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_fx
from moe_fx.errors import CheckpointError
from tests.test_shard import _Pair
from tests.tiny_models import build_tiny

# fused [E, ...] expert tensors in one file; one tensor per expert, split over files with an index
FUSED, PER_EXPERT = "gpt_oss", "mixtral"
EXPERT_KEY = "model.layers.0.block_sparse_moe.experts.3.w1.weight"  # mixtral's, in its checkpoint names


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    for key, max_shard in ((FUSED, "5GB"), (PER_EXPERT, "100KB")):
        build_tiny(key).save_pretrained(root / key, max_shard_size=max_shard)
    return root


def _copy(saved, key: str, tmp_path) -> str:
    return shutil.copytree(saved / key, tmp_path / key)


def _file_of(model_dir: str, key: str) -> str:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return os.path.join(model_dir, json.load(f)["weight_map"][key])
    return os.path.join(model_dir, "model.safetensors")


def _replace(model_dir: str, key: str, value: torch.Tensor) -> str:
    path = _file_of(model_dir, key)
    tensors = load_file(path)
    tensors[key] = value
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_missing_directory(tmp_path):
    missing = str(tmp_path / "no_such_checkpoint")
    with pytest.raises(CheckpointError, match=rf"'{re.escape(missing)}' is not a directory"):
        moe_fx.load_sharded(missing)


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path / 'config.json'))}: no such file"):
        moe_fx.load_sharded(str(tmp_path))


@pytest.mark.parametrize("damage", ("truncated", "garbage"))
def test_unreadable_safetensors_file_is_named(saved, tmp_path, damage):
    model_dir = _copy(saved, FUSED, tmp_path)
    path = os.path.join(model_dir, "model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2] if damage == "truncated" else bytes(range(256)) * 4)
    with pytest.raises(CheckpointError) as info:
        moe_fx.load_sharded(model_dir)
    assert str(info.value).startswith(f"cannot read {path}: Error while deserializing header"), str(info.value)


def test_index_naming_a_missing_file(saved, tmp_path):
    model_dir = _copy(saved, PER_EXPERT, tmp_path)
    path = _file_of(model_dir, EXPERT_KEY)
    os.remove(path)
    with pytest.raises(CheckpointError) as info:
        moe_fx.load_sharded(model_dir)
    assert re.match(rf"{re.escape(path)}: no such file \(.*model\.safetensors\.index\.json names it for tensor '",
                    str(info.value)), str(info.value)


def test_wrong_shape_of_a_whole_tensor(saved, tmp_path):
    model_dir = _copy(saved, FUSED, tmp_path)
    path = _replace(model_dir, "model.norm.weight", torch.ones(32))
    with pytest.raises(CheckpointError) as info:
        moe_fx.load_sharded(model_dir)
    assert str(info.value) == (f"{path}: checkpoint tensor 'model.norm.weight' has shape [32], but the model's "
                               "model.norm.weight needs [64]")


def test_wrong_expert_count_of_a_fused_tensor(saved, tmp_path):
    """Read as rows [0, 4) of 8 on rank 0 of two: the whole tensor's shape is checked first."""
    model_dir = _copy(saved, FUSED, tmp_path)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    path = _replace(model_dir, key, torch.zeros(6, 64, 64))
    with pytest.raises(CheckpointError) as info:
        moe_fx.load_sharded(model_dir, ep_group=_Pair())
    assert str(info.value) == (f"{path}: checkpoint tensor {key!r} has shape [6, 64, 64], but the model's {key} "
                               f"(MoE block 'model.layers.0.mlp.experts', all experts) needs [8, 64, 64]")


def test_wrong_shape_of_one_expert_tensor(saved, tmp_path):
    """One per-expert tensor of the wrong size used to fail in torch.stack, naming nothing."""
    model_dir = _copy(saved, PER_EXPERT, tmp_path)
    path = _replace(model_dir, EXPERT_KEY, torch.zeros(16, 64))
    with pytest.raises(CheckpointError) as info:
        moe_fx.load_sharded(model_dir)
    assert str(info.value) == (f"{path}: checkpoint tensor {EXPERT_KEY!r} has shape [16, 64], but the model's "
                               "model.layers.0.mlp.experts.gate_up_proj (expert 3) needs [32, 64]")
