"""Run configuration for every entry point: the YAML defaults in `configs/` (the one source of defaults), a
user's `--config` file, then flags.

A resolved config is a flat dict of plain values (saved as `config.yaml` in the run directory and inside every
checkpoint). For `agent.train`, `core_kwargs` holds the core's sizes: `configs/cores.yaml` for the chosen core,
updated by the file's `core_kwargs` and by the size flags. Every value is checked before anything expensive
starts: a wrong type, an unknown key or a value that makes no sense raises ConfigError naming the key, where it
came from and the fix.
"""
from __future__ import annotations

import argparse
import difflib
import math
from pathlib import Path

import torch

import configs
from actors.envs import ATARI_PROTOCOLS, resolve_game
from models import check_core_name, make_core
from models.ops import check_backend
from models.policy import TORSO_PRECISIONS, resolve_torso_precision
from runio.files import RunFileError, read_yaml, write_yaml

CONFIG_DIR = Path(configs.__file__).resolve().parent
CORE_SIZE_KEYS = ("hidden_size", "num_layers", "num_heads", "head_dim", "ff_size", "dropout")
SIZE_FLAG_HELP = {
    "hidden_size": "width of the core (LSTM units, fast-weight model width)",
    "num_layers": "stacked layers / fast-weight blocks",
    "num_heads": "fast-weight / attention heads",
    "head_dim": "size of each fast-weight head (agent.train; the supervised models split hidden_size evenly)",
    "ff_size": "feed-forward width of each block",
    "dropout": "dropout rate",
}

# What makes sense for each key, wherever it appears: (test, what the value must be).
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_POSITIVE = (lambda v: v > 0, "greater than 0")
_NON_NEGATIVE = (lambda v: v >= 0, "0 or more")
_PROBABILITY = (lambda v: 0 <= v <= 1, "between 0 and 1")
_OPEN_PROBABILITY = (lambda v: 0 <= v < 1, "at least 0 and below 1")
RANGES = {
    **dict.fromkeys(("envs_per_actor", "env_threads", "unroll_length", "unrolls_in_flight", "batch_size",
                     "total_frames", "frameskip", "frame_stack", "eval_batch_size", "log_every", "segment_len",
                     "sliding_batch_size", "sliding_stride", "hidden_size", "num_layers", "num_heads", "head_dim",
                     "ff_size"), _AT_LEAST_1),
    **dict.fromkeys(("learning_rate", "rmsprop_eps", "adam_eps", "reward_clip", "grad_norm_clip", "actor_cpus",
                     "log_interval_s", "checkpoint_interval_s", "cluster_timeout_s"), _POSITIVE),
    **dict.fromkeys(("num_actors", "noop_max", "max_episode_frames", "baseline_cost", "entropy_cost",
                     "learner_threads", "time_limit_s", "rmsprop_momentum", "warmup_steps", "epochs", "steps",
                     "eval_every", "seed", "data_seed"), _NON_NEGATIVE),
    "discount": _PROBABILITY,
    "dropout": _OPEN_PROBABILITY,
    "rmsprop_alpha": _OPEN_PROBABILITY,
}
# Keys where 0 means "off" although they are otherwise positive (in agent.train and agent.supervised alike).
ZERO_MEANS_OFF = {"grad_norm_clip"}


class ConfigError(ValueError):
    """A config the run cannot use; the message says what to change."""


def load_defaults(name: str) -> dict:
    """The defaults file `configs/<name>`."""
    return read_yaml(CONFIG_DIR / name)


def unknown_key_error(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}.{hint} Known keys: {', '.join(sorted(known))}")


def checked_value(key: str, value, default, where: str):
    """`value` converted to the type of `default` (keys that default to null take strings, lists take lists), or
    a ConfigError. A number written as text in YAML (`1e-4`, which YAML reads as a string) counts as a number."""
    if value is None:
        return None
    if default is None:
        expected, ok = str, isinstance(value, str)
    elif isinstance(default, bool):
        expected, ok = bool, isinstance(value, bool)
    elif isinstance(default, (int, float)):
        expected = type(default)
        if isinstance(value, str):
            try:
                value = float(value) if expected is float else int(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (expected is float or float(value).is_integer()) and math.isfinite(value)
    else:
        expected, ok = type(default), isinstance(value, type(default))
    if not ok:
        kind = {"float": "a number", "int": "a whole number", "bool": "true or false", "str": "a string",
                "list": "a list"}.get(expected.__name__, expected.__name__)
        raise ConfigError(f"config key {key!r} in {where} must be {kind}, got {value!r}")
    return expected(value)


def check_ranges(config: dict, where: dict[str, str]) -> None:
    """ConfigError for the first value of `config` outside its range in RANGES; `where` maps keys to the file or
    flag that set them."""
    for key, (test, text) in RANGES.items():
        value = config.get(key)
        if value is None or (value == 0 and key in ZERO_MEANS_OFF) or test(value):
            continue
        source = where.get(key, "the defaults")
        fix = "--" + key.replace("_", "-") if source == "the command line" else f"{key} in {source}"
        off = " (or 0 for none)" if key in ZERO_MEANS_OFF else ""
        raise ConfigError(f"{key} must be {text}{off}, got {value!r} (from {source}): fix {fix}")


def merge_config(defaults: dict, config_file: str | Path | None, overrides: dict | None,
                 nested: str | None = None, nested_keys: tuple[str, ...] = ()) -> tuple[dict, dict, dict]:
    """Defaults, then `config_file`, then `overrides` (flag values; None means "not given"), type-checked.

    Keys in `nested_keys` (given as flags, or under the file's `nested` key) are collected apart.

    Returns:
        (config, nested values, where): `where` maps each key that was set to the file or flag that set it.
    """
    config = dict(defaults)
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"config file {config_file} does not exist: check the path given to --config")
    try:
        file_values = read_yaml(config_file) if config_file is not None else {}
    except RunFileError as e:
        raise ConfigError(str(e)) from None
    file_nested = (file_values.pop(nested, None) or {}) if nested else {}
    if not isinstance(file_nested, dict):
        raise ConfigError(f"{nested} in {config_file} must be a mapping of sizes, e.g. {{hidden_size: 128}}")
    flag_values = {k: v for k, v in (overrides or {}).items() if v is not None}
    flag_nested = {k: flag_values.pop(k) for k in nested_keys if k in flag_values}
    where: dict[str, str] = {}
    for source, values in ((str(config_file), file_values), ("the command line", flag_values)):
        for key, value in values.items():
            if key not in defaults:
                raise unknown_key_error(key, list(defaults) + ([nested] if nested else []), source)
            config[key] = checked_value(key, value, defaults[key], source)
            where[key] = source
    nested_values = {}
    for source, values in ((f"{nested} of {config_file}", file_nested), ("the command line", flag_nested)):
        for key, value in values.items():
            if key not in nested_keys:
                raise unknown_key_error(key, list(nested_keys), source)
            example = 0.1 if key == "dropout" else 1
            nested_values[key] = checked_value(key, value, example, source)
            where[key] = source
    return config, nested_values, where


def add_core_size_flags(parser: argparse.ArgumentParser, keys: tuple[str, ...], defaults: str) -> None:
    """The core-size flags every entry point shares (`--hidden-size`, ...), as one argument group."""
    sizes = parser.add_argument_group("core sizes", defaults)
    for key in keys:
        sizes.add_argument("--" + key.replace("_", "-"), type=float if key == "dropout" else int,
                           help=SIZE_FLAG_HELP[key])


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; ConfigError for names torch rejects or absent CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"invalid device {name!r}: use auto, cpu, cuda or cuda:N ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available: use --device cpu")
    return device


def resolve_config(config_file: str | Path | None = None, overrides: dict | None = None) -> dict:
    """The `agent.train` config: configs/atari.yaml, then `config_file`, then `overrides`.

    Keys of `overrides` in CORE_SIZE_KEYS go into `core_kwargs`. Unknown keys, values of the wrong type or
    outside their range, an unknown game or core and inconsistent sizes raise ConfigError saying what to change.
    """
    config, core_kwargs, where = merge_config(load_defaults("atari.yaml"), config_file, overrides,
                                              "core_kwargs", CORE_SIZE_KEYS)
    if config["env"] is None:
        raise ConfigError("no game given: pass --env (e.g. --env Breakout, or --env memory for the toy task)")
    if config["core"] is None:
        raise ConfigError("no core given: pass --core (e.g. --core delta_lstm)")
    try:
        resolve_game(config["env"])
        check_core_name(config["core"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    config["core_kwargs"] = {**load_defaults("cores.yaml").get(config["core"], {}), **core_kwargs}
    check_ranges({**config, **config["core_kwargs"]}, where)
    if config["atari_protocol"] not in ATARI_PROTOCOLS:
        raise ConfigError(f"atari_protocol must be one of {', '.join(ATARI_PROTOCOLS)}, got "
                          f"{config['atari_protocol']!r} (from {where.get('atari_protocol', 'the defaults')})")
    if config["batch_size"] % config["envs_per_actor"]:
        raise ConfigError(
            f"batch_size {config['batch_size']} must be a multiple of envs_per_actor {config['envs_per_actor']}: "
            "a batch is made of whole unrolls, each carrying envs_per_actor environments"
        )
    resolve_device(config["device"])
    try:
        check_backend(config["backend"])
    except ValueError as e:
        raise ConfigError(f"{e} (from {where.get('backend', 'the defaults')})") from None
    if config["torso_precision"] not in ("auto", *TORSO_PRECISIONS):
        raise ConfigError(f"torso_precision must be auto, {' or '.join(TORSO_PRECISIONS)}, got "
                          f"{config['torso_precision']!r} (from {where.get('torso_precision', 'the defaults')})")
    config["torso_precision"] = resolve_torso_precision(config["torso_precision"], resolve_device(config["device"]))
    if config["backend"] == "cuda" and resolve_device(config["device"]).type != "cuda":
        raise ConfigError("backend 'cuda' needs the learner on a GPU: pass --device cuda, or --backend auto")
    try:
        make_core(config["core"], input_size=1, **config["core_kwargs"])  # inconsistent sizes fail here, early
    except ValueError as e:
        raise ConfigError(f"core_kwargs {config['core_kwargs']}: {e}") from None
    if config["name"] is None:
        config["name"] = f"{resolve_game(config['env'])}_{config['core']}"
    return config


def save_config(config: dict, path: str | Path) -> None:
    """Write `config` as YAML, atomically."""
    write_yaml(config, path)
