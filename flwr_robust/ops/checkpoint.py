"""Global-model checkpoints, a rollback policy on central accuracy, and resume support.

Layout: one ``round-<NNNNNN>.npz`` per saved round in the checkpoint directory, holding the
named arrays in order (members ``a0``, ``a1``, ...) and a ``__meta__`` member with UTF-8
JSON: ``format``, ``round``, ``names``, ``digest`` (hex
:func:`~flwr_robust.security.digest.digest_arrays`, which binds the order of the arrays),
``time``, caller metadata and, when signed, ``key_id`` and ``signature``. A file is written
to a temporary name, synced and renamed, so a crash never leaves half a checkpoint. A
checkpoint the rollback policy found poisoned is renamed ``round-<NNNNNN>.bad.npz``: kept
for forensics, never loaded for a rollback or a resume.

What a load checks: the metadata's ``round`` is the file's round (a file renamed to another
round is refused), ``names`` are unique strings, and the arrays, read in that order, match
``digest``. **Without keys the digest only detects accidental corruption**: anyone who can
write the directory can plant another model with its digest, and a resume or a rollback
will use it. A store given the server's key pair signs every checkpoint with the private
key and checks every load with the public key (:class:`CheckpointStore` ``signing_key`` /
``verify_key``, :func:`resume_state` ``verify_key``). The signature covers
:data:`CHECKPOINT_TAG` followed by :func:`~flwr_robust.security.signing.encode_map` of the
metadata without ``signature`` and ``key_id``: the digest, round, names, format and the rest
(a value that is not a scalar or a list of scalars is encoded as the bytes of its canonical
JSON). An unsigned checkpoint, one signed by another key and an altered one are refused with
:class:`CheckpointError`, never replaced by another file. A signed checkpoint marked bad is
rewritten with a signed ``bad`` flag, so renaming it back does not reinstate it. Signatures
cannot stop an attacker who can write the directory from deleting checkpoints (a resume then
starts from an older genuine one) or copying in one this key signed in another run.

Round numbering and resume: Flower numbers rounds 1..num_rounds in every run, and round 0 is
the initial model (evaluated before training). Checkpoints use *global* round numbers:
``global = flower_round + round_offset``. To resume, the ServerApp calls
:func:`resume_state` and, when it returns ``(R, arrays)``, starts Flower from ``arrays`` with
``num_rounds = num_server_rounds - R`` (``num-server-rounds`` being the run's total) and gives
``round_offset=R`` to :class:`CheckpointHook` and :class:`~flwr_robust.ops.audit.AuditLog` (and
adds ``R`` to the rounds of its own records), so Flower round ``k`` continues as global
round ``R + k``. The rollback baseline (last good accuracy) is not persisted: the resumed
model's round-0 evaluation becomes the new baseline.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._files import atomic_write
from ..security.digest import cached_digest, digest_arrays
from ..security.errors import DigestError
from ..security.keys import PrivateKey, PublicKey, key_id, public_key_of, sign, verify
from ..security.signing import encode_map
from ..strategy.hooks import StrategyHook

if TYPE_CHECKING:
    from ..strategy.engine import RoundReport

logger = logging.getLogger("flwr.robust")

FORMAT_VERSION = 1
#: Domain separation of checkpoint signatures from every other signature of the server key.
CHECKPOINT_TAG = b"flwr-robust/checkpoint/v1\x00"
_META = "__meta__"
_FILE = re.compile(r"round-(\d{6,})(\.bad)?\.npz")
_SIGNATURE_FIELDS = ("signature", "key_id")
_RESERVED = (*_SIGNATURE_FIELDS, "bad")
_SCALARS = (type(None), bool, int, float, str)
_UNREADABLE = (
    OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, RecursionError,
    zipfile.BadZipFile,
)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, inconsistent, unsigned or wrongly signed, or does
    not match its recorded digest."""


def utc_now() -> str:
    """The current UTC time, ISO 8601 with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its global round, named arrays (in saved order), metadata."""

    round: int
    arrays: dict[str, np.ndarray]
    metadata: dict[str, Any]
    path: Path

    @property
    def digest(self) -> str:
        """Hex digest of the arrays (verified on load)."""
        return str(self.metadata["digest"])


class CheckpointStore:
    """Checkpoints of the global model in ``directory``, pruned to the last ``keep_last``.

    Parameters
    ----------
    directory : str or Path
        Created if missing.
    keep_last : int or None
        Good checkpoints kept after each save (>= 1; ``None`` keeps all). Bad ones are pruned
        to the same count separately. Rounds passed as ``protect`` are never deleted.
    signing_key : PrivateKey, optional
        The server key that signs every saved checkpoint.
    verify_key : PublicKey, optional
        The key every load checks the signature with (default: that of ``signing_key``).
        A store with a ``verify_key`` but no ``signing_key`` can only read.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep_last: int | None = 3,
        *,
        signing_key: PrivateKey | None = None,
        verify_key: PublicKey | None = None,
    ) -> None:
        if keep_last is not None and (
            isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
        ):
            raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
        if signing_key is not None:
            own = public_key_of(signing_key)
            if verify_key is None:
                verify_key = own
            elif key_id(verify_key) != key_id(own):
                raise ValueError("verify_key is not the public key of signing_key")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.signing_key = signing_key
        self.verify_key = verify_key

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.directory)!r}, keep_last={self.keep_last})"

    def path_for(self, server_round: int, *, bad: bool = False) -> Path:
        """The file of ``server_round``'s checkpoint."""
        return self.directory / f"round-{server_round:06d}{'.bad' if bad else ''}.npz"

    def rounds(self, *, bad: bool = False) -> list[int]:
        """Rounds with a good (or, with ``bad=True``, a bad) checkpoint, ascending."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _FILE.fullmatch(path.name)
            if match is not None and bool(match.group(2)) == bad:
                found.append(int(match.group(1)))
        return sorted(found)

    def save(
        self,
        server_round: int,
        arrays: Mapping[str, np.ndarray],
        metadata: Mapping[str, Any] | None = None,
        *,
        protect: Iterable[int] = (),
    ) -> Path:
        """Write ``arrays`` as the checkpoint of ``server_round`` (replacing any), signed if
        the store has a signing key, then prune. ``signature``, ``key_id`` and ``bad`` are
        reserved and dropped from ``metadata``."""
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
            raise ValueError(f"server_round must be an int >= 0, got {server_round!r}")
        if self.verify_key is not None and self.signing_key is None:
            raise ValueError("this store only verifies checkpoints: it has no signing_key")
        meta = {
            **{k: v for k, v in dict(metadata or {}).items() if k not in _RESERVED},
            "format": FORMAT_VERSION,
            "round": server_round,
            "names": list(arrays),
            "digest": cached_digest(arrays).hex(),
            "time": utc_now(),
        }
        target = self.path_for(server_round)
        self._write(target, meta, arrays)
        self.prune(protect=protect)
        return target

    def _write(self, target: Path, meta: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Write one checkpoint file, signing the metadata exactly as a load will read it."""
        meta = json.loads(json.dumps(meta))
        if self.signing_key is not None:
            meta["key_id"] = key_id(self.signing_key)
            meta["signature"] = sign(self.signing_key, signed_content(meta)).hex()
        members = {f"a{index}": np.asarray(arrays[name]) for index, name in enumerate(meta["names"])}
        members[_META] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda stream: np.savez(stream, **members))

    def metadata(self, server_round: int, *, bad: bool = False) -> dict[str, Any]:
        """The metadata of ``server_round``'s checkpoint, checked (and its signature verified
        with a verify key), without reading its arrays."""
        return self._read(server_round, bad, arrays=False)[0]

    def load(self, server_round: int, *, bad: bool = False) -> Checkpoint:
        """The checkpoint of ``server_round``: metadata checked, signature verified (with a
        verify key), arrays matching the digest."""
        meta, arrays = self._read(server_round, bad, arrays=True)
        path = self.path_for(server_round, bad=bad)
        try:
            actual = digest_arrays(arrays).hex()
        except DigestError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        if actual != meta["digest"]:
            raise CheckpointError(
                f"{path}: arrays digest {actual[:16]}... does not match the recorded "
                f"{meta['digest'][:16]}..."
            )
        return Checkpoint(server_round, arrays, meta, path)

    def _read(
        self, server_round: int, bad: bool, *, arrays: bool
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        path = self.path_for(server_round, bad=bad)
        if not path.exists():
            raise CheckpointError(f"no checkpoint of round {server_round} in {self.directory}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(bytes(npz[_META]).decode("utf-8"))
                self._check(meta, server_round, bad, path)
                names = meta["names"] if arrays else []
                loaded = {name: npz[f"a{index}"] for index, name in enumerate(names)}
        except CheckpointError:
            raise
        except _UNREADABLE as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint: {exc}") from exc
        return meta, loaded

    def _check(self, meta: object, server_round: int, bad: bool, path: Path) -> None:
        """Raise :class:`CheckpointError` unless ``meta`` is consistent metadata of
        ``server_round`` (and, with a verify key, validly signed by it)."""
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: the metadata is not a JSON object")
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: unsupported format {meta.get('format')!r:.40}")
        stored = meta.get("round")
        if isinstance(stored, bool) or not isinstance(stored, int) or stored != server_round:
            raise CheckpointError(
                f"{path}: the metadata is of round {stored!r:.40}, not {server_round} "
                "(renamed from another round?)"
            )
        names = meta.get("names")
        if (
            not isinstance(names, list)
            or not all(isinstance(name, str) for name in names)
            or len(set(names)) != len(names)
        ):
            raise CheckpointError(f"{path}: 'names' must be a list of unique strings")
        if not isinstance(meta.get("digest"), str):
            raise CheckpointError(f"{path}: no recorded digest")
        if meta.get("bad") is True and not bad:
            raise CheckpointError(f"{path}: this checkpoint was marked bad (renamed back?)")
        if self.verify_key is not None:
            _verify_signature(meta, path, self.verify_key)

    def latest(self) -> Checkpoint | None:
        """The good checkpoint of the highest round, or ``None``."""
        rounds = self.rounds()
        return self.load(rounds[-1]) if rounds else None

    def mark_bad(self, server_round: int) -> Path | None:
        """Move a good checkpoint to its bad name; return the new path (``None`` if absent).

        A signing store rewrites it with a signed ``bad`` flag (so that renaming it back does
        not make it good again); one failing verification is renamed as is.
        """
        source = self.path_for(server_round)
        if not source.exists():
            return None
        target = self.path_for(server_round, bad=True)
        if self.signing_key is not None:
            try:
                checkpoint = self.load(server_round)
            except CheckpointError as exc:
                logger.warning("quarantining %s as is: %s", source, exc)
            else:
                meta = {k: v for k, v in checkpoint.metadata.items() if k not in _RESERVED}
                self._write(target, {**meta, "bad": True}, checkpoint.arrays)
                source.unlink()
                return target
        os.replace(source, target)
        return target

    def prune(self, protect: Iterable[int] = ()) -> list[Path]:
        """Delete all but the newest ``keep_last`` good and bad checkpoints (except
        ``protect``); return the deleted files."""
        if self.keep_last is None:
            return []
        keep = set(protect)
        deleted = []
        for bad in (False, True):
            for server_round in self.rounds(bad=bad)[: -self.keep_last]:
                if server_round not in keep:
                    path = self.path_for(server_round, bad=bad)
                    path.unlink(missing_ok=True)
                    deleted.append(path)
        return deleted


def _verify_signature(meta: Mapping[str, Any], path: Path, verify_key: PublicKey) -> None:
    """Raise :class:`CheckpointError` unless ``meta`` is validly signed by ``verify_key``."""
    expected = key_id(verify_key)
    signature, signer = meta.get("signature"), meta.get("key_id")
    if signature is None:
        raise CheckpointError(
            f"{path}: unsigned checkpoint; only checkpoints signed by the server key "
            f"{expected} are accepted"
        )
    if signer != expected:
        raise CheckpointError(
            f"{path}: signed by key {signer!r:.40}, not by the server key {expected}"
        )
    try:
        valid = verify(verify_key, bytes.fromhex(signature), signed_content(meta))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed signature: {exc}") from exc
    if not valid:
        raise CheckpointError(
            f"{path}: invalid signature: this metadata was not signed by the server key "
            f"{expected} (altered or forged checkpoint)"
        )


def signed_content(meta: Mapping[str, Any]) -> bytes:
    """What a checkpoint signature covers: :data:`CHECKPOINT_TAG` and the canonical encoding
    of the metadata without its signature fields (see the module docstring)."""
    return CHECKPOINT_TAG + encode_map(
        {k: _signable(v) for k, v in meta.items() if k not in _SIGNATURE_FIELDS}
    )


def _signable(value: object) -> object:
    """``value`` if :func:`encode_map` takes it, else the bytes of its canonical JSON (JSON
    metadata never holds bytes, so the encoding stays unambiguous)."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, list) and all(isinstance(item, _SCALARS) for item in value):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def resume_state(
    directory: str | os.PathLike[str], verify_key: PublicKey | None = None
) -> tuple[int, dict[str, np.ndarray]] | None:
    """``(global round, named arrays)`` of the latest good checkpoint, or ``None`` if there is
    none. Raises :class:`CheckpointError` if that checkpoint fails its checks, or with
    ``verify_key`` is not validly signed by it (never silently falls back to an older one).
    See the module docstring for round numbering."""
    checkpoint = CheckpointStore(directory, keep_last=None, verify_key=verify_key).latest()
    return None if checkpoint is None else (checkpoint.round, checkpoint.arrays)


@dataclass(frozen=True)
class RollbackEvent:
    """A rollback decided after a central evaluation (rounds are global rounds).

    ``round``: the evaluation that showed the drop; ``model_round``: the checkpoint of the
    evaluated (poisoned) model, now marked bad; ``restored_round``/``restored_digest``: the
    last good checkpoint the next training round starts from.
    """

    round: int
    accuracy: float
    model_round: int
    restored_round: int
    restored_accuracy: float
    restored_digest: str
    max_accuracy_drop: float
    time: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


class CheckpointHook(StrategyHook):
    """Save the global model every round and roll back after a poisoned round.

    Saving: the model the first training round starts from (the initial or resumed model,
    global round ``round_offset``) unless already saved, then every aggregated model at
    :meth:`on_round_end`. Rounds that kept the global model save nothing.

    Rollback policy: the ServerApp calls :meth:`record_evaluation` after each central
    evaluation of the global model it holds. The first evaluation sets the baseline. When
    the accuracy is more than ``max_accuracy_drop`` (absolute) below that of the last good
    model, the evaluated model's checkpoint is marked bad and every following training round
    is sent the last good checkpoint (:meth:`global_model_override`) until one aggregates on
    it; otherwise the evaluated model becomes the last good one (so a slow decline in steps
    below the threshold is accepted). Each rollback is logged (WARNING), appended to
    :attr:`rollbacks` and passed to the ``on_rollback`` listeners (e.g.
    ``AuditLog.record_rollback``, ``PrometheusHook.record_rollback``). The last good
    checkpoint and a pending restore are never pruned.

    Parameters
    ----------
    store : CheckpointStore
        Where checkpoints go.
    max_accuracy_drop : float, optional
        Allowed drop of central accuracy from the last good model, in (0, 1]; ``None``
        disables rollbacks (checkpoints only).
    accuracy_key : str
        The metric of :meth:`record_evaluation` that holds the accuracy.
    round_offset : int
        Added to Flower's round numbers (see the module docstring on resuming).
    on_rollback : sequence of callables
        Called with each :class:`RollbackEvent`.
    """

    def __init__(
        self,
        store: CheckpointStore,
        *,
        max_accuracy_drop: float | None = None,
        accuracy_key: str = "accuracy",
        round_offset: int = 0,
        on_rollback: Sequence[Callable[[RollbackEvent], None]] = (),
    ) -> None:
        if max_accuracy_drop is not None and not (
            isinstance(max_accuracy_drop, int | float)
            and not isinstance(max_accuracy_drop, bool)
            and 0.0 < max_accuracy_drop <= 1.0
        ):
            raise ValueError(
                f"max_accuracy_drop must be a number in (0, 1] or None, got {max_accuracy_drop!r}"
            )
        if isinstance(round_offset, bool) or not isinstance(round_offset, int) or round_offset < 0:
            raise ValueError(f"round_offset must be an int >= 0, got {round_offset!r}")
        later = [r for r in store.rounds() if r > round_offset]
        if later:
            raise CheckpointError(
                f"{store.directory} holds checkpoints of rounds after {round_offset} "
                f"({', '.join(map(str, later[:5]))}) from another run: resume from it "
                "(round_offset = the latest round) or use an empty directory"
            )
        self.store = store
        self.max_accuracy_drop = max_accuracy_drop
        self.accuracy_key = accuracy_key
        self.round_offset = round_offset
        self.on_rollback = list(on_rollback)
        self.rollbacks: list[RollbackEvent] = []
        self.accuracies: dict[int, float] = {}
        self.bad_rounds: set[int] = set()
        self.last_good: tuple[int, float] | None = None
        self._model_round = round_offset  # checkpoint round of the model the loop holds
        self._initial_saved = False
        self._restore: Checkpoint | None = None

    @property
    def pending_restore(self) -> int | None:
        """The checkpoint round the next training round will be sent, if a rollback is due."""
        return None if self._restore is None else self._restore.round

    # ------------------------------------------------------------------ hook methods
    def global_model_override(self, server_round: int) -> dict[str, np.ndarray] | None:
        """The last good checkpoint's arrays while a rollback is pending, else ``None``."""
        if self._restore is None:
            return None
        logger.warning(
            "round %d: sending the checkpoint of round %d (rollback)",
            server_round + self.round_offset, self._restore.round,
        )
        return self._restore.arrays

    def on_instruction(
        self,
        server_round: int,
        purpose: str,
        global_arrays: dict[str, np.ndarray],
        config: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Save the model the first training round starts from, unless already saved."""
        if purpose == "train" and not self._initial_saved:
            self._initial_saved = True
            start = self._model_round
            if start in self.store.rounds():
                reason = self._unlike(start, cached_digest(global_arrays).hex())
                if reason is None:
                    return {}
                logger.warning("replacing the checkpoint of round %d: %s", start, reason)
            self.store.save(start, global_arrays, {"source": "initial"}, protect=self._protected())
        return {}

    def _unlike(self, server_round: int, digest: str) -> str | None:
        """Why the checkpoint of ``server_round`` is not a valid one of the model with
        ``digest`` (``None`` if it is)."""
        try:
            stored = self.store.metadata(server_round)["digest"]
        except CheckpointError as exc:
            return str(exc)
        return None if stored == digest else "another model"

    def on_round_end(self, report: RoundReport, new_arrays: dict[str, np.ndarray] | None) -> None:
        """Save the new global model; a pending restore is done once a round aggregates."""
        if new_arrays is None:
            return
        server_round = report.server_round + self.round_offset
        self._model_round = server_round
        self._restore = None
        self.store.save(
            server_round,
            new_arrays,
            {"source": "aggregated", "rule": report.rule, "kept": report.kept},
            protect=self._protected(),
        )

    # ------------------------------------------------------------------ evaluation
    def record_evaluation(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        """Apply the rollback policy to the central evaluation of Flower round
        ``server_round`` (the global model held after that round; 0 = before training)."""
        value = metrics.get(self.accuracy_key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value
        ):
            logger.warning(
                "round %d: no finite %r in the evaluation metrics; rollback policy skipped",
                server_round + self.round_offset, self.accuracy_key,
            )
            return
        accuracy = float(value)
        evaluated = server_round + self.round_offset
        self.accuracies[evaluated] = accuracy
        if self._model_round in self.bad_rounds:
            return  # still the poisoned model (no round aggregated yet): restore pending
        good, drop = self.last_good, self.max_accuracy_drop
        same_model = good is not None and good[0] == self._model_round
        if drop is None or good is None or same_model or good[1] - accuracy <= drop:
            self.last_good = (self._model_round, accuracy)
            return
        self._roll_back(evaluated, accuracy, good, drop)

    def _roll_back(
        self, evaluated: int, accuracy: float, good: tuple[int, float], drop: float
    ) -> None:
        restore = self.store.load(good[0])
        self.bad_rounds.add(self._model_round)
        self.store.mark_bad(self._model_round)
        self._restore = restore
        event = RollbackEvent(
            round=evaluated,
            accuracy=accuracy,
            model_round=self._model_round,
            restored_round=good[0],
            restored_accuracy=good[1],
            restored_digest=restore.digest,
            max_accuracy_drop=drop,
            time=utc_now(),
        )
        self.rollbacks.append(event)
        logger.warning(
            "round %d: accuracy %.4f is %.4f below the last good model's (round %d: %.4f), "
            "more than %g: the model of round %d is marked bad and training resumes from the "
            "checkpoint of round %d",
            evaluated, accuracy, good[1] - accuracy, good[0], good[1], drop,
            self._model_round, good[0],
        )
        for listener in self.on_rollback:
            listener(event)

    def _protected(self) -> set[int]:
        rounds = set()
        if self.last_good is not None:
            rounds.add(self.last_good[0])
        if self._restore is not None:
            rounds.add(self._restore.round)
        return rounds
