"""What is signed, and how: canonical statements and signature bundles.

A :class:`Statement` is what a signature covers: purpose, run id, server round, the signer's
key id, the arrays digest, the digest of the global model a reply was computed from (replies
only) and a flat map of scalars that steer training or aggregation (the instruction's config,
or the reply's metrics such as ``num-examples``).

Encoding, version 1: ``STATEMENT_TAG`` followed by the fields in this fixed order, each as its
name (a ``str`` value) then its value. Every value is type-tagged and self-delimiting, so no
two different statements share an encoding (lengths and counts are u32, big-endian):

- ``n`` none;  ``b`` bool (1 byte);  ``f`` float (IEEE-754 binary64, big-endian);
- ``i`` int: u32 length || two's complement big-endian in ``(bit_length + 8) // 8`` bytes;
- ``s`` str: u32 length || UTF-8;  ``y`` bytes: u32 length || raw;
- ``l`` list of scalars: u32 count || items;  ``m`` map: u32 count || (str key, value) in
  ascending key order.

A :class:`SignatureBundle` is what travels with a message: the signature, key id, algorithm,
and the claims a receiver cannot derive itself (run id, round, base digest). The receiver
rebuilds the statement from those claims plus what actually arrived (arrays digest, metrics
or config) and the purpose it expects, verifies the signature, and only then compares the
claims with what it expected. ``to_config``/``from_config`` map a bundle to a flat dict of
``frs-*`` keys that fits a Flower ConfigRecord (or legacy metrics).
"""

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, TypeVar

from flwr_robust.security.digest import DIGEST_SIZE, digest_arrays
from flwr_robust.security.errors import MalformedSignatureError
from flwr_robust.security.keys import (
    ALGORITHMS,
    KEY_ID_BYTES,
    PrivateKey,
    PublicKey,
    algorithm_of,
    key_id,
    sign,
    verify,
)

STATEMENT_TAG = b"flwr-robust/statement/v1\x00"
PREFIX = "frs-"
SIGNATURE_RECORD = "frs"
WIRE_VERSION = 1
KEY_VERSION = "frs-version"
KEY_SIGNATURE = "frs-signature"
KEY_KEY_ID = "frs-key-id"
KEY_ALGORITHM = "frs-algorithm"
KEY_RUN_ID = "frs-run-id"
KEY_SERVER_ROUND = "frs-server-round"
KEY_BASE_DIGEST = "frs-base-digest"
_REQUIRED_KEYS = (
    KEY_VERSION,
    KEY_SIGNATURE,
    KEY_KEY_ID,
    KEY_ALGORITHM,
    KEY_RUN_ID,
    KEY_SERVER_ROUND,
)
_KNOWN_KEYS = frozenset((*_REQUIRED_KEYS, KEY_BASE_DIGEST))
_KEY_ID_RE = re.compile(rf"[0-9a-f]{{{2 * KEY_ID_BYTES}}}")
_MAX_SIGNATURE_BYTES = 512

Scalar = bool | int | float | str | bytes
Value = Scalar | list[Scalar]

_U32 = struct.Struct(">I")
_F64 = struct.Struct(">d")


class Purpose(StrEnum):
    """What a signature is for; a signature for one purpose never verifies for another."""

    GLOBAL_MODEL = "global-model"  # server -> client: model and config for training
    EVALUATION_MODEL = "evaluation-model"  # server -> client: model and config for evaluation
    UPDATE = "update"  # client -> server: reply to a training instruction
    EVALUATION = "evaluation"  # client -> server: reply to an evaluation instruction


#: The purposes of server instructions, by instruction kind ("train", "evaluate"): a signed
#: training instruction relabelled as an evaluation (or back) does not verify.
INSTRUCTION_PURPOSES = {"train": Purpose.GLOBAL_MODEL, "evaluate": Purpose.EVALUATION_MODEL}


def _encode_scalar(value: object, out: list[bytes]) -> None:
    """Append the tagged encoding of a scalar (raise TypeError otherwise)."""
    if value is None:
        out.append(b"n")
    elif isinstance(value, bool):
        out.append(b"b\x01" if value else b"b\x00")
    elif isinstance(value, int):
        raw = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
        out += (b"i", _U32.pack(len(raw)), raw)
    elif isinstance(value, float):
        out += (b"f", _F64.pack(value))
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out += (b"s", _U32.pack(len(raw)), raw)
    elif isinstance(value, bytes):
        out += (b"y", _U32.pack(len(value)), value)
    else:
        raise TypeError(f"cannot sign a value of type {type(value).__name__}")


def _encode_value(value: object, out: list[bytes]) -> None:
    """Append the tagged encoding of a scalar or a list of scalars."""
    if isinstance(value, list):
        out += (b"l", _U32.pack(len(value)))
        for item in value:
            _encode_scalar(item, out)
    else:
        _encode_scalar(value, out)


def encode_map(values: Mapping[str, object]) -> bytes:
    """Return the canonical encoding of a flat map (sorted keys, tagged values)."""
    out: list[bytes] = [b"m", _U32.pack(len(values))]
    for key in sorted(values):
        if not isinstance(key, str):
            raise TypeError(f"map keys must be str, got {type(key).__name__}")
        _encode_scalar(key, out)
        try:
            _encode_value(values[key], out)
        except TypeError as exc:
            raise TypeError(f"field {key!r}: {exc}") from None
    return b"".join(out)


#: The arrays digest of a reply without arrays (evaluation replies).
NO_ARRAYS_DIGEST = digest_arrays({})

#: Key prefix of a legacy reply's own metrics in its signed content map.
LEGACY_METRIC_PREFIX = "metric:"


def legacy_reply_content(
    num_examples: object, metrics: Mapping[str, object], loss: object | None = None
) -> dict[str, object]:
    """The map a legacy-API reply's signature covers (``FitRes`` / ``EvaluateRes``).

    Legacy replies carry the example count (and, for evaluation, the loss) apart from the
    metrics, so both sides build one map from them: ``num-examples`` (and ``loss``) under
    their own keys and every metric under ``metric:<key>``. The map is injective: a metric
    named ``num-examples`` cannot stand in for the real count, as it could in
    ``{"num-examples": count, **metrics}`` (a man in the middle changed the count while that
    key kept the signature valid). ``frs-*`` keys (the signature itself) are left out.
    """
    content: dict[str, object] = {
        f"{LEGACY_METRIC_PREFIX}{key}": value
        for key, value in metrics.items()
        if not str(key).startswith(PREFIX)
    }
    content["num-examples"] = num_examples
    if loss is not None:
        content["loss"] = loss
    return content


def signature_fields(values: Mapping[str, object]) -> dict[str, object]:
    """Return the ``frs-*`` entries of ``values`` (the signature bundle fields)."""
    return {k: v for k, v in values.items() if str(k).startswith(PREFIX)}


ValueT = TypeVar("ValueT")


def strip_signature(values: Mapping[str, ValueT]) -> dict[str, ValueT]:
    """Return ``values`` without its ``frs-*`` entries (the signed content)."""
    return {k: v for k, v in values.items() if not str(k).startswith(PREFIX)}


def _check_uint(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _check_digest(name: str, value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != DIGEST_SIZE:
        raise ValueError(f"{name} must be {DIGEST_SIZE} bytes, got {value!r:.80}")
    return value


@dataclass(frozen=True)
class Statement:
    """The content a signature covers (see the module docstring for its encoding).

    ``base_digest`` is the digest of the global model a reply was computed from: required for
    ``update`` and ``evaluation``, absent for ``global-model``. ``metrics`` is a flat map of
    scalars or lists of scalars; it is snapshotted and read-only.
    """

    purpose: Purpose
    run_id: int
    server_round: int
    key_id: str
    arrays_digest: bytes
    metrics: Mapping[str, Value] = field(default_factory=dict)
    base_digest: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "purpose", Purpose(self.purpose))
        _check_uint("run_id", self.run_id)
        _check_uint("server_round", self.server_round)
        if not isinstance(self.key_id, str) or not self.key_id:
            raise ValueError(f"key_id must be a non-empty str, got {self.key_id!r}")
        _check_digest("arrays_digest", self.arrays_digest)
        if self.purpose in INSTRUCTION_PURPOSES.values():
            if self.base_digest is not None:
                raise ValueError("a global-model statement has no base digest")
        else:
            _check_digest("base_digest", self.base_digest)
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))

    def encode(self) -> bytes:
        """Return the canonical bytes that are signed."""
        out: list[bytes] = [STATEMENT_TAG]
        for name, value in (
            ("purpose", self.purpose.value),
            ("run-id", self.run_id),
            ("server-round", self.server_round),
            ("key-id", self.key_id),
            ("arrays-digest", self.arrays_digest),
            ("base-digest", self.base_digest),
        ):
            _encode_scalar(name, out)
            _encode_scalar(value, out)
        _encode_scalar("metrics", out)
        out.append(encode_map(self.metrics))
        return b"".join(out)


@dataclass(frozen=True)
class SignatureBundle:
    """A signature plus the claims needed to rebuild the statement it signs."""

    signature: bytes
    key_id: str
    algorithm: str
    run_id: int
    server_round: int
    base_digest: bytes | None = None

    def to_config(self) -> dict[str, Any]:
        """Return the bundle as flat ``frs-*`` fields (ConfigRecord-compatible values)."""
        fields: dict[str, bytes | str | int] = {
            KEY_VERSION: WIRE_VERSION,
            KEY_SIGNATURE: self.signature,
            KEY_KEY_ID: self.key_id,
            KEY_ALGORITHM: self.algorithm,
            KEY_RUN_ID: self.run_id,
            KEY_SERVER_ROUND: self.server_round,
        }
        if self.base_digest is not None:
            fields[KEY_BASE_DIGEST] = self.base_digest
        return fields

    @classmethod
    def from_config(cls, values: Mapping[str, object]) -> "SignatureBundle":
        """Parse the ``frs-*`` fields of ``values`` (other keys are ignored).

        Raises :class:`MalformedSignatureError` for missing, unknown or ill-typed fields.
        """
        fields = signature_fields(values)
        unknown = sorted(set(fields) - _KNOWN_KEYS)
        if unknown:
            raise MalformedSignatureError(f"unknown signature field(s): {', '.join(unknown)}")
        missing = [k for k in _REQUIRED_KEYS if k not in fields]
        if missing:
            raise MalformedSignatureError(f"missing signature field(s): {', '.join(missing)}")
        version = fields[KEY_VERSION]
        if version != WIRE_VERSION or isinstance(version, bool):
            raise MalformedSignatureError(f"unsupported signature version {version!r}")
        signature = fields[KEY_SIGNATURE]
        if not isinstance(signature, bytes) or not 0 < len(signature) <= _MAX_SIGNATURE_BYTES:
            raise MalformedSignatureError(f"{KEY_SIGNATURE} must be 1 to 512 bytes")
        kid = fields[KEY_KEY_ID]
        if not isinstance(kid, str) or not _KEY_ID_RE.fullmatch(kid):
            raise MalformedSignatureError(f"{KEY_KEY_ID} is not a key id: {kid!r:.80}")
        algorithm = fields[KEY_ALGORITHM]
        if algorithm not in ALGORITHMS:
            raise MalformedSignatureError(f"unsupported signature algorithm {algorithm!r:.80}")
        base = fields.get(KEY_BASE_DIGEST)
        try:
            return cls(
                signature=signature,
                key_id=kid,
                algorithm=str(algorithm),
                run_id=_check_uint(KEY_RUN_ID, fields[KEY_RUN_ID]),
                server_round=_check_uint(KEY_SERVER_ROUND, fields[KEY_SERVER_ROUND]),
                base_digest=None if base is None else _check_digest(KEY_BASE_DIGEST, base),
            )
        except ValueError as exc:
            raise MalformedSignatureError(str(exc)) from None

    def statement(
        self, purpose: Purpose, arrays_digest: bytes, metrics: Mapping[str, Value]
    ) -> Statement:
        """Rebuild the statement from these claims and the content that actually arrived."""
        return Statement(
            purpose=purpose,
            run_id=self.run_id,
            server_round=self.server_round,
            key_id=self.key_id,
            arrays_digest=arrays_digest,
            metrics=metrics,
            base_digest=self.base_digest,
        )


def sign_statement(private_key: PrivateKey, statement: Statement) -> SignatureBundle:
    """Sign ``statement``; its ``key_id`` must be the id of ``private_key``."""
    kid = key_id(private_key)
    if statement.key_id != kid:
        raise ValueError(f"statement names key {statement.key_id} but the signing key is {kid}")
    return SignatureBundle(
        signature=sign(private_key, statement.encode()),
        key_id=kid,
        algorithm=algorithm_of(private_key),
        run_id=statement.run_id,
        server_round=statement.server_round,
        base_digest=statement.base_digest,
    )


def verify_statement(public_key: PublicKey, statement: Statement, bundle: SignatureBundle) -> bool:
    """Return whether ``bundle`` holds a valid signature of ``statement`` by ``public_key``.

    The key id and algorithm of the bundle and statement must match the key. The bundle's
    claims are not compared here: build ``statement`` with :meth:`SignatureBundle.statement`.
    """
    return (
        bundle.key_id == statement.key_id == key_id(public_key)
        and bundle.algorithm == algorithm_of(public_key)
        and verify(public_key, bundle.signature, statement.encode())
    )


def sign_global_model(
    private_key: PrivateKey,
    *,
    run_id: int,
    server_round: int,
    arrays_digest: bytes,
    config: Mapping[str, Value],
    instruction: str = "train",
) -> SignatureBundle:
    """Sign the global model and config the server sends for ``instruction`` (``"train"``
    or ``"evaluate"``; ``frs-*`` keys are not signed)."""
    return sign_statement(
        private_key,
        Statement(
            purpose=INSTRUCTION_PURPOSES[instruction],
            run_id=run_id,
            server_round=server_round,
            key_id=key_id(private_key),
            arrays_digest=arrays_digest,
            metrics=strip_signature(config),
        ),
    )


def sign_reply(
    private_key: PrivateKey,
    *,
    run_id: int,
    server_round: int,
    arrays_digest: bytes,
    metrics: Mapping[str, Value],
    base_digest: bytes,
    purpose: Purpose = Purpose.UPDATE,
) -> SignatureBundle:
    """Sign a client reply computed from the global model ``base_digest``.

    ``metrics`` is the reply's whole metric map (``frs-*`` keys are not signed), so the server
    can rebuild the statement from the metrics it receives.
    """
    return sign_statement(
        private_key,
        Statement(
            purpose=purpose,
            run_id=run_id,
            server_round=server_round,
            key_id=key_id(private_key),
            arrays_digest=arrays_digest,
            metrics=strip_signature(metrics),
            base_digest=base_digest,
        ),
    )
