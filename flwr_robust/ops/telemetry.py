"""Prometheus metrics of a federation's rounds, as a strategy hook.

:class:`PrometheusHook` keeps its own :class:`prometheus_client.CollectorRegistry` (never the
process-global one, so several hooks can live in one process) and serves it over HTTP on
request (:meth:`PrometheusHook.start`, loopback by default). Metrics:

``fl_round_total{status}``
    Training rounds by outcome: ``aggregated`` or ``kept_global`` (too few valid replies).
``fl_client_updates_accepted_total``
    Updates the rule aggregated (the report's ``kept`` nodes).
``fl_client_updates_rejected_total{reason}``
    Every rejected reply by reason code.
``fl_gradient_anomaly_detected_total{reason}``
    Anomaly flags by code (``anomaly-norm``, ``anomaly-zscore``, ``anomaly-direction``): one
    per node and code, from the attached detector's flags (both modes, all codes of a node)
    and from ``anomaly-*`` rejections in the report.
``fl_byzantine_client_excluded_total``
    Well-formed, authenticated updates left out for their *behaviour*: rejections coded
    ``excluded-by-rule`` (the robust rule dropped them) or ``anomaly-*`` (the detector
    excluded them). Validation failures (malformed, non-finite, ...) and signature failures
    are not counted here: they may be faults rather than attacks, and the latter have their
    own counter.
``fl_model_signature_verification_failure_total{reason}``
    Rejections whose code is a signature-verification reason of
    :class:`flwr_robust.security.verifier.Reason` (``bad-signature``, ``unsigned``, ...).
``fl_client_epsilon_spent{client_id}``
    The epsilon each client reported in its latest training reply (local DP, read from
    ``report.info["privacy"]``, which :class:`~flwr_robust.privacy.PrivacyPolicyHook`
    fills); without client labels, the largest epsilon reported in the latest round.
``fl_privacy_budget_exhausted_total{client_id}``
    Training instructions clients declined because their privacy budget was spent.
``fl_model_rollback_total``
    Rollbacks to a checkpoint (:meth:`PrometheusHook.record_rollback`).
``fl_model_accuracy``
    Centrally evaluated accuracy of the global model (:meth:`PrometheusHook.record_evaluation`).
``fl_aggregation_duration_seconds``, ``fl_round_duration_seconds``
    Histograms of the robust aggregation step (validation, hooks, rule) and of a whole
    training round (train instruction to aggregated result, so client training included).

Label cardinality is bounded: ``reason`` takes only the codes of
:data:`KNOWN_REASON_CODES` (anything else becomes ``other``) and ``status`` two values.
``client_labels=True`` adds a ``client`` label (the reply's stable identity) to the
per-client counters: one series per client and reason, so only for small federations (the
two privacy metrics name that label ``client_id``, as the security guide does).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ..privacy.hooks import INFO_KEY, PRIVACY_CODES
from ..security.verifier import Reason
from ..strategy.hooks import StrategyHook
from ..validation import REASON_CODES, reason_code
from .anomaly import ANOMALY_CODES, AnomalyDetectionHook

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from ..strategy.engine import RoundReport
    from .checkpoint import RollbackEvent

logger = logging.getLogger("flwr.robust")

#: The reason code the engine gives to replies a robust rule left out.
EXCLUDED_BY_RULE = "excluded-by-rule"
#: Signature-verification rejection codes.
SIGNATURE_CODES = frozenset(reason.value for reason in Reason)
#: Codes counted as Byzantine exclusions (see the module docstring).
BYZANTINE_EXCLUSION_CODES = frozenset((EXCLUDED_BY_RULE, *ANOMALY_CODES))
#: Every value the ``reason`` labels may take besides ``other``.
KNOWN_REASON_CODES = frozenset(
    (*REASON_CODES, *SIGNATURE_CODES, *BYZANTINE_EXCLUSION_CODES, *PRIVACY_CODES)
)
OTHER = "other"
ROUND_STATUSES = ("aggregated", "kept_global")

AGGREGATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)
ROUND_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def reason_label(code: str) -> str:
    """The ``reason`` label value for a rejection code (unknown codes give ``other``)."""
    return code if code in KNOWN_REASON_CODES else OTHER


class PrometheusHook(StrategyHook):
    """Count every round's outcome in Prometheus metrics (see the module docstring).

    Parameters
    ----------
    anomaly : AnomalyDetectionHook, optional
        A detector whose flags to count; needed to count flags in its ``"flag"`` mode, where
        the report holds no anomaly rejections.
    client_labels : bool
        Add a ``client`` label (stable identity) to per-client counters. Off by default: a
        federation can have thousands of clients, each a new series per reason.
    accuracy_key : str
        The metric :meth:`record_evaluation` reads into ``fl_model_accuracy``.
    """

    def __init__(
        self,
        *,
        anomaly: AnomalyDetectionHook | None = None,
        client_labels: bool = False,
        accuracy_key: str = "accuracy",
    ) -> None:
        self.anomaly = anomaly
        self.client_labels = bool(client_labels)
        self.accuracy_key = accuracy_key
        self.registry = CollectorRegistry()
        self._server: WSGIServer | None = None
        self._round_started: dict[int, float] = {}
        if self.client_labels:
            logger.warning(
                "PrometheusHook(client_labels=True): one time series per client and reason; "
                "do not use with large federations"
            )
        client = ("client",) if self.client_labels else ()
        registry = self.registry
        self.rounds = Counter(
            "fl_round_total", "Training rounds by outcome.", ("status",), registry=registry
        )
        self.accepted = Counter(
            "fl_client_updates_accepted_total", "Client updates the robust rule aggregated.",
            client, registry=registry,
        )
        self.rejected = Counter(
            "fl_client_updates_rejected_total", "Rejected client replies by reason code.",
            ("reason", *client), registry=registry,
        )
        self.anomalies = Counter(
            "fl_gradient_anomaly_detected_total",
            "Anomalous client updates detected, by detector code (flagged or excluded).",
            ("reason", *client), registry=registry,
        )
        self.excluded = Counter(
            "fl_byzantine_client_excluded_total",
            "Well-formed updates excluded for their behaviour (excluded-by-rule, anomaly-*).",
            client, registry=registry,
        )
        self.signature_failures = Counter(
            "fl_model_signature_verification_failure_total",
            "Client replies rejected by signature verification, by reason.",
            ("reason", *client), registry=registry,
        )
        self.epsilon = Gauge(
            "fl_client_epsilon_spent",
            "Epsilon a client reported spent in its latest training reply (local DP).",
            ("client_id",) if self.client_labels else (), registry=registry,
        )
        self.budget_exhausted = Counter(
            "fl_privacy_budget_exhausted_total",
            "Training instructions declined because the client's privacy budget was spent.",
            ("client_id",) if self.client_labels else (), registry=registry,
        )
        self.rollbacks = Counter(
            "fl_model_rollback_total", "Rollbacks of the global model to a checkpoint.",
            registry=registry,
        )
        self.accuracy = Gauge(
            "fl_model_accuracy", "Centrally evaluated accuracy of the global model.",
            registry=registry,
        )
        self.aggregation_seconds = Histogram(
            "fl_aggregation_duration_seconds",
            "Duration of the robust aggregation step (validation, hooks, rule).",
            buckets=AGGREGATION_BUCKETS, registry=registry,
        )
        self.round_seconds = Histogram(
            "fl_round_duration_seconds",
            "Duration of a training round, from the train instruction to the new model.",
            buckets=ROUND_BUCKETS, registry=registry,
        )
        for status in ROUND_STATUSES:
            self.rounds.labels(status=status)
        if not self.client_labels:
            self.accepted.inc(0)
            self.excluded.inc(0)
            self.budget_exhausted.inc(0)

    # ------------------------------------------------------------------ HTTP endpoint
    @property
    def port(self) -> int | None:
        """The port the endpoint is bound to, or ``None`` when it is not serving."""
        return None if self._server is None else int(self._server.server_port)

    def start(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr:port`` (port 0: a free port); return the bound port.

        Binds to loopback by default: pass ``addr="0.0.0.0"`` only behind a firewall, as
        the endpoint has no authentication.
        """
        if self._server is not None:
            raise RuntimeError(f"the metrics endpoint is already serving on port {self.port}")
        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        logger.info("Prometheus metrics on http://%s:%d/metrics", addr, self.port)
        return self.port  # type: ignore[return-value]

    def stop(self) -> None:
        """Stop serving and release the port (no-op when not serving)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ hook methods
    def on_instruction(
        self,
        server_round: int,
        purpose: str,
        global_arrays: dict[str, np.ndarray],
        config: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Note when a training round starts (for the round duration); adds nothing."""
        if purpose == "train":
            self._round_started[server_round] = time.perf_counter()
        return {}

    def on_round_end(self, report: RoundReport, new_arrays: dict[str, np.ndarray] | None) -> None:
        """Count the round's outcome, acceptances, rejections and anomalies."""
        self.rounds.labels(status="aggregated" if report.aggregated else "kept_global").inc()
        self.aggregation_seconds.observe(report.seconds)
        started = self._round_started.pop(report.server_round, None)
        if started is not None:
            self.round_seconds.observe(time.perf_counter() - started)
        for stale in [r for r in self._round_started if r < report.server_round]:
            del self._round_started[stale]  # rounds that never reached aggregation
        for node_id in report.kept:
            self._counter(self.accepted, report, node_id).inc()
        anomalies: set[tuple[int, str]] = set()
        for node_id, text in report.rejected.items():
            code = reason_code(text)
            label = reason_label(code)
            self._counter(self.rejected, report, node_id, label).inc()
            if code in SIGNATURE_CODES:
                self._counter(self.signature_failures, report, node_id, label).inc()
            if code in BYZANTINE_EXCLUSION_CODES or code.startswith("anomaly-"):
                self._counter(self.excluded, report, node_id).inc()
            if code.startswith("anomaly-"):
                anomalies.add((node_id, code))
        if self.anomaly is not None:
            for node_id, reasons in self.anomaly.flags_for(report.server_round).items():
                anomalies.update((node_id, reason_code(text)) for text in reasons)
        for node_id, code in anomalies:
            self._counter(self.anomalies, report, node_id, reason_label(code)).inc()
        self._record_privacy(report)

    def _record_privacy(self, report: RoundReport) -> None:
        """Epsilons and exhaustions from the privacy hook's figures in the report."""
        privacy = report.info.get(INFO_KEY) or {}
        epsilons = {int(k): float(v) for k, v in privacy.get("epsilon-spent", {}).items()}
        if self.client_labels:
            for node_id, value in epsilons.items():
                self._counter(self.epsilon, report, node_id).set(value)
        elif epsilons:
            self.epsilon.set(max(epsilons.values()))
        for node_id in privacy.get("budget-exhausted", []):
            self._counter(self.budget_exhausted, report, int(node_id)).inc()

    def record_evaluation(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        """Set ``fl_model_accuracy`` from centrally evaluated ``metrics`` (call after each
        central evaluation; a missing or non-finite accuracy leaves the gauge unchanged)."""
        value = metrics.get(self.accuracy_key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            self.accuracy.set(float(value))

    def record_rollback(self, event: RollbackEvent) -> None:
        """Count a rollback (pass as a ``CheckpointHook`` ``on_rollback`` listener)."""
        self.rollbacks.inc()

    def _counter(self, metric: Counter, report: RoundReport, node_id: int, *labels: str) -> Any:
        """``metric`` with ``labels`` (+ the client's identity when client labels are on)."""
        if self.client_labels:
            labels = (*labels, report.identities.get(node_id, f"node-{node_id}"))
        return metric.labels(*labels) if labels else metric
