"""One regression test per finding of the adversarial-hardening issue, through the public
classes: crafted replies, instructions and inputs that crashed a round, poisoned a robust rule
or bypassed a signature before, and are now rejected with a reason.

(Findings 14-16, trust store, checkpoints and keys CLI, are tested in their own modules.)
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import Code, EvaluateRes, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import (
    evaluateins_to_recorddict,
    evaluateres_to_recorddict,
    fitins_to_recorddict,
    fitres_to_recorddict,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from flwr_robust import make_strategy
from flwr_robust.aggregation import AggregationResult, Aggregator, get_aggregator
from flwr_robust.cli import main as cli_main
from flwr_robust.records import npy_view
from flwr_robust.security import KeyDir, TrustStore, load_private_key
from flwr_robust.security.hooks import SignGlobalModel, VerifyUpdateSignatures
from flwr_robust.security.mod import integrity_mod
from flwr_robust.strategy import RobustStrategy, StrategyHook, with_hooks
from flwr_robust.validation import check_num_examples
from tests.test_integrity_strategy import NODES, RUN_ID, context_for, honest_app
from tests.test_strategy import (
    FakeGrid,
    FakeProxy,
    client_weights,
    global_model,
    reply,
    train_instructions,
)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 1, 1


@pytest.fixture
def keys(tmp_path: Path) -> KeyDir:
    assert cli_main(["keys", "init", str(tmp_path / "keys"), "--clients", "5"]) == 0
    return KeyDir(tmp_path / "keys")


def signing_hooks(keys: KeyDir) -> list[StrategyHook]:
    return [
        VerifyUpdateSignatures(TrustStore.load(keys.truststore), RUN_ID),
        SignGlobalModel(load_private_key(keys.server_key), RUN_ID),
    ]


def npy_with_header(shape: str, payload: bytes = b"") -> bytes:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}".ljust(117) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + payload


def legacy_manager(nodes) -> SimpleClientManager:
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(FakeProxy(node))
    return manager


def fit_res(weights: list[np.ndarray], count=10, metrics=None) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), count, metrics or {})


def instruction_to(strategy, model: dict, node: int = 101, rnd: int = 1) -> Message:
    """The training instruction ``strategy`` sends to ``node`` (of the nodes in NODES)."""
    messages = train_instructions(strategy, model, list(NODES), rnd)
    return next(m for m in messages if m.metadata.dst_node_id == node)


def legacy_instruction_to(strategy, model: dict, node: int = 101, purpose: str = "train"):
    parameters = ndarrays_to_parameters(list(model.values()))
    configure = strategy.configure_fit if purpose == "train" else strategy.configure_evaluate
    return next(ins for proxy, ins in configure(1, parameters, legacy_manager(list(NODES)))
                if proxy.node_id == node)


def check_finite(record: ArrayRecord | None) -> None:
    assert record is not None
    for array in record.values():
        assert np.all(np.isfinite(array.numpy()))


# ----------------------------------------------------------------------------- finding 1
@pytest.mark.parametrize("shape", ["(4294967296, 4294967296)", "(100000000000000000000,)"])
def test_1_overflowing_npy_headers_are_malformed_arrays(shape: str, keys: KeyDir) -> None:
    model = global_model()
    for strategy in (make_strategy("median"), with_hooks(FedAvg(), []),
                     make_strategy("median", hooks=signing_hooks(keys))):
        ins = train_instructions(strategy, model, [1, 2, 3])
        replies = [reply(m, client_weights(model, 0.1)) for m in ins]
        replies[0].content["arrays"]["w"] = Array(
            dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=npy_with_header(shape)
        )
        new, metrics = strategy.aggregate_train(1, replies)
        node = replies[0].metadata.src_node_id
        assert strategy.reports[-1].rejected[node].startswith("malformed-array")
        assert metrics["robust-rejected-malformed-array"] == 1
        if new is not None:  # the signing strategy rejects the unsigned others too
            check_finite(new)
    legacy = make_strategy("median", api="legacy")
    instructions = legacy.configure_fit(1, ndarrays_to_parameters(list(model.values())),
                                        legacy_manager([1, 2, 3]))
    results = [(p, fit_res(list(client_weights(model, 0.1).values()))) for p, _ in instructions]
    results[0][1].parameters.tensors[0] = npy_with_header(shape)
    parameters, _ = legacy.aggregate_fit(1, results, [])
    assert legacy.reports[-1].rejected[results[0][0].node_id].startswith("malformed-array")
    assert parameters is not None


def test_1_overflowing_header_in_an_instruction_is_refused_by_the_client(keys: KeyDir) -> None:
    strategy = make_strategy("median", hooks=signing_hooks(keys))
    ins = instruction_to(strategy, global_model())
    arrays = ArrayRecord(dict(ins.content["arrays"].items()))
    arrays["w"] = Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray",
                        data=npy_with_header("(4294967296, 4294967296)"))
    ins.content = RecordDict({"arrays": arrays, "config": ins.content["config"]})
    answer = integrity_mod(ins, context_for(101, keys), honest_app)
    assert answer.has_error() and "malformed-content" in answer.error.reason


# ----------------------------------------------------------------------------- finding 2
def outlier_rows(magnitude: float, first: bool, n_honest: int = 6, d: int = 30) -> np.ndarray:
    rng = np.random.default_rng(2)
    honest = (1.0 + 0.1 * rng.standard_normal((n_honest, d))).astype(np.float32)
    bad = np.full((1, d), magnitude, dtype=np.float32)
    return np.vstack([bad, honest]) if first else np.vstack([honest, bad])


@pytest.mark.parametrize("magnitude", [1e19, 1e30, 3.4e38])
@pytest.mark.parametrize(
    ("rule", "params"),
    [
        ("centered_clip", {}), ("geometric_median", {}), ("krum", {"num_malicious": 1}),
        ("multi_krum", {"num_malicious": 1}), ("median", {}), ("meamed", {"num_malicious": 1}),
        ("trimmed_mean", {"num_malicious": 1}), ("cluster", {"method": "hdbscan"}),
        ("reputation", {"num_malicious": 1}),
    ],
)
def test_2_huge_outliers_stay_out_of_robust_rules(rule: str, params: dict,
                                                   magnitude: float) -> None:
    for first in (True, False):
        x = outlier_rows(magnitude, first)
        honest = x[1:] if first else x[:-1]
        result = get_aggregator(rule, **params)([[row] for row in x], client_ids=list(range(7)))
        update = result.update[0].astype(np.float64)
        assert np.all(np.isfinite(update))
        assert np.linalg.norm(update - honest.mean(0)) < 1.0  # honest spread ~0.55


@pytest.mark.parametrize("magnitude", [1e19, 3.4e38])
@pytest.mark.parametrize(
    ("rule", "params"),
    [("flame", {"noise_lambda": 0.0}), ("foolsgold", {}), ("cluster", {}),
     ("norm_clip", {}), ("rfout_1d", {"variant": "robust"})],
)
def test_2_every_rule_stays_finite_on_huge_values(rule: str, params: dict,
                                                   magnitude: float) -> None:
    agg = get_aggregator(rule, **params)
    for _ in range(3):  # stateful rules: the state must stay finite too
        result = agg([[row] for row in outlier_rows(magnitude, True)], client_ids=list(range(7)))
        assert np.all(np.isfinite(result.update[0]))


@pytest.mark.parametrize(("rule", "f"), [("meamed", 2), ("bulyan", 1)])
def test_2_mean_around_median_is_exact_next_to_huge_values(rule: str, f: int) -> None:
    """Found while fixing finding 2: the kernel that averages the values nearest to the
    median slid a window with running sums, which lost the honest values next to +-1e19."""
    x = outlier_rows(1e19, True)
    x = np.vstack([-x[:1], x])  # one client at -1e19, one at +1e19, six honest
    honest = x[2:]
    result = get_aggregator(rule, num_malicious=f)([[row] for row in x])
    assert np.linalg.norm(result.update[0] - honest.mean(0)) < 1.0  # honest spread ~0.55


def test_2_krum_never_selects_two_far_clients_placed_first() -> None:
    x = outlier_rows(1e30, True)
    x = np.vstack([x[:1], x])  # two clients at 1e30, first
    for rule in ("krum", "multi_krum"):
        result = get_aggregator(rule, num_malicious=2)([[row] for row in x])
        assert np.all(np.isfinite(result.scores))
        assert 0 not in result.kept and 1 not in result.kept
    for rule, params in (("krum", {"pre": "nnm"}), ("reputation", {"base_rule": "multi_krum"})):
        result = get_aggregator(rule, num_malicious=2, **params)(
            [[row] for row in x], client_ids=list(range(8))
        )
        assert np.all(np.abs(result.update[0]) < 10)


class _Raising(Aggregator):
    name = "raising"

    def _aggregate(self, matrix, num_examples, client_ids):
        raise ValueError("broken rule")


class _NotFinite(Aggregator):
    name = "not_finite"

    def _aggregate(self, matrix, num_examples, client_ids):
        update = [np.full(shape, np.inf, np.float32) for shape in matrix.shapes]
        return AggregationResult(update, kept=list(range(matrix.n)))


@pytest.mark.parametrize("rule", [_Raising(), _NotFinite()])
def test_2_engine_keeps_the_model_when_the_rule_fails(rule: Aggregator) -> None:
    model = global_model()
    strategy = RobustStrategy(aggregator=rule)
    ins = train_instructions(strategy, model, [1, 2])
    new, metrics = strategy.aggregate_train(1, [reply(m, client_weights(model, 1.0)) for m in ins])
    report = strategy.reports[-1]
    assert new is None and report.failure.startswith("aggregation-failed")
    assert metrics["robust-aggregation-failed"] == 1 and not report.kept


# ----------------------------------------------------------------------------- finding 3
def true_geometric_median(x: np.ndarray) -> np.ndarray:
    z = np.median(x, axis=0)
    for _ in range(100_000):
        weights = 1.0 / np.maximum(np.linalg.norm(x - z, axis=1), 1e-300)
        new = weights @ x / weights.sum()
        if np.linalg.norm(new - z) < 1e-13:
            return new
        z = new
    return z


@pytest.mark.parametrize("magnitude", [1e8, 1e10, 1e12, 1e20, 1e30])
def test_3_geometric_median_is_not_dragged_by_one_outlier(magnitude: float) -> None:
    rng = np.random.default_rng(3)
    honest = rng.standard_normal((4, 20))
    x = np.vstack([honest, np.full((1, 20), magnitude)]).astype(np.float32)
    truth = true_geometric_median(x.astype(np.float64))
    spread = np.sqrt(np.mean(np.sum((honest - honest.mean(0)) ** 2, axis=1)))
    for order in ([0, 1, 2, 3, 4], [4, 0, 1, 2, 3]):
        result = get_aggregator("geometric_median")([[row] for row in x[order]])
        assert result.info["converged"] == 1
        assert np.linalg.norm(result.update[0] - truth) < 1e-3 * spread


# ----------------------------------------------------------------------------- finding 4
def exact_krum_choice(x: np.ndarray, f: int) -> int:
    x = x.astype(np.float64)
    distances = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    scores = np.sort(distances, axis=1)[:, : len(x) - f - 2].sum(1)
    return int(np.argmin(scores))


@pytest.mark.parametrize("magnitude", [1e5, 1e7, 1e12])
def test_4_rules_do_not_depend_on_which_client_comes_first(magnitude: float) -> None:
    rng = np.random.default_rng(4)
    honest = (rng.standard_normal((8, 200)) * 0.01 + 0.5).astype(np.float32)
    outlier = np.full((1, 200), magnitude, np.float32)
    first, last = np.vstack([outlier, honest]), np.vstack([honest, outlier])
    mean = honest.mean(0).astype(np.float64)
    for rule, params in (("centered_clip", {}), ("geometric_median", {}),
                         ("multi_krum", {"num_malicious": 1})):
        a = get_aggregator(rule, **params)([[row] for row in first]).update[0]
        b = get_aggregator(rule, **params)([[row] for row in last]).update[0]
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert np.linalg.norm(a - mean) < 0.2  # the honest spread is ~0.14
    chosen = get_aggregator("krum", num_malicious=1)([[row] for row in first]).kept
    assert chosen == [exact_krum_choice(first, 1)]


# ----------------------------------------------------------------------------- finding 5
def test_5_reordered_legacy_layers_fail_the_signature(keys: KeyDir) -> None:
    strategy = make_strategy("median", api="legacy", hooks=signing_hooks(keys))
    layers = [np.arange(4, dtype=np.float32), np.arange(4, dtype=np.float32) + 10]
    ins = legacy_instruction_to(strategy, dict(enumerate(layers)))
    content = fitins_to_recorddict(ins, keep_input=True)
    genuine = content["fitins.parameters"]
    content["fitins.parameters"] = ArrayRecord({"1": genuine["1"], "0": genuine["0"]})
    message = Message(content, dst_node_id=101, message_type="train")
    trained = []

    def app(msg: Message, context: Context) -> Message:
        trained.append(msg)
        return Message(fitres_to_recorddict(fit_res(layers), keep_input=True), reply_to=msg)

    answer = integrity_mod(message, context_for(101, keys), app)
    assert answer.has_error() and "bad-signature" in answer.error.reason and not trained


# ----------------------------------------------------------------------------- finding 6
def test_6_both_layouts_in_one_instruction_are_refused(keys: KeyDir) -> None:
    message_api = make_strategy("median", hooks=signing_hooks(keys))
    legacy = make_strategy("median", api="legacy", hooks=signing_hooks(keys))
    model = global_model()
    ins = instruction_to(message_api, model)
    genuine = fitins_to_recorddict(legacy_instruction_to(legacy, model), keep_input=True)
    tampered_config = ConfigRecord({**ins.content["config"], "learning-rate": 10.0})
    ins.content = RecordDict({
        "arrays": ins.content["arrays"], "config": tampered_config,
        "fitins.parameters": genuine["fitins.parameters"], "fitins.config": genuine["fitins.config"],
    })
    seen = []

    def app(msg: Message, context: Context) -> Message:
        seen.append(msg)
        return honest_app(msg, context)

    answer = integrity_mod(ins, context_for(101, keys), app)
    assert answer.has_error() and "unexpected-records" in answer.error.reason and not seen


def test_6_the_app_gets_only_the_verified_records(keys: KeyDir) -> None:
    strategy = make_strategy("median", hooks=signing_hooks(keys))
    ins = instruction_to(strategy, global_model())
    extra = RecordDict({**dict(ins.content.items()), "extra": ConfigRecord({"lr": 10.0})})
    ins.content = extra
    answer = integrity_mod(ins, context_for(101, keys), honest_app)
    assert answer.has_error() and "unexpected-records" in answer.error.reason
    clean = instruction_to(strategy, global_model(), rnd=2)
    seen = []

    def app(msg: Message, context: Context) -> Message:
        seen.append(sorted(msg.content.keys()))
        return honest_app(msg, context)

    assert not integrity_mod(clean, context_for(101, keys), app).has_error()
    assert seen == [["arrays", "config"]]


# ----------------------------------------------------------------------------- finding 7
def test_7_duplicate_replies_never_reach_the_wrapped_strategy(keys: KeyDir) -> None:
    strategy = with_hooks(FedAvg(min_available_nodes=5), signing_hooks(keys))
    model = global_model()
    arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(list(NODES))))
    replies = [integrity_mod(m, context_for(m.metadata.dst_node_id, keys), honest_app)
               for m in instructions]
    to_101 = next(m for m in instructions if m.metadata.dst_node_id == 101)
    for poison in (np.nan, 1e30):
        injected = reply(to_101, client_weights(model, poison))  # unsigned, node 101
        new, metrics = strategy.aggregate_train(1, [*replies, injected])
        assert strategy.reports[-1].rejected[101].startswith("duplicate-reply")
        assert metrics["robust-rejected-duplicate-reply"] == 1
        check_finite(new)
        assert np.all(np.abs(new["w"].numpy() - model["w"]) < 1.0)
        strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(list(NODES)))


# ----------------------------------------------------------------------------- finding 8
def test_8_replies_from_unsampled_nodes_are_rejected() -> None:
    model = global_model()
    strategy = make_strategy("median")
    ins = train_instructions(strategy, model, [1, 2, 3])
    never_sent = Message(RecordDict(), dst_node_id=99, message_type="train")
    stranger = reply(never_sent, client_weights(model, 100.0))
    replies = [reply(m, client_weights(model, 1.0)) for m in ins] + [stranger]
    new, _ = strategy.aggregate_train(1, replies)
    assert strategy.reports[-1].rejected[99].startswith("unsampled-node")
    np.testing.assert_allclose(new["b"].numpy(), model["b"] + 1.0, rtol=1e-6)
    legacy = make_strategy("median", api="legacy")
    instructions = legacy.configure_fit(1, ndarrays_to_parameters(list(model.values())),
                                        legacy_manager([1, 2, 3]))
    results = [(p, fit_res(list(client_weights(model, 1.0).values()))) for p, _ in instructions]
    results.append((FakeProxy(99), fit_res(list(client_weights(model, 100.0).values()))))
    parameters, _ = legacy.aggregate_fit(1, results, [])
    assert legacy.reports[-1].rejected[99].startswith("unsampled-node")
    np.testing.assert_allclose(npy_view(parameters.tensors[1]), model["b"] + 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------- finding 9
def test_9_every_copy_of_a_duplicated_node_id_is_rejected() -> None:
    model = global_model()
    strategy = make_strategy("median")
    ins = train_instructions(strategy, model, [1, 2, 3, 4])
    injected = reply(ins[0], client_weights(model, 100.0))
    replies = [injected] + [reply(m, client_weights(model, 1.0)) for m in ins]
    new, _ = strategy.aggregate_train(1, replies)
    report = strategy.reports[-1]
    node = ins[0].metadata.dst_node_id
    assert report.rejected[node].startswith("duplicate-reply") and node not in report.kept
    assert report.kept == sorted({1, 2, 3, 4} - {node})
    np.testing.assert_allclose(new["b"].numpy(), model["b"] + 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------- finding 10
def signed_legacy_results(strategy, model: dict, keys: KeyDir, metrics: dict) -> list:
    """One legacy round through the client mod: every node returns its weights + 0.1, 10
    examples and ``metrics``; the (proxy, FitRes) pairs the server receives."""
    instructions = strategy.configure_fit(1, ndarrays_to_parameters(list(model.values())),
                                          legacy_manager(list(NODES)))
    results = []
    for proxy, ins in instructions:
        message = Message(fitins_to_recorddict(ins, keep_input=True), dst_node_id=proxy.node_id,
                          message_type="train")

        def app(msg: Message, context: Context) -> Message:
            res = fit_res(list(client_weights(model, 0.1).values()), 10, dict(metrics))
            return Message(fitres_to_recorddict(res, keep_input=True), reply_to=msg)

        answer = integrity_mod(message, context_for(proxy.node_id, keys), app)
        assert not answer.has_error()
        content = answer.content
        count = content.metric_records["fitres.num_examples"]["num_examples"]
        res = fit_res([], count, dict(content.config_records["fitres.metrics"]))
        res.parameters.tensors = [a.data for a in content["fitres.parameters"].values()]
        results.append((proxy, res))
    return results


def test_10_legacy_count_is_covered_even_with_a_num_examples_metric(keys: KeyDir) -> None:
    strategy = make_strategy("median", api="legacy", hooks=signing_hooks(keys))
    results = signed_legacy_results(strategy, global_model(), keys, {"num-examples": 10})
    res = next(r for p, r in results if p.node_id == 101)
    res.num_examples = 9_000_000  # a man in the middle inflates FitRes.num_examples
    strategy.aggregate_fit(1, results, [])
    assert strategy.reports[-1].rejected[101].startswith("bad-signature")


# ---------------------------------------------------------------------------- finding 11
class AddsConfig(StrategyHook):
    def on_instruction(self, server_round, purpose, global_arrays, config):
        return {"extra-setting": 3}


@pytest.mark.parametrize("sign_first", [True, False])
def test_11_a_hook_adding_config_does_not_break_signing(keys: KeyDir, sign_first: bool) -> None:
    hooks = signing_hooks(keys)
    hooks = [hooks[0], hooks[1], AddsConfig()] if sign_first else [AddsConfig(), *hooks]
    strategy = make_strategy("median", hooks=hooks)
    seen = []

    def app(msg: Message, context: Context) -> Message:
        seen.append(msg.content["config"]["extra-setting"])
        return honest_app(msg, context)

    for ins in train_instructions(strategy, global_model(), list(NODES)):
        answer = integrity_mod(ins, context_for(ins.metadata.dst_node_id, keys), app)
        assert not answer.has_error(), answer.error.reason if answer.has_error() else ""
    assert seen == [3] * len(NODES)


# ---------------------------------------------------------------------------- finding 12
def evaluation_app(accuracy: float):
    def app(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 5, "accuracy": accuracy})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def test_12_evaluation_replies_are_signed_and_verified(keys: KeyDir) -> None:
    strategy = make_strategy("median", hooks=signing_hooks(keys))
    arrays = ArrayRecord({k: Array(v) for k, v in global_model().items()})
    instructions = list(strategy.configure_evaluate(1, arrays, ConfigRecord(),
                                                    FakeGrid(list(NODES))))
    replies = {m.metadata.dst_node_id: integrity_mod(m, context_for(m.metadata.dst_node_id, keys),
                                                     evaluation_app(0.5))
               for m in instructions}
    replies[101].content["metrics"]["accuracy"] = 1.0  # a forged accuracy
    del replies[102].content["frs"]  # unsigned
    metrics = strategy.aggregate_evaluate(1, list(replies.values()))
    rejected = strategy.engine.evaluation_reports[-1].rejected
    assert rejected[101].startswith("bad-signature") and rejected[102].startswith("unsigned")
    assert metrics["accuracy"] == pytest.approx(0.5)


def test_12_legacy_evaluation_results_are_signed_and_verified(keys: KeyDir) -> None:
    strategy = make_strategy("median", api="legacy", hooks=signing_hooks(keys))
    model = global_model()
    instructions = strategy.configure_evaluate(1, ndarrays_to_parameters(list(model.values())),
                                               legacy_manager(list(NODES)))
    results = []
    for proxy, ins in instructions:
        message = Message(evaluateins_to_recorddict(ins, keep_input=True),
                          dst_node_id=proxy.node_id, message_type="evaluate")

        def app(msg: Message, context: Context) -> Message:
            res = EvaluateRes(Status(Code.OK, ""), 0.25, 5, {"accuracy": 0.5})
            return Message(evaluateres_to_recorddict(res), reply_to=msg)

        answer = integrity_mod(message, context_for(proxy.node_id, keys), app)
        assert not answer.has_error(), answer.error.reason if answer.has_error() else ""
        content = answer.content
        loss = content.metric_records["evaluateres.loss"]["loss"]
        if proxy.node_id == 101:
            loss = 0.0001  # a forged loss
        results.append((proxy, EvaluateRes(Status(Code.OK, ""), loss, 5,
                                           dict(content.config_records["evaluateres.metrics"]))))
    loss, _ = strategy.aggregate_evaluate(1, results, [])
    assert strategy.engine.evaluation_reports[-1].rejected[101].startswith("bad-signature")
    assert loss == pytest.approx(0.25)


# ---------------------------------------------------------------------------- finding 13
def test_13_a_node_holding_a_server_key_always_verifies(keys: KeyDir) -> None:
    strategy = make_strategy("median")  # the server does not sign
    model = {k: v + 1e6 for k, v in global_model().items()}  # a tampered model
    ins = instruction_to(strategy, model)
    context = context_for(101, keys, **{
        "signing-key": str(keys.client_key("client-0")),
        "server-public-key": str(keys.server_pub),
    })
    context.run_config["signing"] = False  # the run config cannot switch verification off
    trained = []

    def app(msg: Message, ctx: Context) -> Message:
        trained.append(msg)
        return honest_app(msg, ctx)

    answer = integrity_mod(ins, context, app)
    assert answer.has_error() and "unsigned" in answer.error.reason and not trained


# ---------------------------------------------------------------------------- finding 17
@pytest.mark.parametrize("count", [2**80, 10**400, float("inf"), -(2**70), "12"])
def test_17_absurd_counts_are_reasons_not_exceptions(count) -> None:
    problem = check_num_examples(count)
    assert problem is not None and problem.split(":")[0] in (
        "absurd-num-examples", "invalid-num-examples"
    )
    model = global_model()
    legacy = with_hooks(LegacyFedAvg(min_available_clients=3, min_fit_clients=3), [])
    instructions = legacy.configure_fit(1, ndarrays_to_parameters(list(model.values())),
                                        legacy_manager([1, 2, 3]))
    results = [(p, fit_res(list(client_weights(model, 1.0).values()))) for p, _ in instructions]
    results[0][1].num_examples = count
    parameters, _ = legacy.aggregate_fit(1, results, [])
    assert legacy.reports[-1].rejected[results[0][0].node_id].split(":")[0].endswith(
        "num-examples"
    )
    assert parameters is not None


# ---------------------------------------------------------------------------- finding 18
def test_18_a_reply_with_two_array_records_is_an_error_reply(keys: KeyDir) -> None:
    strategy = make_strategy("median", hooks=signing_hooks(keys))
    ins = instruction_to(strategy, global_model())

    def app(msg: Message, context: Context) -> Message:
        answer = honest_app(msg, context)
        answer.content["second"] = ArrayRecord({"x": Array(np.zeros(2, np.float32))})
        return answer

    answer = integrity_mod(ins, context_for(101, keys), app)
    assert answer.has_error() and "unsignable-reply" in answer.error.reason


def test_18_unreadable_replies_never_escape_a_strategy() -> None:
    model = global_model()
    strategy = make_strategy("median")
    ins = train_instructions(strategy, model, [1, 2, 3, 4])
    replies = [reply(m, client_weights(model, 1.0)) for m in ins]
    replies[0].content["arrays"]["w"] = Array(dtype="float32", shape=(3, 4), stype="x", data=b"")
    replies[1].content["extra"] = ArrayRecord({"w": Array(np.zeros(1, np.float32))})
    replies[2] = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}),
                         reply_to=ins[2])
    strategy.aggregate_train(1, replies)
    rejected = strategy.reports[-1].rejected
    nodes = [m.metadata.dst_node_id for m in ins]
    assert rejected[nodes[0]].startswith("malformed-array")
    assert rejected[nodes[1]].startswith("malformed-reply")
    assert rejected[nodes[2]].startswith("malformed-reply")
    legacy = make_strategy("median", api="legacy")
    instructions = legacy.configure_fit(1, ndarrays_to_parameters(list(model.values())),
                                        legacy_manager([1, 2, 3]))
    results = [(p, fit_res(list(client_weights(model, 1.0).values()))) for p, _ in instructions]
    results[0][1].parameters = Parameters(tensors=None, tensor_type="")  # type: ignore[arg-type]
    legacy.aggregate_fit(1, results, [])
    assert legacy.reports[-1].rejected[results[0][0].node_id].startswith("malformed-")


# ------------------------------------------------- found by the review of the hardening
def npy_variant(array: np.ndarray, kind: str) -> bytes:
    """``.npy`` bytes that ``np.load`` (so Flower's ``Array.numpy()``) refuses."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    data = bytearray(buffer.getvalue())
    if kind == "minor-version":
        data[7] = 1
        return bytes(data)
    shape = str(list(array.shape)) if kind == "list-shape" else str(array.shape)
    extra = "'x': 1, " if kind == "extra-key" else ""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, {extra}}}"
    text = header.ljust(117).encode() + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + array.tobytes()


@pytest.mark.parametrize("kind", ["minor-version", "list-shape", "extra-key"])
def test_review_arrays_np_load_refuses_are_malformed(kind: str) -> None:
    model = global_model()
    strategy = with_hooks(FedAvg(min_available_nodes=3), [])
    ins = train_instructions(strategy, model, [1, 2, 3])
    replies = [reply(m, client_weights(model, 0.5)) for m in ins]
    weights = model["w"] + np.float32(0.5)
    replies[0].content["arrays"]["w"] = Array(
        dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=npy_variant(weights, kind)
    )
    new, _ = strategy.aggregate_train(1, replies)
    node = replies[0].metadata.src_node_id
    assert strategy.reports[-1].rejected[node].startswith("malformed-array")
    np.testing.assert_allclose(new["w"].numpy(), weights, rtol=1e-6)


@pytest.mark.parametrize("odd", [{"acc": [0.5]}, {"acc": 0.5}, {"acc": [1.0, 2.0, 3.0]}])
def test_review_metrics_a_minority_sends_differently_never_void_the_round(odd) -> None:
    model = global_model()
    strategy = with_hooks(FedAvg(min_available_nodes=5), [])
    ins = train_instructions(strategy, model, list(NODES))
    replies = [reply(m, client_weights(model, 0.5), extra_metrics={"acc": [0.5, 0.5]})
               for m in ins]
    replies[0] = reply(ins[0], client_weights(model, 0.5), extra_metrics=odd)
    replies[1] = reply(ins[1], client_weights(model, 0.5), extra_metrics={**odd, "x": 1.0})
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is not None and metrics["acc"] == [0.5, 0.5]
    assert metrics["robust-rejected-inconsistent-reply"] == 2
    robust = make_strategy("median")
    ins = train_instructions(robust, model, list(NODES))
    replies = [reply(m, client_weights(model, 0.5), extra_metrics={"acc": [0.5, 0.5]})
               for m in ins]
    replies[0] = reply(ins[0], client_weights(model, 0.5), extra_metrics=odd)
    _, metrics = robust.aggregate_train(1, replies)
    assert metrics["acc"] == [0.5, 0.5] and metrics["robust-kept"] == 5  # model: all kept


def weighted_accuracy(metrics: list[tuple[int, dict]]) -> dict:
    """The Flower tutorial's metrics function: fails on a missing or non-numeric key."""
    total = sum(n for n, _ in metrics)
    return {"accuracy": sum(n * m["accuracy"] for n, m in metrics) / total}


@pytest.mark.parametrize("odd", [{"accuracy": "0.9"}, {}, {"accuracy": [0.9]}])
def test_review_legacy_evaluation_metrics_and_loss(odd) -> None:
    from flwr.common import EvaluateRes

    strategy = make_strategy("median", api="legacy",
                             evaluate_metrics_aggregation_fn=weighted_accuracy)
    instructions = strategy.configure_evaluate(
        1, ndarrays_to_parameters(list(global_model().values())), legacy_manager([1, 2, 3, 4, 5])
    )
    results = [(p, EvaluateRes(Status(Code.OK, ""), 0.5, 10, {"accuracy": 0.9}))
               for p, _ in instructions]
    results[0][1].metrics = odd
    results[1][1].loss = [0.1, 0.1]  # type: ignore[assignment]
    loss, metrics = strategy.aggregate_evaluate(1, results, [])
    assert loss == pytest.approx(0.5) and metrics == {"accuracy": pytest.approx(0.9)}
    rejected = strategy.engine.evaluation_reports[-1].rejected
    assert rejected[results[1][0].node_id].startswith("malformed-reply")


def test_review_legacy_metric_functions_never_see_signature_fields(keys: KeyDir) -> None:
    seen = []

    def record(metrics: list[tuple[int, dict]]) -> dict:
        seen.extend(key for _, m in metrics for key in m)
        return {}

    strategy = make_strategy("median", api="legacy", hooks=signing_hooks(keys),
                             fit_metrics_aggregation_fn=record)
    strategy.aggregate_fit(1, signed_legacy_results(strategy, global_model(), keys,
                                                    {"acc": 0.5}), [])
    assert strategy.reports[-1].kept == sorted(NODES)
    assert seen and set(seen) == {"acc"}


def test_review_a_message_without_content_is_refused_by_the_mod(keys: KeyDir) -> None:
    from flwr.app import Error

    strategy = make_strategy("median", hooks=signing_hooks(keys))
    ins = instruction_to(strategy, global_model())
    broken = Message(Error(code=3, reason="x"), reply_to=reply(ins, None))
    broken.metadata.message_type = "train"
    answer = integrity_mod(broken, context_for(101, keys), honest_app)
    assert answer.has_error() and "unexpected-records" in answer.error.reason


def test_review_signature_prefixed_metrics_are_refused(keys: KeyDir) -> None:
    model = global_model()
    strategy = make_strategy("median", hooks=signing_hooks(keys))
    ins = train_instructions(strategy, model, list(NODES))
    replies = [integrity_mod(m, context_for(m.metadata.dst_node_id, keys), honest_app)
               for m in ins]
    replies[0].content["metrics"]["frs-accuracy"] = 1e30  # unsigned, would be aggregated
    strategy.aggregate_train(1, replies)
    node = replies[0].metadata.src_node_id
    assert strategy.reports[-1].rejected[node].startswith("malformed-reply")

    def app(msg: Message, context: Context) -> Message:
        answer = honest_app(msg, context)
        answer.content["metrics"]["frs-x"] = 1.0
        return answer

    again = instruction_to(strategy, model, rnd=2)
    assert "unsignable-reply" in integrity_mod(again, context_for(101, keys), app).error.reason


def test_review_identical_updates_tie_by_identity_not_arrival() -> None:
    rng = np.random.default_rng(5)
    honest = [rng.standard_normal(6).astype(np.float32) for _ in range(5)]
    twin = rng.standard_normal(6).astype(np.float32)
    updates = [*honest, twin, twin.copy()]
    ids = ["h0", "h1", "h2", "h3", "h4", "A", "B"]
    outcomes = set()
    for order in ([0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [5, 0, 6, 1, 2, 3, 4]):
        rule = get_aggregator("reputation", base_rule="multi_krum", num_malicious=2)
        for _ in range(4):
            result = rule([[updates[i]] for i in order], client_ids=[ids[i] for i in order])
        kept = tuple(sorted(ids[order[i]] for i in result.kept))
        outcomes.add((kept, result.update[0].tobytes()))
    assert len(outcomes) == 1
    zeros = [np.zeros(3, np.float32), np.array([-0.0, 0, 0], np.float32), np.ones(3, np.float32)]
    bits = {get_aggregator("median")([[zeros[i]] for i in order]).update[0].tobytes()
            for order in ([0, 1, 2], [1, 0, 2], [2, 1, 0])}
    assert len(bits) == 1


def test_review_reputation_distance_keeps_clients_at_the_aggregate() -> None:
    rule = get_aggregator("reputation", base_rule="median", reputation_score="distance")
    for _ in range(6):
        result = rule([[np.zeros(4, np.float32)] for _ in range(5)], client_ids=list("abcde"))
    assert result.kept == [0, 1, 2, 3, 4]


def test_review_integer_and_float64_layers_keep_their_precision() -> None:
    model = {"steps": np.array([2**40 + 1], np.int64), "w": np.array([1.0], np.float64)}
    strategy = make_strategy("krum", num_malicious=0)
    ins = train_instructions(strategy, model, [1, 2, 3])
    replies = [reply(m, {"steps": model["steps"], "w": model["w"] + 1e-9}) for m in ins]
    new, _ = strategy.aggregate_train(1, replies)
    assert new["steps"].numpy()[0] == 2**40 + 1
    assert new["w"].numpy()[0] == pytest.approx(1.0 + 1e-9, abs=1e-15)


def test_review_instructions_bind_their_kind_run_and_round(keys: KeyDir) -> None:
    strategy = make_strategy("median", hooks=signing_hooks(keys))
    train = instruction_to(strategy, global_model())
    relabelled = Message(train.content, dst_node_id=101, message_type="evaluate")
    answer = integrity_mod(relabelled, context_for(101, keys), honest_app)
    assert answer.has_error() and "bad-signature" in answer.error.reason
    context = context_for(101, keys)
    assert not integrity_mod(train, context, honest_app).has_error()
    replayed = integrity_mod(train, context, honest_app)
    assert replayed.has_error() and "stale-round" in replayed.error.reason
    other_run = context_for(102, keys)
    other_run.run_id = RUN_ID + 1
    answer = integrity_mod(instruction_to(strategy, global_model(), 102), other_run, honest_app)
    assert answer.has_error() and "wrong-run" in answer.error.reason
    half = context_for(103, keys)
    half.node_config.pop("server-public-key", None)
    half.node_config["signing-key"] = str(keys.client_key("client-2"))
    answer = integrity_mod(instruction_to(strategy, global_model(), 103), half, honest_app)
    assert answer.has_error() and "keys-unavailable" in answer.error.reason


def test_review_a_revoked_key_stays_revoked_after_reloading_an_older_store(
    keys: KeyDir,
) -> None:
    store = TrustStore.load(keys.truststore)
    backup = keys.truststore.read_bytes()
    store.revoke(store.find("client-0").key_id)
    store.save()
    keys.truststore.write_bytes(backup + b"\n")  # a restored backup
    assert store.reload_if_changed()
    assert store.find("client-0").revoked


def test_review_trimmed_mean_that_trims_nothing_says_so(caplog) -> None:
    with caplog.at_level("WARNING"):
        get_aggregator("trimmed_mean")([[np.ones(2, np.float32)] for _ in range(5)])
    assert "trims nothing" in caplog.text
