"""Prometheus telemetry: scraped over HTTP on 127.0.0.1 after reports and a Median round."""

from __future__ import annotations

import urllib.error
import urllib.request

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from prometheus_client.parser import text_string_to_metric_families

from flwr_robust.ops.anomaly import AnomalyDetectionHook
from flwr_robust.ops.checkpoint import RollbackEvent
from flwr_robust.ops.telemetry import PrometheusHook, reason_label
from flwr_robust.strategy import Median, RoundReport


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1


class FakeGrid:
    def __init__(self, node_ids: list[int]) -> None:
        self._ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from the live endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labelled(samples: dict, name: str) -> dict[tuple, float]:
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


def median_round(hook: PrometheusHook, rnd: int = 1) -> None:
    """One Median round through the Message API: nodes 1-4 honest, 5 non-finite."""
    model = {"w": np.zeros((3, 2), np.float32), "b": np.ones(2, np.float32)}
    strategy = Median(hooks=[hook])
    arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    instructions = strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid([1, 2, 3, 4, 5]))
    replies = []
    for ins in instructions:
        node = ins.metadata.dst_node_id
        delta = np.float32("nan") if node == 5 else np.float32(0.1 * node)
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(v + delta) for k, v in model.items()}),
            "metrics": MetricRecord({"num-examples": 10}),
        })
        replies.append(Message(content, reply_to=ins))
    new, _ = strategy.aggregate_train(rnd, replies)
    assert new is not None


def test_metrics_are_served_and_counted() -> None:
    detector = AnomalyDetectionHook("flag")
    detector.last_round, detector.flags = 2, {8: ("anomaly-direction: cosine -0.5 ...",)}
    hook = PrometheusHook(anomaly=detector)
    port = hook.start(0)
    try:
        assert port > 0 and hook.port == port
        hook.on_round_end(RoundReport(
            1, "krum", 5, kept=[1, 2, 3], aggregated=True, seconds=0.02,
            rejected={4: "excluded-by-rule: krum: far", 5: "bad-signature: tampered"},
        ), None)
        hook.on_round_end(RoundReport(
            2, "krum", 4, aggregated=False, seconds=0.5,
            rejected={6: "anomaly-norm: big; anomaly-zscore: big", 7: "unsigned: none",
                      8: "weird-code: ?", 9: "non-finite: nan"},
        ), None)
        hook.record_evaluation(2, {"accuracy": 0.75, "loss": 0.4})
        hook.record_evaluation(3, {"loss": 0.4})  # no accuracy: gauge unchanged
        hook.record_rollback(RollbackEvent(3, 0.1, 3, 2, 0.75, "ab" * 32, 0.2, "t"))
        median_round(hook)

        samples = scrape(port)
        assert labelled(samples, "fl_round_total") == {
            (("status", "aggregated"),): 2.0, (("status", "kept_global"),): 1.0,
        }
        assert samples[("fl_client_updates_accepted_total", ())] == 3 + 4
        assert samples[("fl_byzantine_client_excluded_total", ())] == 2  # nodes 4 and 6
        assert labelled(samples, "fl_gradient_anomaly_detected_total") == {
            (("reason", "anomaly-norm"),): 1.0,
            (("reason", "anomaly-direction"),): 1.0,  # flag-mode flag of node 8
        }
        assert labelled(samples, "fl_model_signature_verification_failure_total") == {
            (("reason", "bad-signature"),): 1.0, (("reason", "unsigned"),): 1.0,
        }
        assert labelled(samples, "fl_client_updates_rejected_total") == {
            (("reason", "excluded-by-rule"),): 1.0, (("reason", "bad-signature"),): 1.0,
            (("reason", "anomaly-norm"),): 1.0, (("reason", "unsigned"),): 1.0,
            (("reason", "other"),): 1.0, (("reason", "non-finite"),): 2.0,
        }
        assert samples[("fl_model_accuracy", ())] == 0.75
        assert samples[("fl_model_rollback_total", ())] == 1
        assert samples[("fl_aggregation_duration_seconds_count", ())] == 3
        assert samples[("fl_aggregation_duration_seconds_bucket", (("le", "0.05"),))] >= 1
        assert samples[("fl_aggregation_duration_seconds_sum", ())] >= 0.52
        assert samples[("fl_round_duration_seconds_count", ())] == 1  # only the Median round
        client_series = [labels for (_, labels) in samples if any(k == "client" for k, _ in labels)]
        assert client_series == []
    finally:
        hook.stop()
    assert hook.port is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_client_labels_are_opt_in_and_registries_are_separate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plain = PrometheusHook()
    with PrometheusHook(client_labels=True) as hook:
        assert "do not use with large federations" in caplog.text
        port = hook.start()
        hook.on_round_end(RoundReport(
            1, "median", 2, kept=[1], aggregated=True, identities={1: "key-a", 2: "key-b"},
            rejected={2: "anomaly-zscore: far"},
        ), None)
        samples = scrape(port)
    assert samples[("fl_client_updates_accepted_total", (("client", "key-a"),))] == 1
    assert samples[(
        "fl_gradient_anomaly_detected_total", (("client", "key-b"), ("reason", "anomaly-zscore"))
    )] == 1
    assert plain.registry.get_sample_value("fl_client_updates_accepted_total") == 0.0


def test_start_twice_is_an_error_and_reason_labels_are_bounded() -> None:
    with PrometheusHook() as hook:
        hook.start()
        with pytest.raises(RuntimeError, match="already serving"):
            hook.start()
    assert reason_label("stale-base") == "stale-base"
    assert reason_label("anomaly-new-test") == "other"
