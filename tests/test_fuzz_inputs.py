"""Property-based fuzzing (Hypothesis) of every input path a client or a man in the middle
controls: ``.npy`` bytes and headers, reply records, metrics and counts through both strategy
APIs and the wrappers, and instructions through the client mod.

Asserted: no exception escapes; a round's model is finite; every rejection carries a known
reason code; the client app only ever sees the exact records the server signed.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given
from hypothesis import strategies as st

from flwr_robust import make_strategy
from flwr_robust.cli import main as cli_main
from flwr_robust.records import MalformedArray, arrayrecord_views, npy_view
from flwr_robust.security import KeyDir, TrustStore, load_private_key
from flwr_robust.security.digest import digest_arrays
from flwr_robust.security.hooks import SignGlobalModel, VerifyUpdateSignatures
from flwr_robust.security.mod import integrity_mod
from flwr_robust.security.verifier import Reason
from flwr_robust.strategy import with_hooks
from flwr_robust.validation import REASON_CODES, reason_code
from tests.test_integrity_strategy import NODES, RUN_ID, context_for
from tests.test_strategy import FakeProxy, global_model, train_instructions

KNOWN_CODES = set(REASON_CODES) | {r.value for r in Reason} | {"excluded-by-rule"}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 1, 1


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyDir:
    root = tmp_path_factory.mktemp("fuzz") / "keys"
    assert cli_main(["keys", "init", str(root), "--clients", "5"]) == 0
    return KeyDir(root)


# --------------------------------------------------------------------------- .npy bytes
DESCRS = ["<f4", ">f8", "|u1", "<i8", "|b1", "<c8", "|O", "<U3", "|V0", "|V8", "<M8[s]",
          "f4", "<f", "xyz", "", "<f4,<f4"]


def npy_bytes(descr: object, fortran: object, shape: object, payload: bytes, major: int,
              minor: int = 0, extra: str = "") -> bytes:
    header = f"{{'descr': {descr!r}, 'fortran_order': {fortran!r}, 'shape': {shape!r}, {extra}}}"
    text = header.encode("latin1", "replace") + b"\n"
    size = struct.pack("<H", len(text)) if major == 1 else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes([major, minor]) + size + text + payload


def check_like_np_load(data: bytes) -> None:
    """``npy_view`` accepts exactly what ``np.load`` reads (Flower's ``Array.numpy()``
    calls it), and both read the same array; else it raises ``MalformedArray``."""
    try:
        view = npy_view(data)
    except MalformedArray:
        return
    loaded = np.load(io.BytesIO(data), allow_pickle=False)
    assert loaded.dtype == view.dtype and loaded.shape == view.shape
    assert loaded.tobytes() == view.tobytes() and not view.flags.writeable


shapes = st.one_of(
    st.tuples(st.integers(-3, 2**70)),
    st.lists(st.integers(0, 2**33), max_size=40).map(tuple),
    st.lists(st.integers(0, 5), max_size=4).map(tuple),
    st.sampled_from([(2.5,), (True,), "3", None, [2, 2]]),
)


@given(
    descr=st.sampled_from(DESCRS),
    fortran=st.sampled_from([False, True, 1, "no"]),
    shape=shapes,
    payload=st.binary(max_size=64),
    major=st.sampled_from([1, 2, 3]),
    minor=st.sampled_from([0, 0, 1]),
    extra=st.sampled_from(["", "", "'x': 1, "]),
)
def test_npy_headers_are_read_like_np_load(descr, fortran, shape, payload, major, minor, extra):
    check_like_np_load(npy_bytes(descr, fortran, shape, payload, major, minor, extra))


@given(data=st.binary(max_size=300))
def test_random_bytes_give_a_view_or_malformed_array(data: bytes) -> None:
    for candidate in (data, b"\x93NUMPY" + data):
        check_like_np_load(candidate)


@given(flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1,
                      max_size=6))
def test_corrupted_npy_bytes_give_a_view_or_malformed_array(flips) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.arange(12, dtype=np.float32).reshape(3, 4))
    data = bytearray(buffer.getvalue())
    for position, value in flips:
        data[position % len(data)] = value
    check_like_np_load(bytes(data))


@given(
    dtype=st.sampled_from(["float32", "int64", "", "bogus", "float64"]),
    shape=st.one_of(st.lists(st.integers(-1, 2**40), max_size=3), st.just([3, 4])),
    stype=st.sampled_from(["numpy.ndarray", "torch.Tensor", ""]),
    data=st.one_of(st.binary(max_size=40), st.just(Array(np.zeros((3, 4), np.float32)).data)),
)
def test_array_records_give_views_or_malformed_array(dtype, shape, stype, data) -> None:
    record = ArrayRecord({"w": Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)})
    try:
        arrayrecord_views(record)
    except MalformedArray:
        pass


# ------------------------------------------------------------------------ reply records
hostile_numbers = st.one_of(
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.just(10),
)
metric_values = st.one_of(hostile_numbers, st.lists(st.floats(allow_nan=True), max_size=3))


def hostile_array(draw: st.DrawFn) -> Array:
    kind = draw(st.sampled_from(["bytes", "shape", "nan", "huge", "dtype"]))
    if kind == "bytes":
        return Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray",
                     data=draw(st.binary(max_size=80)))
    if kind == "shape":
        return Array(np.zeros(draw(st.integers(0, 13)), np.float32))
    if kind == "dtype":
        return Array(np.zeros((3, 4), np.float64))
    value = np.nan if kind == "nan" else draw(st.floats(1e30, 3.4e38))
    return Array(np.full((3, 4), value, np.float32))


@st.composite
def training_reply(draw: st.DrawFn, instruction: Message, model: dict) -> Message:
    """An honest reply to ``instruction``, then a random set of hostile changes."""
    delta = np.float32(draw(st.floats(-1, 1)))
    arrays = ArrayRecord({k: Array(v + delta) for k, v in model.items()})
    metrics = MetricRecord({"num-examples": 10})
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    for change in draw(st.lists(st.integers(0, 7), max_size=3)):
        if change == 0:
            arrays["w"] = hostile_array(draw)
        elif change == 1:
            metrics["num-examples"] = draw(hostile_numbers)
        elif change == 2:
            metrics[draw(st.sampled_from(["loss", "acc", "x"]))] = draw(metric_values)
        elif change == 3:
            content["more"] = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
        elif change == 4:
            content["more-metrics"] = MetricRecord({"num-examples": 1})
        elif change == 5 and "metrics" in content:
            del content["metrics"]
        elif change == 6:
            content["frs"] = ConfigRecord({"frs-signature": draw(st.binary(max_size=70)),
                                           "frs-version": draw(st.integers(-2, 3))})
        elif change == 7 and "b" in arrays:
            del arrays["b"]
    if draw(st.booleans()) and draw(st.integers(0, 9)) == 0:
        return Message(Error(code=1, reason=draw(st.text(max_size=30))), reply_to=instruction)
    return Message(content, reply_to=instruction)


@st.composite
def round_replies(draw: st.DrawFn, instructions: list[Message], model: dict) -> list[Message]:
    replies = [draw(training_reply(ins, model)) for ins in instructions]
    if draw(st.booleans()):  # a copy under an already used node id
        replies.insert(draw(st.integers(0, len(replies))),
                       draw(training_reply(draw(st.sampled_from(instructions)), model)))
    if draw(st.booleans()):  # a node that was never sampled
        stranger = Message(RecordDict(), dst_node_id=999, message_type="train")
        replies.append(draw(training_reply(stranger, model)))
    return replies


def check_round(new: ArrayRecord | None, report) -> None:
    if new is not None:
        for array in new.values():
            assert np.all(np.isfinite(array.numpy()))
    for text in report.rejected.values():
        assert reason_code(text) in KNOWN_CODES, text
    assert not set(report.kept) & set(report.rejected)


def signing_hooks(keys: KeyDir) -> list:
    return [VerifyUpdateSignatures(TrustStore.load(keys.truststore), RUN_ID),
            SignGlobalModel(load_private_key(keys.server_key), RUN_ID)]


STRATEGIES: dict[str, Callable[[KeyDir], object]] = {
    "median": lambda keys: make_strategy("median", num_malicious=1),
    "krum": lambda keys: make_strategy("krum", num_malicious=1, min_available_nodes=5),
    "fedavg-with-hooks": lambda keys: with_hooks(FedAvg(min_available_nodes=5), []),
    "signed-median": lambda keys: make_strategy("median", hooks=signing_hooks(keys)),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
@given(data=st.data())
def test_hostile_replies_never_escape_aggregate_train(name: str, keys: KeyDir, data) -> None:
    strategy = STRATEGIES[name](keys)
    model = global_model()
    instructions = train_instructions(strategy, model, list(NODES))
    replies = data.draw(round_replies(instructions, model))
    new, metrics = strategy.aggregate_train(1, replies)
    check_round(new, strategy.reports[-1])
    assert metrics is not None


@st.composite
def fit_result(draw: st.DrawFn, model: dict) -> FitRes:
    weights = [v + np.float32(draw(st.floats(-1, 1))) for v in model.values()]
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), 10, {})
    for change in draw(st.lists(st.integers(0, 5), max_size=3)):
        if change == 0 and res.parameters.tensors:
            res.parameters.tensors[0] = draw(st.binary(max_size=80))
        elif change == 1:
            res.num_examples = draw(st.one_of(hostile_numbers, st.text(max_size=3)))
        elif change == 2:
            res.metrics = {draw(st.sampled_from(["num-examples", "frs-signature", "m"])):
                           draw(st.one_of(hostile_numbers, st.binary(max_size=8)))}
        elif change == 3:
            res.status = Status(Code.FIT_NOT_IMPLEMENTED, draw(st.text(max_size=20)))
        elif change == 4:
            res.parameters = Parameters(tensors=[], tensor_type="")
        elif change == 5 and res.parameters.tensors:
            res.parameters.tensors.append(res.parameters.tensors[0])
    return res


@pytest.mark.parametrize("wrapped", [False, True])
@given(data=st.data())
def test_hostile_results_never_escape_aggregate_fit(wrapped: bool, data) -> None:
    from flwr.server.client_manager import SimpleClientManager

    strategy = (with_hooks(LegacyFedAvg(min_available_clients=5, min_fit_clients=5), [])
                if wrapped else make_strategy("median", api="legacy", num_malicious=1))
    model = global_model()
    manager = SimpleClientManager()
    for node in NODES:
        manager.register(FakeProxy(node))
    instructions = strategy.configure_fit(1, ndarrays_to_parameters(list(model.values())),
                                          manager)
    results = [(proxy, data.draw(fit_result(model))) for proxy, _ in instructions]
    if data.draw(st.booleans()):
        results.append((FakeProxy(999), data.draw(fit_result(model))))
    if data.draw(st.booleans()):
        results.append((results[0][0], data.draw(fit_result(model))))
    parameters, _ = strategy.aggregate_fit(1, results, [RuntimeError("lost")])
    report = strategy.reports[-1]
    for text in report.rejected.values():
        assert reason_code(text) in KNOWN_CODES, text
    if parameters is not None:
        for tensor in parameters.tensors:
            assert np.all(np.isfinite(npy_view(tensor)))


# -------------------------------------------------------------------- the client mod
def genuine_instruction(keys: KeyDir, node: int = 101) -> tuple[Message, bytes, dict]:
    strategy = make_strategy("median", hooks=signing_hooks(keys))
    messages = train_instructions(strategy, global_model(), list(NODES))
    message = next(m for m in messages if m.metadata.dst_node_id == node)
    content = message.content
    digest = digest_arrays(arrayrecord_views(content["arrays"]))
    return message, digest, dict(content["config"])


@st.composite
def tampered(draw: st.DrawFn, message: Message) -> Message:
    content = RecordDict(dict(message.content.items()))
    arrays = ArrayRecord(dict(content["arrays"].items()))
    config = ConfigRecord(dict(content["config"].items()))
    content["arrays"], content["config"] = arrays, config
    for change in draw(st.lists(st.integers(0, 9), max_size=3)):
        if change == 0:
            arrays["w"] = hostile_array(draw)
        elif change == 1:
            config[draw(st.sampled_from(["lr", "server-round", "frs-round", "frs-signature"]))] = (
                draw(st.one_of(hostile_numbers, st.binary(max_size=70), st.text(max_size=5)))
            )
        elif change == 2:
            content[draw(st.sampled_from(["fitins.parameters", "extra"]))] = ArrayRecord(
                dict(arrays.items()))
        elif change == 3:
            content[draw(st.sampled_from(["fitins.config", "evil"]))] = ConfigRecord({"lr": 10.0})
        elif change == 4:
            content["m"] = MetricRecord({"x": 1})
        elif change == 5 and "config" in content:
            del content["config"]
        elif change == 6:
            reordered = ArrayRecord(dict(reversed(list(arrays.items()))))
            content["arrays"] = arrays = reordered
        elif change == 7:
            content = RecordDict({"w": arrays, "c": config})
        elif change == 8 and "b" in arrays:
            del arrays["b"]
        elif change == 9:
            config["frs-run-id"] = RUN_ID + 1
    message.content = content
    return message


@given(data=st.data())
def test_the_app_only_sees_what_the_server_signed(keys: KeyDir, data) -> None:
    message, digest, config = genuine_instruction(keys)
    message = data.draw(tampered(message))
    seen = []

    def app(msg: Message, context: Context) -> Message:
        content = msg.content
        assert len(content.array_records) == 1 and len(content.config_records) == 1
        received = next(iter(content.array_records.values()))
        seen.append((digest_arrays(arrayrecord_views(received)),
                     dict(next(iter(content.config_records.values())))))
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": received, "metrics": metrics}), reply_to=msg)

    answer = integrity_mod(message, context_for(101, keys), app)
    assert isinstance(answer, Message)
    if answer.has_error():
        assert not seen
        assert "refused:" in answer.error.reason
    else:
        assert seen == [(digest, config)]


@given(extra=st.sampled_from(["array", "config", "metric", "none"]),
       count=st.one_of(hostile_numbers, st.text(max_size=3)))
def test_the_mod_signs_only_well_formed_replies(keys: KeyDir, extra: str, count) -> None:
    message, _, _ = genuine_instruction(keys)

    def app(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": count}) if isinstance(count, int | float) \
            else MetricRecord({"n": 1.0})
        content = RecordDict({"arrays": msg.content["arrays"], "metrics": metrics})
        if extra == "array":
            content["second"] = ArrayRecord({"x": Array(np.zeros(2, np.float32))})
        elif extra == "config":
            content["c"] = ConfigRecord({"a": 1})
        elif extra == "metric":
            content["m2"] = MetricRecord({"a": 1})
        return Message(content, reply_to=msg)

    answer = integrity_mod(message, context_for(101, keys), app)
    assert isinstance(answer, Message)
    if extra != "none":
        assert answer.has_error() and "unsignable-reply" in answer.error.reason


def test_keys_missing_on_disk_are_a_refusal(tmp_path: Path, keys: KeyDir) -> None:
    message, _, _ = genuine_instruction(keys)
    context = context_for(101, keys, **{"signing-key": str(tmp_path / "none.key")})
    answer = integrity_mod(message, context, lambda m, c: m)
    assert answer.has_error() and "keys-unavailable" in answer.error.reason
