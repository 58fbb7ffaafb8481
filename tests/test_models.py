"""Tests for flwr_robust.task.models: construction, determinism and weight conversion."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from flwr_robust.task.models import (
    build_model,
    default_model,
    get_named_weights,
    get_weights,
    set_weights,
)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Use one intra-op thread (faster on the shared 2-core machine); restore afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 10, 12)])
def test_models_map_images_to_logits(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, input_shape=shape, num_classes=7, seed=0)
    logits = model(torch.rand(5, *shape))
    assert logits.shape == (5, 7) and logits.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_parameter_counts_stay_small() -> None:
    def count(name: str, shape: tuple[int, int, int]) -> int:
        model = build_model(name, input_shape=shape, num_classes=10)
        return sum(p.numel() for p in model.parameters())

    assert count("cnn", (1, 28, 28)) == 20490
    assert count("cnn", (1, 8, 8)) == 6090
    assert count("mlp", (1, 8, 8)) == 64 * 64 + 64 + 64 * 10 + 10


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_seeded_init_is_deterministic_and_leaves_global_rng(name: str) -> None:
    state = torch.random.get_rng_state()
    a = get_weights(build_model(name, input_shape=(1, 8, 8), num_classes=10, seed=3))
    b = get_weights(build_model(name, input_shape=(1, 8, 8), num_classes=10, seed=3))
    c = get_weights(build_model(name, input_shape=(1, 8, 8), num_classes=10, seed=4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))


def test_unseeded_init_draws_from_the_global_rng() -> None:
    torch.manual_seed(11)
    a = get_weights(build_model("mlp", input_shape=(1, 8, 8), num_classes=10))
    torch.manual_seed(11)
    b = get_weights(build_model("mlp", input_shape=(1, 8, 8), num_classes=10))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("name", "shape", "num_classes", "match"),
    [
        ("resnet", (1, 8, 8), 10, r"name must be one of \['mlp', 'cnn'\]"),
        ("cnn", (1, 3, 3), 10, "needs H, W >= 4"),
        ("mlp", (8, 8), 10, r"input_shape must be \(C, H, W\)"),
        ("mlp", (1, 0, 8), 10, r"input_shape must be \(C, H, W\)"),
        ("mlp", (1, 8, 8), 1, "num_classes must be an int >= 2"),
    ],
)
def test_build_model_argument_errors(
    name: str, shape: tuple[int, ...], num_classes: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(name, input_shape=shape, num_classes=num_classes)  # type: ignore[arg-type]


def test_default_model() -> None:
    assert default_model("digits") == "mlp"
    assert default_model("synthetic") == "mlp"
    assert default_model("fashion_mnist") == "cnn"
    assert default_model("hf:zalando-datasets/fashion_mnist") == "cnn"
    with pytest.raises(ValueError, match="dataset_name must be one of"):
        default_model("cifar10")


def test_get_weights_are_float32_copies_in_state_dict_order() -> None:
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10, seed=0)
    weights = get_weights(model)
    named = get_named_weights(model)
    state = model.state_dict()
    assert list(named) == list(state)
    assert [w.shape for w in weights] == [tuple(t.shape) for t in state.values()]
    assert all(w.dtype == np.float32 for w in weights)
    for w, v in zip(weights, named.values(), strict=True):
        np.testing.assert_array_equal(w, v)
    weights[0][...] = 123.0
    assert not torch.any(model.state_dict()[next(iter(state))] == 123.0)


def test_set_weights_round_trip_reproduces_the_model() -> None:
    source = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, seed=1)
    target = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, seed=2)
    x = torch.rand(4, 1, 8, 8)
    assert not torch.equal(source(x), target(x))
    arrays = get_weights(source)
    set_weights(target, arrays)
    assert torch.equal(source(x), target(x))
    arrays[0][...] = 0.0  # the model holds its own copy
    assert torch.equal(source(x), target(x))


def test_set_weights_rejects_count_and_shape_mismatch() -> None:
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, seed=0)
    before = get_weights(model)
    arrays = get_weights(model)
    with pytest.raises(ValueError, match="arrays must hold 4 arrays"):
        set_weights(model, arrays[:-1])
    bad = [*arrays[:-1], np.zeros(9, dtype=np.float32)]
    with pytest.raises(ValueError, match=r"layer 'out.bias' needs shape \(10,\), got \(9,\)"):
        set_weights(model, bad)
    swapped = [arrays[2], arrays[1], arrays[0], arrays[3]]  # layer order matters
    with pytest.raises(ValueError, match=r"'hidden.weight' needs shape \(64, 64\), got \(10, 64\)"):
        set_weights(model, swapped)
    after = get_weights(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
