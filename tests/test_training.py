"""Tests for flwr_robust.task.training: learning, determinism, evaluation and prediction."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from flwr_robust.task.data import Dataset, load_dataset
from flwr_robust.task.models import build_model, get_weights
from flwr_robust.task.training import evaluate, predict, train


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Use one intra-op thread (faster on the shared 2-core machine); restore afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def fresh(name: str, data: Dataset, seed: int = 0) -> torch.nn.Module:
    return build_model(name, input_shape=data.input_shape, num_classes=data.num_classes, seed=seed)


# Thresholds: minimum test accuracy measured over seeds 0-7, minus a margin. Measured minima:
# synthetic/mlp 3 epochs 0.958; digits/mlp 5 epochs 0.903; digits/cnn 5 epochs momentum 0.9
# 0.964. Chance is 0.1. Each run takes < 0.6 s on one thread.
@pytest.mark.parametrize(
    ("dataset", "model_name", "epochs", "learning_rate", "momentum", "threshold"),
    [
        ("synthetic", "mlp", 3, 0.1, 0.0, 0.85),
        ("digits", "mlp", 5, 0.1, 0.0, 0.80),
        ("digits", "cnn", 5, 0.05, 0.9, 0.90),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_training_learns_well_above_chance(
    dataset: str,
    model_name: str,
    epochs: int,
    learning_rate: float,
    momentum: float,
    threshold: float,
    seed: int,
) -> None:
    train_data, test_data = load_dataset(dataset, seed=seed)
    model = fresh(model_name, train_data, seed)
    _, before = evaluate(model, test_data)
    start = time.perf_counter()
    result = train(
        model,
        train_data,
        epochs=epochs,
        learning_rate=learning_rate,
        momentum=momentum,
        seed=seed,
    )
    elapsed = time.perf_counter() - start
    _, after = evaluate(model, test_data)
    assert before < 0.3
    assert after >= threshold
    assert result["num_examples"] == len(train_data)
    assert math.isfinite(result["loss"]) and result["loss"] < math.log(10)
    assert elapsed < 10.0  # about 0.1-0.6 s here; loose for a loaded machine


def test_train_is_deterministic_under_seed() -> None:
    data, _ = load_dataset("digits")

    def run(seed: int) -> list[np.ndarray]:
        model = fresh("mlp", data, seed=0)
        train(model, data, epochs=1, learning_rate=0.1, seed=seed)
        return get_weights(model)

    a, b, c = run(5), run(5), run(6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))


def test_train_leaves_global_torch_state_alone() -> None:
    data, _ = load_dataset("synthetic")
    torch.set_num_threads(1)
    rng_state = torch.random.get_rng_state()
    train(fresh("mlp", data), data, epochs=1, learning_rate=0.1)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert torch.get_num_threads() == 1


def test_train_reports_last_epoch_statistics() -> None:
    data, _ = load_dataset("synthetic")
    model = fresh("mlp", data)
    first = train(model, data, epochs=1, learning_rate=0.1, batch_size=16)
    later = train(model, data, epochs=2, learning_rate=0.1, batch_size=16, seed=1)
    assert set(first) == {"loss", "accuracy", "num_examples"}
    assert later["loss"] < first["loss"]
    assert 0.0 <= first["accuracy"] <= later["accuracy"] <= 1.0


def test_evaluate_matches_a_direct_computation() -> None:
    _, data = load_dataset("digits")
    model = fresh("mlp", data, seed=2)
    loss, accuracy = evaluate(model, data, batch_size=50)
    with torch.no_grad():
        logits = model(torch.tensor(data.x))
        target = torch.tensor(data.y)
        expected_loss = float(F.cross_entropy(logits, target))
        expected_accuracy = float((logits.argmax(1) == target).float().mean())
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert accuracy == pytest.approx(expected_accuracy)
    assert accuracy == pytest.approx(float(np.mean(predict(model, data.x) == data.y)))


def test_predict_returns_int64_labels_independent_of_batch_size() -> None:
    _, data = load_dataset("synthetic")
    model = fresh("cnn", data, seed=1)
    labels = predict(model, data.x)
    assert labels.dtype == np.int64 and labels.shape == (len(data),)
    assert labels.min() >= 0 and labels.max() < data.num_classes
    np.testing.assert_array_equal(predict(model, data.x, batch_size=7), labels)
    np.testing.assert_array_equal(predict(model, data.x.astype(np.float64)), labels)


def test_training_also_runs_on_28x28_images() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 28, 28), dtype=np.float32)
    data = Dataset(x, np.arange(64) % 10, 10, "toy28")
    model = fresh("cnn", data)
    result = train(model, data, epochs=1, learning_rate=0.05, batch_size=32)
    assert result["num_examples"] == 64 and math.isfinite(result["loss"])
    assert predict(model, data.x).shape == (64,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs must be an int >= 1"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"learning_rate": 0.0}, "learning_rate must be a finite float > 0"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite float > 0"),
        ({"momentum": 1.0}, r"momentum must be a float in \[0, 1\)"),
    ],
)
def test_train_argument_errors(kwargs: dict[str, float], match: str) -> None:
    data, _ = load_dataset("synthetic")
    args: dict[str, float] = {"epochs": 1, "learning_rate": 0.1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        train(fresh("mlp", data), data, **args)  # type: ignore[arg-type]


def test_empty_data_and_bad_inputs_are_rejected() -> None:
    data, _ = load_dataset("synthetic")
    empty = data.subset([])
    model = fresh("mlp", data)
    with pytest.raises(ValueError, match="data must hold at least one sample"):
        train(model, empty, epochs=1, learning_rate=0.1)
    with pytest.raises(ValueError, match="data must hold at least one sample"):
        evaluate(model, empty)
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, H, W\)"):
        predict(model, data.x[:, 0])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        evaluate(model, data, batch_size=0)
