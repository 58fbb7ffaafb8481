"""flwr-robust hooks around Flower's own strategies (both APIs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.serverapp.strategy import FedAvg, FedMedian
from flwr.supercore.task_identity import TaskIdentity

from flwr_robust.cli import main as cli_main
from flwr_robust.records import npy_view
from flwr_robust.security import KeyDir, TrustStore, load_private_key
from flwr_robust.security.hooks import SignGlobalModel, VerifyUpdateSignatures
from flwr_robust.security.mod import integrity_mod
from flwr_robust.strategy import HookedLegacyStrategy, HookedStrategy, with_hooks
from tests.test_integrity_strategy import (
    DELTAS,
    NODES,
    RUN_ID,
    context_for,
    honest_app,
)
from tests.test_strategy import FakeGrid, FakeProxy, client_weights, global_model, reply


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 1, 1


@pytest.fixture
def keys(tmp_path: Path) -> KeyDir:
    assert cli_main(["keys", "init", str(tmp_path / "keys"), "--clients", "5"]) == 0
    return KeyDir(tmp_path / "keys")


def signing_hooks(keys: KeyDir) -> list:
    return [
        VerifyUpdateSignatures(TrustStore.load(keys.truststore), RUN_ID),
        SignGlobalModel(load_private_key(keys.server_key), RUN_ID),
    ]


def test_with_hooks_dispatches_on_the_api() -> None:
    assert isinstance(with_hooks(FedAvg(), []), HookedStrategy)
    assert isinstance(with_hooks(LegacyFedAvg(), []), HookedLegacyStrategy)
    with pytest.raises(TypeError, match="not a Flower strategy"):
        with_hooks(object(), [])


def test_flower_fedavg_with_signing_rejects_a_tampered_update(keys: KeyDir) -> None:
    strategy = with_hooks(FedAvg(min_available_nodes=5), signing_hooks(keys))
    model = global_model()
    arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    instructions = strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(list(NODES)))
    replies = []
    for ins in instructions:
        node = ins.metadata.dst_node_id
        answer = integrity_mod(ins, context_for(node, keys), honest_app)
        if node == 105:  # altered on its way back: the signature no longer matches
            values = answer.content["arrays"]["w"].numpy() + 1.0
            answer.content["arrays"]["w"] = Array(values.astype(np.float32))
        replies.append(answer)
    new, metrics = strategy.aggregate_train(1, replies)
    report = strategy.reports[-1]
    assert report.rejected[105].startswith("bad-signature") and report.kept == [101, 102, 103, 104]
    assert metrics["robust-rejected-bad-signature"] == 1
    expected = np.mean([DELTAS[p] for p in (0, 1, 2, 3)])  # FedAvg, equal counts
    np.testing.assert_allclose(new["b"].numpy(), model["b"] + expected, rtol=1e-6, atol=1e-6)


def test_invalid_replies_never_reach_the_wrapped_strategy() -> None:
    model = global_model()
    strategy = with_hooks(FedMedian(min_available_nodes=4), [])
    arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    ins = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2, 3, 4])))
    replies = [reply(m, client_weights(model, 1.0)) for m in ins[:2]]
    replies.append(reply(ins[2], {**model, "w": np.full((3, 4), np.nan, np.float32)}))
    # no MetricRecord: Flower's own consistency check would raise for the whole round
    replies.append(Message(RecordDict({"arrays": ArrayRecord(
        {k: Array(v) for k, v in model.items()})}), reply_to=ins[3]))
    new, metrics = strategy.aggregate_train(1, replies)
    rejected = strategy.reports[-1].rejected
    assert rejected[ins[2].metadata.dst_node_id].startswith("non-finite")
    assert rejected[ins[3].metadata.dst_node_id].startswith("malformed-reply")
    np.testing.assert_allclose(new["w"].numpy(), model["w"] + 1.0, rtol=1e-6)
    assert metrics["robust-kept"] == 2


def test_legacy_fedavg_with_hooks_filters_results() -> None:
    model = global_model()
    strategy = with_hooks(LegacyFedAvg(min_available_clients=3, min_fit_clients=3), [])
    manager = SimpleClientManager()
    for node in (1, 2, 3):
        manager.register(FakeProxy(node))
    instructions = strategy.configure_fit(1, ndarrays_to_parameters(list(model.values())), manager)
    assert all(ins.config["server-round"] == 1 for _, ins in instructions)
    results = []
    for proxy, _ in instructions:
        delta = float("nan") if proxy.node_id == 3 else 1.0
        weights = list(client_weights(model, delta).values())
        results.append((proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), 10,
                                      {})))
    parameters, metrics = strategy.aggregate_fit(1, results, [])
    assert strategy.reports[-1].rejected[3].startswith("non-finite")
    assert metrics["robust-rejected-non-finite"] == 1
    np.testing.assert_allclose(npy_view(parameters.tensors[1]), model["b"] + 1.0, rtol=1e-6)


def test_with_hooks_aggregates_without_configure_like_the_wrapped_strategy(keys: KeyDir) -> None:
    model = global_model()
    ins = list(FedAvg().configure_train(
        1, ArrayRecord({k: Array(v) for k, v in model.items()}), ConfigRecord(), FakeGrid([1, 2, 3])
    ))
    replies = [reply(m, client_weights(model, float(i)), 10 * (i + 1)) for i, m in enumerate(ins)]
    expected, _ = FedAvg().aggregate_train(1, replies)
    got, metrics = with_hooks(FedAvg(), []).aggregate_train(1, replies)
    for name in model:
        np.testing.assert_array_equal(got[name].numpy(), expected[name].numpy())
    assert metrics["robust-kept"] == 3
    # A hook binding replies to the model it sent fails closed: no model was sent.
    signed = with_hooks(FedAvg(), signing_hooks(keys))
    assert signed.aggregate_train(1, replies)[0] is None
    assert signed.reports[-1].kept == []
