"""What a strategy of either Flower API remembers between configuring and aggregating a
round, and how it reads replies: shared by the robust strategies and by the wrappers that put
flwr-robust's hooks around any strategy.

``configure`` applies a hook's model override, remembers the global model sent (as zero-copy
views) and the nodes sampled, and gives the instructions their final config (the hooks'
entries, then the sealing hooks' entries over the final config); ``take`` returns that model
and sample with the round's replies as :class:`ClientReply` objects.

Reading a reply never raises: anything unreadable becomes a reply with a rejection reason
(``malformed-reply``, ``malformed-array``, ``error-reply``), so no reply content can crash a
round.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import Code, EvaluateRes, FitRes, Parameters, ndarrays_to_parameters
from flwr.server.client_proxy import ClientProxy

from ..records import MalformedArray, arrayrecord_views, tensor_views
from ..security.signing import (
    PREFIX,
    SIGNATURE_RECORD,
    legacy_reply_content,
    signature_fields,
    strip_signature,
)
from ..validation import reason
from .engine import ClientReply, HookPipeline, NamedArrays

logger = logging.getLogger("flwr.robust")

LegacyInstructions = list[tuple[ClientProxy, Any]]
_DETAIL = 200  # longest client-provided text quoted in a reason


def _config_as_sent(config: dict[str, Any]) -> dict[str, Any]:
    """The config exactly as a client reads it back from a Flower ConfigRecord."""
    return dict(ConfigRecord(config))


class _Remembered:
    """The global model sent and the nodes sampled, per (purpose, round), and the latest
    model sent or produced (for rounds aggregated without being configured)."""

    def __init__(self) -> None:
        self.sent: dict[tuple[str, int], NamedArrays] = {}
        self.sampled: dict[tuple[str, int], set[int]] = {}
        self.latest: NamedArrays | None = None

    def remember(
        self, purpose: str, server_round: int, arrays: NamedArrays, nodes: Iterable[int]
    ) -> None:
        self.latest = arrays
        self.sent[(purpose, server_round)] = arrays
        self.sampled[(purpose, server_round)] = set(nodes)
        for key in [k for k in self.sent if k[0] == purpose and k[1] < server_round - 1]:
            self.sent.pop(key)  # an unanswered old round must not pin its model
            self.sampled.pop(key, None)

    def pop(self, purpose: str, server_round: int) -> tuple[NamedArrays | None, set[int] | None]:
        """The model sent and the nodes sampled for the round; for a training round this
        strategy did not configure, the latest model (``None`` if none) and ``None``."""
        key = (purpose, server_round)
        sent = self.sent.pop(key, None)
        if sent is None and purpose == "train":
            logger.info(
                "round %d: not configured by this strategy; its replies are read against "
                "the latest model it sent or produced%s", server_round,
                "" if self.latest is not None else " (none yet)",
            )
            return self.latest, None
        return sent, self.sampled.pop(key, None)


class _RoundBook:
    """What both APIs' bookkeeping shares: the memory, and the models produced."""

    def __init__(self, pipeline: HookPipeline) -> None:
        self.pipeline = pipeline
        self._memory = _Remembered()

    def produced(self, arrays: NamedArrays | None, *, initial: bool = False) -> None:
        """Note a new global model (an aggregation's result, or with ``initial`` the
        initial model, which counts only while no other is known): the next round not
        configured here builds on it."""
        if arrays is not None and not (initial and self._memory.latest is not None):
            self._memory.latest = arrays


class MessageRounds(_RoundBook):
    """Round bookkeeping of a Message-API strategy."""

    def configure(
        self,
        server_round: int,
        purpose: str,
        arrays: ArrayRecord,
        build: Callable[[ArrayRecord], Iterable[Message]],
    ) -> list[Message]:
        """``build(arrays)``'s instructions (``purpose`` ``"train"`` or ``"evaluate"``),
        their config final (see :meth:`HookPipeline.instruction_config`); the model and the
        sampled nodes are remembered, and for training a hook's
        :meth:`~StrategyHook.global_model_override` replaces the model first."""
        if purpose == "train":
            override = self.pipeline.model_override(server_round)
            if override is not None:
                arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in override.items()})
        global_arrays = arrayrecord_views(arrays)
        messages = list(build(arrays))
        nodes = {int(message.metadata.dst_node_id) for message in messages}
        self._memory.remember(purpose, server_round, global_arrays, nodes)
        return _with_config(messages, self.pipeline, server_round, purpose, global_arrays)

    def take(
        self, server_round: int, replies: Iterable[Message], weighted_by_key: str
    ) -> tuple[NamedArrays | None, list[Message], list[ClientReply], set[int] | None]:
        """The model sent in training round ``server_round`` (see :meth:`_Remembered.pop`),
        the reply messages, their readings and the sampled node ids (``None``: unknown)."""
        arrays, sampled = self._memory.pop("train", server_round)
        messages = list(replies)
        readings = [read_reply(m, weighted_by_key, i) for i, m in enumerate(messages)]
        return arrays, messages, readings, sampled

    def take_evaluation(
        self, server_round: int, replies: Iterable[Message], weighted_by_key: str
    ) -> tuple[NamedArrays | None, list[Message], list[ClientReply], set[int] | None]:
        """Like :meth:`take` for an evaluation round (the model is ``None`` if unknown)."""
        arrays, sampled = self._memory.pop("evaluate", server_round)
        messages = list(replies)
        readings = [read_evaluate_reply(m, weighted_by_key, i) for i, m in enumerate(messages)]
        return arrays, messages, readings, sampled


class LegacyRounds(_RoundBook):
    """Round bookkeeping of a legacy-API strategy (which also needs the sampled nodes:
    legacy failures arrive without a node id)."""

    def configure(
        self,
        server_round: int,
        purpose: str,
        parameters: Parameters,
        build: Callable[[Parameters], LegacyInstructions],
        kind: type,
    ) -> LegacyInstructions:
        """``build(parameters)``'s instructions as new ``kind`` (FitIns/EvaluateIns) whose
        config also holds ``server-round`` (as the Message API's FedAvg sends it) and the
        hooks' entries; see :meth:`MessageRounds.configure`."""
        if purpose == "train":
            override = self.pipeline.model_override(server_round)
            if override is not None:
                parameters = ndarrays_to_parameters(list(override.values()))
        global_arrays = tensor_views(parameters.tensors)
        instructions = build(parameters)
        nodes = {node_id_of(proxy) for proxy, _ in instructions}
        self._memory.remember(purpose, server_round, global_arrays, nodes)
        built: dict[int, Any] = {}
        for _, ins in instructions:
            if id(ins) not in built:
                config = self.pipeline.instruction_config(
                    server_round, purpose, global_arrays,
                    {**ins.config, "server-round": server_round}, _config_as_sent,
                )
                built[id(ins)] = kind(ins.parameters, config)
        return [(proxy, built[id(ins)]) for proxy, ins in instructions]

    def take(
        self,
        server_round: int,
        results: Sequence[tuple[ClientProxy, FitRes]],
        failures: Sequence[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[NamedArrays | None, list[ClientReply], int, set[int] | None]:
        """The model sent in ``server_round`` (see :meth:`_Remembered.pop`), one
        :class:`ClientReply` per result, failed result and silent sampled node, the number
        of bare exceptions, and the sampled node ids (``None``: unknown)."""
        arrays, sampled = self._memory.pop("train", server_round)
        replies = [read_result(proxy, res, index) for index, (proxy, res) in enumerate(results)]
        replies, exceptions = _with_failures(server_round, replies, failures, sampled)
        return arrays, replies, exceptions, sampled

    def take_evaluation(
        self,
        server_round: int,
        results: Sequence[tuple[ClientProxy, EvaluateRes]],
    ) -> tuple[NamedArrays | None, list[ClientReply], set[int] | None]:
        """The model sent for evaluation in ``server_round`` (``None`` if unknown), one
        :class:`ClientReply` per result, and the sampled node ids."""
        arrays, sampled = self._memory.pop("evaluate", server_round)
        replies = [
            read_evaluate_result(proxy, res, index) for index, (proxy, res) in enumerate(results)
        ]
        return arrays, replies, sampled


def _with_config(
    messages: list[Message], pipeline: HookPipeline, server_round: int, purpose: str,
    global_arrays: NamedArrays,
) -> list[Message]:
    """The messages, their (shared) ConfigRecord replaced by the final config."""
    done: set[int] = set()
    for message in messages:
        content = message.content
        if id(content) in done:
            continue
        done.add(id(content))
        records = content.config_records
        if len(records) > 1:
            raise ValueError("the wrapped strategy's instruction has several ConfigRecords")
        key = next(iter(records), "config")
        config = pipeline.instruction_config(
            server_round, purpose, global_arrays, dict(records.get(key, ConfigRecord())),
            _config_as_sent,
        )
        content[key] = ConfigRecord(config)
    return messages


# ----------------------------------------------------------------------- reading replies
def _text(value: object) -> str:
    return str(value)[:_DETAIL]


def _guarded(node_id: int, index: int | None, read: Callable[[], ClientReply]) -> ClientReply:
    """``read()``, or a ``malformed-reply`` for whatever it raised on hostile content."""
    try:
        return read()
    except MalformedArray as exc:
        return ClientReply(node_id, error=reason("malformed-array", _text(exc)), source=index)
    except Exception as exc:  # noqa: BLE001 - any reply content is turned into a reason
        detail = f"unreadable reply: {type(exc).__name__}: {_text(exc)}"
        return ClientReply(node_id, error=reason("malformed-reply", detail), source=index)


def _source_node(message: Message) -> int:
    try:
        return int(message.metadata.src_node_id)
    except Exception:  # noqa: BLE001 - no usable node id: an impossible one, then rejected
        return -1


def read_reply(
    message: Message, weighted_by_key: str = "num-examples", index: int | None = None
) -> ClientReply:
    """A Message-API training reply as a :class:`ClientReply` (its arrays as zero-copy
    read-only views). Never raises: an error reply or a malformed one carries its reason.

    The reply must hold exactly one ArrayRecord and one MetricRecord (as Flower's FedAvg
    requires); its signature, if any, is read from the ConfigRecord ``frs`` only.
    """
    node_id = _source_node(message)

    def read() -> ClientReply:
        if message.has_error():
            return ClientReply(
                node_id, error=reason("error-reply", _text(message.error.reason)), source=index
            )
        content = message.content
        problem = _record_count_problem(content, array_records=1)
        if problem is not None:
            return ClientReply(node_id, error=problem, source=index)
        metrics = dict(next(iter(content.metric_records.values())))
        if (problem := _reserved_metric_problem(metrics)) is not None:
            return ClientReply(node_id, error=problem, source=index)
        arrays = arrayrecord_views(next(iter(content.array_records.values())))
        return ClientReply(
            node_id,
            arrays=arrays,
            num_examples=metrics.get(weighted_by_key),
            metrics=metrics,
            signature=_signature_record(content),
            source=index,
        )

    return _guarded(node_id, index, read)


def read_evaluate_reply(
    message: Message, weighted_by_key: str = "num-examples", index: int | None = None
) -> ClientReply:
    """A Message-API evaluation reply (exactly one MetricRecord) as a :class:`ClientReply`;
    never raises."""
    node_id = _source_node(message)

    def read() -> ClientReply:
        if message.has_error():
            return ClientReply(
                node_id, error=reason("error-reply", _text(message.error.reason)), source=index
            )
        content = message.content
        problem = _record_count_problem(content, array_records=None)
        if problem is not None:
            return ClientReply(node_id, error=problem, source=index)
        metrics = dict(next(iter(content.metric_records.values())))
        if (problem := _reserved_metric_problem(metrics)) is not None:
            return ClientReply(node_id, error=problem, source=index)
        return ClientReply(
            node_id,
            num_examples=metrics.get(weighted_by_key),
            metrics=metrics,
            signature=_signature_record(content),
            source=index,
        )

    return _guarded(node_id, index, read)


def _record_count_problem(content: RecordDict, array_records: int | None) -> str | None:
    """Reason why a reply does not hold one MetricRecord (and ``array_records``
    ArrayRecords when given)."""
    expected: list[tuple[str, Any, int]] = [("MetricRecord", content.metric_records, 1)]
    if array_records is not None:
        expected.insert(0, ("ArrayRecord", content.array_records, array_records))
    for kind, records, count in expected:
        if len(records) != count:
            return reason("malformed-reply", f"{len(records)} {kind}s, expected {count}")
    return None


def _reserved_metric_problem(metrics: dict[str, Any]) -> str | None:
    """Message-API metrics may not use the ``frs-`` prefix: signatures travel in the ``frs``
    ConfigRecord, and metrics under that prefix would be left out of the signed content."""
    reserved = sorted(k for k in metrics if str(k).startswith(PREFIX))
    if reserved:
        return reason("malformed-reply", f"metric keys {reserved[:3]} use the reserved prefix "
                      f"{PREFIX!r}")
    return None


def _signature_record(content: RecordDict) -> dict[str, Any] | None:
    record = content.config_records.get(SIGNATURE_RECORD)
    return None if record is None else dict(record)


def node_id_of(proxy: ClientProxy) -> int:
    """The Flower node id behind a legacy client proxy."""
    node_id = getattr(proxy, "node_id", None)
    return int(node_id) if node_id is not None else int(proxy.cid)


def _proxy_node(proxy: ClientProxy) -> int:
    try:
        return node_id_of(proxy)
    except Exception:  # noqa: BLE001 - no usable node id: an impossible one, then rejected
        return -1


def read_result(proxy: ClientProxy, res: FitRes, index: int | None = None) -> ClientReply:
    """A legacy fit result as a :class:`ClientReply` (zero-copy read-only array views);
    never raises.

    Legacy results carry the count apart from the metrics: hooks see it as
    ``metrics["num-examples"]`` (the real count wins over a metric of that name), and a
    signature covers :func:`~flwr_robust.security.signing.legacy_reply_content`.
    """
    node_id = _proxy_node(proxy)

    def read() -> ClientReply:
        if res.status.code != Code.OK:
            return ClientReply(
                node_id, error=reason("error-reply", _text(res.status.message)), source=index
            )
        arrays = tensor_views(res.parameters.tensors)
        raw = dict(res.metrics)
        return ClientReply(
            node_id,
            arrays=arrays,
            num_examples=res.num_examples,
            metrics={**strip_signature(raw), "num-examples": res.num_examples},
            signature=signature_fields(raw) or None,
            signed=legacy_reply_content(res.num_examples, raw),
            source=index,
        )

    return _guarded(node_id, index, read)


def read_evaluate_result(
    proxy: ClientProxy, res: EvaluateRes, index: int | None = None
) -> ClientReply:
    """A legacy evaluation result as a :class:`ClientReply` (``loss`` and ``num-examples``
    in its metrics); never raises."""
    node_id = _proxy_node(proxy)

    def read() -> ClientReply:
        if res.status.code != Code.OK:
            return ClientReply(
                node_id, error=reason("error-reply", _text(res.status.message)), source=index
            )
        loss = res.loss
        if isinstance(loss, bool) or not isinstance(loss, int | float):
            return ClientReply(node_id, error=reason(
                "malformed-reply", f"loss {loss!r:.40} is not a number"), source=index)
        raw = dict(res.metrics)
        return ClientReply(
            node_id,
            num_examples=res.num_examples,
            metrics={**strip_signature(raw), "num-examples": res.num_examples, "loss": loss},
            signature=signature_fields(raw) or None,
            signed=legacy_reply_content(res.num_examples, raw, loss=res.loss),
            source=index,
        )

    return _guarded(node_id, index, read)


def _with_failures(
    server_round: int,
    replies: list[ClientReply],
    failures: Sequence[tuple[ClientProxy, FitRes] | BaseException],
    sampled: set[int] | None,
) -> tuple[list[ClientReply], int]:
    """The replies plus one error reply per failed result and per silent sampled node."""
    exceptions: list[BaseException] = []
    for failure in failures:
        if isinstance(failure, BaseException):
            exceptions.append(failure)
        else:
            proxy, res = failure
            message = getattr(getattr(res, "status", None), "message", "failed")
            replies.append(ClientReply(_proxy_node(proxy), error=reason("error-reply",
                                                                          _text(message))))
    silent = (sampled or set()) - {r.node_id for r in replies}
    return replies + attribute_exceptions(server_round, exceptions, silent), len(exceptions)


def attribute_exceptions(
    server_round: int, exceptions: list[BaseException], silent: set[int]
) -> list[ClientReply]:
    """Error replies for the sampled nodes that sent no result.

    Legacy failures arrive as bare exceptions without a node id. A node id the client put in
    the error text (``[node <id>]``, as flwr-robust's client mods do) attributes one; the
    remaining silent nodes are attributed the remaining exceptions' texts together.
    """
    replies = []
    unattributed = []
    for exc in exceptions:
        logger.info("round %d: a client failed: %r", server_round, exc)
        match = re.search(r"\[node (\d+)\]", str(exc))
        node_id = int(match.group(1)) if match else None
        if node_id is not None and node_id in silent:
            silent.discard(node_id)
            replies.append(ClientReply(node_id, error=reason("error-reply", _text(exc))))
        else:
            unattributed.append(_text(exc))
    detail = "; ".join(unattributed) or "no result and no failure report"
    replies += [ClientReply(n, error=reason("error-reply", _text(detail))) for n in sorted(silent)]
    return replies
