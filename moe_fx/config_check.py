"""Checks of ``moe_fx.config`` values: each option's type and range.

``install_checked_config_module(module)`` (config.py's last line) sends every value an option gets
through ``validate_option``: plain assignment, ``config.patch`` (all changes before any is applied),
``config.load_config``, and the environment variables' values (checked at import).
``check_config()`` checks every current value again; the pass calls it when it compiles a graph,
which also catches a dict edited in place (``config.lowering_overrides[pattern] = strategy``).
``warn_unmatched_overrides(blocks)`` logs each ``lowering_overrides`` pattern that matches none of a
graph's MoE blocks.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Iterable
from types import ModuleType

from torch.utils._config_module import _Config, install_config_module

from moe_fx.errors import ConfigError, ConfigTypeError

log = logging.getLogger(__name__)

# moe_fx.lowering.base.Strategy's values but "local" (ep = 1 is never asked for); a test keeps them equal.
# Not imported from there: config.py imports this module before the lowering package can be imported.
STRATEGIES = ("allgather", "all2allv", "mc2", "mc2|all2allv")
LOWERINGS = ("auto", *STRATEGIES)

_Check = Callable[[str, object], None]


def _name(option: str) -> str:
    return f"moe_fx.config.{option}"


def _one_of(*allowed: object) -> _Check:
    """A value among ``allowed`` (strings, or None), compared with its type: True is not "1"."""

    def check(option: str, value: object) -> None:
        if any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            return
        error = ConfigTypeError if not isinstance(value, str) and value is not None else ConfigError
        raise error(f"{_name(option)}={value!r} is not one of {list(allowed)}")

    return check


def _bool(option: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigTypeError(f"{_name(option)}={value!r} must be True or False (got {type(value).__name__})")


def _int_at_least(low: int, *, optional: bool) -> _Check:
    what = ("a positive int" if low == 1 else f"an int >= {low}") + (" or None" if optional else "")

    def check(option: str, value: object) -> None:
        if value is None and optional:
            return
        # bool is an int subclass, but True tokens is a mistake, not 1
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigTypeError(f"{_name(option)}={value!r} must be {what} (got {type(value).__name__})")
        if value < low:
            raise ConfigError(f"{_name(option)}={value!r} must be {what}")

    return check


def _finite_non_negative(option: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigTypeError(f"{_name(option)}={value!r} must be a number >= 0 (got {type(value).__name__})")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{_name(option)}={value!r} must be a finite number >= 0")


def _positive_seconds(option: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigTypeError(f"{_name(option)}={value!r} must be a number of seconds > 0 (got {type(value).__name__})")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{_name(option)}={value!r} must be a finite number of seconds > 0")


def _group_name(option: str, value: object) -> None:
    if value is None or (isinstance(value, str) and value):
        return
    hint = "; pass its name, pg.group_name" if hasattr(value, "group_name") else ""
    raise ConfigTypeError(f"{_name(option)}={value!r} must be None or a process group's name (a non-empty str){hint}")


def _inner_backend(option: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigTypeError(
            f"{_name(option)}={value!r} must be a backend name (a non-empty str): \"inductor\", \"aot_eager\", "
            "\"eager\", \"torchair\" or a name in torch._dynamo.list_backends()"
        )
    if value == "moe_fx":
        raise ConfigError(f"{_name(option)}='moe_fx' is not allowed: the rewritten graph cannot be compiled by moe_fx itself")


def _inner_mode(option: str, value: object) -> None:
    if value is None:
        return
    from torch._inductor import list_mode_options  # moe_fx already imports inductor

    _one_of(None, *list_mode_options())(option, value)


def _lowering_overrides(option: str, value: object) -> None:
    if not isinstance(value, dict):
        raise ConfigTypeError(
            f"{_name(option)}={value!r} must be a dict {{fnmatch pattern over the experts' module path: strategy}} "
            f"(got {type(value).__name__})"
        )
    for pattern, strategy in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise ConfigTypeError(f"{_name(option)}: pattern {pattern!r} must be a non-empty str (an fnmatch pattern)")
        _one_of(*LOWERINGS)(f"{option}[{pattern!r}]", strategy)


def _compiler_config(option: str, value: object) -> None:
    if value is None:
        return
    try:
        from torchair import CompilerConfig
    except ImportError:  # off Ascend: refuse only what cannot be a CompilerConfig
        if isinstance(value, (str, bytes, int, float, dict, list, tuple)):
            raise ConfigTypeError(f"{_name(option)}={value!r} must be None or a torchair.CompilerConfig") from None
        return
    if not isinstance(value, CompilerConfig):
        raise ConfigTypeError(f"{_name(option)}={value!r} must be None or a torchair.CompilerConfig")


# One check per option of moe_fx/config.py; a test keeps the two lists equal.
CHECKS: dict[str, _Check] = {
    "lowering": _one_of(*LOWERINGS),
    "inner_backend": _inner_backend,
    "tokens": _one_of("per_rank", "replicated"),
    "tp_group": _group_name,
    "lowering_overrides": _lowering_overrides,
    "inner_mode": _inner_mode,
    "ep_group": _group_name,
    "on_unmatched": _one_of("warn", "raise"),
    "mc2_transport": _one_of("all_to_all", "symm_mem"),
    "ep_nccl_protocol": _one_of(None, "Simple", "LL128", "LL"),
    "ep_nccl_bulk_bytes": _int_at_least(0, optional=False),
    "ep_overlap_chunks": _int_at_least(1, optional=False),
    "max_tokens_per_rank": _int_at_least(1, optional=True),
    "auto_mc2_max_tokens": _int_at_least(1, optional=False),
    "auto_allgather_ep_per_topk": _finite_non_negative,
    "auto_runtime_switch": _bool,
    "rewrite_without_ep": _bool,
    "probe_check": _bool,
    "collective_timeout_s": _positive_seconds,
    "rank_check": _one_of("auto", "every_call", "first_call"),
    "npu.force": _bool,
    "npu.soc": _one_of(None, "A2", "A3"),
    "npu.mc2_version": _one_of("auto", "v1", "v2"),
    "npu.compiler_config": _compiler_config,
    "npu.mc2_group": _group_name,
}


def validate_option(option: str, value: object) -> None:
    """Raise ``ConfigError`` (``ConfigTypeError`` for a wrong type) if ``value`` is not allowed for ``option``."""
    CHECKS[option](option, value)


def check_config() -> None:
    """Check every option's current value (the pass calls this once per compiled graph)."""
    from moe_fx import config

    for option in CHECKS:
        validate_option(option, _get(config, option))


def _get(config: ModuleType, option: str) -> object:
    obj: object = config
    for part in option.split("."):
        obj = getattr(obj, part)
    return obj


def warn_unmatched_overrides(blocks: Iterable[str]) -> list[str]:
    """Log a warning for each ``lowering_overrides`` pattern that matches none of ``blocks`` (the
    module paths of one compiled graph's MoE blocks); returns those patterns. A graph without MoE
    blocks says nothing: a model split by graph breaks has graphs that hold none."""
    from moe_fx import config

    blocks = list(blocks)
    if not blocks:
        return []
    unmatched = [p for p in config.lowering_overrides if not any(fnmatch.fnmatchcase(b, p) for b in blocks)]
    for pattern in unmatched:
        log.warning(
            "moe_fx.config.lowering_overrides pattern %r matches none of the MoE blocks of this graph (%s): it "
            "changes nothing here. Patterns are fnmatch patterns over the experts' module path.",
            pattern, ", ".join(blocks),
        )
    return unmatched


def install_checked_config_module(module: ModuleType) -> None:
    """``install_config_module(module)``, then every option is checked as it is set, and the values
    it starts with are checked now: a bad environment variable fails ``import moe_fx``, naming it."""
    # read before install_config_module turns the Config records into entries that forget them
    env_names = {k: list(v.env_name_default) for k, v in vars(module).items()
                 if isinstance(v, _Config) and v.env_name_default}
    install_config_module(module)
    unchecked = set(module._config) ^ set(CHECKS)
    if unchecked:
        raise AssertionError(f"moe_fx.config options without a check, or checks without an option: {sorted(unchecked)}")

    class CheckedConfigModule(type(module)):
        def __setattr__(self, name: str, value: object) -> None:
            if name in CHECKS:
                validate_option(name, value)
            super().__setattr__(name, value)

        def patch(self, *args, **kwargs):
            # every change checked before any is applied: torch's patch leaves the ones set before a
            # failing one in place
            patcher = super().patch(*args, **kwargs)
            for name, value in patcher.changes.items():
                if name in CHECKS:
                    validate_option(name, value)
            return patcher

    object.__setattr__(module, "__class__", CheckedConfigModule)  # past the config module's own __setattr__
    for option in CHECKS:
        try:
            validate_option(option, _get(module, option))
        except ConfigError as exc:
            if option not in env_names:
                raise
            raise type(exc)(f"{exc} (from the environment variable {' or '.join(env_names[option])})") from None
