"""The app's run config: every key the code reads is declared in pyproject (Flower rejects
undeclared overrides) with the code's own default, and every rule builds from it."""

from __future__ import annotations

import dataclasses
import inspect
import tomllib
import typing
from pathlib import Path

import pytest

from flwr_robust.aggregation import (
    aggregator_class,
    aggregator_factories,
    available_aggregators,
    get_aggregator,
)
from flwr_robust.aggregation.preaggregation import pre_aggregation_class
from flwr_robust.apps.settings import RunSettings
from flwr_robust.attacks import attack_class, available_attacks
from flwr_robust.config import coerce, config_key
from flwr_robust.ops.anomaly import AnomalyDetectionHook

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
CONFIG = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
STAGES = ("nnm", "bucketing", "arc")
# Deliberate app defaults that differ from the library's (the demo federation has 1
# Byzantine client by default; the whole run is seeded).
APP_DEFAULTS = {"num-malicious": 1, "seed": 42}
# Rule parameters no run config can carry (functions); the server app sets them itself.
RUNTIME_ONLY = ("server_update_fn",)


def parameters(factory, prefix: str = "", skip: tuple[str, ...] = ()):
    hints = typing.get_type_hints(factory)
    for param in inspect.signature(factory).parameters.values():
        if param.name in ("self", *skip) or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        yield prefix + config_key(param.name), param.default, hints.get(param.name)


def all_factories():
    for name in available_aggregators():
        yield f"rule {name}", aggregator_class(name).__init__, ""
    for stage in STAGES:
        yield f"stage {stage}", pre_aggregation_class(stage).__init__, ""
    for name in available_attacks():
        yield f"attack {name}", attack_class(name).__init__, ""
    yield "anomaly detection", AnomalyDetectionHook.__init__, "anomaly-"


@pytest.mark.parametrize(("what", "factory", "prefix"), list(all_factories()))
def test_every_parameter_is_declared_with_the_code_default(what, factory, prefix) -> None:
    skip = ("mode", "pre", "base_rule") if prefix or "reputation" in what else ("pre",)
    skip += RUNTIME_ONLY
    for key, default, annotation in parameters(factory, prefix, skip):
        assert key in CONFIG, f"{what}: run config key {key!r} is not declared in pyproject"
        declared = coerce(key, CONFIG[key], annotation)
        expected = APP_DEFAULTS.get(key, default)
        if key in APP_DEFAULTS or default is None and key in ("seed",):
            continue
        assert declared == expected, f"{what}: {key} is {declared!r} in pyproject, {expected!r} in code"


def test_every_setting_is_declared_with_its_default() -> None:
    for field in dataclasses.fields(RunSettings):
        key = config_key(field.name)
        assert key in CONFIG, f"run setting {key!r} is not declared in pyproject"
    assert RunSettings.from_run_config(CONFIG) == RunSettings()


@pytest.mark.parametrize("name", available_aggregators())
@pytest.mark.parametrize("pre", ["", *STAGES])
def test_every_rule_builds_from_the_declared_config(name: str, pre: str) -> None:
    config = {**CONFIG, "strategy": name, "pre-aggregation": pre}
    settings = RunSettings.from_run_config(config)
    params = settings.rule_params(config)
    cls = aggregator_class(name)
    if pre and cls.needs_client_ids and cls.wraps is None:  # state keyed by client identity
        with pytest.raises(ValueError, match="stage"):
            get_aggregator(name, **params)
        return
    rule = get_aggregator(name, **params)
    assert rule.name == name
    assert len(aggregator_factories(name, pre=pre or None, params=params)) >= 1


def test_no_undeclared_extra_keys_are_read() -> None:
    known = {config_key(f.name) for f in dataclasses.fields(RunSettings)}
    for _, factory, prefix in all_factories():
        known |= {key for key, _, _ in parameters(factory, prefix, ("mode",))}
    known |= {"pre-aggregation", "base-rule"}
    assert sorted(set(CONFIG) - known) == []
