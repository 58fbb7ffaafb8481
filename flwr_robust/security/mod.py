"""Client-side integrity as a Flower client mod (``ClientApp(mods=[integrity_mod])``).

Before a train or evaluate instruction reaches the app, :func:`integrity_mod` checks the
server's signature over the received global model, config, run and round with the server's
public key, and answers with an error reply (no training, no evaluation) when the signature
is missing, invalid, for another run, or for a round older than one this node already saw.
It hands the app a message rebuilt from exactly the records it verified, and refuses
instructions whose layout is ambiguous (records of both message formats) or that carry
records beyond the signed ones. After the app ran it signs the reply: a training reply's
update digest and metrics (such as ``num-examples``), an evaluation reply's metrics, each
with run, round and the digest of the global model received, with the node's key. Both
Flower message formats (Message API and legacy) are handled.

Keys: the node config ``signing-key`` / ``server-public-key`` paths (deployment; both or
neither), else the run config ``keys-dir`` laid out by ``flwr-robust keys init``
(``server.pub``, ``clients/client-<partition-id>.key``). A node whose node config names its
keys always verifies: the run config (which the server controls) can neither switch that off
nor point it at another server key. Otherwise signing is on when the run config says
``signing = true``. The signature binds the instruction's kind (a training instruction
relabelled as an evaluation does not verify), the node's own run id, and each (round, kind)
is carried out at most once (a replayed instruction is refused as ``stale-round``).

No exception from a message's content escapes the mod: every problem becomes an error reply
whose reason starts with a code (``malformed-instruction``, ``unexpected-records``,
``keys-unavailable``, ``unsignable-reply``, or a verification reason).

:func:`fault_injection_mod` simulates a network attacker for tests and demonstrations only
(run config ``integrity-faults``); it is inert unless configured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)

from ..records import MalformedArray, arrayrecord_views
from .digest import digest_arrays
from .keydir import KeyDir
from .keys import PrivateKey, PublicKey, generate_private_key, load_private_key, load_public_key
from .signing import (
    NO_ARRAYS_DIGEST,
    PREFIX,
    SIGNATURE_RECORD,
    Purpose,
    SignatureBundle,
    legacy_reply_content,
    sign_reply,
    signature_fields,
)
from .verifier import verify_global_model

logger = logging.getLogger("flwr.robust")

#: Error code of a refused instruction (Flower's own codes are small integers).
REFUSED_INSTRUCTION = 4301

CallNext = Callable[[Message, Context], Message]


class Refused(Exception):
    """An instruction or reply the mod will not pass on; ``str()`` is the reason."""


# ----------------------------------------------------------------------- message layout
@dataclass(frozen=True)
class Layout:
    """Where arrays, config and metrics live in one message format."""

    legacy: bool
    kind: str  # "train" or "evaluate"
    arrays_key: str = "arrays"
    config_key: str = "config"

    @property
    def prefix(self) -> str:
        return "fitins" if self.kind == MessageType.TRAIN else "evaluateins"

    @property
    def result(self) -> str:
        return "fitres" if self.kind == MessageType.TRAIN else "evaluateres"

    def instruction_arrays(self, message: Message) -> ArrayRecord:
        return message.content.array_records[self.arrays_key]

    def instruction_config(self, message: Message) -> dict[str, Any]:
        return dict(message.content.config_records[self.config_key])

    def reply_arrays(self, reply: Message) -> ArrayRecord | None:
        records = reply.content.array_records
        if self.legacy:
            return records.get("fitres.parameters")
        return next(iter(records.values())) if len(records) == 1 else None

    def reply_content(self, reply: Message) -> dict[str, Any]:
        """The content map the server rebuilds the reply's statement from (see
        :func:`~flwr_robust.strategy.rounds.read_reply` and ``read_result``)."""
        content = reply.content
        if not self.legacy:
            return dict(next(iter(content.metric_records.values())))
        count = content.metric_records[f"{self.result}.num_examples"]["num_examples"]
        metrics = content.config_records[f"{self.result}.metrics"]
        loss = None
        if self.kind == MessageType.EVALUATE:
            loss = content.metric_records["evaluateres.loss"]["loss"]
        return legacy_reply_content(count, metrics, loss=loss)

    def check_reply(self, reply: Message) -> None:
        """Raise :class:`Refused` unless the reply holds exactly the records that get
        signed (the legacy status record aside)."""
        content = reply.content
        if self.legacy:
            arrays = {"fitres.parameters"} if self.kind == MessageType.TRAIN else set()
            metrics = {f"{self.result}.num_examples"}
            if self.kind == MessageType.EVALUATE:
                metrics.add("evaluateres.loss")
            configs = {f"{self.result}.metrics", f"{self.result}.status"}
        else:
            arrays = {"*"} if self.kind == MessageType.TRAIN else set()
            metrics, configs = {"*"}, set()
        _expect_records(content.array_records, arrays, "ArrayRecord")
        _expect_records(content.metric_records, metrics, "MetricRecord")
        _expect_records(content.config_records, configs, "ConfigRecord")
        if not self.legacy:
            reserved = [k for k in next(iter(content.metric_records.values()))
                        if str(k).startswith(PREFIX)]
            if reserved:
                raise Refused(f"unsignable-reply: metric keys {reserved[:3]} use the prefix "
                              f"{PREFIX!r} reserved for signatures")

    def attach(self, reply: Message, bundle: SignatureBundle) -> None:
        """Put the signature where the server's strategy reads it."""
        if self.legacy:
            metrics = reply.content.config_records[f"{self.result}.metrics"]
            for key, value in bundle.to_config().items():
                metrics[key] = value
        else:
            reply.content.config_records[SIGNATURE_RECORD] = ConfigRecord(bundle.to_config())


def _expect_records(records: Mapping[str, Any], expected: set[str], kind: str) -> None:
    names = set(records)
    ok = len(names) == 1 if expected == {"*"} else names == expected
    if not ok:
        wanted = "exactly one" if expected == {"*"} else (sorted(expected) or "none")
        raise Refused(f"unsignable-reply: the reply holds {kind}s {sorted(names)}, expected "
                      f"{wanted}")


def layout_of(message: Message) -> Layout | None:
    """The layout of a train/evaluate message, ``None`` for other message types.

    Raises :class:`Refused` when the records fit no layout exactly: an instruction holds one
    ArrayRecord and one ConfigRecord (legacy: ``fitins.parameters`` and ``fitins.config``,
    or the ``evaluateins`` pair), and nothing else.
    """
    kind = str(message.metadata.message_type).split(".")[0]
    if kind not in (MessageType.TRAIN, MessageType.EVALUATE):
        return None
    if not message.has_content():
        raise Refused("unexpected-records: the instruction carries an error, no records")
    content = message.content
    arrays, configs = list(content.array_records), list(content.config_records)
    if len(arrays) != 1 or len(configs) != 1 or content.metric_records:
        raise Refused(
            f"unexpected-records: an instruction holds one ArrayRecord and one ConfigRecord, "
            f"this one {sorted(arrays)}, {sorted(configs)} and "
            f"{len(content.metric_records)} MetricRecord(s)"
        )
    prefix = "fitins" if kind == MessageType.TRAIN else "evaluateins"
    legacy_arrays = arrays[0] == f"{prefix}.parameters"
    legacy_config = configs[0] == f"{prefix}.config"
    if legacy_arrays != legacy_config or any(
        name.startswith(("fitins.", "evaluateins.")) and not legacy_arrays
        for name in arrays + configs
    ):
        raise Refused(
            f"unexpected-records: records {arrays[0]!r} and {configs[0]!r} mix the legacy and "
            "the Message-API layouts"
        )
    return Layout(legacy=legacy_arrays, kind=kind, arrays_key=arrays[0], config_key=configs[0])


def record_digest(record: ArrayRecord | None) -> bytes | None:
    """Digest of an ArrayRecord's arrays in record order (zero-copy), ``None`` when
    malformed."""
    if record is None:
        return None
    try:
        return digest_arrays(arrayrecord_views(record))
    except MalformedArray:
        return None


# -------------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class NodeKeys:
    """A node's signing key and the server's public key."""

    signing_key: PrivateKey
    server_key: PublicKey


@lru_cache(maxsize=64)
def _load_keys(signing_key: str, server_key: str) -> NodeKeys:
    return NodeKeys(load_private_key(Path(signing_key)), load_public_key(Path(server_key)))


def node_keys(context: Context) -> NodeKeys | None:
    """The node's keys, or ``None`` when this node does not sign.

    A node config naming ``signing-key`` or ``server-public-key`` turns verification on
    whatever the run config says (fail closed: the server cannot talk a node holding a
    server key out of checking it); otherwise the run config's ``signing`` does.

    Raises ``ValueError`` (or a key-file error) when signing is on but a key cannot be
    found or loaded.
    """
    node = context.node_config
    signing = str(node.get("signing-key", "") or "")
    server = str(node.get("server-public-key", "") or "")
    if not (signing or server or context.run_config.get("signing", False)):
        return None
    if bool(signing) != bool(server):  # the server key must never come from the run config
        raise ValueError(
            "node config names only one of 'signing-key' and 'server-public-key': give both"
        )
    keys_dir = str(context.run_config.get("keys-dir", "") or "")
    if not signing and not keys_dir:
        raise ValueError(
            "signing is on but neither node config 'signing-key'/'server-public-key' nor "
            "run config 'keys-dir' says where the keys are"
        )
    layout = KeyDir(Path(keys_dir)) if keys_dir else None
    if not signing:
        signing = str(layout.client_key(f"client-{int(node['partition-id'])}"))  # type: ignore[union-attr]
    if not server:
        server = str(layout.server_pub)  # type: ignore[union-attr]
    return _load_keys(signing, server)


# --------------------------------------------------------------------------------- mods
_STATE = "frs-state"  # the node's own record in context.state (kept across a run's rounds)


def refuse(message: Message, context: Context, why: str) -> Message:
    """An error reply (the node id in the text: legacy servers see only the text)."""
    logger.warning("node %d refused the instruction: %s", context.node_id, why)
    return Message(
        Error(code=REFUSED_INSTRUCTION, reason=f"[node {context.node_id}] refused: {why}"),
        reply_to=message,
    )


@dataclass(frozen=True)
class _Verified:
    layout: Layout
    bundle: SignatureBundle
    received_digest: bytes


def _verify_instruction(message: Message, context: Context, keys: NodeKeys) -> _Verified:
    """Check the instruction (raise :class:`Refused`) and rebuild its content from the
    verified records only."""
    layout = layout_of(message)
    assert layout is not None  # the caller checked the message type
    arrays = layout.instruction_arrays(message)
    config = layout.instruction_config(message)
    received_digest = record_digest(arrays)
    verdict = verify_global_model(
        keys.server_key,
        signature_fields(config),
        run_id=int(context.run_id),  # the node's own run, not what the message claims
        arrays_digest=received_digest,
        config=config,
        instruction=layout.kind,
    )
    if not verdict.accepted or received_digest is None:
        raise Refused(f"{verdict.reason}: {verdict.detail}")
    bundle = SignatureBundle.from_config(signature_fields(config))
    seen = context.state.config_records.setdefault(_STATE, ConfigRecord())
    previous = int(cast(int, seen.get("last-round", 0)))
    if bundle.server_round < previous:
        raise Refused(
            f"stale-round: signed for round {bundle.server_round}, this node saw {previous}"
        )
    last_of_kind = int(cast(int, seen.get(f"last-{layout.kind}", 0)))
    if bundle.server_round <= last_of_kind:
        raise Refused(
            f"stale-round: a {layout.kind} instruction of round {bundle.server_round} was "
            "already carried out (replayed)"
        )
    seen["last-round"] = bundle.server_round
    seen[f"last-{layout.kind}"] = bundle.server_round
    message.content = RecordDict(
        {layout.arrays_key: arrays, layout.config_key: message.content[layout.config_key]}
    )
    return _Verified(layout, bundle, received_digest)


def _sign(reply: Message, verified: _Verified, keys: NodeKeys) -> None:
    """Sign the app's reply in place (raise :class:`Refused` if it cannot be signed)."""
    layout = verified.layout
    layout.check_reply(reply)
    if layout.legacy:
        status = reply.content.config_records[f"{layout.result}.status"]
        if int(cast(int, status["code"])):
            return  # a legacy failure status: nothing the server will use
    training = layout.kind == MessageType.TRAIN
    digest = record_digest(layout.reply_arrays(reply)) if training else NO_ARRAYS_DIGEST
    if digest is None:
        raise Refused("unsignable-reply: the reply's arrays are malformed")
    layout.attach(
        reply,
        sign_reply(
            keys.signing_key,
            run_id=verified.bundle.run_id,
            server_round=verified.bundle.server_round,
            arrays_digest=digest,
            metrics=layout.reply_content(reply),
            base_digest=verified.received_digest,
            purpose=Purpose.UPDATE if training else Purpose.EVALUATION,
        ),
    )


def integrity_mod(message: Message, context: Context, call_next: CallNext) -> Message:
    """Verify the server's signature before the app runs; sign the reply after."""
    try:
        if layout_of(message) is None:
            return call_next(message, context)
    except Refused as refused:
        if _signing_wanted(context):
            return refuse(message, context, str(refused))
        return call_next(message, context)
    try:
        keys = node_keys(context)
    except Exception as exc:  # noqa: BLE001 - missing or broken keys: refuse, never skip
        return refuse(message, context, f"keys-unavailable: {type(exc).__name__}: {exc}")
    if keys is None:
        return call_next(message, context)
    try:
        verified = _verify_instruction(message, context, keys)
    except Refused as refused:
        return refuse(message, context, str(refused))
    except Exception as exc:  # noqa: BLE001 - any hostile content becomes a refusal
        return refuse(message, context, f"malformed-instruction: {type(exc).__name__}: {exc}")
    reply = call_next(message, context)
    if reply.has_error():
        return reply
    try:
        _sign(reply, verified, keys)
    except Refused as refused:
        return refuse(message, context, str(refused))
    except Exception as exc:  # noqa: BLE001 - e.g. metrics that cannot be encoded
        return refuse(message, context, f"unsignable-reply: {type(exc).__name__}: {exc}")
    return reply


def _signing_wanted(context: Context) -> bool:
    node = context.node_config
    return bool(
        node.get("signing-key") or node.get("server-public-key")
        or context.run_config.get("signing", False)
    )


# ------------------------------------------------------------------ fault injection
FAULTS = ("tamper-model", "tamper-update", "rogue-key")


def parse_faults(text: str) -> dict[str, set[int]]:
    """``"tamper-model@2,rogue-key@3"`` -> ``{"tamper-model": {2}, "rogue-key": {3}}``."""
    faults: dict[str, set[int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, partition = item.partition("@")
        if name not in FAULTS or not partition.isdigit():
            raise ValueError(
                f"run config 'integrity-faults' item {item!r}: expected <fault>@<partition-id> "
                f"with a fault in {FAULTS}"
            )
        faults.setdefault(name, set()).add(int(partition))
    return faults


def _flip_first_value(record: ArrayRecord) -> None:
    name = next(iter(record))
    values = record[name].numpy().copy()
    values.reshape(-1)[0] = np.nextafter(values.reshape(-1)[0], np.inf)
    record[name] = Array(values)


def fault_injection_mod(message: Message, context: Context, call_next: CallNext) -> Message:
    """SIMULATED NETWORK ATTACKER, for tests and demonstrations: on the partitions named by
    run config ``integrity-faults`` it alters the model on its way to the node
    (``tamper-model``), alters the signed update on its way back (``tamper-update``), or
    re-signs the update with a key the server does not know (``rogue-key``). Place it
    outside (before) :func:`integrity_mod`."""
    faults = parse_faults(str(context.run_config.get("integrity-faults", "")))
    if not faults:
        return call_next(message, context)
    try:
        layout = layout_of(message)
    except Refused:
        layout = None
    if layout is None:
        return call_next(message, context)
    partition = int(context.node_config.get("partition-id", -1))
    active = {name for name, partitions in faults.items() if partition in partitions}
    if "tamper-model" in active:
        _flip_first_value(layout.instruction_arrays(message))
    received_digest = record_digest(layout.instruction_arrays(message))
    reply = call_next(message, context)
    if reply.has_error() or layout.kind != MessageType.TRAIN:
        return reply
    if "tamper-update" in active:
        record = layout.reply_arrays(reply)
        if record is not None:
            _flip_first_value(record)
    if "rogue-key" in active:
        claims = SignatureBundle.from_config(_reply_signature(layout, reply))
        layout.attach(
            reply,
            sign_reply(
                generate_private_key(),
                run_id=claims.run_id,
                server_round=claims.server_round,
                arrays_digest=record_digest(layout.reply_arrays(reply)) or b"",
                metrics=layout.reply_content(reply),
                base_digest=received_digest,  # type: ignore[arg-type]
            ),
        )
    return reply


def _reply_signature(layout: Layout, reply: Message) -> Mapping[str, Any]:
    """The signature fields of a signed reply."""
    if layout.legacy:
        return signature_fields(reply.content.config_records["fitres.metrics"])
    return dict(reply.content.config_records[SIGNATURE_RECORD])
