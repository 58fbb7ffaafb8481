"""Run-config keys a benchmark sizes its runs with: dataset subsampling and evaluate-every."""

from __future__ import annotations

from pathlib import Path

import pytest

from flwr_robust.apps.server import CentralEvaluation
from flwr_robust.apps.settings import RunSettings
from flwr_robust.task.data import load_dataset
from flwr_robust.task.models import build_model, get_named_weights


def test_dataset_sizes_are_fashion_mnist_options_only() -> None:
    settings = RunSettings.from_run_config(
        {"dataset": "fashion_mnist", "max-train-samples": 5000, "max-test-samples": 0})
    assert settings.dataset_options() == {"max_train": 5000}
    assert RunSettings.from_run_config({}).dataset_options() == {}
    with pytest.raises(ValueError, match="'fashion_mnist' only"):
        RunSettings.from_run_config({"dataset": "digits", "max-test-samples": 100})
    with pytest.raises(ValueError, match="max-train-samples"):
        RunSettings.from_run_config({"dataset": "fashion_mnist", "max-train-samples": -1})


def test_evaluate_every_keeps_round_zero_and_the_last() -> None:
    settings = RunSettings.from_run_config({"evaluate-every": 3, "num-server-rounds": 10})
    assert [r for r in range(11) if settings.evaluates(r)] == [0, 3, 6, 9, 10]
    with pytest.raises(ValueError, match="evaluate-every"):
        RunSettings.from_run_config({"evaluate-every": 0})


class _NoReports:
    def report_for(self, server_round: int) -> None:
        return None


def test_rounds_not_evaluated_are_recorded_without_accuracy(tmp_path: Path) -> None:
    settings = RunSettings.from_run_config(
        {"evaluate-every": 2, "num-server-rounds": 3, "results-file": str(tmp_path / "r.jsonl")})
    _, test = load_dataset("digits")
    model = build_model("mlp", input_shape=test.x.shape[1:], num_classes=test.num_classes)
    weights = list(get_named_weights(model).values())
    evaluation = CentralEvaluation(settings, model, test, engine=_NoReports())  # type: ignore[arg-type]
    returned = [evaluation(r, weights) for r in range(4)]
    assert [r is None for r in returned] == [False, True, False, False]
    records = evaluation.history
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert records[1]["accuracy"] is None and records[1]["loss"] is None
    assert all(0.0 <= records[r]["accuracy"] <= 1.0 for r in (0, 2, 3))
    assert all(r["evaluation_seconds"] >= 0.0 for r in records)
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 4
