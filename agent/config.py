"""Run configuration: the YAML defaults of `configs/atari.yaml`, a user's `--config` file, then flags.

A resolved config is a flat dict of plain values (saved as `config.yaml` in the run directory and inside every
checkpoint), except `core_kwargs`, the core's sizes: `configs/cores.yaml` for the chosen core, updated by the
file's `core_kwargs` and by the size flags (`hidden_size`, `num_layers`, ...).
"""
from __future__ import annotations

import difflib
from pathlib import Path

import torch
import yaml

from actors.envs import ATARI_PROTOCOLS, resolve_game
from agent.files import atomic_path
from models import check_core_name, make_core

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CORE_SIZE_KEYS = ("hidden_size", "num_layers", "num_heads", "head_dim", "ff_size", "dropout")
ENV_OPTION_KEYS = ("atari_protocol", "sticky_actions", "noop_max", "frameskip", "frame_stack", "fire_reset",
                   "episodic_life", "max_episode_frames")
POSITIVE_INT_KEYS = ("envs_per_actor", "env_threads", "unroll_length", "unrolls_in_flight", "batch_size",
                     "total_frames", "frameskip", "frame_stack")


class ConfigError(ValueError):
    """A config the run cannot use; the message says what to change."""


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping from `path` (an empty file gives {})."""
    with open(path) as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys to values, got a {type(data).__name__}")
    return data


def unknown_key_error(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}.{hint} Known keys: {', '.join(sorted(known))}")


def checked_value(key: str, value, default):
    """`value` converted to the type of `default` (keys that default to null take strings), or a ConfigError."""
    if value is None:
        return None
    if default is None:
        expected, ok = str, isinstance(value, str)
    elif isinstance(default, bool):
        expected, ok = bool, isinstance(value, bool)
    elif isinstance(default, (int, float)):
        expected = type(default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (expected is float or isinstance(value, int))
    else:
        expected, ok = type(default), isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"config key {key!r} must be of type {expected.__name__}, got {value!r}")
    return expected(value)


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; a clear error for names torch rejects or absent CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"invalid device {name!r}: use auto, cpu, cuda or cuda:N ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available: use --device cpu")
    return device


def _validate(config: dict) -> None:
    if config["env"] is None:
        raise ConfigError("no game given: pass --env (e.g. --env Breakout, or --env memory for the toy task)")
    if config["core"] is None:
        raise ConfigError("no core given: pass --core (e.g. --core delta_lstm)")
    try:
        resolve_game(config["env"])
        check_core_name(config["core"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in POSITIVE_INT_KEYS:
        if config[key] < 1:
            raise ConfigError(f"{key} must be at least 1, got {config[key]}")
    if config["atari_protocol"] not in ATARI_PROTOCOLS:
        raise ConfigError(
            f"atari_protocol must be one of {', '.join(ATARI_PROTOCOLS)}, got {config['atari_protocol']!r}"
        )
    if config["num_actors"] < 0:
        raise ConfigError(f"num_actors must be 0 (one per CPU) or more, got {config['num_actors']}")
    if config["batch_size"] % config["envs_per_actor"]:
        raise ConfigError(
            f"batch_size {config['batch_size']} must be a multiple of envs_per_actor {config['envs_per_actor']}: "
            "a batch is made of whole unrolls, each carrying envs_per_actor environments"
        )
    try:
        resolve_device(config["device"])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def resolve_config(config_file: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Defaults, then `config_file`, then `overrides` (flag values; None means "not given").

    Keys of `overrides` in CORE_SIZE_KEYS go into `core_kwargs`. Unknown keys, values of the wrong type, an
    unknown game or core and inconsistent sizes raise ConfigError saying what to change.
    """
    defaults = load_yaml(CONFIG_DIR / "atari.yaml")
    config = dict(defaults)
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"config file {config_file} does not exist")
    file_values = load_yaml(config_file) if config_file is not None else {}
    file_core_kwargs = file_values.pop("core_kwargs", {}) or {}
    flag_values = {k: v for k, v in (overrides or {}).items() if v is not None}
    flag_core_kwargs = {k: flag_values.pop(k) for k in CORE_SIZE_KEYS if k in flag_values}
    for source, values in ((str(config_file), file_values), ("the overrides", flag_values)):
        for key, value in values.items():
            if key not in defaults:
                raise unknown_key_error(key, list(defaults) + ["core_kwargs"], source)
            config[key] = checked_value(key, value, defaults[key])
    _validate(config)
    core_sizes = load_yaml(CONFIG_DIR / "cores.yaml")
    config["core_kwargs"] = {**core_sizes.get(config["core"], {}), **file_core_kwargs, **flag_core_kwargs}
    for key in config["core_kwargs"]:
        if key not in CORE_SIZE_KEYS:
            raise unknown_key_error(key, list(CORE_SIZE_KEYS), "core_kwargs")
    try:
        make_core(config["core"], input_size=1, **config["core_kwargs"])  # inconsistent sizes fail here, early
    except ValueError as e:
        raise ConfigError(f"core_kwargs {config['core_kwargs']}: {e}") from None
    if config["name"] is None:
        config["name"] = f"{resolve_game(config['env'])}_{config['core']}"
    return config


def env_options(config: dict) -> dict:
    """The keyword arguments of `actors.envs.make_vector_env` that a resolved config sets."""
    return {key: config[key] for key in ENV_OPTION_KEYS} | {"num_threads": config["env_threads"]}


def save_config(config: dict, path: str | Path) -> None:
    """Write `config` as YAML, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
