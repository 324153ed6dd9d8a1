"""moe_fx.config: every option checked when it is set (moe_fx/config_check.py), and lowering_overrides
patterns that match no block reported (single process, no compile)."""

from __future__ import annotations

import importlib.util
import logging
import math
import sys

import pytest

import moe_fx
from moe_fx import config
from moe_fx.config_check import CHECKS, STRATEGIES, check_config, warn_unmatched_overrides
from moe_fx.errors import ConfigError, ConfigTypeError
from moe_fx.lowering.base import Strategy

# (option, bad value, error class, what the message must say after "moe_fx.config.<option>=<value!r>")
BAD = [
    ("max_tokens_per_rank", "8", ConfigTypeError, "must be a positive int or None (got str)"),
    ("max_tokens_per_rank", 8.5, ConfigTypeError, "must be a positive int or None (got float)"),
    ("max_tokens_per_rank", True, ConfigTypeError, "must be a positive int or None (got bool)"),
    ("max_tokens_per_rank", 0, ConfigError, "must be a positive int or None"),
    ("ep_overlap_chunks", 0, ConfigError, "must be a positive int"),
    ("ep_overlap_chunks", None, ConfigTypeError, "must be a positive int (got NoneType)"),
    ("auto_allgather_ep_per_topk", "two", ConfigTypeError, "must be a number >= 0 (got str)"),
    ("auto_allgather_ep_per_topk", math.nan, ConfigError, "must be a finite number >= 0"),
    ("auto_allgather_ep_per_topk", -1.0, ConfigError, "must be a finite number >= 0"),
    ("auto_mc2_max_tokens", -1, ConfigError, "must be a positive int"),
    ("auto_mc2_max_tokens", None, ConfigTypeError, "must be a positive int (got NoneType)"),
    ("mc2_transport", "nccl", ConfigError, "is not one of ['all_to_all', 'symm_mem']"),
    ("lowering", "alltoall", ConfigError, "is not one of ['auto', 'allgather', 'all2allv', 'mc2', 'mc2|all2allv']"),
    ("lowering", "local", ConfigError, "is not one of ['auto', 'allgather'"),
    ("on_unmatched", "ignore", ConfigError, "is not one of ['warn', 'raise']"),
    ("on_unmatched", True, ConfigTypeError, "is not one of ['warn', 'raise']"),
    ("tokens", "sharded", ConfigError, "is not one of ['per_rank', 'replicated']"),
    ("inner_mode", "fast", ConfigError, "is not one of [None, 'default'"),
    ("inner_backend", None, ConfigTypeError, "must be a backend name"),
    ("inner_backend", "moe_fx", ConfigError, "is not allowed: the rewritten graph cannot be compiled by moe_fx"),
    ("ep_group", 0, ConfigTypeError, "must be None or a process group's name"),
    ("tp_group", "", ConfigTypeError, "must be None or a process group's name"),
    ("auto_runtime_switch", "no", ConfigTypeError, "must be True or False (got str)"),
    ("rewrite_without_ep", 1, ConfigTypeError, "must be True or False (got int)"),
    ("lowering_overrides", ["model.*"], ConfigTypeError, "must be a dict {fnmatch pattern"),
    ("npu.force", None, ConfigTypeError, "must be True or False"),
    ("npu.soc", "A5", ConfigError, "is not one of [None, 'A2', 'A3']"),
    ("npu.soc", 910, ConfigTypeError, "is not one of [None, 'A2', 'A3']"),
    ("npu.mc2_version", "v3", ConfigError, "is not one of ['auto', 'v1', 'v2']"),
    ("npu.compiler_config", "max-autotune", ConfigTypeError, "must be None or a torchair.CompilerConfig"),
]


def _get(option: str):
    obj = config
    for part in option.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("option,value,error,says", BAD, ids=[f"{o}={v!r}" for o, v, *_ in BAD])
def test_bad_values_are_refused_when_set(option, value, error, says):
    before = _get(option)
    message = f"moe_fx.config.{option}={value!r} {says}"
    with pytest.raises(error) as patched:
        config.patch({option: value})
    assert message in str(patched.value)
    with pytest.raises(error) as assigned:  # plain assignment, nested options through their namespace
        owner, _, leaf = option.rpartition(".")
        setattr(getattr(config, owner) if owner else config, leaf, value)
    assert message in str(assigned.value)
    assert _get(option) == before or (before != before)  # unchanged (nan is never equal to itself)


@pytest.mark.parametrize("overrides,says", [
    ({"model.layers.0.*": "alltoall"}, "lowering_overrides['model.layers.0.*']='alltoall' is not one of ['auto'"),
    ({3: "mc2"}, "lowering_overrides: pattern 3 must be a non-empty str"),
])
def test_lowering_overrides_entries_are_checked(overrides, says):
    with pytest.raises(ConfigError, match="moe_fx.config.") as info:
        config.lowering_overrides = overrides
    assert says in str(info.value)
    assert config.lowering_overrides == {}


def test_error_types_stay_value_and_type_errors():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, moe_fx.MoEFxError)
    assert issubclass(ConfigTypeError, TypeError) and issubclass(ConfigTypeError, ConfigError)


def test_good_values_are_kept_and_restored():
    good = {"max_tokens_per_rank": 8, "auto_allgather_ep_per_topk": 2, "auto_mc2_max_tokens": 1,
            "inner_mode": "max-autotune", "ep_group": "0", "npu.soc": "A3", "npu.mc2_version": "v1",
            "lowering_overrides": {"model.layers.0.*": "mc2|all2allv", "*": "auto"}, "mc2_transport": "symm_mem"}
    with config.patch(good):
        assert {k: _get(k) for k in good} == good
    assert (config.max_tokens_per_rank, config.npu.soc, config.lowering_overrides) == (None, None, {})


def test_a_failing_patch_changes_nothing():
    """torch's patch applies its changes one by one: a bad later one must not leave an earlier one set."""
    with pytest.raises(ConfigTypeError, match="max_tokens_per_rank='8'"):
        with config.patch(lowering="mc2", max_tokens_per_rank="8"):
            pass
    assert config.lowering == "auto"


def test_every_option_has_a_check_and_strategies_match():
    assert set(CHECKS) == set(config._config)
    assert set(STRATEGIES) == {s.value for s in Strategy} - {"local"}


def test_check_config_catches_a_dict_edited_in_place():
    with config.patch(lowering_overrides={}):
        check_config()
        config.lowering_overrides["model.*"] = "fastest"
        with pytest.raises(ConfigError, match=r"lowering_overrides\['model\.\*'\]='fastest' is not one of"):
            check_config()
    check_config()


def test_bad_environment_variable_fails_import_naming_it(monkeypatch):
    """The env defaults are checked when the config module is built (a fresh copy of moe_fx/config.py)."""
    monkeypatch.setenv("MOE_FX_ON_UNMATCHED", "ignore")
    spec = importlib.util.spec_from_file_location("moe_fx_config_copy", config.__file__)
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, copy)
    with pytest.raises(ConfigError) as info:
        spec.loader.exec_module(copy)
    assert str(info.value) == ("moe_fx.config.on_unmatched='ignore' is not one of ['warn', 'raise'] "
                               "(from the environment variable MOE_FX_ON_UNMATCHED)")


BLOCKS = ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def test_unmatched_override_pattern_is_named(caplog):
    overrides = {"model.layers.1.*": "mc2", "model.layer.0.*": "allgather", "*.experts": "auto"}
    with config.patch(lowering_overrides=overrides), caplog.at_level(logging.WARNING, logger="moe_fx.config_check"):
        assert warn_unmatched_overrides(BLOCKS) == ["model.layer.0.*"]
    (record,) = caplog.records
    assert "lowering_overrides pattern 'model.layer.0.*' matches none of the MoE blocks" in record.getMessage()
    assert ", ".join(BLOCKS) in record.getMessage()


def test_graph_without_blocks_or_overrides_says_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="moe_fx.config_check"):
        assert warn_unmatched_overrides(BLOCKS) == []
        with config.patch(lowering_overrides={"model.layer.0.*": "mc2"}):
            assert warn_unmatched_overrides([]) == []
    assert not caplog.records
