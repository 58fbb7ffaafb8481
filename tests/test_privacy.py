"""Local differential privacy (issue 11, items 1 and 3): the mechanism, its accounting, the
client mod's place before signing, the server's policy, budget exhaustion and the metrics."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod.utils import make_ffn
from flwr.clientapp import ClientApp
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, fitres_to_recorddict
from flwr.server.client_manager import SimpleClientManager
from flwr.supercore.task_identity import TaskIdentity
from prometheus_client import generate_latest
from scipy.optimize import minimize_scalar

from flwr_robust import make_strategy
from flwr_robust.aggregation.base import InvalidParameterError
from flwr_robust.apps.server import privacy_hook
from flwr_robust.apps.settings import RunSettings
from flwr_robust.cli import main as cli_main
from flwr_robust.ops.telemetry import PrometheusHook
from flwr_robust.privacy import (
    BUDGET_EXHAUSTED,
    LocalDP,
    NodeDP,
    PrivacyLedger,
    PrivacyPolicyHook,
    clip_and_noise,
    epsilon_spent,
    local_dp_mod,
)
from flwr_robust.privacy.mod import UNPRIVATISABLE
from flwr_robust.records import npy_view
from flwr_robust.security import KeyDir
from flwr_robust.security.mod import fault_injection_mod, integrity_mod, record_digest
from flwr_robust.strategy.engine import ClientReply, RoundReport
from tests.test_integrity_strategy import NODES, RUN_ID, context_for, signed_median
from tests.test_strategy import FakeGrid, FakeProxy, global_model

CLIP, SIGMA, DELTA = 0.5, 1.2, 1e-5
DP_CONFIG = {"dp-clip": CLIP, "dp-noise-multiplier": SIGMA, "dp-delta": DELTA}
SHIFT = 3.0  # every test client moves each weight by this: norm far above CLIP


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 1, 1


@pytest.fixture
def keys(tmp_path: Path) -> KeyDir:
    assert cli_main(["keys", "init", str(tmp_path / "keys"), "--clients", "5"]) == 0
    return KeyDir(tmp_path / "keys")


def shifting_app(message: Message, context: Context) -> Message:
    """Trains by adding SHIFT to every weight; reports a (private) training loss."""
    arrays = {k: Array(v.numpy() + np.float32(SHIFT)) for k, v in message.content["arrays"].items()}
    metrics = MetricRecord({"num-examples": 10, "train-loss": 0.25})
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}),
                   reply_to=message)


def dp_context(node_id: int = 101, state: RecordDict | None = None, **run_config) -> Context:
    return Context(run_id=RUN_ID, node_id=node_id,
                   node_config={"partition-id": NODES.get(node_id, 0), "num-partitions": 5},
                   state=RecordDict() if state is None else state,
                   run_config={**DP_CONFIG, **run_config})


def train_instruction(model: dict, rnd: int = 1, node: int = 101) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in model.items()}),
                          "config": ConfigRecord({"server-round": rnd})})
    return Message(content, dst_node_id=node, message_type="train")


def sent_round(strategy, model: dict, rnd: int, nodes: list[int]) -> dict[int, Message]:
    """The strategy's training instructions of round ``rnd`` by node."""
    arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    instructions = strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid(nodes))
    return {ins.metadata.dst_node_id: ins for ins in instructions}


def flat(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([v.numpy().ravel().astype(np.float64) for v in record.values()])


def independent_rdp_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """From the closed-form RDP curve of the composed Gaussian mechanism,
    ``rounds * alpha / (2 sigma^2)`` (Mironov 2017, Prop. 7 and 1), and the RDP-to-DP
    conversion of Balle et al. (AISTATS 2020, Thm. 21), optimised over a continuous order."""

    def eps(alpha: float) -> float:
        rdp = rounds * alpha / (2 * sigma**2)
        return rdp + math.log1p(-1 / alpha) - math.log(delta * alpha) / (alpha - 1)

    return float(minimize_scalar(eps, bounds=(1.02, 5000.0), method="bounded").fun)


# ---------------------------------------------------------------- the mechanism
def test_clipping_bounds_the_norm_and_keeps_the_direction() -> None:
    update = [np.full((30, 20), 2.0), np.arange(7.0)]
    norm = float(np.linalg.norm(np.concatenate([a.ravel() for a in update])))
    noised, before = clip_and_noise(update, CLIP, SIGMA, np.random.default_rng(5))
    noise = np.random.default_rng(5).normal(0.0, SIGMA * CLIP, size=607)
    clipped = np.concatenate([a.ravel() for a in noised]) - noise
    assert before == pytest.approx(norm)
    assert np.linalg.norm(clipped) == pytest.approx(CLIP, rel=1e-9)
    np.testing.assert_allclose(clipped * norm / CLIP,
                               np.concatenate([a.ravel() for a in update]), rtol=1e-9)
    assert [a.shape for a in noised] == [(30, 20), (7,)]


def test_an_update_within_the_bound_is_not_scaled() -> None:
    update = [np.array([0.1, -0.2, 0.05])]
    noised, _ = clip_and_noise(update, CLIP, SIGMA, np.random.default_rng(1))
    noise = np.random.default_rng(1).normal(0.0, SIGMA * CLIP, size=3)
    np.testing.assert_allclose(noised[0] - noise, update[0], atol=1e-15)


def test_noise_has_std_sigma_times_clip() -> None:
    d = 200_000
    noised, _ = clip_and_noise([np.zeros(d)], CLIP, SIGMA, np.random.default_rng(0))
    std = SIGMA * CLIP
    # the sample std's standard error is std / sqrt(2d), the mean's std / sqrt(d): 5 of each
    assert abs(noised[0].std() - std) < 5 * std / math.sqrt(2 * d)
    assert abs(noised[0].mean()) < 5 * std / math.sqrt(d)


def test_huge_updates_are_clipped_without_overflow() -> None:
    noised, norm = clip_and_noise([np.full(4, 1e300)], 1.0, 1e-3, np.random.default_rng(0))
    assert norm == pytest.approx(2e300) and np.all(np.isfinite(noised[0]))
    with pytest.raises(ValueError, match="not finite"):
        clip_and_noise([np.array([np.inf])], 1.0, 1.0, np.random.default_rng(0))


def test_settings_blank_or_zero_is_off_and_bad_values_raise() -> None:
    assert LocalDP.from_config({"dp-clip": "", "dp-noise-multiplier": 1.0}) is None
    assert LocalDP.from_config({"dp-clip": 1.0, "dp-noise-multiplier": 0}) is None
    with pytest.raises(InvalidParameterError):
        LocalDP.from_config({"dp-clip": "big", "dp-noise-multiplier": 1.0})
    with pytest.raises(InvalidParameterError):
        LocalDP(1.0, 1.0, delta=1.5)


@pytest.mark.parametrize("bad", [
    {"dp-noise-multiplier": 1e300}, {"dp-noise-multiplier": 1e-300}, {"dp-clip": 1e300},
    {"dp-delta": 0.999}, {"dp-delta": 5e-324}, {"dp-max-epsilon": 1e300},
    {"dp-clip": math.nan}, {"dp-noise-multiplier": math.inf}, {"dp-delta": "nan"},
    {"dp-max-epsilon": -1.0}, {"dp-clip": True},
])
def test_settings_outside_sane_finite_ranges_raise(bad: dict) -> None:
    with pytest.raises(InvalidParameterError):
        LocalDP.from_config({**DP_CONFIG, **bad})


def test_a_node_config_with_any_dp_key_owns_every_dp_setting() -> None:
    server = {**DP_CONFIG, "dp-delta": 0.005, "dp-max-epsilon": 99.0}
    # node silent: the run config's four mechanism keys, never its node-only keys
    assert NodeDP.resolve({"partition-id": 0}, {**server, "dp-allow-evaluation": True}) == \
        NodeDP(LocalDP(CLIP, SIGMA, 0.005, 99.0))
    # the node sets clip and sigma: delta and budget are the code defaults, not the server's
    node = {"dp-clip": 1.0, "dp-noise-multiplier": 2.0}
    assert NodeDP.resolve(node, server).dp == LocalDP(1.0, 2.0, 1e-5, None)
    # a node key alone (here dp-required) takes the server's DP away: off, and required
    resolved = NodeDP.resolve({"dp-required": "true"}, server)
    assert resolved.dp is None and resolved.required
    # only dp-clip (and a budget): the server would choose sigma, so it is refused
    for partial in ({"dp-clip": 0.5}, {"dp-clip": 0.5, "dp-max-epsilon": 5.0}, {"dp-delta": 1e-6},
                    {"dp-ledger-file": "/tmp/ledger.json"}):
        with pytest.raises(InvalidParameterError, match="both"):
            NodeDP.resolve(partial, {"dp-noise-multiplier": 1e-2})
    with pytest.raises(InvalidParameterError):
        NodeDP.resolve({"dp-required": "maybe"}, {})
    with pytest.raises(InvalidParameterError, match="absolute"):
        NodeDP.resolve({**DP_CONFIG, "dp-ledger-file": "ledger.json"}, {})


# ---------------------------------------------------------------- accounting
@pytest.mark.parametrize(("sigma", "rounds"), [(1.2, 1), (1.2, 5), (0.8, 20), (4.0, 50)])
def test_epsilon_matches_an_independent_rdp_computation(sigma: float, rounds: int) -> None:
    ours = epsilon_spent([sigma] * rounds, DELTA)
    assert ours == pytest.approx(independent_rdp_epsilon(sigma, rounds, DELTA), rel=0.01)
    accountant = RdpAccountant()
    accountant.compose(SelfComposedDpEvent(GaussianDpEvent(sigma), rounds))
    assert ours == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-9)
    # RDP is an upper bound of the tight (PLD) epsilon, and not a loose one
    pld = PLDAccountant()
    pld.compose(SelfComposedDpEvent(GaussianDpEvent(sigma), rounds))
    assert pld.get_epsilon(DELTA) <= ours <= 1.3 * pld.get_epsilon(DELTA)


def test_the_mod_reports_the_epsilon_of_the_rounds_it_released() -> None:
    model, state = global_model(), RecordDict()
    reported = []
    for rnd in (1, 2, 3):
        reply = local_dp_mod(train_instruction(model, rnd), dp_context(state=state),
                             shifting_app)
        metrics = dict(reply.content["metrics"])
        assert set(metrics) == {"num-examples", "epsilon-spent", "dp-delta"}  # loss withheld
        assert metrics["dp-delta"] == DELTA
        reported.append(metrics["epsilon-spent"])
    for rounds, epsilon in enumerate(reported, start=1):
        assert epsilon == pytest.approx(independent_rdp_epsilon(SIGMA, rounds, DELTA), rel=0.01)
    assert PrivacyLedger.load(state).noise_multipliers == [SIGMA] * 3


def test_the_released_update_is_clipped_and_noised() -> None:
    rng = np.random.default_rng(3)
    model = {"w": rng.standard_normal((200, 50)).astype(np.float32),
             "b": np.zeros(50, np.float32)}
    reply = local_dp_mod(train_instruction(model), dp_context(), shifting_app)
    sent = np.concatenate([v.ravel().astype(np.float64) for v in model.values()])
    released = flat(reply.content["arrays"]) - sent
    d = released.size
    # clean direction (all +SHIFT) clipped to CLIP, plus noise of std SIGMA*CLIP per coordinate
    residual = released - CLIP / math.sqrt(d)
    std = SIGMA * CLIP
    assert abs(residual.std() - std) < 5 * std / math.sqrt(2 * d)
    assert abs(residual.mean()) < 5 * std / math.sqrt(d)
    assert np.max(np.abs(released)) < SHIFT  # nothing of the raw +3 update survives
    assert list(reply.content["arrays"]) == list(model)  # layer order kept
    assert all(v.numpy().dtype == np.float32 for v in reply.content["arrays"].values())


def test_dp_off_passes_the_reply_through() -> None:
    model = global_model()
    context = dp_context(**{"dp-clip": ""})
    reply = local_dp_mod(train_instruction(model), context, shifting_app)
    assert dict(reply.content["metrics"]) == {"num-examples": 10, "train-loss": 0.25}


# ---------------------------------------------------------------- budget exhaustion
def test_a_client_declines_once_its_budget_is_spent_and_the_server_counts_it() -> None:
    two_rounds = epsilon_spent([SIGMA] * 2, DELTA)
    budget = {"dp-max-epsilon": (two_rounds + epsilon_spent([SIGMA] * 3, DELTA)) / 2}
    model, state, calls = global_model(), RecordDict(), []

    def app(message: Message, context: Context) -> Message:
        calls.append(1)
        return shifting_app(message, context)

    hook = PrivacyPolicyHook(max_epsilon=100.0)
    strategy = make_strategy("fedavg", api="message", hooks=[hook])
    for rnd in (1, 2, 3):
        sent = sent_round(strategy, model, rnd, [101, 102, 103])
        reply = local_dp_mod(sent[101], dp_context(state=state, **budget), app)
        others = [local_dp_mod(sent[node], dp_context(node), app) for node in (102, 103)]
        strategy.aggregate_train(rnd, [reply, *others])
    assert len(calls) == 2 + 3 * 2  # node 101 trained twice, never in round 3
    assert reply.has_error() and "[node 101]" in reply.error.reason
    assert f"{BUDGET_EXHAUSTED}:" in reply.error.reason
    report = strategy.reports[-1]
    assert report.rejected[101].startswith("error-reply")
    assert report.info["privacy"]["budget-exhausted"] == [101]
    assert hook.counts[BUDGET_EXHAUSTED] == 1
    assert set(report.info["privacy"]["epsilon-spent"]) == {"102", "103"}
    assert PrivacyLedger.load(state).noise_multipliers == [SIGMA] * 2  # the refusal is free


# ---------------------------------------------------------------- policy hook
def reply_with(node: int, **metrics) -> ClientReply:
    return ClientReply(node, metrics={"num-examples": 10, **metrics})


def test_policy_hook_reason_codes() -> None:
    hook = PrivacyPolicyHook(max_epsilon=3.0, max_delta=1e-5)
    replies = [
        reply_with(1, **{"epsilon-spent": 2.0, "dp-delta": 1e-5}),
        reply_with(2),
        reply_with(3, **{"epsilon-spent": 2.0}),
        reply_with(4, **{"epsilon-spent": 3.5, "dp-delta": 1e-6}),
        reply_with(5, **{"epsilon-spent": 1.0, "dp-delta": 1e-3}),
        reply_with(6, **{"epsilon-spent": float("nan"), "dp-delta": 1e-6}),
    ]
    rejected = hook.on_replies(1, {}, replies)
    codes = {node: text.split(":")[0] for node, text in rejected.items()}
    assert codes == {2: "privacy-unreported", 3: "privacy-unreported",
                     4: "privacy-over-budget", 5: "privacy-over-budget",
                     6: "privacy-unreported"}
    assert hook.counts == {"privacy-unreported": 3, "privacy-over-budget": 2}
    report = RoundReport(1, "fedavg", 6)
    hook.on_round_end(report, None)
    assert report.info["privacy"]["epsilon-spent"] == {"1": 2.0, "3": 2.0, "4": 3.5, "5": 1.0}


def test_policy_hook_without_a_policy_only_reports() -> None:
    hook = PrivacyPolicyHook()
    assert hook.on_replies(1, {}, [reply_with(1), reply_with(2, **{"epsilon-spent": 9.0})]) == {}
    with pytest.raises(InvalidParameterError):
        PrivacyPolicyHook(max_epsilon=-1.0)


def test_server_app_installs_the_hook_from_the_run_config() -> None:
    assert privacy_hook(RunSettings()) is None
    reporting = privacy_hook(RunSettings.from_run_config(DP_CONFIG))
    assert reporting is not None and not reporting.enforcing
    policy = privacy_hook(RunSettings.from_run_config({"dp-policy-max-epsilon": 8.0}))
    assert policy is not None and (policy.max_epsilon, policy.max_delta) == (8.0, None)


def test_policy_rejections_are_counted_by_the_engine() -> None:
    strategy = make_strategy("fedavg", api="message", hooks=[PrivacyPolicyHook(max_epsilon=1e-3)])
    model = global_model()
    sent = sent_round(strategy, model, 1, [101, 102, 103])
    replies = [local_dp_mod(sent[n], dp_context(n), shifting_app) for n in (101, 102)]
    replies.append(shifting_app(sent[103], dp_context(103)))
    strategy.aggregate_train(1, replies)
    counts = strategy.reports[-1].metrics()
    assert counts["robust-rejected-privacy-over-budget"] == 2
    assert counts["robust-rejected-privacy-unreported"] == 1


# ---------------------------------------------------------------- mod order and signing
def signed_dp_round(keys: KeyDir, mods: list) -> tuple:
    app = ClientApp(mods=mods)
    app.train()(shifting_app)
    strategy, _ = signed_median(keys)
    strategy.engine.hooks.insert(1, PrivacyPolicyHook(max_epsilon=50.0))
    model = global_model()
    arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(list(NODES))))
    replies = []
    for ins in instructions:
        context = context_for(ins.metadata.dst_node_id, keys)
        context.run_config.update(DP_CONFIG)
        replies.append(app(ins, context))
    strategy.aggregate_train(1, replies)
    return strategy.reports[-1], replies, model


def test_the_bundled_app_noises_inside_the_integrity_mod(keys: KeyDir) -> None:
    from client_app.app import app as bundled

    assert bundled._mods == [fault_injection_mod, integrity_mod, local_dp_mod]
    report, replies, model = signed_dp_round(keys, bundled._mods)
    assert report.kept == sorted(NODES) and not report.rejected  # signatures verified
    sent = np.concatenate([v.ravel().astype(np.float64) for v in model.values()])
    for reply in replies:
        released = flat(reply.content["arrays"]) - sent
        assert np.max(np.abs(released)) < SHIFT  # the signed update is the noised one
        assert reply.content["metrics"]["epsilon-spent"] > 0
    assert report.info["privacy"]["epsilon-spent"].keys() == {str(n) for n in NODES}


def test_the_mod_outside_the_integrity_mod_releases_nothing(keys: KeyDir) -> None:
    # the signed reply carries a signature ConfigRecord: the DP mod refuses it (noising it
    # would break the signature anyway)
    report, replies, _ = signed_dp_round(keys, [local_dp_mod, integrity_mod])
    assert not report.kept
    assert {text.split(":")[0] for text in report.rejected.values()} == {"error-reply"}
    assert all(f"{UNPRIVATISABLE}:" in reply.error.reason for reply in replies)


def test_legacy_replies_carry_the_privacy_figures_in_fit_metrics(keys: KeyDir) -> None:
    strategy, _ = signed_median(keys, api="legacy")
    strategy.engine.hooks.insert(1, PrivacyPolicyHook(max_epsilon=50.0))
    model = global_model()
    manager = SimpleClientManager()
    for node in NODES:
        manager.register(FakeProxy(node))
    results = []
    for proxy, ins in strategy.configure_fit(1, ndarrays_to_parameters(list(model.values())),
                                             manager):
        message = Message(fitins_to_recorddict(ins, keep_input=True),
                          dst_node_id=proxy.node_id, message_type="train")

        def legacy_app(msg: Message, context: Context) -> Message:
            received = [npy_view(a.data) for a in msg.content["fitins.parameters"].values()]
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
                [r + np.float32(SHIFT) for r in received]), 10, {"train-loss": 0.3})
            return Message(fitres_to_recorddict(res, keep_input=True), reply_to=msg)

        context = context_for(proxy.node_id, keys)
        context.run_config.update(DP_CONFIG)
        reply = integrity_mod(message, context, lambda m, c: local_dp_mod(m, c, legacy_app))
        assert not reply.has_error()
        content = reply.content
        metrics = dict(content.config_records["fitres.metrics"])
        assert "train-loss" not in metrics and metrics["dp-delta"] == DELTA
        assert record_digest(content.array_records["fitres.parameters"]) is not None
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([]),
                     content.metric_records["fitres.num_examples"]["num_examples"], metrics)
        res.parameters.tensors = [a.data for a in content.array_records["fitres.parameters"].values()]
        results.append((proxy, res))
    strategy.aggregate_fit(1, results, [])
    report = strategy.reports[-1]
    assert report.kept == sorted(NODES), report.rejected
    assert len(report.info["privacy"]["epsilon-spent"]) == len(NODES)


# ---------------------------------------------------------------- metrics and alert
def privacy_report() -> RoundReport:
    report = RoundReport(2, "median", 3, kept=[1, 2], identities={1: "key:a", 2: "key:b",
                                                                 3: "key:c"})
    report.rejected[3] = f"error-reply: [node 3] refused: {BUDGET_EXHAUSTED}: spent"
    report.info["privacy"] = {"epsilon-spent": {"1": 1.5, "2": 2.5}, "budget-exhausted": [3]}
    return report


def test_metrics_are_exported_with_client_labels() -> None:
    hook = PrometheusHook(client_labels=True)
    hook.on_round_end(privacy_report(), None)
    text = generate_latest(hook.registry).decode()
    assert 'fl_client_epsilon_spent{client_id="key:a"} 1.5' in text
    assert 'fl_client_epsilon_spent{client_id="key:b"} 2.5' in text
    assert 'fl_privacy_budget_exhausted_total{client_id="key:c"} 1.0' in text


def test_metrics_without_client_labels_stay_bounded() -> None:
    hook = PrometheusHook()
    hook.on_round_end(privacy_report(), None)
    hook.on_round_end(privacy_report(), None)
    text = generate_latest(hook.registry).decode()
    assert "fl_client_epsilon_spent 2.5" in text
    assert "fl_privacy_budget_exhausted_total 2.0" in text
    rejected = RoundReport(1, "fedavg", 1, rejected={4: "privacy-over-budget: eps 9 > 8"})
    hook.on_round_end(rejected, None)
    text = generate_latest(hook.registry).decode()
    assert 'fl_client_updates_rejected_total{reason="privacy-over-budget"} 1.0' in text


ALERTS = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_the_exhaustion_alert_rule_fires() -> None:
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run(["promtool", *args], cwd=ALERTS, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- end to end
@pytest.mark.integration
def test_flwr_run_reports_each_clients_epsilon_every_round(tmp_path: Path) -> None:
    from flwr_robust.runtime.launch import flwr_run

    keys = tmp_path / "keys"
    assert cli_main(["keys", "init", str(keys), "--clients", "5"]) == 0
    results = tmp_path / "rounds.jsonl"
    outcome = flwr_run(
        {"strategy": "median", "num-server-rounds": 2, "local-epochs": 1, "signing": True,
         "keys-dir": str(keys), "results-file": str(results), "dp-policy-max-epsilon": 100.0,
         "dp-clip": 5.0, "dp-noise-multiplier": 0.5, "dp-delta": DELTA,
         "dp-max-epsilon": 12.0},  # one round spends 10.7, two would spend 16.5
        flwr_home=tmp_path / "flwr-home", num_supernodes=5, timeout=300,
    )
    assert outcome.ok, (outcome.status, outcome.status_details, outcome.output[-3000:])
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    assert [r["round"] for r in records] == [0, 1, 2]
    first, second = records[1], records[2]
    epsilons = first["info"]["privacy"]["epsilon-spent"]
    assert len(epsilons) == 5 and sorted(map(int, epsilons)) == first["kept"]
    expected = epsilon_spent([0.5], DELTA)
    assert all(e == pytest.approx(expected, rel=1e-9) for e in epsilons.values())
    # round 2: every node remembers (context.state) its spent round and declines
    privacy = second["info"]["privacy"]
    assert privacy["epsilon-spent"] == {} and len(privacy["budget-exhausted"]) == 5
    assert all(BUDGET_EXHAUSTED in text for text in second["rejected"].values())


# ---------------------------------------------------------------- review regressions
def counting(app=shifting_app):
    calls: list[int] = []

    def wrapped(message: Message, context: Context) -> Message:
        calls.append(1)
        return app(message, context)

    return wrapped, calls


def node_dp_context(node_config: dict, state: RecordDict | None = None, **run_config) -> Context:
    return Context(run_id=RUN_ID, node_id=101, node_config={"partition-id": 0, **node_config},
                   state=RecordDict() if state is None else state, run_config=run_config)


def test_an_instruction_with_an_unknown_layout_is_refused_not_trained() -> None:
    message = train_instruction(global_model())
    message.content["x"] = MetricRecord({"a": 1})
    app, calls = counting()
    context = dp_context()
    for mods in ([local_dp_mod], [integrity_mod, local_dp_mod]):
        reply = make_ffn(app, mods)(message, context)
        assert reply.has_error() and not calls
    assert len(PrivacyLedger.load(context.state)) == 0


def test_the_server_cannot_loosen_a_node_that_sets_its_own_dp() -> None:
    node = {"dp-clip": CLIP, "dp-noise-multiplier": SIGMA, "dp-max-epsilon": 5.0}
    server = {"dp-delta": 0.005, "dp-noise-multiplier": 100.0, "dp-max-epsilon": 1e5,
              "experiment-cells": json.dumps([{"dp-delta": 0.009, "dp-noise-multiplier": 1e4}])}
    state, rounds = RecordDict(), 0
    for rnd in range(1, 6):
        message = train_instruction(global_model(), rnd)
        message.content["config"]["experiment-cell"] = 0
        message.content["config"]["dp-delta"] = 0.009  # instruction keys are ignored too
        reply = local_dp_mod(message, node_dp_context(node, state, **server), shifting_app)
        if reply.has_error():
            assert f"{BUDGET_EXHAUSTED}:" in reply.error.reason
            break
        rounds += 1
        assert reply.content["metrics"]["dp-delta"] == DELTA  # the code default, not 0.005
    assert rounds == 1  # epsilon(2 rounds at sigma 1.2, delta 1e-5) > 5
    assert PrivacyLedger.load(state).noise_multipliers == [SIGMA]


def test_a_node_silent_on_dp_ignores_the_instructions_experiment_cell() -> None:
    cells = json.dumps([{"dp-delta": 0.009, "dp-noise-multiplier": 50.0}])
    message = train_instruction(global_model())
    message.content["config"]["experiment-cell"] = 0
    reply = local_dp_mod(message, dp_context(**{"experiment-cells": cells}), shifting_app)
    metrics = reply.content["metrics"]
    assert metrics["dp-delta"] == DELTA
    assert metrics["epsilon-spent"] == pytest.approx(epsilon_spent([SIGMA], DELTA))
    with pytest.raises(ValueError, match="experiment cells cannot set"):
        RunSettings.from_run_config({"experiment-cells": cells})


def test_dp_required_refuses_training_when_dp_is_off() -> None:
    app, calls = counting()
    for node in ({"dp-required": True}, {"dp-required": "true", "dp-clip": 0,
                                          "dp-noise-multiplier": 0}):
        reply = local_dp_mod(train_instruction(global_model()),
                             node_dp_context(node, **DP_CONFIG), app)
        assert reply.has_error() and "privacy-required:" in reply.error.reason
    assert not calls


@pytest.mark.parametrize("server", [{"dp-noise-multiplier": 1e300}, {"dp-clip": 1e300},
                                    {"dp-delta": 0.999}, {"dp-noise-multiplier": "nan"}])
def test_insane_settings_are_an_error_reply_and_do_not_poison_the_ledger(server: dict) -> None:
    state, (app, calls) = RecordDict(), counting()
    reply = local_dp_mod(train_instruction(global_model()),
                         dp_context(state=state, **server), app)
    assert reply.has_error() and "privacy-bad-settings:" in reply.error.reason and not calls
    reply = local_dp_mod(train_instruction(global_model(), 2), dp_context(state=state), app)
    assert not reply.has_error() and PrivacyLedger.load(state).noise_multipliers == [SIGMA]


def test_a_failing_accountant_after_training_saves_nothing(monkeypatch) -> None:
    from flwr_robust.privacy import local

    real, calls = local.epsilon_spent, []

    def flaky(sigmas, delta):
        calls.append(1)
        if len(calls) == 2:  # the budget check passes, the commit's computation fails
            raise OverflowError("secret 0.123")
        return real(sigmas, delta)

    monkeypatch.setattr(local, "epsilon_spent", flaky)
    state = RecordDict()
    reply = local_dp_mod(train_instruction(global_model()), dp_context(state=state),
                         shifting_app)
    assert reply.has_error() and "secret" not in reply.error.reason
    assert len(PrivacyLedger.load(state)) == 0
    reply = local_dp_mod(train_instruction(global_model(), 2), dp_context(state=state),
                         shifting_app)
    assert not reply.has_error() and len(PrivacyLedger.load(state)) == 1


def test_no_exception_escapes_and_reasons_carry_no_data() -> None:
    def leaky(message: Message, context: Context) -> Message:
        raise RuntimeError("train-loss 0.123456")

    reply = local_dp_mod(train_instruction(global_model()), dp_context(), leaky)
    assert reply.has_error() and "0.123456" not in reply.error.reason

    def non_finite(message: Message, context: Context) -> Message:
        reply = shifting_app(message, context)
        reply.content["arrays"]["w"] = Array(np.full_like(
            message.content["arrays"]["w"].numpy(), np.nan))
        return reply

    reply = local_dp_mod(train_instruction(global_model()), dp_context(), non_finite)
    assert reply.has_error() and reply.error.reason.endswith("the update is not finite")


def test_a_ledger_file_keeps_the_budget_across_runs(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.json"
    node = {"dp-clip": CLIP, "dp-noise-multiplier": SIGMA, "dp-ledger-file": str(ledger),
            "dp-max-epsilon": (epsilon_spent([SIGMA] * 2, DELTA)
                               + epsilon_spent([SIGMA] * 3, DELTA)) / 2}
    released = []
    for run in range(3):  # a fresh context.state each run, as a new run or restart gives
        def app(message: Message, context: Context, run: int = run) -> Message:
            released.append(run)
            # the ledger is on disk before the reply leaves the mod
            assert len(PrivacyLedger.load_file(ledger, "partition-0")) == len(released) - 1
            return shifting_app(message, context)

        reply = local_dp_mod(train_instruction(global_model()), node_dp_context(node), app)
        assert reply.has_error() == (run == 2)
    assert released == [0, 1]
    assert PrivacyLedger.load_file(ledger, "partition-0").noise_multipliers == [SIGMA] * 2
    assert len(PrivacyLedger.load_file(ledger, "partition-1")) == 0  # keyed by identity
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]
    ledger.write_text("{not json")
    app, calls = counting()
    reply = local_dp_mod(train_instruction(global_model()),
                         node_dp_context({**node, "dp-max-epsilon": 100.0}), app)
    assert reply.has_error() and "ledger is unreadable" in reply.error.reason and not calls


def evaluate_instruction(model: dict) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in model.items()}),
                          "config": ConfigRecord({"server-round": 1})})
    return Message(content, dst_node_id=101, message_type="evaluate")


def test_evaluation_is_refused_while_dp_is_on_unless_the_node_allows_it() -> None:
    def evaluate(message: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"accuracy": 0.9})}),
                       reply_to=message)

    model = global_model()
    reply = local_dp_mod(evaluate_instruction(model), dp_context(), evaluate)
    assert reply.has_error() and "privacy-evaluation-refused:" in reply.error.reason
    node = {"dp-clip": CLIP, "dp-noise-multiplier": SIGMA, "dp-allow-evaluation": True}
    reply = local_dp_mod(evaluate_instruction(model), node_dp_context(node), evaluate)
    assert reply.content["metrics"]["accuracy"] == 0.9
    # the server cannot allow it; with DP off evaluation passes
    reply = local_dp_mod(evaluate_instruction(model),
                         dp_context(**{"dp-allow-evaluation": True}), evaluate)
    assert reply.has_error()
    reply = local_dp_mod(evaluate_instruction(model), node_dp_context({}), evaluate)
    assert not reply.has_error()


def test_zero_d_and_non_floating_arrays_keep_their_shapes_and_layers_pair_by_name() -> None:
    model = {"a": np.ones((2, 3), np.float16), "b": np.arange(3, dtype=np.int64),
             "c": np.array(1.5), "d": np.zeros((0,), np.float32)}

    def reversed_app(message: Message, context: Context) -> Message:
        arrays = {k: Array(np.asarray(v.numpy() + 1, dtype=v.numpy().dtype))
                  for k, v in reversed(list(message.content["arrays"].items()))}
        return Message(RecordDict({"arrays": ArrayRecord(arrays),
                                   "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=message)

    node = {"dp-clip": 1e-6, "dp-noise-multiplier": 1e-2}  # almost no noise, tiny clip
    reply = local_dp_mod(train_instruction(model), node_dp_context(node), reversed_app)
    out = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert list(out) == list(model)
    for name, sent in model.items():
        assert out[name].shape == sent.shape and out[name].dtype == sent.dtype
        np.testing.assert_allclose(out[name], sent, atol=1e-3)  # clipped: near the global
    np.testing.assert_array_equal(out["b"], model["b"])  # non-floating reset


@pytest.mark.parametrize("extra", [{"extra": MetricRecord({"train-loss": 0.123})},
                                   {"cfg": ConfigRecord({"loss": 0.5})}])
def test_a_reply_with_extra_records_is_refused(extra: dict) -> None:
    def app(message: Message, context: Context) -> Message:
        reply = shifting_app(message, context)
        for name, record in extra.items():
            reply.content[name] = record
        return reply

    state = RecordDict()
    reply = local_dp_mod(train_instruction(global_model()), dp_context(state=state), app)
    assert reply.has_error() and f"{UNPRIVATISABLE}:" in reply.error.reason
    assert len(PrivacyLedger.load(state)) == 0


def test_a_legacy_failure_reply_is_stripped_to_its_status() -> None:
    model = global_model()
    ins = FitIns(ndarrays_to_parameters(list(model.values())), {"server-round": 1})
    message = Message(fitins_to_recorddict(ins, keep_input=True), dst_node_id=101,
                      message_type="train")

    def failing(msg: Message, context: Context) -> Message:
        res = FitRes(Status(Code.FIT_NOT_IMPLEMENTED, "no"), ndarrays_to_parameters(
            [v + np.float32(SHIFT) for v in model.values()]), 10, {"train-loss": 0.3})
        return Message(fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    state = RecordDict()
    reply = local_dp_mod(message, dp_context(state=state), failing)
    content = reply.content
    assert len(content["fitres.parameters"]) == 0
    assert dict(content["fitres.metrics"]) == {}
    assert content["fitres.num_examples"]["num_examples"] == 0
    assert content["fitres.status"]["code"] == Code.FIT_NOT_IMPLEMENTED.value
    assert len(PrivacyLedger.load(state)) == 0


def test_an_infinite_epsilon_is_over_budget() -> None:
    hook = PrivacyPolicyHook(max_epsilon=3.0)
    rejected = hook.on_replies(1, {}, [reply_with(1, **{"epsilon-spent": math.inf,
                                                         "dp-delta": DELTA})])
    assert rejected[1].startswith("privacy-over-budget")


@pytest.mark.parametrize("key", ["dp-clip", "dp-noise-multiplier", "dp-max-epsilon",
                                 "dp-delta"])
def test_run_settings_reject_non_finite_dp_values(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        RunSettings.from_run_config({key: math.nan})
