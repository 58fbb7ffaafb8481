"""FLTrust (Cao et al., NDSS 2021): hand-computed trust scores, normalisation, skipped
rounds, both strategy APIs, and the server app's root dataset."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_proxy import ClientProxy
from flwr.supercore.task_identity import TaskIdentity

from flwr_robust import legacy, make_strategy
from flwr_robust import strategy as message
from flwr_robust.aggregation import FLTrust, PreAggregated, get_aggregator
from flwr_robust.apps.server import RootDatasetUpdate, split_root_dataset, with_server_update
from flwr_robust.apps.settings import RunSettings
from flwr_robust.records import npy_view
from flwr_robust.task.data import Dataset
from flwr_robust.task.models import build_model, get_weights


def fixed(*layers: list[float]):
    """A server update function returning ``layers`` (recording what it was given)."""

    def update(weights: list[np.ndarray]) -> list[np.ndarray]:
        update.calls.append([w.copy() for w in weights])  # type: ignore[attr-defined]
        return [np.asarray(layer, dtype=np.float32) for layer in layers]

    update.calls = []  # type: ignore[attr-defined]
    return update


def clients(*rows: list[float]) -> list[list[np.ndarray]]:
    return [[np.asarray(row, dtype=np.float32)] for row in rows]


def flat(result) -> np.ndarray:
    return np.concatenate([layer.ravel() for layer in result.update])


# ---------------------------------------------------------------------------- the rule
def test_hand_computed_three_clients_in_2d() -> None:
    # g0 = (3, 4), ||g0|| = 5.
    # a = (6, 8): cos 1, TS 1, rescaled to (3, 4).
    # b = (4, 0): cos 12 / 20 = 0.6, rescaled to (5, 0).
    # c = (0, -2): cos -8 / 10 = -0.8, TS 0.
    # aggregate = (1 * (3, 4) + 0.6 * (5, 0)) / 1.6 = (3.75, 2.5).
    base = [np.array([10.0, -1.0], np.float32)]
    deltas = [[6, 8], [4, 0], [0, -2]]
    weights = clients(*[np.add(d, base[0]) for d in deltas])
    server = fixed([3, 4])
    result = FLTrust(server_update_fn=server)(weights, base=base)
    np.testing.assert_allclose(flat(result), [3.75, 2.5], rtol=1e-6)
    np.testing.assert_allclose(result.scores, [1.0, 0.6, 0.0], atol=1e-7)
    # coefficients on the raw updates: TS_i * ||g0|| / ||g_i|| / sum TS
    np.testing.assert_allclose(result.weights, [5 / 10 / 1.6, 0.6 * 5 / 4 / 1.6, 0.0], rtol=1e-6)
    assert result.kept == [0, 1]
    assert "cosine -0.8" in result.rejected[2]
    np.testing.assert_array_equal(server.calls[0][0], base[0])  # trained from the global model
    assert result.info["server_update_norm"] == pytest.approx(5.0)


def test_client_opposite_to_the_server_update_gets_no_weight_at_any_scale() -> None:
    rule = FLTrust(server_update_fn=fixed([1, 2]))
    honest = rule(clients([1, 2.2], [0.9, 2]))
    for scale in (1.0, 1e3, 1e30):
        result = rule(clients([1, 2.2], [0.9, 2], [-scale, -2 * scale]))
        assert result.weights[2] == 0 and result.scores[2] == 0 and 2 in result.rejected
        np.testing.assert_allclose(flat(result), flat(honest), rtol=1e-6)


@pytest.mark.parametrize("scale", [1e3, 1e30, 3e38])
def test_huge_client_is_rescaled_to_the_server_norm(scale: float) -> None:
    rule = FLTrust(server_update_fn=fixed([0.0, 2.0]))
    result = rule(clients([0, 1], [scale, scale]))
    # both rescaled to norm 2: (0, 2) with TS 1 and (sqrt 2, sqrt 2) with TS 1/sqrt 2
    t = 1 / np.sqrt(2)
    expected = (np.array([0, 2]) + t * np.array([np.sqrt(2), np.sqrt(2)])) / (1 + t)
    out = flat(result)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert np.linalg.norm(out) <= 2.0 * (1 + 1e-6)


@pytest.mark.parametrize("scale", [1e-20, 1e-30, 1e-40])
def test_tiny_client_is_rescaled_not_taken_for_a_zero_update(scale: float) -> None:
    """Review p4: squares of values around 1e-30 underflow float32 to exactly 0, so the
    client looked like a zero row (trust 0). Its products are now redone rescaled."""
    rule = FLTrust(server_update_fn=fixed([0.0, 2.0]))
    result = rule(clients([0, 1], [scale, scale]))
    t = 1 / np.sqrt(2)
    np.testing.assert_allclose(result.scores, [1, t], rtol=1e-5)
    expected = (np.array([0, 2]) + t * np.array([np.sqrt(2), np.sqrt(2)])) / (1 + t)
    np.testing.assert_allclose(flat(result), expected, rtol=1e-5)
    assert result.kept == [0, 1]


def test_matrix_products_of_underflowing_rows() -> None:
    from flwr_robust.aggregation.matrix import UpdateMatrix

    x = np.array([[3e-30, 4e-30, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 2.0]], np.float32)
    matrix = UpdateMatrix(clients(*x))
    exact = x.astype(np.float64) @ x.astype(np.float64).T
    np.testing.assert_allclose(matrix.gram(centered=False), exact, rtol=1e-6, atol=0)
    np.testing.assert_allclose(matrix.squared_norms(), np.diag(exact), rtol=1e-6, atol=0)
    # centred around the zero row: the tiny row's distance to it is still 5e-30
    np.testing.assert_allclose(
        UpdateMatrix(clients(*x[:2])).gram(), exact[:2, :2], rtol=1e-6, atol=0
    )


def test_zero_client_update_has_no_direction() -> None:
    result = FLTrust(server_update_fn=fixed([1, 0]))(clients([0, 0], [2, 0]))
    assert result.kept == [1] and "zero update" in result.rejected[0]
    np.testing.assert_allclose(flat(result), [1, 0])


def test_all_trust_scores_zero_skips_the_round(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        result = FLTrust(server_update_fn=fixed([1, 1]))(clients([-1, 0], [0, -3], [1, -1]))
    np.testing.assert_array_equal(flat(result), [0, 0])
    assert result.kept == [] and sorted(result.rejected) == [0, 1, 2]
    assert all(text.startswith("trust score 0") for text in result.rejected.values())
    assert result.info["skipped"] == "every trust score is 0"
    assert "skipping the round" in caplog.text


@pytest.mark.parametrize(
    ("server", "why"),
    [([np.nan, 1.0], "not finite"), ([np.inf, 0.0], "not finite"), ([1e39, 0.0], "not finite"),
     ([0.0, 0.0], "zero")],
)
def test_unusable_server_update_skips_the_round(server: list[float], why: str) -> None:
    with np.errstate(over="ignore"):
        result = FLTrust(server_update_fn=fixed(server))(clients([1, 0], [0, 1]))
    np.testing.assert_array_equal(flat(result), [0, 0])
    assert result.kept == [] and all(why in text for text in result.rejected.values())
    assert why in str(result.info["skipped"])


def test_missing_or_malformed_provider_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="server_update_fn.*root dataset.*fltrust-root-size"):
        get_aggregator("fltrust")(clients([1, 0], [0, 1]))
    with pytest.raises(ValueError, match="expected \\[\\(2,\\)\\]"):
        FLTrust(server_update_fn=fixed([1, 0, 0]))(clients([1, 0], [0, 1]))
    with pytest.raises(TypeError, match="list of layer arrays"):
        FLTrust(server_update_fn=lambda w: np.ones(2))(clients([1, 0], [0, 1]))
    with pytest.raises(TypeError, match="callable"):
        FLTrust(server_update_fn=3)  # type: ignore[arg-type]


def test_provider_is_settable_after_construction_and_behind_a_stage() -> None:
    rule = get_aggregator("fltrust", pre="nnm", num_malicious=1)
    assert isinstance(rule, PreAggregated) and not rule.translation_equivariant()
    rule.rule.server_update_fn = fixed([1, 1])  # type: ignore[attr-defined]
    base = [np.array([5.0, 5.0], np.float32)]
    updates = clients([6, 6.2], [6.1, 6], [6, 6], [-100, -100])
    result = rule(updates, base=base)
    assert 3 not in result.kept and np.all(flat(result) > 0)
    assert np.linalg.norm(flat(result)) <= np.sqrt(2) * (1 + 1e-6)


def test_permutation_invariance_exact() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 7)).astype(np.float32)
    x[7] *= 1e6
    server = rng.standard_normal(7).tolist()
    rule = FLTrust(server_update_fn=fixed(server[:3], server[3:]))
    split = [[row[:3], row[3:]] for row in x]
    a = rule(split)
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(9)
        b = rule([split[i] for i in perm])
        np.testing.assert_array_equal(flat(a), flat(b))
        np.testing.assert_array_equal(a.scores[perm], b.scores)
        assert sorted(perm[b.kept].tolist()) == a.kept


# --------------------------------------------------------------------- both strategy APIs
LAYERS = {"w": (3, 4), "b": (4,)}
#: Client deltas (every coordinate) and the expected outcome with g0 = all ones: 1 and 2
#: align (rescaled to ones), -1 is opposite (weight 0): the model moves by exactly 1.
DELTAS = {1: 1.0, 2: 2.0, 3: -1.0}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1


def model_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in LAYERS.items()}


def ones_update():
    def update(weights: list[np.ndarray]) -> list[np.ndarray]:
        update.seen = [w.copy() for w in weights]  # type: ignore[attr-defined]
        return [np.ones_like(w) for w in weights]

    return update


class Grid:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


class Proxy(ClientProxy):
    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, *a, **k):  # pragma: no cover - never called
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


def message_round(strategy, model: dict[str, np.ndarray]):
    arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    instructions = strategy.configure_train(1, arrays, ConfigRecord({}), Grid(list(DELTAS)))
    replies = []
    for ins in instructions:
        delta = np.float32(DELTAS[ins.metadata.dst_node_id])
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(v + delta) for k, v in model.items()}),
            "metrics": MetricRecord({"num-examples": 10}),
        })
        replies.append(Message(content, reply_to=ins))
    new, metrics = strategy.aggregate_train(1, replies)
    return None if new is None else {k: v.numpy() for k, v in new.items()}, metrics


def legacy_round(strategy, model: dict[str, np.ndarray]):
    results = [
        (Proxy(node), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
            [v + np.float32(delta) for v in model.values()]), 10, {}))
        for node, delta in DELTAS.items()
    ]
    parameters, metrics = strategy.aggregate_fit(1, results, [])
    return dict(zip(LAYERS, [npy_view(t) for t in parameters.tensors], strict=True)), metrics


@pytest.mark.parametrize("api", ["message", "legacy"])
def test_both_apis_aggregate_with_a_server_update(api: str) -> None:
    model = model_arrays()
    server = ones_update()
    if api == "message":
        new, metrics = message_round(message.FLTrust(server_update_fn=server), model)
    else:
        strategy = legacy.FLTrust(
            server_update_fn=server,
            initial_parameters=ndarrays_to_parameters(list(model.values())),
        )
        new, metrics = legacy_round(strategy, model)
    for name in LAYERS:
        np.testing.assert_allclose(new[name], model[name] + 1.0, rtol=1e-6)
        np.testing.assert_array_equal(server.seen[list(LAYERS).index(name)], model[name])
    assert metrics["robust-kept"] == 2 and metrics["robust-rejected-excluded-by-rule"] == 1


@pytest.mark.parametrize("api", ["message", "legacy"])
def test_make_strategy_passes_the_server_update(api: str) -> None:
    server = ones_update()
    strategy = make_strategy("fltrust", api=api, server_update_fn=server)
    assert strategy.aggregator.server_update_fn is server


def test_round_without_provider_fails_with_the_reason_and_keeps_the_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        new, metrics = message_round(message.FLTrust(), model_arrays())
    assert new is None and metrics["robust-aggregation-failed"] == 1
    assert "aggregation-failed" in caplog.text and "set server_update_fn" in caplog.text


def test_non_finite_server_update_rejects_the_round_without_a_crash() -> None:
    model = model_arrays()
    nan = message.FLTrust(server_update_fn=lambda w: [np.full_like(x, np.nan) for x in w])
    new, metrics = message_round(nan, model)
    for name in LAYERS:  # a zero update: the model is kept
        np.testing.assert_array_equal(new[name], model[name])
    assert metrics["robust-kept"] == 0 and metrics["robust-rejected-excluded-by-rule"] == 3
    assert all("not finite" in text for text in nan.reports[-1].rejected.values())


# -------------------------------------------------------------------- the server app
def numbered(n: int) -> Dataset:
    """Sample i is the image filled with i (so samples are identifiable)."""
    x = np.repeat(np.arange(n, dtype=np.float32), 4).reshape(n, 1, 2, 2)
    return Dataset(x, np.arange(n) % 3, 3, "numbered")


def ids(data: Dataset) -> set[int]:
    return {int(v) for v in data.x[:, 0, 0, 0]}


def test_root_dataset_has_the_size_is_disjoint_and_seeded() -> None:
    test = numbered(150)
    root, rest = split_root_dataset(test, 100, seed=42)
    assert len(root) == 100 and len(rest) == 50
    assert ids(root).isdisjoint(ids(rest)) and ids(root) | ids(rest) == set(range(150))
    again, _ = split_root_dataset(test, 100, seed=42)
    other, _ = split_root_dataset(test, 100, seed=43)
    assert ids(again) == ids(root) and ids(other) != ids(root)
    for size in (0, 150):
        with pytest.raises(ValueError, match="fltrust-root-size"):
            split_root_dataset(test, size, seed=42)


@pytest.mark.parametrize(
    ("strategy", "extra", "wired"),
    [("fltrust", {}, True), ("fltrust", {"pre": "nnm", "num_malicious": 1}, True),
     ("reputation", {"base_rule": "fltrust"}, True), ("krum", {"num_malicious": 1}, False)],
)
def test_server_app_wires_the_root_update_for_fltrust(strategy: str, extra: dict, wired: bool):
    settings = RunSettings(strategy=strategy, fltrust_root_size=30)
    test = numbered(80)
    model = build_model("mlp", input_shape=(1, 2, 2), num_classes=3, seed=0)
    params, evaluation = with_server_update(settings, {"pre": None, **extra}, model, test)
    if not wired:
        assert evaluation is test and "server_update_fn" not in params
        return
    assert isinstance(params["server_update_fn"], RootDatasetUpdate)
    assert len(evaluation) == 50 and len(params["server_update_fn"].root) == 30
    assert ids(evaluation).isdisjoint(ids(params["server_update_fn"].root))
    built = make_strategy(strategy, **params)
    rule = built.aggregator
    inner = getattr(rule, "rule", None) or getattr(rule, "base", rule)
    assert inner.server_update_fn is params["server_update_fn"]


def test_root_update_trains_like_the_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = RunSettings(local_epochs=2, learning_rate=0.05, batch_size=8, momentum=0.5)
    model = build_model("mlp", input_shape=(1, 2, 2), num_classes=3, seed=0)
    provider = RootDatasetUpdate(model, numbered(20), settings)
    weights = get_weights(model)
    update = provider(weights)
    assert [u.shape for u in update] == [w.shape for w in weights]
    assert all(np.all(np.isfinite(u)) for u in update) and any(np.any(u) for u in update)
    np.testing.assert_array_equal(get_weights(model)[0], weights[0])  # the app's model untouched
    seen = {}

    def spy(model, data, **kwargs):
        seen.update(kwargs, size=len(data))
        return {}

    monkeypatch.setattr("flwr_robust.apps.server.train", spy)
    provider(weights)
    assert seen["epochs"] == 2 and seen["learning_rate"] == 0.05
    assert seen["batch_size"] == 8 and seen["momentum"] == 0.5 and seen["size"] == 20
