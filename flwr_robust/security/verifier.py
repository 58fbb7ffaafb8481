"""Verification decisions, framework-free: the server's check of client replies and the
client's check of the global model.

Each check returns a :class:`Verdict`: accepted (``reason is None``) or rejected with one
:class:`Reason` and a human-readable detail. Checks run in this order, the first failure wins:
``unsigned``, ``malformed-signature``, ``malformed-content``, ``unknown-key``, ``revoked-key``,
``wrong-algorithm``, ``bad-signature``, ``wrong-run``, ``replayed-round``, ``stale-base``,
then (server side, across replies) ``duplicate-key``. The statement is always rebuilt from
what arrived (arrays digest, metrics or config) plus the sender's claims, so any change to
the arrays or the metrics gives ``bad-signature``; claims are compared with expectations only
after the signature verified, so ``wrong-run``/``replayed-round``/``stale-base`` are
authenticated statements of the key holder (e.g. a replayed message), not forgeries.

Duplicate policy (one key, several otherwise valid replies in one round): if every copy signs
the same statement (a resent or duplicated message), the first in input order is kept and the
others are rejected; if the statements differ (the key holder equivocates, e.g. one key shared
by Sybil nodes), all of them are rejected. Replies rejected for another reason never count as
copies, so nobody can knock out an honest client by sending junk or replays under its key id.
"""

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from flwr_robust.security.digest import DIGEST_SIZE
from flwr_robust.security.errors import MalformedSignatureError
from flwr_robust.security.keys import PublicKey, algorithm_of, key_id, verify
from flwr_robust.security.signing import (
    INSTRUCTION_PURPOSES,
    Purpose,
    SignatureBundle,
    Value,
    signature_fields,
    strip_signature,
)
from flwr_robust.security.truststore import TrustEntry


class Reason(StrEnum):
    """Machine-readable rejection reasons."""

    UNSIGNED = "unsigned"  # no frs-* signature field at all
    MALFORMED_SIGNATURE = "malformed-signature"  # missing/ill-typed fields, unknown version
    MALFORMED_CONTENT = "malformed-content"  # arrays not digestible or metrics not encodable
    UNKNOWN_KEY = "unknown-key"  # key id not in the trust store (or not the server key)
    REVOKED_KEY = "revoked-key"  # key id revoked in the trust store
    WRONG_ALGORITHM = "wrong-algorithm"  # declared algorithm differs from the key's
    BAD_SIGNATURE = "bad-signature"  # signature invalid for what arrived (tampering)
    WRONG_RUN = "wrong-run"  # validly signed for another run
    REPLAYED_ROUND = "replayed-round"  # validly signed for another round
    STALE_BASE = "stale-base"  # validly signed, computed from another global model
    DUPLICATE_KEY = "duplicate-key"  # several valid replies signed by one key in a round


@dataclass(frozen=True)
class Verdict:
    """Outcome for one message.

    ``key_id`` is set only once the signature verified, so it is authenticated: accepted
    replies carry their signer's key id (key stateful per-client state by it), and so do
    ``wrong-run``, ``replayed-round``, ``stale-base`` and ``duplicate-key`` rejections.
    """

    client: Hashable
    reason: Reason | None
    detail: str
    key_id: str | None = None

    @property
    def accepted(self) -> bool:
        """Whether the message passed every check."""
        return self.reason is None


@dataclass(frozen=True)
class Reply:
    """What the server received from one client.

    ``arrays_digest`` is the digest of the reply's arrays (``None`` if they could not be
    digested), ``metrics`` the reply's metric map as received, ``signature`` the mapping
    holding its ``frs-*`` fields (``None`` or without such fields when unsigned); the two may
    be the same mapping, as with legacy metrics.
    """

    client: Hashable
    arrays_digest: bytes | None
    metrics: Mapping[str, Value]
    signature: Mapping[str, object] | None = None


class KeyLookup(Protocol):
    """What the verifier needs from a trust store."""

    def get(self, key_id: str) -> TrustEntry | None:
        """Return the entry of ``key_id``, or None."""


class _Rejected(Exception):
    """Internal: a check failed with ``reason``."""

    def __init__(self, reason: Reason, detail: str, key_id: str | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.key_id = reason, detail, key_id


def _parse(
    signature: Mapping[str, object] | None,
    purpose: Purpose,
    arrays_digest: bytes | None,
    content: Mapping[str, Value],
) -> tuple[SignatureBundle, bytes]:
    """Parse the bundle and return it with the encoding of the statement rebuilt."""
    if signature is None or not signature_fields(signature):
        raise _Rejected(Reason.UNSIGNED, "no signature fields")
    try:
        bundle = SignatureBundle.from_config(signature)
    except MalformedSignatureError as exc:
        raise _Rejected(Reason.MALFORMED_SIGNATURE, str(exc)) from None
    if not isinstance(arrays_digest, bytes) or len(arrays_digest) != DIGEST_SIZE:
        raise _Rejected(Reason.MALFORMED_CONTENT, "the arrays could not be digested")
    try:
        encoded = bundle.statement(purpose, arrays_digest, strip_signature(content)).encode()
    except TypeError as exc:
        raise _Rejected(Reason.MALFORMED_CONTENT, f"content cannot be signed: {exc}") from None
    except ValueError as exc:
        detail = f"claims do not fit a {purpose} statement: {exc}"
        raise _Rejected(Reason.MALFORMED_SIGNATURE, detail) from None
    return bundle, encoded


def _check_signature(
    public_key: PublicKey, bundle: SignatureBundle, encoded: bytes, what: str
) -> None:
    """Check the algorithm and the signature over the rebuilt statement."""
    actual = algorithm_of(public_key)
    if bundle.algorithm != actual:
        raise _Rejected(
            Reason.WRONG_ALGORITHM,
            f"signature declares {bundle.algorithm} but {what} {bundle.key_id} is {actual}",
        )
    if not verify(public_key, bundle.signature, encoded):
        raise _Rejected(
            Reason.BAD_SIGNATURE,
            f"signature by {what} {bundle.key_id} does not match the arrays, metrics or claims "
            "received",
        )


def _check_claims(
    bundle: SignatureBundle, run_id: int, server_round: int | None, base_digest: bytes | None
) -> None:
    """Compare the authenticated claims with what the receiver expects."""
    kid = bundle.key_id
    if bundle.run_id != run_id:
        raise _Rejected(Reason.WRONG_RUN, f"signed for run {bundle.run_id}, expected {run_id}", kid)
    if server_round is not None and bundle.server_round != server_round:
        raise _Rejected(
            Reason.REPLAYED_ROUND,
            f"signed for round {bundle.server_round}, expected {server_round}",
            kid,
        )
    if base_digest is not None and bundle.base_digest != base_digest:
        raise _Rejected(
            Reason.STALE_BASE,
            "computed from global model "
            f"{(bundle.base_digest or b'').hex()[:16]}..., expected {base_digest.hex()[:16]}...",
            kid,
        )


def _verify_reply(
    reply: Reply,
    trust_store: KeyLookup,
    purpose: Purpose,
    run_id: int,
    server_round: int,
    base_digest: bytes,
) -> tuple[str, bytes]:
    """Check one reply; return (key id, encoded statement) or raise :class:`_Rejected`."""
    bundle, encoded = _parse(reply.signature, purpose, reply.arrays_digest, reply.metrics)
    entry = trust_store.get(bundle.key_id)
    if entry is None:
        raise _Rejected(Reason.UNKNOWN_KEY, f"key {bundle.key_id} is not in the trust store")
    if entry.revoked:
        raise _Rejected(
            Reason.REVOKED_KEY, f"key {bundle.key_id} ({entry.name or 'unnamed'}) is revoked"
        )
    _check_signature(entry.public_key, bundle, encoded, "key")
    _check_claims(bundle, run_id, server_round, base_digest)
    return bundle.key_id, encoded


def verify_replies(
    replies: Sequence[Reply],
    *,
    trust_store: KeyLookup,
    run_id: int,
    server_round: int,
    base_digest: bytes,
    purpose: Purpose = Purpose.UPDATE,
) -> list[Verdict]:
    """Decide every reply of one round, in input order (see the module docstring).

    ``base_digest`` is the digest of the global model the server sent this round, ``purpose``
    is ``update`` for training replies and ``evaluation`` for evaluation replies.
    """
    verdicts: list[Verdict] = []
    statements: dict[str, list[tuple[int, bytes]]] = {}
    for index, reply in enumerate(replies):
        try:
            kid, encoded = _verify_reply(
                reply, trust_store, purpose, run_id, server_round, base_digest
            )
        except _Rejected as rejected:
            verdicts.append(
                Verdict(reply.client, rejected.reason, rejected.detail, rejected.key_id)
            )
            continue
        statements.setdefault(kid, []).append((index, encoded))
        verdicts.append(Verdict(reply.client, None, f"signed by key {kid}", kid))
    for kid, copies in statements.items():
        if len(copies) < 2:
            continue
        identical = len({encoded for _, encoded in copies}) == 1
        for position, (index, _) in enumerate(copies):
            if identical and position == 0:
                continue
            detail = (
                f"copy of an update already accepted from key {kid}"
                if identical
                else f"key {kid} signed {len(copies)} different replies for round {server_round}"
            )
            verdicts[index] = Verdict(replies[index].client, Reason.DUPLICATE_KEY, detail, kid)
    return verdicts


def verify_global_model(
    server_public_key: PublicKey,
    signature: Mapping[str, object] | None,
    *,
    run_id: int,
    arrays_digest: bytes | None,
    config: Mapping[str, Value],
    server_round: int | None = None,
    instruction: str = "train",
) -> Verdict:
    """Client side: check the server's signature over the received model and config of an
    ``instruction`` (``"train"`` or ``"evaluate"``: one does not verify as the other).

    ``config`` is the received config map (``frs-*`` keys are ignored); ``server_round``, when
    given, must equal the signed round. The signed round is authenticated but its freshness is
    not (a client cannot know the current round): a replayed old model is caught by the
    server, whose ``replayed-round``/``stale-base`` checks reject the resulting update.
    """
    try:
        purpose = INSTRUCTION_PURPOSES[instruction]
        bundle, encoded = _parse(signature, purpose, arrays_digest, config)
        expected = key_id(server_public_key)
        if bundle.key_id != expected:
            raise _Rejected(
                Reason.UNKNOWN_KEY, f"signed by key {bundle.key_id}, not the server key {expected}"
            )
        _check_signature(server_public_key, bundle, encoded, "server key")
        _check_claims(bundle, run_id, server_round, None)
    except _Rejected as rejected:
        return Verdict("server", rejected.reason, rejected.detail, rejected.key_id)
    return Verdict(
        "server",
        None,
        f"global model of round {bundle.server_round} signed by the server",
        bundle.key_id,
    )
