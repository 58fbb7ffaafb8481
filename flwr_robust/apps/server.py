"""The bundled ServerApp: a robust strategy from run config, central evaluation per round."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerConfig
from flwr.server.compat import start_grid
from flwr.serverapp import Grid

from .. import make_strategy
from ..aggregation import aggregator_parameters, get_aggregator
from ..attacks import (
    OmniscientAttackHook,
    TriggerAttack,
    attack_class,
    attack_params_from_config,
    get_attack,
)
from ..config import kwargs_from_config
from ..ops.anomaly import AnomalyDetectionHook
from ..ops.audit import AuditLog
from ..ops.checkpoint import CheckpointHook, CheckpointStore, resume_state
from ..ops.telemetry import PrometheusHook
from ..privacy import PrivacyPolicyHook
from ..security import KeyDir, TrustStore, load_private_key
from ..security.hooks import SignGlobalModel, VerifyUpdateSignatures
from ..strategy import RobustAggregation, StrategyHook
from ..task.data import Dataset, load_dataset
from ..task.models import build_model, default_model, get_named_weights, set_weights
from ..task.training import evaluate, predict, train
from .settings import RunSettings, cell_run_config, parse_cells

logger = logging.getLogger("flwr.robust")


def build_global_model(settings: RunSettings, data: Dataset) -> torch.nn.Module:
    """The model every participant trains, initialised deterministically from the seed."""
    name = settings.model or default_model(settings.dataset)
    return build_model(
        name, input_shape=data.input_shape, num_classes=data.num_classes, seed=settings.seed
    )


def query_roster(grid: Grid, expected: int, timeout: float = 300.0) -> dict[int, int]:
    """Node id -> partition id of every node, asked once with a ``query`` message after
    ``expected`` nodes have registered. Evaluation ground truth (which node ids the run
    config's Byzantine partitions are) comes from here, never from training replies."""
    deadline = time.monotonic() + timeout
    while len(node_ids := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(node_ids)} of {expected} nodes registered")
        time.sleep(1.0)
    messages = [
        Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.QUERY)
        for node_id in node_ids
    ]
    roster = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node_id = int(reply.metadata.src_node_id)
        if reply.has_error() or "roster" not in reply.content:
            logger.warning("roster: node %d gave no partition id", node_id)
            continue
        roster[node_id] = int(reply.content["roster"]["partition-id"])
    for node_id, partition in sorted(roster.items(), key=lambda item: item[1]):
        logger.info("roster: node %d is partition %d", node_id, partition)
    return roster


def detection_scores(
    rejected: set[int], participants: set[int], byzantine: frozenset[int]
) -> tuple[float | None, float | None]:
    """Precision and recall of the round's rejections against the Byzantine ground truth
    (``None`` where undefined: nothing rejected / no Byzantine participant)."""
    attackers = participants & byzantine
    hits = len(rejected & attackers)
    precision = hits / len(rejected) if rejected else None
    recall = hits / len(attackers) if attackers else None
    return precision, recall


class CentralEvaluation:
    """Evaluates each round's global model on the held-out test split, logs one
    ``accuracy`` line per round and appends it, with the round's report, to the
    ``results-file`` (one JSON object per line) when one is configured.

    With Byzantine ground truth it adds detection ``precision`` and ``recall``; with a
    backdoor attack (a :class:`~flwr_robust.attacks.TriggerAttack`), the
    ``attack_success_rate`` of its (global) trigger on triggered test inputs, every round,
    also after an ``attack-stop-round``; for a distributed trigger (DBA) also
    ``attack_success_rate_local``, one rate per local trigger.
    """

    def __init__(
        self,
        settings: RunSettings,
        model: torch.nn.Module,
        test: Dataset,
        engine: RobustAggregation,
        byzantine_nodes: frozenset[int] = frozenset(),
        backdoor: TriggerAttack | None = None,
        roster: dict[int, int] | None = None,
        *,
        round_offset: int = 0,
        listeners: Sequence[EvaluationListener] = (),
    ) -> None:
        self.settings = settings
        self.model = model
        self.test = test
        self.engine = engine
        self.byzantine_nodes = byzantine_nodes
        self.backdoor = backdoor
        self.roster = roster or {}
        self.round_offset = round_offset
        self.listeners = list(listeners)
        self.names = list(get_named_weights(model))
        self.results_path = Path(settings.results_file) if settings.results_file else None
        if self.results_path is not None:
            self.results_path.parent.mkdir(parents=True, exist_ok=True)
        self.history: list[dict[str, Any]] = []

    def __call__(self, server_round: int, arrays: list[np.ndarray]) -> dict[str, float] | None:
        global_round = server_round + self.round_offset
        evaluated = self.settings.evaluates(global_round)
        started = time.perf_counter()
        set_weights(self.model, arrays)
        loss, accuracy = evaluate(self.model, self.test) if evaluated else (None, None)
        record: dict[str, Any] = {
            "round": global_round, "accuracy": accuracy, "loss": loss, "time": time.time()
        }
        report = self.engine.report_for(server_round) if server_round > 0 else None
        if report is not None:
            record.update(report.to_dict())
            record["round"] = global_round
        else:
            record.update({"kept": [], "rejected": {}})
        asr = None
        if self.backdoor is not None and evaluated:
            asr = self.backdoor.success_rate(lambda x: predict(self.model, x), self.test)
            if len(self.backdoor.local_triggers()) > 1:
                record["attack_success_rate_local"] = self.backdoor.local_success_rates(
                    lambda x: predict(self.model, x), self.test
                )
        precision = recall = None
        if report is not None and self.byzantine_nodes:
            participants = set(report.identities)
            precision, recall = detection_scores(
                set(report.rejected), participants, self.byzantine_nodes
            )
        record.update(
            {
                "attack_success_rate": asr,
                "precision": precision,
                "recall": recall,
                "byzantine": sorted(self.byzantine_nodes),
                "partitions": {str(n): p for n, p in sorted(self.roster.items())},
                "evaluation_seconds": round(time.perf_counter() - started, 6),
            }
        )
        self.history.append(record)
        extra = "" if asr is None else f" attack_success_rate={asr:.4f}"
        if precision is not None or recall is not None:
            extra += f" precision={_fmt(precision)} recall={_fmt(recall)}"
        quality = (f"accuracy={accuracy:.4f} loss={loss:.4f}" if evaluated else
                   f"not evaluated (evaluate-every={self.settings.evaluate_every})")
        logger.info(
            "round %d: %s kept=%d rejected=%d%s%s",
            global_round, quality, len(record["kept"]), len(record["rejected"]), extra,
            f" ({report.note})" if report is not None and report.note else "",
        )
        if self.results_path is not None:
            with self.results_path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")
        if accuracy is None or loss is None:
            return None
        metrics = {"accuracy": accuracy, "loss": loss}
        for listener in self.listeners:
            listener(server_round, dict(metrics))
        return metrics

    def message_api(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``evaluate_fn`` of ``Strategy.start`` (``None`` on rounds not evaluated)."""
        metrics = self(server_round, arrays.to_numpy_ndarrays())
        return None if metrics is None else MetricRecord(metrics)

    def legacy_api(
        self, server_round: int, arrays: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, dict[str, float]] | None:
        """``evaluate_fn`` of the legacy ``FedAvg`` (``None`` on rounds not evaluated)."""
        metrics = self(server_round, arrays)
        return None if metrics is None else (metrics["loss"], {"accuracy": metrics["accuracy"]})


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def integrity_hooks(keys_dir: Path, run_id: int) -> list[StrategyHook]:
    """Signature verification of updates (first, so later hooks see only authentic replies)
    and signing of the global model, with the keys of ``flwr-robust keys init``."""
    layout = KeyDir(keys_dir)
    for warning in layout.permission_warnings():
        logger.warning("keys: %s", warning)
    store = TrustStore.load(layout.truststore)
    logger.info("signing on: %d trusted client keys in %s", len(store), layout.truststore)
    return [
        VerifyUpdateSignatures(store, run_id),
        SignGlobalModel(load_private_key(layout.server_key), run_id),
    ]


#: Mixed into the run seed for FLTrust's root dataset and server training shuffles.
FLTRUST_SEED_TAG = 0x464C54


def privacy_hook(settings: RunSettings) -> PrivacyPolicyHook | None:
    """The privacy policy (``dp-policy-max-epsilon`` / ``-delta``), or a reporting-only hook
    when the clients run local DP (``dp-clip`` and ``dp-noise-multiplier``); else ``None``."""
    policy = (settings.dp_policy_max_epsilon or None, settings.dp_policy_max_delta or None)
    if policy == (None, None) and not (settings.dp_clip and settings.dp_noise_multiplier):
        return None
    return PrivacyPolicyHook(*policy)


def split_root_dataset(test: Dataset, size: int, seed: int) -> tuple[Dataset, Dataset]:
    """FLTrust's root dataset: ``size`` samples of the test split drawn with ``seed``, and
    the other test samples, the only ones the central evaluation then uses (disjoint)."""
    if not 0 < size < len(test):
        raise ValueError(
            f"run config 'fltrust-root-size' must be in 1..{len(test) - 1} (the test split "
            f"has {len(test)} samples; the rest is kept for central evaluation), got {size}"
        )
    chosen = np.random.default_rng([seed, FLTRUST_SEED_TAG]).choice(len(test), size, replace=False)
    rest = np.setdiff1d(np.arange(len(test)), chosen)
    return test.subset(np.sort(chosen)), test.subset(rest)


class RootDatasetUpdate:
    """FLTrust's ``server_update_fn``: trains a copy of the model from the global weights on
    the root dataset with the clients' local hyperparameters (epochs, learning rate, batch
    size, momentum) and returns the trained weights minus the global ones."""

    def __init__(self, model: torch.nn.Module, root: Dataset, settings: RunSettings) -> None:
        self.model = copy.deepcopy(model)
        self.root = root
        self.settings = settings
        self.calls = 0

    def __call__(self, weights: list[np.ndarray]) -> list[np.ndarray]:
        set_weights(self.model, weights)
        seed = np.random.default_rng([self.settings.seed, FLTRUST_SEED_TAG, self.calls])
        self.calls += 1
        train(
            self.model,
            self.root,
            epochs=self.settings.local_epochs,
            learning_rate=self.settings.learning_rate,
            batch_size=self.settings.batch_size,
            momentum=self.settings.momentum,
            seed=int(seed.integers(2**31)),
        )
        trained = get_named_weights(self.model).values()
        return [w - g for w, g in zip(trained, weights, strict=True)]

    def __repr__(self) -> str:
        return f"RootDatasetUpdate({len(self.root)} samples)"


def with_server_update(
    settings: RunSettings, rule_params: dict[str, Any], model: torch.nn.Module, test: Dataset
) -> tuple[dict[str, Any], Dataset]:
    """The rule parameters and the central-evaluation data: for a rule that takes a
    ``server_update_fn`` (``fltrust``, also behind a pre-aggregation stage or as reputation's
    base rule), a :class:`RootDatasetUpdate` on a root set split off the test data, which the
    evaluation then no longer uses; otherwise both unchanged."""
    accepted = aggregator_parameters(settings.strategy, pre=rule_params.get("pre"),
                                     params=rule_params)
    if "server_update_fn" not in accepted:
        return rule_params, test
    root, rest = split_root_dataset(test, settings.fltrust_root_size, settings.seed)
    logger.info("%s: root dataset of %d test samples; central evaluation on the other %d",
                settings.strategy, len(root), len(rest))
    return {**rule_params, "server_update_fn": RootDatasetUpdate(model, root, settings)}, rest


EvaluationListener = Callable[[int, dict[str, Any]], None]


@dataclass
class Operations:
    """The operational hooks a run config switches on (anomaly detection, checkpoints and
    rollback, audit log, Prometheus metrics) and the evaluation listeners they need, in the
    order they must run."""

    hooks: list[StrategyHook] = field(default_factory=list)
    listeners: list[EvaluationListener] = field(default_factory=list)
    round_offset: int = 0
    resumed: dict[str, np.ndarray] | None = None
    audit: AuditLog | None = None
    metrics: PrometheusHook | None = None

    @classmethod
    def from_settings(cls, settings: RunSettings, run_config: Mapping[str, Any]) -> Operations:
        """Build what ``settings`` asks for; resume from the latest checkpoint if asked."""
        ops = cls()
        server_key = None  # with signing, checkpoints are signed and verified with it
        if settings.signing and settings.checkpoint_dir:
            server_key = load_private_key(KeyDir(settings.keys_dir).server_key)
        if settings.resume:
            verify_key = None if server_key is None else server_key.public_key()
            state = resume_state(settings.checkpoint_dir, verify_key)
            if state is None:
                logger.warning("resume: no checkpoint in %s, starting fresh", settings.checkpoint_dir)
            else:
                ops.round_offset, ops.resumed = state
                logger.info("resume: continuing after round %d from %s", ops.round_offset,
                            settings.checkpoint_dir)
        anomaly = None
        if settings.anomaly_detection:
            anomaly = AnomalyDetectionHook(
                settings.anomaly_detection,
                **kwargs_from_config(AnomalyDetectionHook.__init__, run_config, skip=("mode",),
                                     prefix="anomaly-"),
            )
            ops.hooks.append(anomaly)
        if settings.metrics_port is not None:
            ops.metrics = PrometheusHook(
                anomaly=anomaly, client_labels=settings.metrics_client_labels
            )
            ops.metrics.start(settings.metrics_port, settings.metrics_addr)
        if settings.audit_file:
            ops.audit = AuditLog(
                settings.audit_file, round_offset=ops.round_offset, anomaly=anomaly
            )
            ops.listeners.append(ops.audit.record_evaluation)
        if ops.metrics is not None:
            ops.listeners.append(ops.metrics.record_evaluation)
        if settings.checkpoint_dir:
            rollback_listeners = [h.record_rollback for h in (ops.audit, ops.metrics) if h]
            checkpoints = CheckpointHook(
                CheckpointStore(
                    settings.checkpoint_dir,
                    settings.checkpoint_keep or None,
                    signing_key=server_key,
                ),
                max_accuracy_drop=settings.rollback_max_accuracy_drop,
                round_offset=ops.round_offset,
                on_rollback=rollback_listeners,
            )
            ops.hooks.append(checkpoints)
            ops.listeners.append(checkpoints.record_evaluation)  # last: may decide a rollback
        ops.hooks += [h for h in (ops.audit, ops.metrics) if h is not None]
        return ops

    def close(self) -> None:
        """Stop the metrics server; log the audit chain's head (verify against it later)."""
        if self.metrics is not None:
            self.metrics.stop()
        if self.audit is not None:
            logger.info("audit log %s head %s (flwr-robust audit verify FILE --head HEAD)",
                        self.audit.path, self.audit.head)


#: FedAvg's (fraction train, fraction evaluate, available, train and evaluate minimum)
#: parameter names in each API.
NODE_PARAMETERS = {
    "message": ("fraction_train", "fraction_evaluate", "min_available_nodes",
                "min_train_nodes", "min_evaluate_nodes"),
    "legacy": ("fraction_fit", "fraction_evaluate", "min_available_clients",
               "min_fit_clients", "min_evaluate_clients"),
}


def train_config(settings: RunSettings) -> dict[str, Any]:
    """What every client receives with each training instruction."""
    return {"local-epochs": settings.local_epochs, "learning-rate": settings.learning_rate}


def run(grid: Grid, context: Context) -> list[dict[str, Any]]:
    """Body of the ServerApp's ``main``: returns the per-round evaluation records.

    With run config ``experiment-cells`` (an experiment grid's batch), runs every cell back
    to back in this one Flower run: each from a fresh model with its own settings, its
    instructions carrying ``experiment-cell`` so that clients apply the same overrides.
    """
    settings = RunSettings.from_run_config(context.run_config)
    cells = parse_cells(settings.experiment_cells)
    if not cells:
        return run_one(grid, dict(context.run_config), context.run_id)
    history: list[dict[str, Any]] = []
    rosters: dict[int, dict[int, int]] = {}
    failed = []
    for index in range(len(cells)):
        logger.info("experiment cell %d of %d: %s", index + 1, len(cells), cells[index])
        run_config = cell_run_config(context.run_config, index)
        try:
            history += run_one(grid, run_config, context.run_id, index, rosters)
        except Exception:  # one cell's failure must not void the others' results
            logger.exception("experiment cell %d failed", index + 1)
            failed.append(index + 1)
    if failed:
        raise RuntimeError(f"experiment cells {failed} of {len(cells)} failed (see the log)")
    return history


def run_one(
    grid: Grid,
    run_config: dict[str, Any],
    run_id: int,
    cell: int | None = None,
    rosters: dict[int, dict[int, int]] | None = None,
) -> list[dict[str, Any]]:
    """One federated training from a fresh (or resumed) model under ``run_config``."""
    settings = RunSettings.from_run_config(run_config)
    logger.info("flwr-robust: %s", settings)
    ops = Operations.from_settings(settings, run_config)
    try:
        return _run(grid, run_config, run_id, settings, ops, cell, rosters or {})
    finally:
        ops.close()


def _run(
    grid: Grid,
    run_config: dict[str, Any],
    run_id: int,
    settings: RunSettings,
    ops: Operations,
    cell: int | None,
    rosters: dict[int, dict[int, int]],
) -> list[dict[str, Any]]:
    _, test = load_dataset(settings.dataset, seed=settings.seed,
                           path=settings.dataset_path or None, **settings.dataset_options())
    model = build_global_model(settings, test)
    initial = ops.resumed or get_named_weights(model)
    num_rounds = settings.num_server_rounds - ops.round_offset
    if num_rounds < 1:
        raise ValueError(
            f"resume: the checkpoint is from round {ops.round_offset}, run config "
            f"'num-server-rounds' is {settings.num_server_rounds}: nothing left to run"
        )
    cell_config = {} if cell is None else {"experiment-cell": cell}
    rule_params, test = with_server_update(settings, settings.rule_params(run_config), model, test)
    hooks: list[StrategyHook] = []
    if settings.signing:
        hooks += integrity_hooks(Path(settings.keys_dir), run_id)
    privacy = privacy_hook(settings)
    if privacy is not None:  # after verification: the figures it reads are signed ones
        hooks.append(privacy)
    roster: dict[int, int] = {}
    byzantine_nodes: frozenset[int] = frozenset()
    if settings.attack or settings.integrity_faults:
        expected = settings.min_available_nodes
        if expected not in rosters:  # one query per Flower run, shared by its cells
            rosters[expected] = query_roster(grid, expected)
        roster = rosters[expected]
    if settings.attack:
        partitions = settings.byzantine_partitions(len(roster))
        byzantine_nodes = frozenset(n for n, p in roster.items() if p in partitions)
        logger.info("Byzantine ground truth: partitions %s = nodes %s", sorted(partitions),
                    sorted(byzantine_nodes))
        if settings.attack_omniscient:
            params = attack_params_from_config(settings.attack, run_config)
            hooks.append(OmniscientAttackHook(settings.attack, byzantine_nodes, params,
                                              seed=settings.seed))
    hooks += ops.hooks
    backdoor = None  # the attack whose success rate the central evaluation reports
    if settings.attack and issubclass(attack_class(settings.attack), TriggerAttack):
        attack = get_attack(settings.attack,
                            **attack_params_from_config(settings.attack, run_config))
        assert isinstance(attack, TriggerAttack)
        backdoor = attack
    common = {"max_num_examples": settings.max_num_examples, "hooks": hooks, **rule_params}
    needed = get_aggregator(settings.strategy, **rule_params).min_clients()
    nodes = max(settings.min_available_nodes, needed)
    # Minimums matching the federation: FedAvg sizes its sample before waiting for nodes.
    train_nodes = max(needed, int(nodes * settings.fraction_train))
    evaluate_nodes = int(nodes * settings.fraction_evaluate)

    def evaluation_for(engine: RobustAggregation) -> CentralEvaluation:
        engine.round_offset = ops.round_offset
        return CentralEvaluation(
            settings, model, test, engine, byzantine_nodes, backdoor, roster,
            round_offset=ops.round_offset, listeners=ops.listeners,
        )

    # FedAvg's sampling parameters are named differently in the two APIs.
    names = NODE_PARAMETERS[settings.api]
    sampling = dict(zip(names, (settings.fraction_train, settings.fraction_evaluate, nodes,
                                train_nodes, evaluate_nodes), strict=True))
    if settings.api == "message":
        strategy = make_strategy(settings.strategy, api="message", **sampling, **common)
        evaluation = evaluation_for(strategy.engine)
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({k: Array(v) for k, v in initial.items()}),
            num_rounds=num_rounds,
            train_config=ConfigRecord({**train_config(settings), **cell_config}),
            evaluate_config=ConfigRecord(cell_config),
            evaluate_fn=evaluation.message_api,
        )
    else:
        strategy = make_strategy(
            settings.strategy,
            api="legacy",
            initial_parameters=ndarrays_to_parameters(list(initial.values())),
            on_fit_config_fn=lambda _round: {**train_config(settings), **cell_config},
            on_evaluate_config_fn=lambda _round: dict(cell_config),
            **sampling,
            **common,
        )
        evaluation = evaluation_for(strategy.engine)
        strategy.evaluate_fn = evaluation.legacy_api
        start_grid(grid=grid, strategy=strategy, config=ServerConfig(num_rounds))
    return evaluation.history
