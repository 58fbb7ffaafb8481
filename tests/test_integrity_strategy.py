"""Signed models and updates end to end through the strategies, the client mod and the
hooks: every attack is rejected with its reason and never reaches the global model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, fitres_to_recorddict
from flwr.supercore.task_identity import TaskIdentity

from flwr_robust import make_strategy
from flwr_robust.cli import main as cli_main
from flwr_robust.records import npy_view
from flwr_robust.security import (
    KeyDir,
    TrustStore,
    generate_private_key,
    load_private_key,
    save_private_key,
)
from flwr_robust.security.hooks import SignGlobalModel, VerifyUpdateSignatures
from flwr_robust.security.mod import integrity_mod, record_digest
from flwr_robust.security.signing import SIGNATURE_RECORD, sign_reply
from tests.test_strategy import FakeGrid, FakeProxy, global_model

RUN_ID = 7
NODES = {101: 0, 102: 1, 103: 2, 104: 3, 105: 4}  # node id -> partition id
DELTAS = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4, 4: 0.5}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 1, 1


@pytest.fixture
def keys(tmp_path: Path) -> KeyDir:
    assert cli_main(["keys", "init", str(tmp_path / "keys"), "--clients", "5"]) == 0
    return KeyDir(tmp_path / "keys")


def signed_median(keys: KeyDir, api: str = "message"):
    store = TrustStore.load(keys.truststore)
    hooks = [
        VerifyUpdateSignatures(store, RUN_ID),
        SignGlobalModel(load_private_key(keys.server_key), RUN_ID),
    ]
    return make_strategy("median", api=api, hooks=hooks), store


def context_for(node_id: int, keys: KeyDir, **node_config) -> Context:
    if "signing-key" in node_config:  # a node naming its key names the server's too
        node_config.setdefault("server-public-key", str(keys.server_pub))
    return Context(
        run_id=RUN_ID,
        node_id=node_id,
        node_config={"partition-id": NODES.get(node_id, 0), "num-partitions": 5, **node_config},
        state=RecordDict(),
        run_config={"signing": True, "keys-dir": str(keys.root)},
    )


def honest_app(message: Message, context: Context) -> Message:
    """A client app: received weights + this partition's delta, 10 examples."""
    delta = DELTAS[int(context.node_config["partition-id"])]
    arrays = {k: Array(v.numpy() + np.float32(delta)) for k, v in message.content["arrays"].items()}
    content = RecordDict(
        {"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 10})}
    )
    return Message(content, reply_to=message)


def client_round(strategy, model: dict, keys: KeyDir, rnd: int = 1, node_configs=None):
    node_configs = node_configs or {}
    arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    instructions = list(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid(list(NODES))))
    replies = {}
    for ins in instructions:
        node = ins.metadata.dst_node_id
        replies[node] = integrity_mod(ins, context_for(node, keys, **node_configs.get(node, {})),
                                      honest_app)
    return instructions, replies


def expected_median(model: dict, partitions: list[int]) -> dict:
    delta = np.median([DELTAS[p] for p in partitions])
    return {k: v + np.float32(delta) for k, v in model.items()}


def check_model(arrays: ArrayRecord, expected: dict) -> None:
    for name, value in arrays.items():
        np.testing.assert_allclose(value.numpy(), expected[name], rtol=1e-6, atol=1e-6)


def flip_bit(record: ArrayRecord, name: str = "w") -> None:
    values = record[name].numpy().copy()
    values.view(np.uint32).reshape(-1)[0] ^= 1
    record[name] = Array(values)


def intercept(message: Message, name: str = "w") -> None:
    """A man in the middle flips one bit of the model on its way to one node (Flower builds
    every node's instruction from one shared RecordDict, so copy it first)."""
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in message.content["arrays"].items()})
    flip_bit(arrays, name)
    message.content = RecordDict({"arrays": arrays, "config": message.content["config"]})


def test_honest_signed_round_is_accepted_and_keyed_by_signer(keys: KeyDir) -> None:
    strategy, store = signed_median(keys)
    model = global_model()
    _, replies = client_round(strategy, model, keys)
    arrays, _metrics = strategy.aggregate_train(1, list(replies.values()))
    report = strategy.reports[-1]
    assert report.kept == sorted(NODES) and not report.rejected
    key_ids = {entry.key_id for entry in store}
    assert {i.removeprefix("key:") for i in report.identities.values()} == key_ids
    check_model(arrays, expected_median(model, list(DELTAS)))


def test_flipped_bit_in_the_model_is_refused_by_the_client(keys: KeyDir) -> None:
    strategy, _ = signed_median(keys)
    model = global_model()
    arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(list(NODES))))
    replies = []
    for ins in instructions:
        node = ins.metadata.dst_node_id
        if node == 103:
            intercept(ins)
        replies.append(integrity_mod(ins, context_for(node, keys), honest_app))
    refused = next(r for r in replies if r.metadata.src_node_id == 103)
    assert refused.has_error() and "bad-signature" in refused.error.reason
    new, _ = strategy.aggregate_train(1, replies)
    assert strategy.reports[-1].rejected[103].startswith("error-reply")
    check_model(new, expected_median(model, [0, 1, 3, 4]))


def test_unsigned_model_is_refused(keys: KeyDir) -> None:
    strategy = make_strategy("median")  # no SignGlobalModel hook
    arrays = ArrayRecord({k: Array(v) for k, v in global_model().items()})
    ins = next(iter(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([101, 102, 103]))))
    reply = integrity_mod(ins, context_for(ins.metadata.dst_node_id, keys), honest_app)
    assert reply.has_error() and "unsigned" in reply.error.reason


def test_evaluate_instructions_are_signed_and_checked(keys: KeyDir) -> None:
    strategy, _ = signed_median(keys)
    arrays = ArrayRecord({k: Array(v) for k, v in global_model().items()})
    good, bad = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid([101, 102])))
    intercept(bad, "b")

    def evaluate_app(message: Message, context: Context) -> Message:
        return Message(RecordDict({"m": MetricRecord({"num-examples": 5})}), reply_to=message)

    assert not integrity_mod(good, context_for(101, keys), evaluate_app).has_error()
    assert integrity_mod(bad, context_for(102, keys), evaluate_app).has_error()


def tamper(reply: Message, what: str) -> None:
    if what == "update":
        flip_bit(reply.content["arrays"])
    elif what == "num-examples":
        reply.content["metrics"]["num-examples"] = 10_000
    elif what == "algorithm":
        reply.content[SIGNATURE_RECORD]["frs-algorithm"] = "ecdsa-p256"


@pytest.mark.parametrize(
    ("what", "code"),
    [("update", "bad-signature"), ("num-examples", "bad-signature"),
     ("algorithm", "wrong-algorithm")],
)
def test_altered_reply_is_rejected(keys: KeyDir, what: str, code: str) -> None:
    strategy, _ = signed_median(keys)
    model = global_model()
    _, replies = client_round(strategy, model, keys)
    tamper(replies[104], what)
    new, metrics = strategy.aggregate_train(1, list(replies.values()))
    assert strategy.reports[-1].rejected[104].startswith(code + ":")
    assert metrics[f"robust-rejected-{code}"] == 1
    check_model(new, expected_median(model, [0, 1, 2, 4]))


def test_unknown_and_revoked_keys_are_rejected(keys: KeyDir, tmp_path: Path) -> None:
    rogue = tmp_path / "rogue.key"
    save_private_key(generate_private_key(), rogue)
    strategy, store = signed_median(keys)
    revoked = store.find("client-1")
    store.revoke(revoked.key_id)
    store.save()
    model = global_model()
    _, replies = client_round(strategy, model, keys, node_configs={105: {"signing-key": str(rogue)}})
    new, _ = strategy.aggregate_train(1, list(replies.values()))
    rejected = strategy.reports[-1].rejected
    assert rejected[105].startswith("unknown-key:")
    assert rejected[102].startswith("revoked-key:")  # partition 1 = client-1
    check_model(new, expected_median(model, [0, 2, 3]))


def test_replayed_update_from_last_round_is_rejected(keys: KeyDir) -> None:
    strategy, _ = signed_median(keys)
    model = global_model()
    _, first = client_round(strategy, model, keys, rnd=1)
    new, _ = strategy.aggregate_train(1, list(first.values()))
    model2 = {k: v.numpy() for k, v in new.items()}
    instructions, second = client_round(strategy, model2, keys, rnd=2)
    target = next(i for i in instructions if i.metadata.dst_node_id == 101)
    second[101] = Message(first[101].content, reply_to=target)  # last round's signed reply
    new2, _ = strategy.aggregate_train(2, list(second.values()))
    assert strategy.reports[-1].rejected[101].startswith("replayed-round:")
    check_model(new2, expected_median(model2, [1, 2, 3, 4]))


def test_update_trained_on_another_global_model_is_rejected(keys: KeyDir) -> None:
    strategy, _ = signed_median(keys)
    model = global_model()
    _instructions, replies = client_round(strategy, model, keys)
    other = ArrayRecord({k: Array(v + 1.0) for k, v in model.items()})
    reply = replies[102]
    bundle = sign_reply(
        load_private_key(keys.client_key("client-1")),
        run_id=RUN_ID, server_round=1,
        arrays_digest=record_digest(reply.content["arrays"]),
        metrics=dict(reply.content["metrics"]),
        base_digest=record_digest(other),  # honestly signed, but trained from another model
    )
    reply.content[SIGNATURE_RECORD] = ConfigRecord(bundle.to_config())
    new, _ = strategy.aggregate_train(1, list(replies.values()))
    assert strategy.reports[-1].rejected[102].startswith("stale-base:")
    check_model(new, expected_median(model, [0, 2, 3, 4]))


def test_two_updates_under_one_key_are_both_rejected(keys: KeyDir) -> None:
    strategy, _ = signed_median(keys)
    model = global_model()
    shared = str(keys.client_key("client-0"))
    _, replies = client_round(strategy, model, keys, node_configs={104: {"signing-key": shared}})
    new, _ = strategy.aggregate_train(1, list(replies.values()))
    rejected = strategy.reports[-1].rejected
    assert rejected[101].startswith("duplicate-key:") and rejected[104].startswith("duplicate-key:")
    check_model(new, expected_median(model, [1, 2, 4]))


def test_rotated_key_works_after_trust_store_reload(keys: KeyDir, tmp_path: Path) -> None:
    strategy, _store = signed_median(keys)
    model = global_model()
    new_key = generate_private_key()
    new_path = tmp_path / "client-2-rotated.key"
    save_private_key(new_key, new_path)
    on_disk = TrustStore.load(keys.truststore)  # the operator's copy
    on_disk.add(new_key.public_key(), name="client-2-rotated")
    on_disk.revoke(on_disk.find("client-2").key_id)
    on_disk.save()
    _, replies = client_round(strategy, model, keys, node_configs={103: {"signing-key": str(new_path)}})
    strategy.aggregate_train(1, list(replies.values()))
    report = strategy.reports[-1]
    assert 103 in report.kept and not report.rejected


def test_legacy_api_signing_round_trip(keys: KeyDir) -> None:
    """The legacy message format: signatures ride in the fit config and fit metrics."""
    from flwr.server.client_manager import SimpleClientManager

    strategy, _ = signed_median(keys, api="legacy")
    model = global_model()
    manager = SimpleClientManager()
    for node in NODES:
        manager.register(FakeProxy(node))
    instructions = strategy.configure_fit(1, ndarrays_to_parameters(list(model.values())), manager)
    results = []
    for proxy, ins in instructions:
        message = Message(
            fitins_to_recorddict(ins, keep_input=True), dst_node_id=proxy.node_id,
            message_type="train",
        )

        def legacy_app(msg: Message, context: Context, node=proxy.node_id) -> Message:
            received = [npy_view(a.data) for a in msg.content["fitins.parameters"].values()]
            delta = DELTAS[NODES[node]]
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
                [r + np.float32(delta) for r in received]), 10, {})
            return Message(fitres_to_recorddict(res, keep_input=True), reply_to=msg)

        reply = integrity_mod(message, context_for(proxy.node_id, keys), legacy_app)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        content = reply.content
        metrics = dict(content.config_records["fitres.metrics"])
        if proxy.node_id == 105:
            metrics["frs-signature"] = bytes(64)  # forged
        params = [a.data for a in content.array_records["fitres.parameters"].values()]
        count = content.metric_records["fitres.num_examples"]["num_examples"]
        results.append((proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([]), count,
                                      metrics)))
        results[-1][1].parameters.tensors = params
    parameters, _ = strategy.aggregate_fit(1, results, [])
    report = strategy.reports[-1]
    assert report.rejected[105].startswith("bad-signature:")
    assert report.kept == [101, 102, 103, 104]
    expected = expected_median(model, [0, 1, 2, 3])
    for tensor, name in zip(parameters.tensors, model, strict=True):
        np.testing.assert_allclose(npy_view(tensor), expected[name], rtol=1e-6, atol=1e-6)


def test_node_refuses_an_older_round_than_it_saw(keys: KeyDir) -> None:
    strategy, _ = signed_median(keys)
    model = ArrayRecord({k: Array(v) for k, v in global_model().items()})
    def to_101(rnd: int) -> Message:
        messages = strategy.configure_train(rnd, model, ConfigRecord(), FakeGrid([101, 102]))
        return next(m for m in messages if m.metadata.dst_node_id == 101)

    old, new = to_101(1), to_101(2)
    context = context_for(101, keys)  # one node: its context.state persists across messages
    assert not integrity_mod(new, context, honest_app).has_error()
    replayed = integrity_mod(old, context, honest_app)
    assert replayed.has_error() and "stale-round" in replayed.error.reason


def test_signing_off_passes_messages_through(keys: KeyDir) -> None:
    strategy = make_strategy("median")
    model = ArrayRecord({k: Array(v) for k, v in global_model().items()})
    ins = next(iter(strategy.configure_train(1, model, ConfigRecord(), FakeGrid([101, 102]))))
    context = context_for(ins.metadata.dst_node_id, keys)
    context.run_config["signing"] = False
    reply = integrity_mod(ins, context, honest_app)
    assert not reply.has_error() and SIGNATURE_RECORD not in reply.content


def test_the_global_model_is_hashed_once_per_round(keys: KeyDir, monkeypatch) -> None:
    import flwr_robust.security.digest as digest_module
    import flwr_robust.security.hooks as security_hooks

    hashed: list[int] = []
    real = digest_module.digest_arrays

    def counting(arrays):
        hashed.append(id(arrays))
        return real(arrays)

    monkeypatch.setattr(digest_module, "digest_arrays", counting)
    monkeypatch.setattr(security_hooks, "digest_arrays", counting)
    strategy, _ = signed_median(keys)
    _, replies = client_round(strategy, global_model(), keys)
    strategy.aggregate_train(1, list(replies.values()))
    assert not strategy.reports[-1].rejected
    assert len(hashed) == 1 + len(replies)  # the global model once (signing), each update once
