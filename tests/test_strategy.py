"""The Flower adapters of both APIs: validation, deltas, reports, hooks, no mutation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.supercore.task_identity import TaskIdentity

from flwr_robust import make_strategy
from flwr_robust.aggregation import available_aggregators, get_aggregator
from flwr_robust.legacy import Krum as LegacyKrum
from flwr_robust.records import npy_view
from flwr_robust.strategy import Krum, Median, RobustStrategy, StrategyHook

LAYERS = {"w": (3, 4), "b": (4,)}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1


def global_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in LAYERS.items()}


class FakeGrid:
    """The two things FedAvg's sampling asks of a Grid."""

    def __init__(self, node_ids: list[int]) -> None:
        self._ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


def train_instructions(strategy: RobustStrategy, model: dict, nodes: list[int], rnd: int = 1):
    arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    return list(strategy.configure_train(rnd, arrays, ConfigRecord({"lr": 0.1}), FakeGrid(nodes)))


def reply(ins: Message, arrays: dict | None, num_examples=10, extra_metrics=None) -> Message:
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    if num_examples is not None or extra_metrics:
        metrics = {} if num_examples is None else {"num-examples": num_examples}
        metrics.update(extra_metrics or {})
        content["metrics"] = MetricRecord(metrics)
    return Message(content, reply_to=ins)


def client_weights(model: dict, delta: float | np.ndarray) -> dict[str, np.ndarray]:
    return {k: (v + np.float32(delta)).astype(v.dtype) for k, v in model.items()}


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


# ------------------------------------------------------------------------ Message API
def test_median_strategy_aggregates_deltas_onto_the_global_model() -> None:
    model = global_model()
    strategy = Median()
    ins = train_instructions(strategy, model, [11, 12, 13])
    deltas = {11: 1.0, 12: 2.0, 13: 100.0}
    replies = [reply(m, client_weights(model, deltas[m.metadata.dst_node_id])) for m in ins]
    arrays, metrics = strategy.aggregate_train(1, replies)
    for name, value in as_numpy(arrays).items():
        np.testing.assert_allclose(value, model[name] + 2.0, rtol=1e-6)
    assert metrics["robust-kept"] == 3 and metrics["robust-rejected"] == 0
    report = strategy.reports[-1]
    assert report.aggregated and report.kept == [11, 12, 13]


def test_instruction_carries_config_and_server_round() -> None:
    strategy = Median()
    ins = train_instructions(strategy, global_model(), [1, 2, 3])
    config = ins[0].content["config"]
    assert config["lr"] == 0.1 and config["server-round"] == 1
    assert sorted(m.metadata.dst_node_id for m in ins) == [1, 2, 3]


BAD_REPLIES = {
    "error-reply": lambda ins, model: Message(Error(code=0, reason="boom"), reply_to=ins),
    "non-finite": lambda ins, model: reply(
        ins, {**model, "w": np.full((3, 4), np.nan, np.float32)}
    ),
    "shape-mismatch": lambda ins, model: reply(ins, {**model, "w": np.zeros((4, 3), np.float32)}),
    "dtype-mismatch": lambda ins, model: reply(ins, {**model, "w": model["w"].astype(np.float64)}),
    "missing-arrays": lambda ins, model: reply(ins, {"w": model["w"]}),
    "extra-arrays": lambda ins, model: reply(ins, {**model, "z": np.zeros(1, np.float32)}),
    "missing-num-examples": lambda ins, model: reply(ins, model, None, {"loss": 1.0}),
    "invalid-num-examples": lambda ins, model: reply(ins, model, 0),
    "absurd-num-examples": lambda ins, model: reply(ins, model, 10**12),
    "malformed-reply": lambda ins, model: Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 3})}), reply_to=ins
    ),
}


@pytest.mark.parametrize("code", BAD_REPLIES)
def test_bad_reply_is_rejected_with_reason_and_never_reaches_the_model(code: str) -> None:
    model = global_model()
    strategy = Median(num_malicious=1)
    ins = train_instructions(strategy, model, [1, 2, 3, 4])
    replies = [reply(m, client_weights(model, 1.0)) for m in ins[:3]]
    replies.append(BAD_REPLIES[code](ins[3], model))
    arrays, metrics = strategy.aggregate_train(1, replies)
    bad_node = ins[3].metadata.dst_node_id
    report = strategy.reports[-1]
    assert report.rejected[bad_node].startswith(code + ":"), report.rejected
    assert metrics[f"robust-rejected-{code}"] == 1
    for name, value in as_numpy(arrays).items():
        np.testing.assert_allclose(value, model[name] + 1.0, rtol=1e-6)


@pytest.mark.parametrize("value", [-3, 2.5, float("nan"), float("inf")])
def test_implausible_counts_are_rejected(value: float) -> None:
    model = global_model()
    strategy = Median(num_malicious=1)
    ins = train_instructions(strategy, model, [1, 2, 3, 4])
    replies = [reply(m, client_weights(model, 1.0)) for m in ins[:3]]
    replies.append(reply(ins[3], client_weights(model, 50.0), value))
    strategy.aggregate_train(1, replies)
    assert strategy.reports[-1].rejected[ins[3].metadata.dst_node_id].startswith(
        "invalid-num-examples"
    )


def test_too_few_valid_replies_keep_the_global_model(caplog: pytest.LogCaptureFixture) -> None:
    model = global_model()
    strategy = Krum(num_malicious=1)  # needs 5
    assert strategy.min_train_nodes == 5 and strategy.min_available_nodes == 5
    ins = train_instructions(strategy, model, [1, 2, 3, 4, 5])
    replies = [reply(m, client_weights(model, 1.0)) for m in ins[:4]]
    replies.append(Message(Error(code=0, reason="crashed"), reply_to=ins[4]))
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None
    assert metrics["robust-aggregated"] == 0
    assert "4 valid replies, Krum(num_malicious=1) needs at least 5" in caplog.text


def test_replies_are_not_mutated() -> None:
    model = global_model()
    strategy = Median()
    ins = train_instructions(strategy, model, [1, 2, 3])
    replies = [reply(m, client_weights(model, float(i))) for i, m in enumerate(ins)]
    before = [
        {k: bytes(a.data) for k, a in r.content["arrays"].items()} | {"m": dict(r.content["metrics"])}
        for r in replies
    ]
    strategy.aggregate_train(1, replies)
    after = [
        {k: bytes(a.data) for k, a in r.content["arrays"].items()} | {"m": dict(r.content["metrics"])}
        for r in replies
    ]
    assert before == after


def test_aggregate_without_configure_and_no_replies_returns_flowers_empty_result() -> None:
    assert Median().aggregate_train(3, []) == (None, None)
    assert LegacyKrum().aggregate_fit(3, [], []) == (None, {})


def test_client_metrics_that_disagree_do_not_crash_the_round() -> None:
    model = global_model()
    strategy = Median()
    ins = train_instructions(strategy, model, [1, 2, 3])
    replies = [
        reply(ins[0], client_weights(model, 1.0), extra_metrics={"acc": [0.1, 0.2]}),
        reply(ins[1], client_weights(model, 1.0), extra_metrics={"acc": [0.1]}),
        reply(ins[2], client_weights(model, 1.0), extra_metrics={"acc": [0.1, 0.2]}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["robust-kept"] == 3


def test_evaluate_ignores_hostile_replies() -> None:
    strategy = Median()
    ins = list(
        strategy.configure_evaluate(
            1, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord(), FakeGrid([1, 2, 3])
        )
    )
    good = [
        Message(RecordDict({"m": MetricRecord({"num-examples": 10, "acc": 0.5})}), reply_to=i)
        for i in ins[:2]
    ]
    bad = Message(RecordDict({"m": MetricRecord({"num-examples": -1, "acc": 9.0})}), reply_to=ins[2])
    metrics = strategy.aggregate_evaluate(1, [*good, bad])
    assert metrics["acc"] == pytest.approx(0.5)


def test_krum_strategy_rejects_the_outlier_by_rule() -> None:
    model = global_model()
    strategy = make_strategy("multi_krum", num_malicious=1)
    nodes = [1, 2, 3, 4, 5]
    ins = train_instructions(strategy, model, nodes)
    rng = np.random.default_rng(0)
    replies = []
    for m in ins:
        delta = 1e3 if m.metadata.dst_node_id == 5 else rng.normal(0, 0.01, size=1)[0]
        replies.append(reply(m, client_weights(model, delta)))
    strategy.aggregate_train(1, replies)
    report = strategy.reports[-1]
    assert 5 not in report.kept and report.rejected[5].startswith("excluded-by-rule: multi_krum")


class RejectOdd(StrategyHook):
    def __init__(self) -> None:
        self.instructions: list[tuple[int, str]] = []
        self.ends: list[int] = []

    def on_instruction(self, server_round, purpose, global_arrays, config):
        assert config["server-round"] == server_round
        self.instructions.append((server_round, purpose))
        return {"hook-tag": f"{purpose}-{server_round}"}

    def on_replies(self, server_round, global_arrays, replies):
        for r in replies:
            r.identity = f"key-{r.node_id}"
        return {r.node_id: "bad-signature: odd node" for r in replies if r.node_id % 2}

    def on_round_end(self, report, new_arrays):
        self.ends.append(report.server_round)


def test_hooks_add_config_reject_and_set_identities() -> None:
    model = global_model()
    hook = RejectOdd()
    strategy = Median(hooks=[hook])
    ins = train_instructions(strategy, model, [1, 2, 3, 4, 6])
    assert ins[0].content["config"]["hook-tag"] == "train-1"
    replies = [reply(m, client_weights(model, float(m.metadata.dst_node_id))) for m in ins]
    arrays, metrics = strategy.aggregate_train(1, replies)
    report = strategy.reports[-1]
    assert sorted(report.kept) == [2, 4, 6]
    assert metrics["robust-rejected-bad-signature"] == 2
    assert report.identities[2] == "key-2"
    np.testing.assert_allclose(as_numpy(arrays)["b"], model["b"] + 4.0, rtol=1e-6)
    assert hook.ends == [1]


# ------------------------------------------------------------------------- legacy API
class FakeProxy(ClientProxy):
    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, *a, **k):  # pragma: no cover - never called
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


def legacy_round(strategy, model: dict, deltas: dict[int, float], rnd: int = 1):
    manager = SimpleClientManager()
    proxies = {n: FakeProxy(n) for n in deltas}
    for p in proxies.values():
        manager.register(p)
    parameters = ndarrays_to_parameters(list(model.values()))
    instructions = strategy.configure_fit(rnd, parameters, manager)
    results = []
    for proxy, _ in instructions:
        weights = client_weights(model, deltas[proxy.node_id])
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(weights.values())), 10, {})
        results.append((proxy, res))
    return instructions, results


def test_legacy_and_message_apis_agree() -> None:
    model = global_model()
    deltas = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.25, 5: 50.0}
    legacy = LegacyKrum(num_malicious=1)
    _, results = legacy_round(legacy, model, deltas)
    parameters, metrics = legacy.aggregate_fit(1, results, [])
    legacy_arrays = [npy_view(t) for t in parameters.tensors]
    message = Krum(num_malicious=1)
    ins = train_instructions(message, model, list(deltas))
    arrays, _ = message.aggregate_train(
        1, [reply(m, client_weights(model, deltas[m.metadata.dst_node_id])) for m in ins]
    )
    for a, b in zip(legacy_arrays, as_numpy(arrays).values(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert legacy.reports[-1].kept == message.reports[-1].kept
    assert metrics["robust-kept"] == 1


def test_legacy_rejects_bad_results_and_counts_failures() -> None:
    model = global_model()
    strategy = make_strategy("median", api="legacy", num_malicious=1)
    _, results = legacy_round(strategy, model, {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 9: 1.0})
    nan_weights = client_weights(model, float("nan"))
    results = [
        (proxy, FitRes(
            Status(Code.OK, ""), ndarrays_to_parameters(list(nan_weights.values())), 10, {}
        )) if proxy.node_id == 4 else (proxy, res)
        for proxy, res in results if proxy.node_id != 9
    ]
    failed = (FakeProxy(9), FitRes(Status(Code.FIT_NOT_IMPLEMENTED, "no"), Parameters([], ""), 0, {}))
    parameters, _ = strategy.aggregate_fit(1, results, [failed, RuntimeError("lost")])
    report = strategy.reports[-1]
    assert report.rejected[4].startswith("non-finite") and report.rejected[9].startswith("error-reply")
    assert report.info["exceptions"] == 1
    np.testing.assert_allclose(npy_view(parameters.tensors[1]), model["b"] + 1.0, rtol=1e-6)


def test_legacy_accept_failures_false_keeps_the_model() -> None:
    strategy = make_strategy("median", api="legacy", accept_failures=False)
    _, results = legacy_round(strategy, global_model(), {1: 1.0, 2: 1.0, 3: 1.0})
    assert strategy.aggregate_fit(1, results, [RuntimeError("x")]) == (None, {})


def test_legacy_hook_extras_reach_fit_config() -> None:
    hook = RejectOdd()
    strategy = make_strategy("median", api="legacy", hooks=[hook])
    instructions, _ = legacy_round(strategy, global_model(), {2: 0.0, 4: 0.0})
    assert all(ins.config["hook-tag"] == "train-1" for _, ins in instructions)


# ------------------------------------------------------------------ construction errors
@pytest.mark.parametrize("api", ["message", "legacy"])
@pytest.mark.parametrize("name", available_aggregators())
def test_make_strategy_builds_every_rule_on_both_apis(name: str, api: str) -> None:
    strategy = make_strategy(name, api=api)
    assert strategy.aggregator.name == name


def test_constructor_errors_are_clear() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument.*num_malicous"):
        Krum(num_malicous=2)
    with pytest.raises(ValueError, match="api must be one of"):
        make_strategy("krum", api="grpc")
    with pytest.raises(ValueError, match="unknown aggregator"):
        make_strategy("kurm")


def test_generic_strategy_takes_an_aggregator_instance() -> None:
    strategy = RobustStrategy(get_aggregator("trimmed_mean", num_malicious=1), fraction_train=0.5)
    assert strategy.aggregator.num_malicious == 1 and strategy.fraction_train == 0.5
    assert "Krum" in Krum.__doc__ and "Blanchard" in Krum.__doc__


class Rollback(StrategyHook):
    def __init__(self, model: dict) -> None:
        self.model = model

    def global_model_override(self, server_round):
        return self.model if server_round == 2 else None


@pytest.mark.parametrize("api", ["message", "legacy"])
def test_hook_can_replace_the_global_model_before_a_round(api: str) -> None:
    model, replacement = global_model(0), global_model(1)
    strategy = make_strategy("median", api=api, hooks=[Rollback(replacement)])
    if api == "message":
        ins = train_instructions(strategy, model, [1, 2, 3], rnd=2)
        sent = as_numpy(ins[0].content["arrays"])
        arrays, _ = strategy.aggregate_train(
            2, [reply(m, client_weights(replacement, 1.0)) for m in ins]
        )
        result = as_numpy(arrays)
    else:
        instructions, results = legacy_round(strategy, model, {1: 1.0, 2: 1.0, 3: 1.0}, rnd=2)
        sent = dict(zip(LAYERS, [npy_view(t) for t in instructions[0][1].parameters.tensors]))
        results = [
            (proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
                list(client_weights(replacement, 1.0).values())), 10, {}))
            for proxy, _ in results
        ]
        parameters, _ = strategy.aggregate_fit(2, results, [])
        result = dict(zip(LAYERS, [npy_view(t) for t in parameters.tensors]))
    for name in LAYERS:
        np.testing.assert_array_equal(sent[name], replacement[name])
        np.testing.assert_allclose(result[name], replacement[name] + 1.0, rtol=1e-6)


# ------------------------------------------------------- Flower drop-in: minimums, state
def test_an_explicit_small_minimum_is_kept_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        strategy = Krum(num_malicious=2, min_train_nodes=3)
    assert strategy.min_train_nodes == 3 and strategy.min_available_nodes == 7
    assert "min_train_nodes=3 below the 7 replies Krum(num_malicious=2) needs" in caplog.text
    model = global_model()
    ins = train_instructions(strategy, model, list(range(1, 8)))[:3]
    arrays, metrics = strategy.aggregate_train(1, [reply(m, client_weights(model, 1.0)) for m in ins])
    assert arrays is None and metrics["robust-aggregated"] == 0
    assert "3 valid replies" in strategy.reports[-1].note


class SlowGrid(FakeGrid):
    """Two nodes connected at the first look, all of them afterwards."""

    def __init__(self, node_ids: list[int]) -> None:
        super().__init__(node_ids)
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return self._ids[:2] if self.calls == 1 else list(self._ids)


def test_the_log_says_why_the_run_waits_for_a_raised_minimum(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = Krum(num_malicious=1)
    arrays = ArrayRecord({k: Array(v) for k, v in global_model().items()})
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        strategy.configure_train(1, arrays, ConfigRecord(), SlowGrid([1, 2, 3, 4, 5]))
    assert "2 nodes connected, waiting for min_available_nodes=5" in caplog.text
    assert "Krum(num_malicious=1) needs 5 replies" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        Krum(num_malicious=1, min_available_nodes=5).configure_train(
            1, arrays, ConfigRecord(), SlowGrid([1, 2, 3, 4, 5])
        )
    assert "waiting" not in caplog.text  # the user chose 5: Flower's own message says it


EQUIVARIANT = [
    ("fedavg", {}), ("median", {}), ("trimmed_mean", {"num_malicious": 1}),
    ("krum", {"num_malicious": 1}), ("multi_krum", {"num_malicious": 1}),
    ("bulyan", {"num_malicious": 1}), ("geometric_median", {}), ("meamed", {"num_malicious": 1}),
    ("rfout_1d", {"variant": "robust"}), ("cluster", {}), ("krum", {"pre": "nnm", "num_malicious": 1}),
]


@pytest.mark.parametrize(("rule", "params"), EQUIVARIANT)
def test_stateless_aggregation_of_an_equivariant_rule_equals_the_configured_one(
    rule: str, params: dict
) -> None:
    model = global_model()
    nodes = [1, 2, 3, 4, 5, 6, 7]
    configured = make_strategy(rule, **params)
    ins = train_instructions(configured, model, nodes)
    rng = np.random.default_rng(3)
    shifts = {n: rng.standard_normal(4).astype(np.float32) for n in nodes}
    weights = {n: {k: v + shifts[n][: v.shape[-1]] for k, v in model.items()} for n in nodes}
    expected, _ = configured.aggregate_train(
        1, [reply(m, weights[m.metadata.dst_node_id]) for m in ins]
    )
    stateless = make_strategy(rule, **params)
    got, metrics = stateless.aggregate_train(
        1, [reply(m, weights[m.metadata.dst_node_id]) for m in ins]
    )
    assert got is not None and metrics["robust-kept"] >= 1
    for name, value in as_numpy(expected).items():
        np.testing.assert_allclose(as_numpy(got)[name], value, rtol=1e-5, atol=1e-5)
    assert stateless.reports[-1].info["reference"].startswith("zeros")


@pytest.mark.parametrize("rule", ["norm_clip", "flame", "foolsgold", "centered_clip"])
def test_stateless_rule_needing_the_model_keeps_it_then_uses_the_latest_one(rule: str) -> None:
    model = global_model()
    strategy = make_strategy(rule)
    nodes = [1, 2, 3, 4, 5]
    ins = train_instructions(Median(), model, nodes)
    arrays, _ = strategy.aggregate_train(1, [reply(m, client_weights(model, 1.0)) for m in ins])
    assert arrays is None
    assert "neither sent nor been given" in strategy.reports[-1].note
    # Once it has sent a model, an unconfigured round builds on the latest model it knows.
    ins = train_instructions(strategy, model, nodes, rnd=2)
    first, _ = strategy.aggregate_train(2, [reply(m, client_weights(model, 1.0)) for m in ins])
    assert first is not None
    produced = as_numpy(first)
    rng = np.random.default_rng(5)
    again, _ = strategy.aggregate_train(3, [
        reply(m, client_weights(produced, rng.standard_normal(4).astype(np.float32)))
        for m in train_instructions(Median(), produced, nodes)
    ])
    assert again is not None and strategy.reports[-1].aggregated
    assert "reference" not in strategy.reports[-1].info


def test_legacy_stateless_aggregation_uses_the_initial_parameters() -> None:
    model = global_model()
    strategy = make_strategy("norm_clip", api="legacy", max_norm=10.0,
                             initial_parameters=ndarrays_to_parameters(list(model.values())))
    results = []
    for cid in range(1, 4):
        proxy = FakeProxy(cid)
        weights = [v + np.float32(cid) for v in model.values()]
        results.append((proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), 10, {})))
    parameters, _ = strategy.aggregate_fit(1, results, [])
    assert parameters is not None
    report = strategy.reports[-1]
    assert report.kept == [1, 2, 3] and "reference" not in report.info


@pytest.mark.parametrize("api", ["message", "legacy"])
def test_rule_classes_show_exactly_their_rules_parameters(api: str) -> None:
    """The own-rule classes spell the rule's parameters out (for IDEs and type checkers):
    they must stay those of the rule, with the same defaults."""
    import inspect

    from flwr_robust import legacy
    from flwr_robust import strategy as message
    from flwr_robust.aggregation import aggregator_class

    module = message if api == "message" else legacy
    names = ["GeometricMedian", "NormClipping", "CenteredClipping", "RFOut1d", "MeaMed", "Flame",
             "FoolsGold", "ClusterFilter", "Reputation", "FLTrust", "DnC", "SignGuard",
             "RobustLR", "FLDetector"]
    for name in names:
        cls = getattr(module, name)
        shown = {
            p.name: p.default for p in inspect.signature(cls).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        rule = {
            p.name: p.default
            for p in inspect.signature(aggregator_class(cls.rule).__init__).parameters.values()
            if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
        }
        assert shown == rule, name
        assert f"``{cls.rule}`` rule" in (cls.__doc__ or ""), name


def test_stateless_round_a_minority_layout_or_duplicate_cannot_set_the_reference() -> None:
    """Without a model, the reference layout is the one most nodes send: a node sending
    another shape, or several copies of one, is rejected and does not vote."""
    model = global_model()
    ins = train_instructions(Median(), model, [1, 2, 3, 4, 5])
    honest = [reply(m, client_weights(model, float(i))) for i, m in enumerate(ins[:3])]
    odd = {**model, "w": np.zeros((4, 3), np.float32)}
    hostile = [reply(ins[3], odd), reply(ins[4], odd), reply(ins[4], odd)]
    strategy = Median()
    arrays, _ = strategy.aggregate_train(1, hostile + honest)
    report = strategy.reports[-1]
    node = [m.metadata.dst_node_id for m in ins]
    assert report.kept == sorted(node[:3])
    assert report.rejected[node[3]].startswith("shape-mismatch")
    assert report.rejected[node[4]].startswith("duplicate-reply")
    for name, value in as_numpy(arrays).items():
        np.testing.assert_allclose(value, model[name] + 1.0, rtol=1e-6)
