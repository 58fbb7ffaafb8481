"""Experiment configs (TOML) and their expansion into grid cells.

A config has four parts (every run-config key is kebab-case, as in ``pyproject.toml``)::

    [experiment]
    name = "quick"                        # used in the report's title
    output = "results/quick"              # output directory (relative to the working
                                          # directory; `--output` overrides it)
    clients = 20                          # simulated SuperNodes (= partitions) per run
    rounds = 5                            # server rounds per run
    seeds = [0, 1]                        # each seed is one run of every cell
    fractions = [0.2]                     # Byzantine fractions (0 < f < 1)
    partitionings = ["iid", "dirichlet-0.5"]   # "iid" or "dirichlet-<alpha>"
    timeout = 900                         # optional: seconds per cell before a run is killed
    client-cpus = 1                       # optional: CPUs Ray reserves per client
    cells-per-run = 16                    # optional: cells run back to back in one Flower
                                          # run (each from a fresh model), sharing its ~20 s
                                          # of start-up; 1 = one run per cell
    archive = "docs/benchmark/cells.csv"  # optional: a committed CSV of finished cells
                                          # (relative to the working directory): they are
                                          # not run again, and every finished cell is added

    [run-config]                          # optional: fixed run-config keys of every run
    local-epochs = 2

    [defences.krum]                       # one table per defence, named freely
    strategy = "krum"                     # the aggregation rule (required)
    num-malicious = "auto"                # rule parameters; "auto" = the cell's Byzantine count
    fractions = [0.1, 0.2]                # optional: run this defence at these fractions only

    [attacks.none]                        # no `attack` key: the clean baseline, no Byzantine
                                          # clients, run once per defence x partitioning x seed
    [attacks.scale]
    attack = "scale"                      # the attack (required for a non-clean entry)
    scale-factor = 10.0                   # its parameters

The grid is defence x attack x Byzantine fraction x partitioning x seed; a clean attack
contributes one cell per defence x partitioning x seed (fraction 0). ``num-malicious = "auto"``
is the number of Byzantine clients of the cell (``round(fraction * clients)``, the count the
ClientApp uses); in clean cells it is the count of the largest fraction the defence runs at, so
that the clean baseline measures the defence as it would be deployed against that threat. With
client sampling (``fraction-train < 1``) it is the count expected among the clients a round
samples (:meth:`RunSettings.round_population`), and each rule's precondition is checked for
that many clients.

Keys the grid sets itself (:data:`GRID_KEYS`: ``byzantine-fraction``, ``partitioner``,
``seed``, ...) may appear in no table, ``strategy`` only in defences, ``attack`` only in
attacks. A defence may set its rule's parameters (and those of the pre-aggregation stage it
names with ``pre-aggregation``) and general run-config keys, but no parameter of another rule
or of an attack; an attack likewise. Defence keys override ``[run-config]``; an attack and a
defence may not set the same key. :func:`load_config` checks all of this before any run starts,
and also: unknown tables and keys, run-config keys not declared in the app's
``pyproject.toml`` (Flower would reject them), unknown rule and attack names, value types and
ranges (by building every rule and attack as the apps do), and each rule's precondition on the
number of clients (e.g. Krum needs ``n > 2f + 2``) in every cell. Errors name the offending
entry. Nothing here lists rules, attacks or their parameters: new ones work unchanged.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..aggregation import (
    Aggregator,
    aggregator_class,
    aggregator_parameters,
    available_aggregators,
    available_pre_aggregations,
    get_aggregator,
    pre_aggregation_class,
)
from ..apps.settings import RunSettings
from ..attacks import (
    attack_parameters,
    attack_params_from_config,
    available_attacks,
    get_attack,
)
from ..config import config_key, keyword_parameters
from ..runtime.launch import APP_DIR

#: Run-config keys set per cell by the grid; no table may set them (except as noted).
GRID_KEYS = (
    "strategy", "attack", "byzantine-fraction", "byzantine-ids", "partitioner",
    "dirichlet-alpha", "seed", "num-server-rounds", "results-file", "min-available-nodes",
    "experiment-cells",
)
AUTO = "auto"
AUTO_KEYS = ("num-malicious",)
EXPERIMENT_KEYS = {
    "name": str, "output": str, "clients": int, "rounds": int, "seeds": list,
    "fractions": list, "partitionings": list, "timeout": float, "client-cpus": int,
    "cells-per-run": int, "archive": str,
}
REQUIRED_EXPERIMENT_KEYS = ("name", "output", "clients", "rounds", "seeds", "fractions",
                            "partitionings")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


class ConfigError(ValueError):
    """An invalid experiment config; the message names the offending entry."""


def declared_keys(app_dir: Path = APP_DIR) -> frozenset[str]:
    """Run-config keys declared in the app's ``[tool.flwr.app.config]`` (Flower rejects
    others), nested tables flattened with dots as Flower does."""
    with (app_dir / "pyproject.toml").open("rb") as stream:
        table = tomllib.load(stream)["tool"]["flwr"]["app"]["config"]

    def flatten(prefix: str, node: Mapping[str, Any]) -> list[str]:
        keys = []
        for key, value in node.items():
            name = f"{prefix}{key}"
            keys += flatten(name + ".", value) if isinstance(value, dict) else [name]
        return keys

    return frozenset(flatten("", table))


def partition_label(partitioner: str, alpha: float | None) -> str:
    """``"iid"`` or ``"dirichlet-<alpha>"``: the spelling of configs, rows and reports."""
    return partitioner if alpha is None else f"{partitioner}-{alpha:g}"


def parse_partitioning(text: str) -> tuple[str, float | None]:
    """``"iid"`` -> ``("iid", None)``; ``"dirichlet-0.5"`` -> ``("dirichlet", 0.5)``."""
    if text == "iid":
        return "iid", None
    match = re.fullmatch(r"dirichlet-(.+)", text)
    if match:
        try:
            alpha = float(match.group(1))
        except ValueError:
            alpha = math.nan
        if alpha > 0 and math.isfinite(alpha):
            return "dirichlet", alpha
    raise ConfigError(
        f"[experiment] partitionings: {text!r} is not 'iid' or 'dirichlet-<alpha>' (alpha > 0)"
    )


def byzantine_count(fraction: float, clients: int) -> int:
    """Number of Byzantine clients the ClientApp derives from ``byzantine-fraction``."""
    return len(RunSettings(byzantine_fraction=fraction).byzantine_partitions(clients))


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    defence: str
    attack: str
    fraction: float
    num_byzantine: int
    partitioner: str
    alpha: float | None
    seed: int
    run_config: dict[str, Any] = field(compare=False, hash=False)

    @property
    def partition(self) -> str:
        """The partitioning's label (``iid``, ``dirichlet-0.5``)."""
        return partition_label(self.partitioner, self.alpha)

    @property
    def cell_id(self) -> str:
        """Unique, file-system safe name: ``defence--attack--f0.2--iid--s0``."""
        return "--".join(
            (self.defence, self.attack, f"f{self.fraction:g}", self.partition, f"s{self.seed}")
        )

    def labels(self) -> dict[str, Any]:
        """The cell's identifying columns of every row."""
        return {
            "cell": self.cell_id, "defence": self.defence, "attack": self.attack,
            "fraction": self.fraction, "n_byzantine": self.num_byzantine,
            "partitioner": self.partitioner, "alpha": self.alpha, "seed": self.seed,
        }


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment config (see the module docstring for the TOML format)."""

    name: str
    output: Path
    clients: int
    rounds: int
    seeds: tuple[int, ...]
    fractions: tuple[float, ...]
    partitionings: tuple[tuple[str, float | None], ...]
    run_config: dict[str, Any]
    defences: dict[str, dict[str, Any]]
    defence_fractions: dict[str, tuple[float, ...]]
    attacks: dict[str, dict[str, Any]]
    timeout: float = 900.0
    client_cpus: int = 1
    cells_per_run: int = 16
    archive: Path | None = None

    def clean(self, attack: str) -> bool:
        """Whether attack entry ``attack`` is the clean baseline (no Byzantine clients)."""
        return not self.attacks[attack].get("attack")

    def cells(self) -> list[Cell]:
        """Every cell of the grid, seeds outermost (a first pass covers the whole grid once)."""
        cells = []
        for seed in self.seeds:
            for partitioner, alpha in self.partitionings:
                for attack in self.attacks:
                    for fraction in (0.0,) if self.clean(attack) else self.fractions:
                        for defence in self.defences:
                            if fraction and fraction not in self.defence_fractions[defence]:
                                continue
                            cells.append(self.cell(defence, attack, fraction, partitioner,
                                                   alpha, seed))
        return cells

    def sampled_clients(self, defence: str) -> int:
        """The clients a round of ``defence`` samples (``fraction-train`` of ``clients``)."""
        return self._settings(defence).round_population(self.clients, 0)[0]

    def round_byzantine(self, defence: str, count: int) -> int:
        """``num-malicious = "auto"``: the Byzantine clients expected in a round of
        ``defence`` when ``count`` of the ``clients`` are Byzantine (all of them without
        client sampling)."""
        return self._settings(defence).round_population(self.clients, count)[1]

    def _fraction_train(self, defence: str) -> float:
        merged = {**self.run_config, **self.defences[defence]}
        return float(merged.get("fraction-train", 1.0))

    def _settings(self, defence: str) -> RunSettings:
        return RunSettings(fraction_train=self._fraction_train(defence))

    def cell(
        self, defence: str, attack: str, fraction: float, partitioner: str,
        alpha: float | None, seed: int,
    ) -> Cell:
        """The cell of these coordinates with its full run config (without ``results-file``)."""
        count = byzantine_count(fraction, self.clients)
        assumed = self.round_byzantine(defence, count or max(
            byzantine_count(f, self.clients) for f in self.defence_fractions[defence]
        ))
        defence_keys = {
            key: assumed if key in AUTO_KEYS and value == AUTO else value
            for key, value in self.defences[defence].items()
        }
        run_config: dict[str, Any] = {
            **self.run_config, **defence_keys, **self.attacks[attack],
            "num-server-rounds": self.rounds, "partitioner": partitioner, "seed": seed,
        }
        if alpha is not None:
            run_config["dirichlet-alpha"] = alpha
        if fraction:
            run_config["byzantine-fraction"] = fraction
        return Cell(defence, attack, fraction, count, partitioner, alpha, seed, run_config)


# ---------------------------------------------------------------------------- validation
def _check_type(where: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {kind.__name__}, got {value!r}")
    return value


def _check_list(where: str, values: list[Any], kind: type) -> tuple[Any, ...]:
    if not values:
        raise ConfigError(f"{where} must not be empty")
    items = tuple(_check_type(f"{where}[{i}]", v, kind) for i, v in enumerate(values))
    if len(set(items)) != len(items):
        raise ConfigError(f"{where} has duplicates: {list(values)}")
    return items


def _check_name(where: str, name: str) -> None:
    if not NAME_PATTERN.fullmatch(name) or "--" in name:
        raise ConfigError(
            f"{where}: name {name!r} must be letters, digits, '_', '.', '+' or '-' (no '--'); "
            "it becomes part of file names"
        )


def _check_scalars(where: str, table: Mapping[str, Any], declared: frozenset[str]) -> None:
    for key, value in table.items():
        if key not in declared:
            raise ConfigError(
                f"{where}: {key!r} is not a run-config key declared in pyproject.toml "
                "[tool.flwr.app.config]"
            )
        if not isinstance(value, bool | int | float | str):
            raise ConfigError(f"{where}: {key!r} must be a scalar (int, float, bool or "
                              f"string), got {value!r}")


def _parameter_keys(factory: Any) -> set[str]:
    """Run-config spellings of a constructor's parameters."""
    return {config_key(name) for name in keyword_parameters(factory)}


def rule_keys() -> set[str]:
    """Run-config keys that are parameters of some rule or pre-aggregation stage."""
    factories = [aggregator_class(name).__init__ for name in available_aggregators()]
    factories += [pre_aggregation_class(name).__init__ for name in available_pre_aggregations()]
    return set().union(*(_parameter_keys(f) for f in factories))


def attack_keys() -> set[str]:
    """Run-config keys that are parameters of some attack."""
    return {config_key(p) for name in available_attacks() for p in attack_parameters(name)}


def _rule_of(run_config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The rule of a run config and the keyword arguments the ServerApp builds it with."""
    settings = RunSettings.from_run_config(run_config)
    return settings.strategy, settings.rule_params(run_config)


def build_rule(run_config: Mapping[str, Any]) -> Aggregator:
    """The aggregator a run with this run config uses (validates every rule parameter)."""
    strategy, params = _rule_of(run_config)
    return get_aggregator(strategy, **params)


def _check_keys(where: str, table: Mapping[str, Any], own: set[str], owner: str,
                foreign: set[str]) -> None:
    """Reject keys of other rules/attacks (``foreign`` minus ``own``) and the grid's keys."""
    for key in table:
        if key in GRID_KEYS and key not in ("strategy", "attack"):
            raise ConfigError(f"{where}: {key!r} is set by the grid")
        if key in foreign - own:
            raise ConfigError(
                f"{where}: {key!r} is not a parameter of {owner} (those are: "
                f"{', '.join(sorted(own)) or 'none'})"
            )


def _validate_defence(name: str, table: dict[str, Any], declared: frozenset[str],
                      base: Mapping[str, Any]) -> None:
    where = f"[defences.{name}]"
    _check_name(where, name)
    strategy = table.get("strategy")
    if not isinstance(strategy, str) or not strategy:
        raise ConfigError(f"{where} needs strategy = one of {', '.join(available_aggregators())}")
    if "attack" in table:
        raise ConfigError(f"{where}: 'attack' belongs in an [attacks.*] table")
    _check_scalars(where, table, declared)
    for key, value in table.items():
        if value == AUTO and key not in AUTO_KEYS:
            raise ConfigError(f"{where}: {key!r} = \"auto\" is only allowed for {AUTO_KEYS}")
    _check_keys(where, table, set(), "a defence", attack_keys())
    probe = {key: 1 if value == AUTO else value for key, value in table.items()}
    try:
        strategy, params = _rule_of({**base, **probe})
        accepted = aggregator_parameters(strategy, pre=params.get("pre"), params=params)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _check_keys(where, table, {config_key(p) for p in accepted}, f"rule {strategy!r}",
                rule_keys())


def _validate_attack(name: str, table: dict[str, Any], declared: frozenset[str]) -> None:
    where = f"[attacks.{name}]"
    _check_name(where, name)
    _check_scalars(where, table, declared)
    attack = table.get("attack", "")
    if not attack:
        if set(table) - {"attack"}:
            raise ConfigError(
                f"{where} has no 'attack' (a clean baseline) but sets "
                f"{', '.join(sorted(set(table) - {'attack'}))}"
            )
        table.clear()
        return
    if not isinstance(attack, str):
        raise ConfigError(f"{where}: 'attack' must be a string, got {attack!r}")
    if "strategy" in table:
        raise ConfigError(f"{where}: 'strategy' belongs in a [defences.*] table")
    _check_keys(where, table, set(), "an attack", rule_keys())
    try:
        own = {config_key(p) for p in attack_parameters(attack)}
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _check_keys(where, table, own, f"attack {attack!r}", attack_keys())
    try:
        get_attack(attack, **attack_params_from_config(attack, table))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _tables(raw: Mapping[str, Any], key: str) -> dict[str, dict[str, Any]]:
    tables = raw.get(key)
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"the config needs at least one [{key}.<name>] table")
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[{key}] entry {name!r} must be a table ([{key}.{name}])")
    return {name: dict(table) for name, table in tables.items()}


def _experiment_section(raw: Mapping[str, Any]) -> dict[str, Any]:
    section = raw.get("experiment")
    if not isinstance(section, dict):
        raise ConfigError("the config needs an [experiment] table")
    unknown = sorted(set(section) - set(EXPERIMENT_KEYS))
    if unknown:
        raise ConfigError(f"[experiment]: unknown key(s) {unknown}; known: "
                          f"{', '.join(EXPERIMENT_KEYS)}")
    missing = [key for key in REQUIRED_EXPERIMENT_KEYS if key not in section]
    if missing:
        raise ConfigError(f"[experiment] lacks {', '.join(missing)}")
    return {key: _check_type(f"[experiment] {key}", value, EXPERIMENT_KEYS[key])
            for key, value in section.items()}


def _fraction_list(where: str, values: Any, clients: int) -> tuple[float, ...]:
    fractions = _check_list(where, _check_type(where, values, list), float)
    for fraction in fractions:
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"{where}: {fraction} is not in (0, 1)")
        if byzantine_count(fraction, clients) == 0:
            raise ConfigError(f"{where}: {fraction} of {clients} clients is 0 Byzantine clients")
    return fractions


def parse_config(raw: Mapping[str, Any], app_dir: Path = APP_DIR) -> ExperimentConfig:
    """Validate a parsed TOML config (see the module docstring); raise :class:`ConfigError`."""
    unknown = sorted(set(raw) - {"experiment", "run-config", "defences", "attacks"})
    if unknown:
        raise ConfigError(f"unknown top-level table(s) {unknown}; known: experiment, "
                          "run-config, defences, attacks")
    section = _experiment_section(raw)
    _check_name("[experiment] name", section["name"])
    clients, rounds = section["clients"], section["rounds"]
    if clients < 2 or rounds < 1:
        raise ConfigError("[experiment] needs clients >= 2 and rounds >= 1")
    seeds = _check_list("[experiment] seeds", section["seeds"], int)
    fractions = _fraction_list("[experiment] fractions", section["fractions"], clients)
    partitionings = tuple(
        parse_partitioning(p)
        for p in _check_list("[experiment] partitionings", section["partitionings"], str)
    )
    if section.get("timeout", 1.0) <= 0 or section.get("client-cpus", 1) < 1:
        raise ConfigError("[experiment] needs timeout > 0 and client-cpus >= 1")
    if section.get("cells-per-run", 1) < 1:
        raise ConfigError("[experiment] needs cells-per-run >= 1")

    declared = declared_keys(app_dir)
    run_config = raw.get("run-config", {})
    if not isinstance(run_config, dict):
        raise ConfigError("[run-config] must be a table")
    _check_scalars("[run-config]", run_config, declared)
    reserved = sorted(set(run_config) & set(GRID_KEYS))
    if reserved:
        raise ConfigError(f"[run-config]: {reserved} are set by the grid (use [experiment], "
                          "[defences.*] and [attacks.*])")
    try:
        RunSettings.from_run_config(run_config)
    except ValueError as exc:
        raise ConfigError(f"[run-config]: {exc}") from None

    defences = _tables(raw, "defences")
    defence_fractions: dict[str, tuple[float, ...]] = {}
    for name, table in defences.items():
        own = table.pop("fractions", None)
        where = f"[defences.{name}] fractions"
        defence_fractions[name] = fractions if own is None else _fraction_list(
            where, own, clients)
        stray = sorted(set(defence_fractions[name]) - set(fractions))
        if stray:
            raise ConfigError(f"{where}: {stray} not in [experiment] fractions")
        _validate_defence(name, table, declared, run_config)
    attacks = _tables(raw, "attacks")
    for name, table in attacks.items():
        _validate_attack(name, table, declared)
        clash = sorted(set(table) & {k for d in defences.values() for k in d})
        if clash:
            raise ConfigError(f"[attacks.{name}] sets {clash}, which a defence sets too")

    config = ExperimentConfig(
        name=section["name"], output=Path(section["output"]), clients=clients, rounds=rounds,
        seeds=seeds, fractions=fractions, partitionings=partitionings, run_config=run_config,
        defences=defences, defence_fractions=defence_fractions, attacks=attacks,
        timeout=section.get("timeout", 900.0), client_cpus=section.get("client-cpus", 1),
        cells_per_run=section.get("cells-per-run", 16),
        archive=Path(section["archive"]) if section.get("archive") else None,
    )
    _validate_cells(config)
    return config


def _validate_cells(config: ExperimentConfig) -> None:
    """Build every distinct (defence, attack, fraction) run config and its rule."""
    seen = set()
    for cell in config.cells():
        key = (cell.defence, cell.attack, cell.fraction, cell.partitioner)
        if key in seen:
            continue
        seen.add(key)
        sampled = config.sampled_clients(cell.defence)
        where = f"[defences.{cell.defence}] x [attacks.{cell.attack}] " + (
            f"at Byzantine fraction {cell.fraction:g} ({cell.num_byzantine} of "
            f"{config.clients} clients)" if cell.fraction else "(clean baseline)")
        if sampled < config.clients:
            where += f" with {sampled} clients sampled per round"
        try:
            build_rule(cell.run_config).check_num_clients(sampled)
        except ValueError as exc:
            raise ConfigError(
                f"{where}: {exc} (restrict the defence with fractions = [...] or change "
                "clients)"
            ) from None


def load_config(path: Path | str, app_dir: Path = APP_DIR) -> ExperimentConfig:
    """Read and validate the TOML experiment config at ``path``."""
    path = Path(path)
    try:
        with path.open("rb") as stream:
            raw = tomllib.load(stream)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_config(raw, app_dir)


__all__ = [
    "AUTO",
    "Cell",
    "ConfigError",
    "ExperimentConfig",
    "build_rule",
    "byzantine_count",
    "declared_keys",
    "load_config",
    "parse_config",
    "parse_partitioning",
    "partition_label",
]
