"""The bundled ClientApp's work: honest or Byzantine local training on the node's partition,
for both the Message-API and the legacy message formats.

A node is Byzantine when its node config says ``role='byzantine'`` (deployment), otherwise
when its partition id is among the run config's ``byzantine-ids`` / ``byzantine-fraction``
(simulation). A Byzantine reply carries the same records, keys and plausible metrics as an
honest one: only its content differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import Client, NumPyClient

from ..attacks import (
    Attack,
    AttackContext,
    attack_params_from_config,
    get_attack,
    poisoned_training,
)
from ..attacks.data import TrainingOptions
from ..records import arrayrecord_views
from ..task.data import load_partition
from ..task.models import get_named_weights, set_weights
from ..task.training import evaluate, train
from .server import build_global_model
from .settings import RunSettings, cell_run_config

NamedArrays = dict[str, np.ndarray]
ROLES = ("honest", "byzantine")
_threads_set: list[int] = []


def partition_of(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config (set by the simulation
    engine, or by ``--node-config`` in deployment)."""
    config = context.node_config
    missing = [key for key in ("partition-id", "num-partitions") if key not in config]
    if missing:
        raise ValueError(
            f"node config lacks {', '.join(missing)}; start deployment SuperNodes with "
            "--node-config \"partition-id=<i> num-partitions=<n>\""
        )
    return int(config["partition-id"]), int(config["num-partitions"])


@dataclass(frozen=True)
class Role:
    """What this node does with its update (``attack`` is None for honest nodes and for
    Byzantine nodes whose attack the server-side omniscient simulation crafts)."""

    byzantine: bool
    attack: Attack | None
    colluders: tuple[int, ...] = ()


def role_of(context: Context, settings: RunSettings, run_config: Mapping[str, Any]) -> Role:
    """The node's role: node config ``role`` / ``attack`` first, else the run config."""
    partition_id, num_partitions = partition_of(context)
    colluders = tuple(sorted(settings.byzantine_partitions(num_partitions)))
    node_role = str(context.node_config.get("role", "")).lower()
    if node_role and node_role not in ROLES:
        raise ValueError(f"node config 'role' must be one of {ROLES}, got {node_role!r}")
    byzantine = node_role == "byzantine" if node_role else partition_id in colluders
    if not byzantine:
        return Role(False, None)
    name = str(context.node_config.get("attack", "") or settings.attack)
    if not name:
        raise ValueError("this node is Byzantine but no attack is configured ('attack')")
    if settings.attack_omniscient:
        return Role(True, None, colluders)
    params = attack_params_from_config(name, {**run_config, **context.node_config})
    return Role(True, get_attack(name, **params), colluders or (partition_id,))


class LocalTrainer:
    """A partition's model and data, cached per process across rounds."""

    def __init__(self, settings: RunSettings, partition_id: int, num_partitions: int) -> None:
        self.settings = settings
        self.partition_id = partition_id
        self.num_partitions = num_partitions
        self.train_data, self.val_data = load_partition(
            settings.dataset,
            partition_id,
            num_partitions,
            partitioner=settings.partitioner,
            alpha=settings.dirichlet_alpha,
            seed=settings.seed,
            path=settings.dataset_path or None,
            **settings.dataset_options(),
        )
        self.model = build_global_model(settings, self.train_data)
        self.names = list(get_named_weights(self.model))
        self._honest: dict[int, tuple[list[np.ndarray], dict[str, float]]] = {}
        #: The global models of the (at most two) latest rounds a Byzantine node received.
        self._globals: list[tuple[int, list[np.ndarray]]] = []

    def named(self, arrays: Mapping[str, np.ndarray] | list[np.ndarray]) -> NamedArrays:
        """Received arrays by this model's layer names (legacy lists arrive by position)."""
        if isinstance(arrays, Mapping):
            return {name: np.asarray(arrays[name]) for name in self.names}
        if len(arrays) != len(self.names):
            raise ValueError(f"received {len(arrays)} arrays, the model has {len(self.names)}")
        return dict(zip(self.names, arrays, strict=True))

    def honest_delta(
        self, global_arrays: NamedArrays, config: Mapping[str, Any], server_round: int
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """Train from the global model on the clean partition; the update and metrics."""
        set_weights(self.model, list(global_arrays.values()))
        metrics = self._fit(self.train_data, config, server_round)
        delta = [w - g for w, g in zip(self.weights().values(), global_arrays.values(), strict=True)]
        self._honest = {server_round: (delta, metrics)}
        return delta, metrics

    def _fit(
        self,
        data: Any,
        config: Mapping[str, Any],
        server_round: int,
        options: TrainingOptions | None = None,
    ) -> dict[str, float]:
        return train(
            self.model,
            data,
            epochs=int(config.get("local-epochs", self.settings.local_epochs)),
            learning_rate=float(config.get("learning-rate", self.settings.learning_rate)),
            batch_size=self.settings.batch_size,
            momentum=self.settings.momentum,
            seed=self.settings.seed * 100_003 + server_round * 1_009 + self.partition_id,
            **({} if options is None else self._training_keywords(options)),
        )

    def _training_keywords(self, options: TrainingOptions) -> dict[str, Any]:
        """An attack's training options as :func:`train` keywords keyed by parameter name."""
        parameters = {name for name, _ in self.model.named_parameters()}

        def by_name(layers: list[np.ndarray] | None) -> dict[str, np.ndarray] | None:
            if layers is None:
                return None
            named = zip(self.names, layers, strict=True)
            return {name: layer for name, layer in named if name in parameters}

        return {
            "gradient_mask": by_name(options.gradient_mask),
            "proximal_anchor": by_name(options.proximal_anchor),
            "anomaly_weight": options.anomaly_weight,
        }

    def _previous_global(
        self, global_arrays: NamedArrays, server_round: int
    ) -> list[np.ndarray] | None:
        """The latest global model received before ``server_round`` (None: none seen); keeps
        a copy of this round's."""
        earlier = [entry for entry in self._globals if entry[0] < server_round]
        if all(r != server_round for r, _ in self._globals):
            current = [np.array(a, copy=True) for a in global_arrays.values()]
            self._globals = [*earlier[-1:], (server_round, current)]
        return earlier[-1][1] if earlier else None

    def colluder_index(self, role: Role) -> int:
        """This node's position among the sorted Byzantine partition ids of the run config
        (a node made Byzantine by its node config alone comes after them)."""
        if self.partition_id in role.colluders:
            return role.colluders.index(self.partition_id)
        return len(role.colluders)

    def round_population(self, role: Role) -> tuple[int, int]:
        """``(n, f)`` an attack assumes for a round (:meth:`RunSettings.round_population`):
        colluders know the federation's size and sampling, not which nodes the server picked,
        so with client sampling ``f`` is the expected count of colluders in the round."""
        return self.settings.round_population(self.num_partitions, max(1, len(role.colluders)))

    def cached_honest_delta(
        self, global_arrays: NamedArrays, config: Mapping[str, Any], server_round: int
    ) -> list[np.ndarray]:
        """This partition's honest update of ``server_round`` (computed at most once)."""
        if server_round not in self._honest:
            self.honest_delta(global_arrays, config, server_round)
        return self._honest[server_round][0]

    def update(
        self,
        global_arrays: NamedArrays,
        config: Mapping[str, Any],
        server_round: int,
        role: Role,
    ) -> tuple[NamedArrays, int, dict[str, float]]:
        """New weights, claimed example count and metrics for one training instruction.

        A Byzantine node attacks only inside the run's attack window
        (:meth:`RunSettings.attack_active`) and trains honestly outside it; it remembers the
        global models it receives either way (``AttackContext.previous_global_weights``).
        """
        previous = self._previous_global(global_arrays, server_round) if role.byzantine else None
        attack = role.attack if self.settings.attack_active(server_round) else None
        count = len(self.train_data)
        if attack is None:
            delta, metrics = self.honest_delta(global_arrays, config, server_round)
            return self._apply(global_arrays, delta), count, metrics
        rng = np.random.default_rng([self.settings.seed, server_round, self.partition_id])
        num_clients, num_byzantine = self.round_population(role)
        context = AttackContext(
            server_round=server_round,
            num_clients=num_clients,
            num_byzantine=num_byzantine,
            rng=rng,
            global_weights=list(global_arrays.values()),
            colluder_deltas=lambda: [
                trainer_for(self.settings, p, self.num_partitions).cached_honest_delta(
                    global_arrays, config, server_round
                )
                for p in role.colluders
            ],
            colluder_index=self.colluder_index(role),
            previous_global_weights=previous,
            colluder_rng=np.random.default_rng([self.settings.seed, server_round]),
        )
        set_weights(self.model, list(global_arrays.values()))
        if attack.skips_training:
            loss, accuracy = evaluate(self.model, self.train_data)
            delta = [np.zeros_like(g) for g in global_arrays.values()]
            metrics = {"loss": loss, "accuracy": accuracy}
        elif attack.colluding and type(attack).poison_data is Attack.poison_data:
            # crafted from the colluders' clean deltas, this node's own among them: train once
            delta = self.cached_honest_delta(global_arrays, config, server_round)
            metrics = self._honest[server_round][1]
        else:
            data, options = poisoned_training(attack, self.train_data, context)
            metrics = self._fit(data, config, server_round, options)
            delta = [
                w - g for w, g in zip(self.weights().values(), global_arrays.values(), strict=True)
            ]
        poisoned = attack.poison_update(delta, context)
        return self._apply(global_arrays, poisoned), attack.claimed_examples(count), metrics

    @staticmethod
    def _apply(global_arrays: NamedArrays, delta: list[np.ndarray]) -> NamedArrays:
        return {
            name: (g + d).astype(g.dtype, copy=False)
            for (name, g), d in zip(global_arrays.items(), delta, strict=True)
        }

    def weights(self) -> NamedArrays:
        """Current weights by name."""
        return get_named_weights(self.model)

    def evaluate(self, global_arrays: NamedArrays) -> tuple[float, float, int]:
        """Loss, accuracy and size of the validation split (the train split if empty)."""
        set_weights(self.model, list(global_arrays.values()))
        data = self.val_data if len(self.val_data) else self.train_data
        loss, accuracy = evaluate(self.model, data)
        return loss, accuracy, len(data)


@lru_cache(maxsize=64)
def trainer_for(settings: RunSettings, partition_id: int, num_partitions: int) -> LocalTrainer:
    """The process-wide trainer of a partition (simulation reuses processes across nodes,
    and colluders train their peers' partitions)."""
    return LocalTrainer(settings, partition_id, num_partitions)


@dataclass(frozen=True)
class Work:
    """What one instruction asks of this node: settings, trainer and role."""

    settings: RunSettings
    trainer: LocalTrainer
    role: Role


def setup(context: Context, config: Mapping[str, Any]) -> Work:
    """Settings (the run config, with the overrides of the instruction's experiment cell),
    trainer and role for one instruction; sets torch threads once per process."""
    cell = config.get("experiment-cell")
    run_config = cell_run_config(context.run_config, None if cell is None else int(cell))
    settings = RunSettings.from_run_config(run_config)
    if not _threads_set:
        torch.set_num_threads(settings.client_threads)
        _threads_set.append(settings.client_threads)
    trainer = trainer_for(settings, *partition_of(context))
    return Work(settings, trainer, role_of(context, settings, run_config))


def server_round_of(config: Mapping[str, Any]) -> int:
    """The round number the server put in the instruction's config (0 if absent)."""
    return int(config.get("server-round", 0))


def train_reply(message: Message, context: Context) -> Message:
    """Message-API training: reply with the new weights and ``num-examples``."""
    content = message.content
    config = dict(content["config"]) if "config" in content else {}
    work = setup(context, config)
    received = work.trainer.named(arrayrecord_views(content["arrays"]))
    weights, count, metrics = work.trainer.update(
        received, config, server_round_of(config), work.role
    )
    reply = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
            "metrics": MetricRecord({"num-examples": int(count), "train-loss": metrics["loss"]}),
        }
    )
    return Message(reply, reply_to=message)


def evaluate_reply(message: Message, context: Context) -> Message:
    """Message-API evaluation on the node's validation split."""
    content = message.content
    trainer = setup(context, dict(content["config"]) if "config" in content else {}).trainer
    received = trainer.named(arrayrecord_views(content["arrays"]))
    loss, accuracy, count = trainer.evaluate(received)
    metrics = MetricRecord({"num-examples": count, "eval-loss": loss, "eval-accuracy": accuracy})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


def roster_reply(message: Message, context: Context) -> Message:
    """The node's partition, for the server's evaluation ground truth (never its role)."""
    partition_id, num_partitions = partition_of(context)
    metrics = MetricRecord({"partition-id": partition_id, "num-partitions": num_partitions})
    return Message(RecordDict({"roster": metrics}), reply_to=message)


class LegacyClient(NumPyClient):
    """The same work for legacy-API servers (``flwr.server.strategy``)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        work = setup(self.context, config)
        weights, count, metrics = work.trainer.update(
            work.trainer.named(parameters), config, server_round_of(config), work.role
        )
        return list(weights.values()), int(count), {"train-loss": metrics["loss"]}

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        trainer = setup(self.context, config).trainer
        loss, accuracy, count = trainer.evaluate(trainer.named(parameters))
        return loss, count, {"eval-accuracy": accuracy}


def legacy_client_fn(context: Context) -> Client:
    """``client_fn`` for Flower's legacy message handler."""
    return LegacyClient(context).to_client()
