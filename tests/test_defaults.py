"""Defaults are set once, in configs/*.yaml: no constructor or dataclass of the learner or the sequence models
repeats a value those files give the key of the same name (a second copy would silently win or drift)."""
from __future__ import annotations

import importlib
import inspect

import pytest
import yaml

from agent.config import CONFIG_DIR

MODULES = ("learner.impala", "learner.supervised", "learner.rl", "learner.vtrace", "learner.losses",
           "models.sequence")
# Defaults kept on purpose, with the reason.
KEPT = {
    "backend": "'auto' is what every layer of models/ does by itself (models.ops.Rules picks per device); the "
    "YAML key exists so that a run can pin another backend",
}


def config_values() -> dict[str, list]:
    """Every value configs/*.yaml give each key (core sizes of cores.yaml included)."""
    values: dict[str, list] = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        entries = yaml.safe_load(path.read_text()) or {}
        if path.name == "cores.yaml":
            entries = {k: v for sizes in entries.values() for k, v in (sizes or {}).items()}
        for key, value in entries.items():
            values.setdefault(key, []).append(value)
    return values


def repeated_defaults(module_name: str, values: dict[str, list]) -> list[str]:
    module = importlib.import_module(module_name)
    found = []
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module_name or not callable(obj):
            continue
        try:
            parameters = inspect.signature(obj).parameters.values()
        except ValueError:  # a class with a builtin constructor (an exception type) takes no settings
            continue
        for parameter in parameters:
            default = parameter.default
            if parameter.name in KEPT or default is inspect.Parameter.empty:
                continue
            if any(type(default) is type(v) and default == v for v in values.get(parameter.name, [])):
                found.append(f"{module_name}.{name}({parameter.name}={default!r})")
    return found


@pytest.mark.parametrize("module_name", MODULES)
def test_no_default_repeats_a_config_value(module_name):
    assert repeated_defaults(module_name, config_values()) == []


def test_the_check_sees_the_config_values():
    values = config_values()
    assert 0.0006 in values["learning_rate"] and 2048 in values["ff_size"] and 512 in values["ff_size"]
    # a repeated value is found (here a made-up config that gives depth the value of Feeder's default)
    assert repeated_defaults("learner.rl", {"depth": [1]}) == ["learner.rl.Feeder(depth=1)"]
