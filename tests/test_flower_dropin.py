"""Drop-in tests: ``flwr_robust`` strategies must behave like Flower's own.

Each test runs twice, once against Flower's classes and once against ``flwr_robust``'s; the
only thing that changes is the module the class names are looked up in:

* Message API: ``flwr.serverapp.strategy`` vs ``flwr_robust.strategy``
  (``FedAvg``, ``FedMedian``, ``FedTrimmedAvg``, ``Krum``, ``MultiKrum``, ``Bulyan``);
* legacy API: ``flwr.server.strategy`` vs ``flwr_robust.legacy``
  (``FedAvg``, ``FedMedian``, ``FedTrimmedAvg``, ``Krum``, ``Bulyan``; legacy Flower has no
  ``MultiKrum``: ``Krum(num_clients_to_keep=k)`` is Multi-Krum).

The expected values are worked out by hand in the comments (small integer inputs), and the
aggregation calls are stateless (no ``configure_*`` first), which is also how Flower's own
unit tests call them. Replies are real ``Message`` objects built with
``Message(content, reply_to=instruction)``, one distinct node per reply, as a Grid would
deliver them.

Behaviour that ``flwr_robust`` changes on purpose is listed once, in
``INTENDED_DIFFERENCES``: those tests assert Flower's behaviour and are expected to fail
(strictly, with an ``AssertionError``) for the ``flwr_robust`` parameter only.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

RTOL, ATOL = 1e-5, 1e-6

IMPLEMENTATIONS = ["flwr", "flwr_robust"]
MESSAGE_MODULES = {"flwr": "flwr.serverapp.strategy", "flwr_robust": "flwr_robust.strategy"}
LEGACY_MODULES = {"flwr": "flwr.server.strategy", "flwr_robust": "flwr_robust.legacy"}
MESSAGE_CLASSES = ["FedAvg", "FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan"]
LEGACY_CLASSES = ["FedAvg", "FedMedian", "FedTrimmedAvg", "Krum", "Bulyan"]

_KRUM_CONDITION = (
    "flwr_robust applies Blanchard et al. (2017)'s condition n > 2f + 2 for (Multi-)Krum "
    "and keeps the global model (no arrays) when fewer replies arrive; Flower still "
    "selects with n <= 2f + 2"
)
_BULYAN_CONDITION = (
    "flwr_robust enforces El Mhamdi et al. (2018)'s n >= 4f + 3 for Bulyan by keeping the "
    "global model; Flower's legacy Bulyan raises ValueError instead"
)

_RAISED_MINIMUM = (
    "flwr_robust raises Flower's default minimums (2) to the replies the rule needs "
    "(Krum 2f + 3, Bulyan 4f + 3), with an INFO line; an explicit value is kept"
)
_COUNTERS = (
    "flwr_robust returns its robust-* counters (replies, kept, rejected per reason) on every "
    "round with replies, also when nothing was aggregated, so that rejections show in the "
    "run's history; Flower returns None metrics"
)
_UNWEIGHTED_SELECTION = (
    "flwr_robust averages the updates Multi-Krum selects without weights, as El Mhamdi et "
    "al. (2018): example counts are client claims, and a selected attacker claiming a huge "
    "count would otherwise dominate; Flower weights them by num-examples"
)
_KEPT_METRICS = (
    "flwr_robust gives the metrics function the results the rule kept only, so an excluded "
    "(e.g. Byzantine) client cannot steer the reported metrics; legacy Flower passes them all"
)

# test name, or name[parameters] for one case only -> why flwr_robust differs from Flower
# there (on purpose). docs/flower-differences.md lists the same differences for users.
INTENDED_DIFFERENCES: dict[str, str] = {
    "test_message_defaults[flwr_robust-Krum]": _RAISED_MINIMUM,
    "test_message_defaults[flwr_robust-MultiKrum]": _RAISED_MINIMUM,
    "test_message_defaults[flwr_robust-Bulyan]": _RAISED_MINIMUM,
    "test_legacy_defaults[flwr_robust-Krum]": _RAISED_MINIMUM,
    "test_legacy_defaults[flwr_robust-Bulyan]": _RAISED_MINIMUM,
    "test_message_round_of_error_replies_returns_none_none": _COUNTERS,
    "test_message_bulyan_with_n_below_4f_plus_3_keeps_model": _COUNTERS,
    "test_message_multikrum_weighted_mean_of_selection": _UNWEIGHTED_SELECTION,
    "test_legacy_multikrum_weighted_mean_of_selection": _UNWEIGHTED_SELECTION,
    "test_legacy_krum_fit_metrics_fn_sees_every_result": _KEPT_METRICS,
    "test_message_krum_with_n_equal_2f_plus_2": _KRUM_CONDITION,
    "test_message_multikrum_with_n_equal_2f_plus_2": _KRUM_CONDITION,
    "test_legacy_krum_with_n_equal_2f_plus_2": _KRUM_CONDITION,
    "test_legacy_multikrum_with_n_equal_2f_plus_2": _KRUM_CONDITION,
    "test_legacy_bulyan_with_n_below_4f_plus_3_raises": _BULYAN_CONDITION,
}


def _mark_intended_difference(request: pytest.FixtureRequest, implementation: str) -> None:
    """Expect the listed tests to fail, for the flwr_robust implementation only."""
    reason = INTENDED_DIFFERENCES.get(request.node.name) or INTENDED_DIFFERENCES.get(
        request.node.originalname
    )
    if implementation == "flwr_robust" and reason is not None:
        request.node.add_marker(
            pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)
        )


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest) -> str:
    _mark_intended_difference(request, request.param)
    return request.param


@pytest.fixture
def message_api(implementation: str) -> ModuleType:
    return importlib.import_module(MESSAGE_MODULES[implementation])


@pytest.fixture
def legacy_api(implementation: str) -> ModuleType:
    return importlib.import_module(LEGACY_MODULES[implementation])


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower 1.41 stamps run and node ids on every new instruction Message; a ServerApp
    process sets them at start-up, a unit test has to."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 4242)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


# -------------------------------------------------------------- Message API helpers
def _instruction(node_id: int, message_type: str) -> Message:
    return Message(RecordDict(), dst_node_id=node_id, message_type=message_type)


def _float32_arrays(arrays: dict[str, Any]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})


def train_reply(node_id: int, arrays: dict[str, Any], metrics: dict[str, Any]) -> Message:
    """A node's reply to a train instruction: one ArrayRecord and one MetricRecord."""
    content = RecordDict({"arrays": _float32_arrays(arrays), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=_instruction(node_id, MessageType.TRAIN))


def evaluate_reply(node_id: int, metrics: dict[str, Any]) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    return Message(content, reply_to=_instruction(node_id, MessageType.EVALUATE))


def error_reply(node_id: int, message_type: str = MessageType.TRAIN) -> Message:
    error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="ClientApp raised")
    return Message(error, reply_to=_instruction(node_id, message_type))


def vector_replies(
    vectors: Sequence[Sequence[float]], num_examples: Sequence[int], first_node: int = 101
) -> list[Message]:
    """One reply per vector (array key ``"w"``), from nodes ``first_node``, +1, ..."""
    return [
        train_reply(first_node + i, {"w": vec}, {"num-examples": n})
        for i, (vec, n) in enumerate(zip(vectors, num_examples, strict=True))
    ]


def _w(arrays: ArrayRecord | None) -> np.ndarray:
    assert arrays is not None, "expected an aggregated ArrayRecord, got None"
    return arrays["w"].numpy()


def _close(actual: Any, expected: Any) -> None:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL)


def _grid(node_ids: Sequence[int]) -> Mock:
    """A Grid whose ``get_node_ids`` lists ``node_ids``. Flower's sampling polls it once a
    second until enough nodes are connected; after a few polls this fails instead of
    waiting forever."""
    grid = Mock(spec=Grid)
    calls = {"n": 0}

    def get_node_ids() -> list[int]:
        calls["n"] += 1
        if calls["n"] > 6:
            raise RuntimeError("the strategy keeps waiting for more nodes than connected")
        return list(node_ids)

    grid.get_node_ids.side_effect = get_node_ids
    return grid


# ------------------------------------------------------------------ legacy helpers
class _Proxy(ClientProxy):
    """A ClientProxy that is never called: the strategy only samples and returns it."""

    def get_properties(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError


class _ClientManager(SimpleClientManager):
    """Flower's SimpleClientManager, waiting one second (not one day) for missing clients."""

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        return super().wait_for(num_clients, timeout=1)


def _client_manager(num_clients: int) -> _ClientManager:
    manager = _ClientManager()
    for i in range(num_clients):
        manager.register(_Proxy(cid=str(1000 + i)))
    return manager


_OK = Status(code=Code.OK, message="Success")


def fit_result(
    cid: int, layers: Sequence[Any], num_examples: int, metrics: dict[str, Any] | None = None
) -> tuple[ClientProxy, FitRes]:
    parameters = ndarrays_to_parameters([np.asarray(x, dtype=np.float32) for x in layers])
    res = FitRes(status=_OK, parameters=parameters, num_examples=num_examples,
                 metrics=dict(metrics or {}))
    return _Proxy(cid=str(cid)), res


def vector_results(
    vectors: Sequence[Sequence[float]], num_examples: Sequence[int]
) -> list[tuple[ClientProxy, FitRes]]:
    return [
        fit_result(200 + i, [vec], n)
        for i, (vec, n) in enumerate(zip(vectors, num_examples, strict=True))
    ]


def evaluate_result(
    cid: int, loss: float, num_examples: int, metrics: dict[str, Any] | None = None
) -> tuple[ClientProxy, EvaluateRes]:
    res = EvaluateRes(status=_OK, loss=loss, num_examples=num_examples,
                      metrics=dict(metrics or {}))
    return _Proxy(cid=str(cid)), res


def _first_layer(parameters: Any) -> np.ndarray:
    assert parameters is not None, "expected aggregated Parameters, got None"
    return parameters_to_ndarrays(parameters)[0]


# ------------------------------------------------------------------------ test data
# Three clients, two named arrays. Weighted by num-examples (1, 3, 4), total 8:
#   w = (A + 3B + 4C) / 8 = [[10, 8], [6, 4]] / 8 = [[1.25, 1.0], [0.75, 0.5]]
#   b = (1 - 3 + 0) / 8 = -0.25
LAYERS = [
    {"layer.w": [[1.0, 2.0], [3.0, 4.0]], "layer.b": [1.0]},
    {"layer.w": [[3.0, 2.0], [1.0, 0.0]], "layer.b": [-1.0]},
    {"layer.w": [[0.0, 0.0], [0.0, 0.0]], "layer.b": [0.0]},
]
NUM_EXAMPLES = [1, 3, 4]
# Metrics, weighted by (1, 3, 4) / 8:
#   loss (0.8, 0.4, 0.2)            -> (0.8 + 1.2 + 0.8) / 8 = 0.35
#   accuracy (0.5, 0.75, 1.0)       -> (0.5 + 2.25 + 4.0) / 8 = 0.84375
#   steps (10, 20, 30), ints        -> (10 + 60 + 120) / 8 = 23.75
#   per-class ([1, 0], [0, 1], [0.5, 0.5]) -> ([1 + 0 + 2] / 8, [0 + 3 + 2] / 8)
TRAIN_METRICS = [
    {"loss": 0.8, "accuracy": 0.5, "steps": 10, "per-class": [1.0, 0.0]},
    {"loss": 0.4, "accuracy": 0.75, "steps": 20, "per-class": [0.0, 1.0]},
    {"loss": 0.2, "accuracy": 1.0, "steps": 30, "per-class": [0.5, 0.5]},
]


def layer_replies(weight_key: str = "num-examples", extra: dict[str, Any] | None = None,
                  weights: Sequence[int] = NUM_EXAMPLES) -> list[Message]:
    return [
        train_reply(101 + i, layers, {weight_key: n, **TRAIN_METRICS[i], **(extra or {})})
        for i, (layers, n) in enumerate(zip(LAYERS, weights, strict=True))
    ]


# Krum family, f = 1, n = 5 > 2f + 2. Every vector is v * (1, -2) for
# v = 4, 100, 1, 0, 2, so squared distances are 5 * (v_i - v_j)^2. Each client's score sums
# its n - f - 2 = 2 smallest distances (in units of 5):
#   v=0: 1 + 4 = 5,  v=1: 1 + 1 = 2,  v=2: 1 + 4 = 5,  v=4: 4 + 9 = 13,  v=100: > 9000
# Krum keeps v=1 alone; Multi-Krum with 3 keeps {v=1, v=0, v=2} (next score is 13).
KRUM_VECTORS = [[4.0, -8.0], [100.0, -200.0], [1.0, -2.0], [0.0, 0.0], [2.0, -4.0]]
KRUM_EXAMPLES = [5, 10, 1, 1, 2]
KRUM_SELECTED = [1.0, -2.0]
# Multi-Krum averages its selection weighted by num-examples: (0*1 + 1*1 + 2*2) / 4 = 1.25.
# (The unweighted mean would be v = 1.)
MULTIKRUM_MEAN = [1.25, -2.5]

# Krum family at n = 2f + 2 = 4 (f = 1): v = 0, 2, 3, 100 (times (1, -2)). Each score is
# the distance to the single nearest vector (n - f - 2 = 1 in Flower); v=2 and v=3 are
# each other's nearest and tie, so Krum returns one of them.
BOUNDARY_VECTORS = [[0.0, 0.0], [2.0, -4.0], [3.0, -6.0], [100.0, -200.0]]
# Multi-Krum with 2 at n = 4, f = 1: v = 0, 1, 5, 100; scores 1, 1, 16, > 9000 -> {0, 1},
# averaged with weights (1, 3): (0*1 + 1*3) / 4 = 0.75.
BOUNDARY_MK_VECTORS = [[0.0, 0.0], [1.0, -2.0], [5.0, -10.0], [100.0, -200.0]]
BOUNDARY_MK_EXAMPLES = [1, 3, 1, 1]

# Bulyan, f = 1, n = 7 = 4f + 3: theta = n - 2f = 5 selected, beta = theta - 2f = 3 kept per
# coordinate. [60, -60] is far away and [6, -5] is the furthest of the rest; both the
# Message API (one Multi-Krum pass selecting 5) and the legacy API (5 successive Krum
# picks) select the other five, whatever the order of the replies:
#   (-5, -3), (-4, 2), (0, 4), (-5, 3), (-4, 1)
# coordinate 0: values -5, -4, 0, -5, -4, median -4; the 3 closest are -4, -4, -5
#               -> -13/3
# coordinate 1: values -3, 2, 4, 3, 1, median 2; the 3 closest are 2, 3, 1 -> 2.0
# The final mean is unweighted (the num-examples below would change a weighted mean).
BULYAN_VECTORS = [[6.0, -5.0], [-5.0, -3.0], [60.0, -60.0], [-4.0, 2.0], [0.0, 4.0],
                  [-5.0, 3.0], [-4.0, 1.0]]
BULYAN_EXAMPLES = [3, 1, 4, 1, 5, 9, 2]
BULYAN_EXPECTED = [-13.0 / 3.0, 2.0]

# Median / trimmed-mean inputs: five clients, weights deliberately uneven (they must not
# matter). Columns: (1, 2, 3, 100, 4) -> 3; (10, 20, 30, -100, 40) -> 20;
# (-1, -2, -3, 0, 1000) -> -1.
MEDIAN_ODD = ([[1, 10, -1], [2, 20, -2], [3, 30, -3], [100, -100, 0], [4, 40, 1000]],
              [1, 2, 3, 4, 100], [3.0, 20.0, -1.0])
# Even count: the mean of the two middle values, (2 + 10) / 2 = 6, (-1 + 0) / 2 = -0.5.
MEDIAN_EVEN = ([[1, 0], [2, -1], [10, 5], [20, -7]], [1, 1, 1, 50], [6.0, -0.5])
# Trimmed mean over five clients; columns (9, 0, 100, 1, 2) and (8, -50, 6, 3, 4).
# Sorted: (0, 1, 2, 9, 100) and (-50, 3, 4, 6, 8). int(beta * 5) values cut at each end:
#   beta 0.2 (the default) -> cut 1: (1 + 2 + 9) / 3 = 4,       (3 + 4 + 6) / 3 = 13/3
#   beta 0.1               -> cut 0: 112 / 5 = 22.4,            -29 / 5 = -5.8
#   beta 0.4               -> cut 2: 2,                         4
TRIM_VECTORS = [[9, 8], [0, -50], [100, 6], [1, 3], [2, 4]]
TRIM_EXAMPLES = [1, 2, 3, 4, 5]
TRIM_CASES = [
    pytest.param(None, [4.0, 13.0 / 3.0], id="default-beta"),
    pytest.param(0.2, [4.0, 13.0 / 3.0], id="beta-0.2"),
    pytest.param(0.1, [22.4, -5.8], id="beta-0.1"),
    pytest.param(0.4, [2.0, 4.0], id="beta-0.4"),
]


# ============================================================================
# 1. Construction
# ============================================================================
@pytest.mark.parametrize("name", MESSAGE_CLASSES)
def test_message_defaults(message_api: ModuleType, name: str) -> None:
    strategy = getattr(message_api, name)()
    assert strategy.fraction_train == 1.0
    assert strategy.fraction_evaluate == 1.0
    assert strategy.min_train_nodes == 2
    assert strategy.min_evaluate_nodes == 2
    assert strategy.min_available_nodes == 2
    assert strategy.weighted_by_key == "num-examples"
    assert strategy.arrayrecord_key == "arrays"
    assert strategy.configrecord_key == "config"
    assert callable(strategy.train_metrics_aggr_fn)
    assert callable(strategy.evaluate_metrics_aggr_fn)
    if name in ("Krum", "MultiKrum", "Bulyan"):
        assert strategy.num_malicious_nodes == 0
    if name in ("Krum", "MultiKrum"):
        assert strategy.num_nodes_to_select == 1
    if name == "FedTrimmedAvg":
        assert strategy.beta == 0.2


def test_message_fedavg_positional_arguments(message_api: ModuleType) -> None:
    strategy = message_api.FedAvg(0.5, 0.25, 3, 4, 5, "samples", "model", "cfg")
    assert strategy.fraction_train == 0.5
    assert strategy.fraction_evaluate == 0.25
    assert strategy.min_train_nodes == 3
    assert strategy.min_evaluate_nodes == 4
    assert strategy.min_available_nodes == 5
    assert strategy.weighted_by_key == "samples"
    assert strategy.arrayrecord_key == "model"
    assert strategy.configrecord_key == "cfg"


def test_message_fraction_zero_turns_phase_off(message_api: ModuleType) -> None:
    # Flower sets the phase's minimum to 0 when its fraction is 0.0.
    no_eval = message_api.FedAvg(0.5, 0.0)
    assert (no_eval.fraction_train, no_eval.fraction_evaluate) == (0.5, 0.0)
    assert no_eval.min_evaluate_nodes == 0
    assert no_eval.min_train_nodes == 2
    no_train = message_api.FedAvg(fraction_train=0.0)
    assert no_train.min_train_nodes == 0
    assert no_train.min_evaluate_nodes == 2


def test_message_metrics_functions_are_kept(message_api: ModuleType) -> None:
    def train_fn(records: list[RecordDict], key: str) -> MetricRecord:
        return MetricRecord()

    def eval_fn(records: list[RecordDict], key: str) -> MetricRecord:
        return MetricRecord()

    strategy = message_api.FedAvg(train_metrics_aggr_fn=train_fn,
                                  evaluate_metrics_aggr_fn=eval_fn)
    assert strategy.train_metrics_aggr_fn is train_fn
    assert strategy.evaluate_metrics_aggr_fn is eval_fn


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        pytest.param("Krum", (1.0, 1.0, 2, 2, 2, 1),
                     {"num_malicious_nodes": 1, "num_nodes_to_select": 1}, id="Krum"),
        pytest.param("MultiKrum", (1.0, 0.5, 3, 2, 4, 1, 3),
                     {"fraction_evaluate": 0.5, "min_train_nodes": 3, "min_available_nodes": 4,
                      "num_malicious_nodes": 1, "num_nodes_to_select": 3}, id="MultiKrum"),
        pytest.param("Bulyan", (1.0, 1.0, 2, 2, 2, 2, "samples"),
                     {"num_malicious_nodes": 2, "weighted_by_key": "samples"}, id="Bulyan"),
        pytest.param("FedTrimmedAvg",
                     (1.0, 1.0, 2, 2, 2, "num-examples", "arrays", "config", None, None, 0.3),
                     {"beta": 0.3}, id="FedTrimmedAvg"),
    ],
)
def test_message_positional_rule_parameters(
    message_api: ModuleType, name: str, args: tuple[Any, ...], expected: dict[str, Any]
) -> None:
    strategy = getattr(message_api, name)(*args)
    for attribute, value in expected.items():
        assert getattr(strategy, attribute) == value, attribute


def test_message_rule_keyword_parameters(message_api: ModuleType) -> None:
    krum = message_api.Krum(num_malicious_nodes=2)
    assert (krum.num_malicious_nodes, krum.num_nodes_to_select) == (2, 1)
    multikrum = message_api.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=4)
    assert (multikrum.num_malicious_nodes, multikrum.num_nodes_to_select) == (1, 4)
    assert message_api.Bulyan(num_malicious_nodes=3).num_malicious_nodes == 3
    assert message_api.FedTrimmedAvg(beta=0.1).beta == 0.1


@pytest.mark.parametrize("beta", [0.5, 0.75, -0.1])
def test_message_trimmed_avg_rejects_beta_outside_range(
    message_api: ModuleType, beta: float
) -> None:
    with pytest.raises(ValueError):
        message_api.FedTrimmedAvg(beta=beta)


@pytest.mark.parametrize("name", LEGACY_CLASSES)
def test_legacy_defaults(legacy_api: ModuleType, name: str) -> None:
    strategy = getattr(legacy_api, name)()
    assert strategy.fraction_fit == 1.0
    assert strategy.fraction_evaluate == 1.0
    assert strategy.min_fit_clients == 2
    assert strategy.min_evaluate_clients == 2
    assert strategy.min_available_clients == 2
    assert strategy.accept_failures is True
    assert strategy.initial_parameters is None
    assert strategy.evaluate_fn is None
    assert strategy.on_fit_config_fn is None
    assert strategy.on_evaluate_config_fn is None
    assert strategy.fit_metrics_aggregation_fn is None
    assert strategy.evaluate_metrics_aggregation_fn is None
    if name in ("Krum", "Bulyan"):
        assert strategy.num_malicious_clients == 0
    if name == "Krum":
        assert strategy.num_clients_to_keep == 0
    if name == "FedTrimmedAvg":
        assert strategy.beta == 0.2


@pytest.mark.parametrize("name", LEGACY_CLASSES)
def test_legacy_keyword_arguments(legacy_api: ModuleType, name: str) -> None:
    parameters = ndarrays_to_parameters([np.zeros(3, dtype=np.float32)])

    def fit_config(server_round: int) -> dict[str, Any]:
        return {"round": server_round}

    def fit_metrics(metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        return {}

    strategy = getattr(legacy_api, name)(
        fraction_fit=0.5, fraction_evaluate=0.25, min_fit_clients=3,
        min_evaluate_clients=4, min_available_clients=5, accept_failures=False,
        initial_parameters=parameters, on_fit_config_fn=fit_config,
        fit_metrics_aggregation_fn=fit_metrics,
    )
    assert strategy.fraction_fit == 0.5
    assert strategy.fraction_evaluate == 0.25
    assert strategy.min_fit_clients == 3
    assert strategy.min_evaluate_clients == 4
    assert strategy.min_available_clients == 5
    assert strategy.accept_failures is False
    assert strategy.initial_parameters is parameters
    assert strategy.on_fit_config_fn is fit_config
    assert strategy.fit_metrics_aggregation_fn is fit_metrics


@pytest.mark.parametrize("name", LEGACY_CLASSES)
def test_legacy_arguments_are_keyword_only(legacy_api: ModuleType, name: str) -> None:
    with pytest.raises(TypeError):
        getattr(legacy_api, name)(0.5)


def test_legacy_rule_parameters(legacy_api: ModuleType) -> None:
    krum = legacy_api.Krum(num_malicious_clients=1, num_clients_to_keep=2)
    assert (krum.num_malicious_clients, krum.num_clients_to_keep) == (1, 2)
    assert legacy_api.Bulyan(num_malicious_clients=2).num_malicious_clients == 2
    assert legacy_api.FedTrimmedAvg(beta=0.3).beta == 0.3
    with pytest.raises(ValueError):
        legacy_api.FedTrimmedAvg(beta=0.5)


def test_legacy_initial_parameters_handed_out_once(legacy_api: ModuleType) -> None:
    parameters = ndarrays_to_parameters([np.arange(4, dtype=np.float32)])
    strategy = legacy_api.FedAvg(initial_parameters=parameters)
    first = strategy.initialize_parameters(_client_manager(2))
    assert first is not None
    _close(parameters_to_ndarrays(first)[0], [0.0, 1.0, 2.0, 3.0])
    # Flower drops its reference after handing the parameters to the server.
    assert strategy.initialize_parameters(_client_manager(2)) is None


def test_legacy_sample_sizes(legacy_api: ModuleType) -> None:
    strategy = legacy_api.FedAvg(fraction_fit=0.5, min_fit_clients=3, fraction_evaluate=0.1,
                                 min_evaluate_clients=2, min_available_clients=4)
    # (max(int(available * fraction), minimum), min_available_clients)
    assert strategy.num_fit_clients(10) == (5, 4)
    assert strategy.num_fit_clients(4) == (3, 4)
    assert strategy.num_evaluation_clients(40) == (4, 4)
    assert strategy.num_evaluation_clients(10) == (2, 4)


# ============================================================================
# 2. Stateless aggregation, Message API
# ============================================================================
def test_message_fedavg_weighted_mean(message_api: ModuleType) -> None:
    arrays, _ = message_api.FedAvg().aggregate_train(1, layer_replies())
    assert arrays is not None
    assert list(arrays.keys()) == ["layer.w", "layer.b"]  # names and order kept
    _close(arrays["layer.w"].numpy(), [[1.25, 1.0], [0.75, 0.5]])
    _close(arrays["layer.b"].numpy(), [-0.25])


def test_message_fedavg_weighted_by_custom_key(message_api: ModuleType) -> None:
    # Weights "samples" = (2, 1, 1), total 4 (the replies' num-examples are ignored):
    #   w = (2A + B + C) / 4 = [[5, 6], [7, 8]] / 4,  b = (2 - 1 + 0) / 4 = 0.25
    replies = [
        train_reply(101 + i, layers, {"samples": s, "num-examples": n})
        for i, (layers, s, n) in enumerate(zip(LAYERS, [2, 1, 1], NUM_EXAMPLES, strict=True))
    ]
    arrays, _ = message_api.FedAvg(weighted_by_key="samples").aggregate_train(1, replies)
    assert arrays is not None
    _close(arrays["layer.w"].numpy(), [[1.25, 1.5], [1.75, 2.0]])
    _close(arrays["layer.b"].numpy(), [0.25])


@pytest.mark.parametrize("case", [MEDIAN_ODD, MEDIAN_EVEN], ids=["odd", "even"])
def test_message_fedmedian_coordinatewise(
    message_api: ModuleType, case: tuple[list[list[float]], list[int], list[float]]
) -> None:
    vectors, examples, expected = case
    arrays, _ = message_api.FedMedian().aggregate_train(1, vector_replies(vectors, examples))
    _close(_w(arrays), expected)


@pytest.mark.parametrize(("beta", "expected"), TRIM_CASES)
def test_message_fedtrimmedavg(
    message_api: ModuleType, beta: float | None, expected: list[float]
) -> None:
    strategy = message_api.FedTrimmedAvg() if beta is None else message_api.FedTrimmedAvg(
        beta=beta
    )
    arrays, _ = strategy.aggregate_train(1, vector_replies(TRIM_VECTORS, TRIM_EXAMPLES))
    _close(_w(arrays), expected)


def test_message_krum_selects_most_central_reply(message_api: ModuleType) -> None:
    strategy = message_api.Krum(num_malicious_nodes=1)
    arrays, _ = strategy.aggregate_train(1, vector_replies(KRUM_VECTORS, KRUM_EXAMPLES))
    _close(_w(arrays), KRUM_SELECTED)


def test_message_krum_metrics_come_from_selected_reply(message_api: ModuleType) -> None:
    # Flower passes only the reply Krum selected to the metrics function.
    seen: list[list[float]] = []

    def losses(records: list[RecordDict], key: str) -> MetricRecord:
        values = [float(next(iter(r.metric_records.values()))["loss"]) for r in records]
        seen.append(values)
        return MetricRecord({"losses-seen": values})

    replies = [
        train_reply(101 + i, {"w": vec}, {"num-examples": n, "loss": float(i)})
        for i, (vec, n) in enumerate(zip(KRUM_VECTORS, KRUM_EXAMPLES, strict=True))
    ]
    strategy = message_api.Krum(num_malicious_nodes=1, train_metrics_aggr_fn=losses)
    _, metrics = strategy.aggregate_train(1, replies)
    assert seen == [[2.0]]  # the third reply, KRUM_SELECTED
    assert metrics is not None
    assert list(metrics["losses-seen"]) == [2.0]


def test_message_multikrum_weighted_mean_of_selection(message_api: ModuleType) -> None:
    strategy = message_api.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3)
    arrays, _ = strategy.aggregate_train(1, vector_replies(KRUM_VECTORS, KRUM_EXAMPLES))
    _close(_w(arrays), MULTIKRUM_MEAN)


def test_message_bulyan(message_api: ModuleType) -> None:
    strategy = message_api.Bulyan(num_malicious_nodes=1)
    arrays, _ = strategy.aggregate_train(1, vector_replies(BULYAN_VECTORS, BULYAN_EXAMPLES))
    _close(_w(arrays), BULYAN_EXPECTED)


def test_message_bulyan_with_n_below_4f_plus_3_keeps_model(message_api: ModuleType) -> None:
    # n = 6 < 4f + 3 = 7: Flower's Message-API Bulyan skips the round, (None, None).
    strategy = message_api.Bulyan(num_malicious_nodes=1)
    replies = vector_replies(BULYAN_VECTORS[:6], BULYAN_EXAMPLES[:6])
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None
    assert not metrics  # Flower: None


def test_message_krum_with_n_equal_2f_plus_2(message_api: ModuleType) -> None:
    strategy = message_api.Krum(num_malicious_nodes=1)
    arrays, _ = strategy.aggregate_train(1, vector_replies(BOUNDARY_VECTORS, [1, 1, 1, 1]))
    assert arrays is not None, "Flower's Krum aggregates 4 replies with f=1"
    result = _w(arrays).tolist()
    assert result in ([2.0, -4.0], [3.0, -6.0]), result


def test_message_multikrum_with_n_equal_2f_plus_2(message_api: ModuleType) -> None:
    strategy = message_api.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=2)
    replies = vector_replies(BOUNDARY_MK_VECTORS, BOUNDARY_MK_EXAMPLES)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None, "Flower's MultiKrum aggregates 4 replies with f=1"
    _close(_w(arrays), [0.75, -1.5])


# ============================================================================
# 2'. Stateless aggregation, legacy API
# ============================================================================
def test_legacy_fedavg_weighted_mean(legacy_api: ModuleType) -> None:
    results = [
        fit_result(200 + i, [layers["layer.w"], layers["layer.b"]], n)
        for i, (layers, n) in enumerate(zip(LAYERS, NUM_EXAMPLES, strict=True))
    ]
    parameters, _ = legacy_api.FedAvg().aggregate_fit(1, results, [])
    assert parameters is not None
    weight, bias = parameters_to_ndarrays(parameters)
    _close(weight, [[1.25, 1.0], [0.75, 0.5]])
    _close(bias, [-0.25])


@pytest.mark.parametrize("case", [MEDIAN_ODD, MEDIAN_EVEN], ids=["odd", "even"])
def test_legacy_fedmedian_coordinatewise(
    legacy_api: ModuleType, case: tuple[list[list[float]], list[int], list[float]]
) -> None:
    vectors, examples, expected = case
    parameters, _ = legacy_api.FedMedian().aggregate_fit(
        1, vector_results(vectors, examples), []
    )
    _close(_first_layer(parameters), expected)


@pytest.mark.parametrize(("beta", "expected"), TRIM_CASES)
def test_legacy_fedtrimmedavg(
    legacy_api: ModuleType, beta: float | None, expected: list[float]
) -> None:
    strategy = legacy_api.FedTrimmedAvg() if beta is None else legacy_api.FedTrimmedAvg(
        beta=beta
    )
    parameters, _ = strategy.aggregate_fit(1, vector_results(TRIM_VECTORS, TRIM_EXAMPLES), [])
    _close(_first_layer(parameters), expected)


def test_legacy_krum_selects_most_central_result(legacy_api: ModuleType) -> None:
    strategy = legacy_api.Krum(num_malicious_clients=1)
    parameters, _ = strategy.aggregate_fit(1, vector_results(KRUM_VECTORS, KRUM_EXAMPLES), [])
    _close(_first_layer(parameters), KRUM_SELECTED)


def test_legacy_multikrum_weighted_mean_of_selection(legacy_api: ModuleType) -> None:
    strategy = legacy_api.Krum(num_malicious_clients=1, num_clients_to_keep=3)
    parameters, _ = strategy.aggregate_fit(1, vector_results(KRUM_VECTORS, KRUM_EXAMPLES), [])
    _close(_first_layer(parameters), MULTIKRUM_MEAN)


def test_legacy_bulyan(legacy_api: ModuleType) -> None:
    # Flower's default first rule (aggregate_krum) needs `to_keep` among the extra keyword
    # arguments: Bulyan(num_malicious_clients=1) alone raises TypeError in aggregate_fit.
    strategy = legacy_api.Bulyan(num_malicious_clients=1, to_keep=0)
    parameters, _ = strategy.aggregate_fit(
        1, vector_results(BULYAN_VECTORS, BULYAN_EXAMPLES), []
    )
    _close(_first_layer(parameters), BULYAN_EXPECTED)


def test_legacy_bulyan_with_n_below_4f_plus_3_raises(legacy_api: ModuleType) -> None:
    strategy = legacy_api.Bulyan(num_malicious_clients=1)
    results = vector_results(BULYAN_VECTORS[:6], BULYAN_EXAMPLES[:6])
    raised: ValueError | None = None
    outcome: Any = None
    try:
        outcome = strategy.aggregate_fit(1, results, [])
    except ValueError as exc:
        raised = exc
    assert raised is not None, f"Flower raises ValueError for n=6, f=1; got {outcome!r}"
    assert "4 * num_malicious + 3" in str(raised)


def test_legacy_krum_with_n_equal_2f_plus_2(legacy_api: ModuleType) -> None:
    strategy = legacy_api.Krum(num_malicious_clients=1)
    parameters, _ = strategy.aggregate_fit(
        1, vector_results(BOUNDARY_VECTORS, [1, 1, 1, 1]), []
    )
    assert parameters is not None, "Flower's legacy Krum aggregates 4 results with f=1"
    result = _first_layer(parameters).tolist()
    assert result in ([2.0, -4.0], [3.0, -6.0]), result


def test_legacy_multikrum_with_n_equal_2f_plus_2(legacy_api: ModuleType) -> None:
    strategy = legacy_api.Krum(num_malicious_clients=1, num_clients_to_keep=2)
    parameters, _ = strategy.aggregate_fit(
        1, vector_results(BOUNDARY_MK_VECTORS, BOUNDARY_MK_EXAMPLES), []
    )
    assert parameters is not None, "Flower's legacy Multi-Krum aggregates 4 results with f=1"
    _close(_first_layer(parameters), [0.75, -1.5])


# ============================================================================
# 3. Training metrics
# ============================================================================
@pytest.mark.parametrize("name", ["FedAvg", "FedMedian", "FedTrimmedAvg"])
def test_message_default_train_metrics_weighted_average(
    message_api: ModuleType, name: str
) -> None:
    _, metrics = getattr(message_api, name)().aggregate_train(1, layer_replies())
    assert metrics is not None
    _close(metrics["loss"], 0.35)
    _close(metrics["accuracy"], 0.84375)
    _close(metrics["steps"], 23.75)
    _close(metrics["per-class"], [0.375, 0.625])


def test_message_default_train_metrics_custom_weight_key(message_api: ModuleType) -> None:
    # Weighted by "samples" = (2, 1, 1) / 4: loss (1.6 + 0.4 + 0.2) / 4 = 0.55.
    replies = [
        train_reply(101 + i, layers, {"samples": s, "loss": TRAIN_METRICS[i]["loss"]})
        for i, (layers, s) in enumerate(zip(LAYERS, [2, 1, 1], strict=True))
    ]
    _, metrics = message_api.FedAvg(weighted_by_key="samples").aggregate_train(1, replies)
    assert metrics is not None
    _close(metrics["loss"], 0.55)


def test_message_custom_train_metrics_aggr_fn(message_api: ModuleType) -> None:
    calls: list[tuple[int, str]] = []

    def summarize(records: list[RecordDict], weighting_key: str) -> MetricRecord:
        calls.append((len(records), weighting_key))
        losses = [float(next(iter(r.metric_records.values()))["loss"]) for r in records]
        return MetricRecord({"max-loss": max(losses), "replies": len(records)})

    strategy = message_api.FedAvg(train_metrics_aggr_fn=summarize)
    _, metrics = strategy.aggregate_train(1, layer_replies())
    assert calls == [(3, "num-examples")]
    assert metrics is not None
    _close(metrics["max-loss"], 0.8)
    assert metrics["replies"] == 3


def test_legacy_fit_metrics_aggregation_fn(legacy_api: ModuleType) -> None:
    received: list[list[tuple[int, dict[str, Any]]]] = []

    def weighted_loss(metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        received.append(metrics)
        total = sum(n for n, _ in metrics)
        return {"loss": sum(n * float(m["loss"]) for n, m in metrics) / total}

    results = [
        fit_result(200 + i, [layers["layer.w"], layers["layer.b"]], n, TRAIN_METRICS[i])
        for i, (layers, n) in enumerate(zip(LAYERS, NUM_EXAMPLES, strict=True))
    ]
    strategy = legacy_api.FedAvg(fit_metrics_aggregation_fn=weighted_loss)
    _, metrics = strategy.aggregate_fit(1, results, [])
    assert len(received) == 1
    assert [n for n, _ in received[0]] == NUM_EXAMPLES
    assert [m["loss"] for _, m in received[0]] == [0.8, 0.4, 0.2]
    _close(metrics["loss"], 0.35)


def test_legacy_krum_fit_metrics_fn_sees_every_result(legacy_api: ModuleType) -> None:
    # Unlike the Message API, legacy Flower gives the metrics function every result, also
    # those Krum did not select.
    received: list[list[int]] = []

    def count(metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        received.append([n for n, _ in metrics])
        return {"results": len(metrics)}

    results = [
        fit_result(200 + i, [vec], n, {"loss": float(i)})
        for i, (vec, n) in enumerate(zip(KRUM_VECTORS, KRUM_EXAMPLES, strict=True))
    ]
    strategy = legacy_api.Krum(num_malicious_clients=1, fit_metrics_aggregation_fn=count)
    _, metrics = strategy.aggregate_fit(1, results, [])
    assert received == [KRUM_EXAMPLES]
    assert metrics["results"] == 5


# ============================================================================
# 4. Empty rounds, error replies, failures
# ============================================================================
@pytest.mark.parametrize("name", MESSAGE_CLASSES)
def test_message_empty_round_returns_none_none(message_api: ModuleType, name: str) -> None:
    assert getattr(message_api, name)().aggregate_train(1, []) == (None, None)


@pytest.mark.parametrize("name", MESSAGE_CLASSES)
def test_message_round_of_error_replies_returns_none_none(
    message_api: ModuleType, name: str
) -> None:
    replies = [error_reply(101), error_reply(102), error_reply(103)]
    assert getattr(message_api, name)().aggregate_train(1, replies) == (None, None)


def test_message_fedavg_skips_error_replies(message_api: ModuleType) -> None:
    # Only A (1 example) and B (3): w = (A + 3B) / 4 = [[10, 8], [6, 4]] / 4,
    # b = (1 - 3) / 4 = -0.5, loss = (0.8 + 3 * 0.4) / 4 = 0.5.
    good = layer_replies()
    replies = [good[0], error_reply(109), good[1]]
    arrays, metrics = message_api.FedAvg().aggregate_train(1, replies)
    assert arrays is not None
    _close(arrays["layer.w"].numpy(), [[2.5, 2.0], [1.5, 1.0]])
    _close(arrays["layer.b"].numpy(), [-0.5])
    assert metrics is not None
    _close(metrics["loss"], 0.5)


def test_message_fedmedian_skips_error_replies(message_api: ModuleType) -> None:
    # Median of the first three MEDIAN_ODD rows: (2, 20, -2).
    vectors, examples, _ = MEDIAN_ODD
    good = vector_replies(vectors[:3], examples[:3])
    replies = [good[0], error_reply(109), good[1], error_reply(110), good[2]]
    arrays, _ = message_api.FedMedian().aggregate_train(1, replies)
    _close(_w(arrays), [2.0, 20.0, -2.0])


@pytest.mark.parametrize("name", LEGACY_CLASSES)
def test_legacy_empty_round_returns_none_and_empty_dict(
    legacy_api: ModuleType, name: str
) -> None:
    assert getattr(legacy_api, name)().aggregate_fit(1, [], []) == (None, {})


@pytest.mark.parametrize("name", LEGACY_CLASSES)
def test_legacy_failure_not_accepted_returns_none_and_empty_dict(
    legacy_api: ModuleType, name: str
) -> None:
    strategy = getattr(legacy_api, name)(accept_failures=False)
    results = vector_results(BULYAN_VECTORS, BULYAN_EXAMPLES)
    assert strategy.aggregate_fit(1, results, [RuntimeError("client lost")]) == (None, {})


def test_legacy_failures_accepted_by_default(legacy_api: ModuleType) -> None:
    # Failures are ignored: the mean of A (1 example) and B (3) only.
    results = [
        fit_result(200 + i, [layers["layer.w"], layers["layer.b"]], n)
        for i, (layers, n) in enumerate(zip(LAYERS[:2], NUM_EXAMPLES[:2], strict=True))
    ]
    parameters, _ = legacy_api.FedAvg().aggregate_fit(1, results, [RuntimeError("lost")])
    assert parameters is not None
    weight, bias = parameters_to_ndarrays(parameters)
    _close(weight, [[2.5, 2.0], [1.5, 1.0]])
    _close(bias, [-0.5])


# ============================================================================
# 5. Configuring a round
# ============================================================================
NODES = [11, 12, 13, 14, 15]
GLOBAL = {"w": [0.5, -0.5, 2.0]}


@pytest.mark.parametrize("name", MESSAGE_CLASSES)
def test_message_configure_train(message_api: ModuleType, name: str) -> None:
    strategy = getattr(message_api, name)(fraction_train=0.6, min_train_nodes=2,
                                          min_available_nodes=2)
    config = ConfigRecord({"lr": 0.05})
    messages = list(strategy.configure_train(4, _float32_arrays(GLOBAL), config, _grid(NODES)))
    assert len(messages) == 3  # int(5 * 0.6)
    destinations = [m.metadata.dst_node_id for m in messages]
    assert len(set(destinations)) == 3 and set(destinations) <= set(NODES)
    for message in messages:
        assert message.metadata.message_type == MessageType.TRAIN
        sent_config = message.content["config"]
        assert sent_config["server-round"] == 4
        assert sent_config["lr"] == 0.05
        _close(message.content["arrays"]["w"].numpy(), GLOBAL["w"])


@pytest.mark.parametrize("name", MESSAGE_CLASSES)
def test_message_configure_evaluate(message_api: ModuleType, name: str) -> None:
    strategy = getattr(message_api, name)(fraction_evaluate=0.4, min_evaluate_nodes=1,
                                          min_available_nodes=2)
    config = ConfigRecord({"batch": 8})
    messages = list(
        strategy.configure_evaluate(2, _float32_arrays(GLOBAL), config, _grid(NODES))
    )
    assert len(messages) == 2  # int(5 * 0.4)
    assert len({m.metadata.dst_node_id for m in messages}) == 2
    for message in messages:
        assert message.metadata.message_type == MessageType.EVALUATE
        assert message.content["config"]["server-round"] == 2
        assert message.content["config"]["batch"] == 8
        _close(message.content["arrays"]["w"].numpy(), GLOBAL["w"])


def test_message_configure_with_fraction_zero_sends_nothing(message_api: ModuleType) -> None:
    arrays = _float32_arrays(GLOBAL)
    no_train = message_api.FedAvg(fraction_train=0.0)
    assert list(no_train.configure_train(1, arrays, ConfigRecord(), _grid(NODES))) == []
    no_eval = message_api.FedAvg(fraction_evaluate=0.0)
    assert list(no_eval.configure_evaluate(1, arrays, ConfigRecord(), _grid(NODES))) == []


@pytest.mark.parametrize("name", LEGACY_CLASSES)
def test_legacy_configure_fit(legacy_api: ModuleType, name: str) -> None:
    manager = _client_manager(6)

    def fit_config(server_round: int) -> dict[str, Any]:
        return {"server-round": server_round, "lr": 0.05}

    strategy = getattr(legacy_api, name)(fraction_fit=0.5, min_fit_clients=2,
                                         min_available_clients=2, on_fit_config_fn=fit_config)
    parameters = ndarrays_to_parameters([np.asarray(GLOBAL["w"], dtype=np.float32)])
    instructions = strategy.configure_fit(3, parameters, manager)
    assert len(instructions) == 3  # int(6 * 0.5)
    registered = manager.all()
    assert len({proxy.cid for proxy, _ in instructions}) == 3
    for proxy, fit_ins in instructions:
        assert registered[proxy.cid] is proxy
        assert isinstance(fit_ins, FitIns)
        assert fit_ins.config["server-round"] == 3
        assert fit_ins.config["lr"] == 0.05
        _close(parameters_to_ndarrays(fit_ins.parameters)[0], GLOBAL["w"])


@pytest.mark.parametrize("name", LEGACY_CLASSES)
def test_legacy_configure_evaluate(legacy_api: ModuleType, name: str) -> None:
    def evaluate_config(server_round: int) -> dict[str, Any]:
        return {"round": server_round}

    strategy = getattr(legacy_api, name)(fraction_evaluate=0.5, min_evaluate_clients=2,
                                         min_available_clients=2,
                                         on_evaluate_config_fn=evaluate_config)
    parameters = ndarrays_to_parameters([np.asarray(GLOBAL["w"], dtype=np.float32)])
    instructions = strategy.configure_evaluate(5, parameters, _client_manager(6))
    assert len(instructions) == 3
    assert len({proxy.cid for proxy, _ in instructions}) == 3
    for _, evaluate_ins in instructions:
        assert isinstance(evaluate_ins, EvaluateIns)
        assert evaluate_ins.config["round"] == 5
        _close(parameters_to_ndarrays(evaluate_ins.parameters)[0], GLOBAL["w"])
    off = getattr(legacy_api, name)(fraction_evaluate=0.0)
    assert off.configure_evaluate(5, parameters, _client_manager(6)) == []


# ============================================================================
# 6. Evaluation
# ============================================================================
# Three evaluation replies, num-examples (2, 6, 2), total 10:
#   eval-loss (1.0, 0.2, 0.6) -> (2 + 1.2 + 1.2) / 10 = 0.44
#   eval-acc  (0.5, 0.9, 0.7) -> (1 + 5.4 + 1.4) / 10 = 0.78
EVAL_ROWS = [(2, 1.0, 0.5), (6, 0.2, 0.9), (2, 0.6, 0.7)]


def _evaluate_replies() -> list[Message]:
    return [
        evaluate_reply(101 + i, {"num-examples": n, "eval-loss": loss, "eval-acc": acc})
        for i, (n, loss, acc) in enumerate(EVAL_ROWS)
    ]


@pytest.mark.parametrize("name", MESSAGE_CLASSES)
def test_message_aggregate_evaluate_weighted(message_api: ModuleType, name: str) -> None:
    metrics = getattr(message_api, name)().aggregate_evaluate(1, _evaluate_replies())
    assert metrics is not None
    _close(metrics["eval-loss"], 0.44)
    _close(metrics["eval-acc"], 0.78)


def test_message_aggregate_evaluate_skips_error_replies(message_api: ModuleType) -> None:
    # First two only, weights (2, 6) / 8: loss (2 + 1.2) / 8 = 0.4, acc (1 + 5.4) / 8 = 0.8.
    good = _evaluate_replies()
    replies = [good[0], error_reply(120, MessageType.EVALUATE), good[1]]
    metrics = message_api.FedAvg().aggregate_evaluate(1, replies)
    assert metrics is not None
    _close(metrics["eval-loss"], 0.4)
    _close(metrics["eval-acc"], 0.8)


def test_message_custom_evaluate_metrics_aggr_fn(message_api: ModuleType) -> None:
    calls: list[tuple[int, str]] = []

    def best(records: list[RecordDict], weighting_key: str) -> MetricRecord:
        calls.append((len(records), weighting_key))
        accs = [float(next(iter(r.metric_records.values()))["eval-acc"]) for r in records]
        return MetricRecord({"best-acc": max(accs)})

    strategy = message_api.FedAvg(evaluate_metrics_aggr_fn=best)
    metrics = strategy.aggregate_evaluate(1, _evaluate_replies())
    assert calls == [(3, "num-examples")]
    assert metrics is not None
    _close(metrics["best-acc"], 0.9)


@pytest.mark.parametrize("name", MESSAGE_CLASSES)
def test_message_aggregate_evaluate_empty_returns_none(
    message_api: ModuleType, name: str
) -> None:
    strategy = getattr(message_api, name)()
    assert strategy.aggregate_evaluate(1, []) is None
    errors = [error_reply(101, MessageType.EVALUATE), error_reply(102, MessageType.EVALUATE)]
    assert strategy.aggregate_evaluate(1, errors) is None


def _evaluate_results() -> list[tuple[ClientProxy, EvaluateRes]]:
    return [
        evaluate_result(300 + i, loss, n, {"acc": acc})
        for i, (n, loss, acc) in enumerate(EVAL_ROWS)
    ]


def _weighted_acc(metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    total = sum(n for n, _ in metrics)
    return {"acc": sum(n * float(m["acc"]) for n, m in metrics) / total}


@pytest.mark.parametrize("name", LEGACY_CLASSES)
def test_legacy_aggregate_evaluate_weighted_loss(legacy_api: ModuleType, name: str) -> None:
    strategy = getattr(legacy_api, name)(evaluate_metrics_aggregation_fn=_weighted_acc)
    loss, metrics = strategy.aggregate_evaluate(1, _evaluate_results(), [])
    _close(loss, 0.44)
    _close(metrics["acc"], 0.78)


def test_legacy_aggregate_evaluate_without_metrics_fn(legacy_api: ModuleType) -> None:
    loss, metrics = legacy_api.FedAvg().aggregate_evaluate(1, _evaluate_results(), [])
    _close(loss, 0.44)
    assert isinstance(metrics, dict)


def test_legacy_aggregate_evaluate_empty_and_failures(legacy_api: ModuleType) -> None:
    assert legacy_api.FedAvg().aggregate_evaluate(1, [], []) == (None, {})
    strict = legacy_api.FedAvg(accept_failures=False)
    failures = [RuntimeError("client lost")]
    assert strict.aggregate_evaluate(1, _evaluate_results(), failures) == (None, {})
    # Accepted by default: the failure is ignored.
    loss, _ = legacy_api.FedAvg().aggregate_evaluate(1, _evaluate_results(), failures)
    _close(loss, 0.44)


# Every entry of INTENDED_DIFFERENCES must name a test of this module.
_UNKNOWN = {k.split("[")[0] for k in INTENDED_DIFFERENCES} - {
    n for n in dir() if n.startswith("test_")
}
assert not _UNKNOWN, f"INTENDED_DIFFERENCES names unknown tests: {sorted(_UNKNOWN)}"
