"""Typed run settings of the bundled Flower apps, read from the run config."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..aggregation import aggregator_class, aggregator_factories
from ..attacks import attack_class
from ..config import kwargs_from_config
from ..ops.anomaly import MODES
from ..strategy import APIS
from ..task.data import DATASETS, PARTITIONERS


@lru_cache(maxsize=8)
def parse_cells(text: str) -> tuple[dict[str, Any], ...]:
    """The run config's ``experiment-cells``: a JSON list of run-config overrides, one per
    cell of an experiment grid run back to back in one Flower run (``""``: no cells)."""
    if not text.strip():
        return ()
    try:
        cells = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"run config 'experiment-cells' is not valid JSON: {exc}") from exc
    if not isinstance(cells, list) or not all(isinstance(cell, dict) for cell in cells):
        raise ValueError("run config 'experiment-cells' must be a JSON list of objects")
    for cell in cells:
        bad = [k for k, v in cell.items() if k == "experiment-cells" or
               not isinstance(v, bool | int | float | str)]
        if bad:
            raise ValueError(f"experiment cell keys {bad}: values must be scalars, no nesting")
    return tuple(cells)


def cell_run_config(run_config: Mapping[str, Any], cell: int | None) -> dict[str, Any]:
    """``run_config`` with the overrides of experiment cell ``cell`` (if any) applied."""
    base = dict(run_config)
    if cell is None:
        return base
    cells = parse_cells(str(base.get("experiment-cells", "")))
    if not 0 <= cell < len(cells):
        raise ValueError(f"experiment cell {cell} does not exist ({len(cells)} cells)")
    return {**base, **cells[cell]}


@dataclass(frozen=True)
class RunSettings:
    """Run-config keys shared by the ServerApp and the ClientApp (kebab-case in TOML).

    The aggregation rule's own parameters (``num-malicious``, ``trim-ratio``,
    ``num-selected``, ``variant``, ...) are read separately by :meth:`rule_params`, the
    attack's (``scale-factor``, ``backdoor-target``, ...) by
    :func:`flwr_robust.attacks.attack_params_from_config`.

    ``max-train-samples`` / ``max-test-samples`` (0: all) subsample Fashion-MNIST's train and
    test splits deterministically before partitioning (a benchmark sizes its clients' data
    with them); ``evaluate-every`` evaluates the global model centrally every k rounds (and
    after the last), the other rounds' records carry no accuracy.

    ``fltrust-root-size``: with the ``fltrust`` rule, the size of the server's root dataset,
    drawn with ``seed`` from the test split; those samples are left out of the central
    evaluation (accuracy, loss and attack success rate use the rest of the test split).
    """

    strategy: str = "multi_krum"
    api: str = "message"
    num_server_rounds: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_available_nodes: int = 2
    local_epochs: int = 3
    learning_rate: float = 0.1
    momentum: float = 0.9
    batch_size: int = 16
    seed: int = 42
    dataset: str = "digits"
    dataset_path: str = ""
    max_train_samples: int = 0
    max_test_samples: int = 0
    evaluate_every: int = 1
    model: str = ""
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    results_file: str = ""
    client_threads: int = 1
    max_num_examples: int = 10_000_000
    fltrust_root_size: int = 100
    byzantine_ids: str = ""
    byzantine_fraction: float = 0.0
    attack: str = ""
    attack_omniscient: bool = False
    attack_start_round: int = 1
    attack_stop_round: int = 0
    signing: bool = False
    keys_dir: str = ""
    integrity_faults: str = ""
    anomaly_detection: str = ""
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    metrics_client_labels: bool = False
    audit_file: str = ""
    checkpoint_dir: str = ""
    checkpoint_keep: int = 3
    rollback_max_accuracy_drop: float | None = None
    resume: bool = False
    dp_clip: float | None = None
    dp_noise_multiplier: float | None = None
    dp_delta: float = 1e-5
    dp_max_epsilon: float | None = None
    dp_policy_max_epsilon: float | None = None
    dp_policy_max_delta: float | None = None
    experiment_cells: str = field(default="", repr=False)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Settings from ``context.run_config``, validated; absent keys keep defaults."""
        settings = cls(**kwargs_from_config(cls, run_config))
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ``ValueError`` naming the run-config key of any invalid value."""
        aggregator_class(self.strategy)  # unknown rule -> ValueError listing the valid ones
        choices = {"api": APIS, "partitioner": PARTITIONERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"run config {name!r} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        if self.dataset not in DATASETS and not self.dataset.startswith("hf:"):
            raise ValueError(f"run config 'dataset' must be one of {DATASETS} or 'hf:<id>', "
                             f"got {self.dataset!r}")
        positive = (
            "num_server_rounds", "local_epochs", "batch_size", "client_threads",
            "min_available_nodes", "fltrust_root_size", "evaluate_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"run config {name.replace('_', '-')!r} must be >= 1")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"run config {name.replace('_', '-')!r} must be in [0, 1]")
        for name in ("max_train_samples", "max_test_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"run config {name.replace('_', '-')!r} must be >= 0")
        if self.dataset_options() and self.dataset != "fashion_mnist":
            raise ValueError("run config 'max-train-samples' / 'max-test-samples' apply to "
                             f"dataset 'fashion_mnist' only, not {self.dataset!r}")
        if self.learning_rate <= 0 or self.dirichlet_alpha <= 0:
            raise ValueError("run config 'learning-rate' and 'dirichlet-alpha' must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError("run config 'momentum' must be in [0, 1)")
        if not 0.0 <= self.byzantine_fraction < 1.0:
            raise ValueError("run config 'byzantine-fraction' must be in [0, 1)")
        if self.byzantine_fraction and self.byzantine_ids.strip():
            raise ValueError("give either run config 'byzantine-ids' or 'byzantine-fraction'")
        try:
            [int(v) for v in self.byzantine_ids.replace(" ", "").split(",") if v]
        except ValueError as exc:
            raise ValueError(
                f"run config 'byzantine-ids' must be comma-separated partition ids, got "
                f"{self.byzantine_ids!r}"
            ) from exc
        if self.attack:
            attack = attack_class(self.attack)  # unknown attack -> ValueError listing them
            if self.attack_omniscient and not attack.colluding:
                raise ValueError(
                    f"run config 'attack-omniscient' needs a colluding attack, not {self.attack!r}"
                )
        elif self.byzantine_ids.strip() or self.byzantine_fraction:
            raise ValueError("Byzantine clients are configured but run config 'attack' is empty")
        if self.attack_start_round < 1 or self.attack_stop_round < 0:
            raise ValueError("run config 'attack-start-round' must be >= 1 and "
                             "'attack-stop-round' >= 0 (0: never stop)")
        if 0 < self.attack_stop_round < self.attack_start_round:
            raise ValueError("run config 'attack-stop-round' must be 0 or >= 'attack-start-round'")
        if self.attack_omniscient and (self.attack_start_round, self.attack_stop_round) != (1, 0):
            raise ValueError("run config 'attack-start-round' / 'attack-stop-round' apply to "
                             "client-side attacks, not to 'attack-omniscient'")
        if self.anomaly_detection not in ("", *MODES):
            raise ValueError(
                f"run config 'anomaly-detection' must be '' or one of {MODES}, got "
                f"{self.anomaly_detection!r}"
            )
        if self.checkpoint_keep < 0:
            raise ValueError("run config 'checkpoint-keep' must be >= 0 (0 keeps all)")
        needs_dir = ("rollback_max_accuracy_drop", "resume")
        if any(getattr(self, name) for name in needs_dir) and not self.checkpoint_dir:
            raise ValueError("run config 'rollback-max-accuracy-drop' and 'resume' need "
                             "'checkpoint-dir'")
        optional = ("dp_clip", "dp_noise_multiplier", "dp_max_epsilon", "dp_policy_max_epsilon",
                    "dp_policy_max_delta")
        for name in optional:
            value = getattr(self, name) or 0
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"run config {name.replace('_', '-')!r} must be finite and "
                                 ">= 0 (0: off)")
        if not 0.0 < self.dp_delta < 1.0:  # NaN fails too
            raise ValueError("run config 'dp-delta' must be in (0, 1)")
        cells = parse_cells(self.experiment_cells)
        client_dp = ("dp-clip", "dp-noise-multiplier", "dp-delta", "dp-max-epsilon")
        if any(key in client_dp for cell in cells for key in cell):
            raise ValueError(f"experiment cells cannot set {list(client_dp)} (clients never "
                             "take DP settings from an instruction's cell)")
        if cells and (self.signing or self.resume):
            raise ValueError("run config 'experiment-cells' cannot be combined with 'signing' "
                             "or 'resume' (every cell restarts Flower's round count)")
        if self.signing and not self.keys_dir:
            raise ValueError("run config 'signing' needs 'keys-dir' (see `flwr-robust keys init`)")
        if self.keys_dir and not Path(self.keys_dir).is_absolute():
            raise ValueError(
                f"run config 'keys-dir' must be an absolute path (Flower runs the apps from "
                f"its own directories), got {self.keys_dir!r}"
            )

    def round_population(self, num_partitions: int, num_byzantine: int) -> tuple[int, int]:
        """``(n, f)`` of a training round: the clients FedAvg samples (``fraction-train`` of
        the ``num_partitions`` nodes, at least 1) and the Byzantine clients expected among
        them (``round(num_byzantine * n / N)``, at least 1 when there are any). With client
        sampling the actual count varies from round to round around ``f``."""
        sampled = min(num_partitions, max(1, int(num_partitions * self.fraction_train)))
        if sampled == num_partitions or num_byzantine == 0:
            return sampled, num_byzantine
        expected = round(num_byzantine * sampled / num_partitions)
        return sampled, min(sampled, max(1, expected))

    def dataset_options(self) -> dict[str, int]:
        """The dataset loader's size options (``max_train`` / ``max_test``) set in the run
        config."""
        sizes = {"max_train": self.max_train_samples, "max_test": self.max_test_samples}
        return {key: value for key, value in sizes.items() if value}

    def evaluates(self, server_round: int) -> bool:
        """Whether the central evaluation runs after ``server_round`` (round 0, every
        ``evaluate-every``-th round and the last)."""
        return (server_round % self.evaluate_every == 0
                or server_round >= self.num_server_rounds)

    def attack_active(self, server_round: int) -> bool:
        """Whether Byzantine clients attack in ``server_round``: from ``attack-start-round``
        through ``attack-stop-round`` (0: to the end); they train honestly outside. An
        instruction without a round number (0: the server sent no ``server-round``) is
        attacked."""
        if server_round < 1:
            return True
        stop = self.attack_stop_round
        return server_round >= self.attack_start_round and (stop == 0 or server_round <= stop)

    def byzantine_partitions(self, num_partitions: int) -> frozenset[int]:
        """Ground truth: the partition ids of the Byzantine clients, from ``byzantine-ids``
        (``"0,3"``) or ``byzantine-fraction`` (that share of the partitions, rounded, chosen
        by ``seed``)."""
        if self.byzantine_ids.strip():
            ids = frozenset(int(v) for v in self.byzantine_ids.replace(" ", "").split(",") if v)
            bad = sorted(i for i in ids if not 0 <= i < num_partitions)
            if bad:
                raise ValueError(
                    f"run config 'byzantine-ids' names partitions {bad} outside 0..{num_partitions - 1}"
                )
            return ids
        count = round(self.byzantine_fraction * num_partitions)
        chosen = np.random.default_rng(self.seed).choice(num_partitions, count, replace=False)
        return frozenset(int(i) for i in chosen)

    def rule_params(self, run_config: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments for :func:`~flwr_robust.aggregation.get_aggregator`: the rule's
        parameters present in the run config, the rule it wraps and the pre-aggregation stage
        (run config ``pre-aggregation``) with theirs. The first component taking a name
        reads it (``num-malicious`` is shared)."""
        pre = str(run_config.get("pre-aggregation", "")) or None
        own = kwargs_from_config(aggregator_class(self.strategy).__init__, run_config)
        params: dict[str, Any] = {}
        for factory in aggregator_factories(self.strategy, pre=pre, params=own):
            for key, value in kwargs_from_config(factory, run_config).items():
                params.setdefault(key, value)
        return {**params, "pre": pre}

    def replace(self, **changes: Any) -> RunSettings:
        """A copy with ``changes`` applied (validated)."""
        settings = dataclasses.replace(self, **changes)
        settings.validate()
        return settings
