"""A per-round JSONL audit record with a hash chain over its lines and the model lineage.

Format (version 1): one JSON object per line, in canonical form (sorted keys, separators
``,`` and ``:``, ASCII with ``\\u`` escapes, no NaN/Infinity; so also valid UTF-8), ending
with ``\\n``. Every line has

- ``v`` (1), ``seq`` (0-based line number), ``type``, ``time`` (UTC, ISO 8601);
- ``prev_hash``: the previous line's ``hash`` (:data:`GENESIS_HASH` on the first line);
- ``hash``: hex SHA-256 of the line's canonical bytes without the ``hash`` field.

Line types: ``start`` (a writer opened the file; ``round_offset`` of its round numbers),
``round`` (a training round: ``round``, ``rule``, ``status`` ``aggregated``/``kept_global``,
``kept``, ``rejected`` node -> reason, ``rejection_counts``, ``scores``, ``identities``,
``note``, ``seconds``, ``info``, ``anomaly_flags`` when a detector is attached, and the
lineage: ``base_digest`` of the model the round started from, ``model_digest`` of the global
model after it (the base when the model was kept) and ``prev_model_digest``, the previous
round line's ``model_digest``), ``evaluation`` (central metrics of the model after
``round``) and ``rollback`` (a :class:`~flwr_robust.ops.checkpoint.RollbackEvent`). Digests are
hex :func:`~flwr_robust.security.digest.digest_arrays`.

:func:`verify_audit_log` checks every line: canonical form, its hash, the chain (so an edited,
deleted, inserted or reordered line breaks it at that line) and the lineage: each round's
``prev_model_digest`` is the previous round's model, and each round starts from a model an
earlier line produced or restored (a rollback or a resume may go back to an older model; a
model never seen before may not appear), except the file's first round. A chain cannot show
that lines were cut from its *end*: compare :attr:`AuditVerification.head` with the last hash
kept elsewhere (e.g. the ServerApp's log), as ``flwr-robust audit verify --head`` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..security.digest import cached_digest
from ..strategy.hooks import StrategyHook
from .checkpoint import utc_now

if TYPE_CHECKING:
    from ..strategy.engine import ClientReply, RoundReport
    from .anomaly import AnomalyDetectionHook
    from .checkpoint import RollbackEvent

logger = logging.getLogger("flwr.robust")

FORMAT_VERSION = 1
GENESIS_HASH = "0" * 64
ENTRY_TYPES = ("start", "round", "evaluation", "rollback")


class AuditError(ValueError):
    """An audit log cannot be continued (its chain is broken)."""


def canonical_bytes(entry: Mapping[str, Any]) -> bytes:
    """The canonical JSON encoding of ``entry``."""
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Hex SHA-256 of ``entry``'s canonical bytes without its ``hash`` field."""
    body = {key: value for key, value in entry.items() if key != "hash"}
    return hashlib.sha256(canonical_bytes(body)).hexdigest()


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays converted, mapping keys as strings and non-finite
    floats as strings (``"nan"``, ``"inf"``), so that it encodes as canonical JSON."""
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value) if isinstance(value, set | frozenset) else value
        return [jsonable(item) for item in items]
    if isinstance(value, np.ndarray | np.generic):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


@dataclass(frozen=True)
class AuditVerification:
    """Outcome of :func:`verify_audit_log`.

    ``lines`` counts every line of the file; ``bad_line`` (1-based) and ``problem`` say where
    and why verification failed; ``head`` is the hash of the last verified line
    (:data:`GENESIS_HASH` for an empty file).
    """

    path: str
    ok: bool
    lines: int
    bad_line: int | None = None
    problem: str = ""
    head: str = GENESIS_HASH
    rounds: int = 0
    last_model_digest: str | None = None

    def summary(self) -> str:
        """One line for people."""
        if self.ok:
            return (
                f"{self.path}: ok: {self.lines} lines, {self.rounds} rounds, "
                f"head {self.head}"
            )
        where = f"line {self.bad_line} of {self.lines}" if self.bad_line else "end of file"
        return f"{self.path}: BROKEN at {where}: {self.problem}"


@dataclass
class _Chain:
    """The running state of verification."""

    head: str = GENESIS_HASH
    seq: int = 0
    rounds: int = 0
    last_model_digest: str | None = None
    known_models: set[str] = field(default_factory=set)

    def check(self, raw: bytes) -> str | None:
        """The problem with the next line ``raw`` (``None`` if it is fine); advances."""
        if not raw.endswith(b"\n"):
            return "incomplete line without a newline (truncated write?)"
        body = raw[:-1]
        try:
            entry = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return f"not valid JSON: {exc}"
        if not isinstance(entry, dict):
            return "not a JSON object"
        try:
            canonical = canonical_bytes(entry)
        except ValueError as exc:
            return f"cannot be encoded canonically: {exc}"
        if canonical != body:
            return "not in canonical form (the line was edited)"
        if entry.get("hash") != entry_hash(entry):
            return "hash does not match the line's content (the line was modified)"
        if entry.get("prev_hash") != self.head:
            previous = "the genesis value" if self.seq == 0 else "the previous line's hash"
            return f"prev_hash is not {previous} (a line was deleted, inserted or reordered)"
        if entry.get("seq") != self.seq:
            return f"sequence number {entry.get('seq')!r}, expected {self.seq}"
        if entry.get("v") != FORMAT_VERSION or entry.get("type") not in ENTRY_TYPES:
            return f"unknown version {entry.get('v')!r} or type {entry.get('type')!r}"
        problem = self._lineage(entry)
        if problem is not None:
            return f"lineage: {problem}"
        self.head = entry["hash"]
        self.seq += 1
        return None

    def _lineage(self, entry: dict[str, Any]) -> str | None:
        if entry["type"] == "rollback":
            self.known_models.add(str(entry.get("restored_digest")))
            return None
        if entry["type"] != "round":
            return None
        base, model = entry.get("base_digest"), entry.get("model_digest")
        if entry.get("prev_model_digest") != self.last_model_digest:
            return (
                f"round {entry.get('round')}: prev_model_digest is not the previous round's "
                "model_digest"
            )
        if self.known_models and base not in self.known_models:
            return (
                f"round {entry.get('round')} started from model {str(base)[:16]}..., which no "
                "earlier line produced or restored"
            )
        if entry.get("status") != "aggregated" and model != base:
            return f"round {entry.get('round')} kept the global model but changed its digest"
        self.known_models.update(str(digest) for digest in (base, model))
        self.last_model_digest = model
        self.rounds += 1
        return None


def verify_audit_log(
    path: str | os.PathLike[str], *, expected_head: str | None = None
) -> AuditVerification:
    """Verify an audit log (see the module docstring); raises ``OSError`` if unreadable.

    ``expected_head``, when given, must be the hash of the file's last line.
    """
    chain = _Chain()
    bad_line, problem, lines = None, "", 0
    with open(path, "rb") as stream:
        for raw in stream:
            lines += 1
            if bad_line is None:
                problem = chain.check(raw) or ""
                bad_line = lines if problem else None
    ok = bad_line is None
    if ok and expected_head is not None and expected_head.lower() != chain.head:
        ok = False
        problem = (
            f"last hash {chain.head[:16]}... is not the expected {expected_head[:16]}... "
            "(lines were cut from or added to the end)"
        )
    return AuditVerification(
        str(path), ok, lines, bad_line, problem, chain.head, chain.rounds, chain.last_model_digest
    )


class AuditLog(StrategyHook):
    """Append one audit line per training round (and per evaluation and rollback) to ``path``.

    Opening an existing file verifies it and continues its chain (raises
    :class:`AuditError` if it is broken); every writer first appends a ``start`` line. Each
    line is written with one ``write`` call on a file opened for appending, then flushed and
    (by default) fsynced. One writer per file: two concurrent writers would fork the chain.

    Parameters
    ----------
    path : str or Path
        The JSONL file (created with its parent directory if missing).
    round_offset : int
        Added to Flower's round numbers (see :mod:`flwr_robust.ops.checkpoint` on resuming).
    anomaly : AnomalyDetectionHook, optional
        A detector whose flags of each round are recorded (``anomaly_flags``), which matters
        in its ``"flag"`` mode, where the report holds no anomaly rejections.
    fsync : bool
        Force every line to disk.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        round_offset: int = 0,
        anomaly: AnomalyDetectionHook | None = None,
        fsync: bool = True,
    ) -> None:
        if isinstance(round_offset, bool) or not isinstance(round_offset, int) or round_offset < 0:
            raise ValueError(f"round_offset must be an int >= 0, got {round_offset!r}")
        self.path = Path(path)
        self.round_offset = round_offset
        self.anomaly = anomaly
        self.fsync = fsync
        self.head = GENESIS_HASH
        self._seq = 0
        self._last_model_digest: str | None = None
        self._bases: dict[int, str] = {}
        if self.path.exists() and self.path.stat().st_size > 0:
            existing = verify_audit_log(self.path)
            if not existing.ok:
                raise AuditError(f"cannot continue a broken audit log: {existing.summary()}")
            self.head, self._seq = existing.head, existing.lines
            self._last_model_digest = existing.last_model_digest
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write({"type": "start", "round_offset": round_offset})

    # ------------------------------------------------------------------ hook methods
    def on_replies(
        self,
        server_round: int,
        global_arrays: dict[str, np.ndarray],
        replies: Sequence[ClientReply],
    ) -> dict[int, str]:
        """Digest the model the round started from; rejects nothing."""
        self._bases[server_round] = cached_digest(global_arrays).hex()
        return {}

    def on_round_end(self, report: RoundReport, new_arrays: dict[str, np.ndarray] | None) -> None:
        """Append the round's line."""
        base = self._bases.pop(report.server_round, None)
        model = base if new_arrays is None else cached_digest(new_arrays).hex()
        entry = report.to_dict()
        entry.update(
            type="round",
            round=report.server_round + self.round_offset,
            status="aggregated" if report.aggregated else "kept_global",
            base_digest=base,
            model_digest=model,
            prev_model_digest=self._last_model_digest,
        )
        if self.anomaly is not None:
            entry["anomaly_flags"] = self.anomaly.flags_for(report.server_round)
        self._write(entry)
        self._last_model_digest = model

    # ------------------------------------------------------------------ other records
    def record_evaluation(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        """Append the central evaluation of the model after Flower round ``server_round``
        (call after each central evaluation)."""
        self._write(
            {"type": "evaluation", "round": server_round + self.round_offset, "metrics": metrics}
        )

    def record_rollback(self, event: RollbackEvent) -> None:
        """Append a rollback (pass as a ``CheckpointHook`` ``on_rollback`` listener)."""
        self._write({**event.to_dict(), "type": "rollback"})

    def _write(self, entry: Mapping[str, Any]) -> None:
        line = {"time": utc_now(), **jsonable(entry)}
        line.update(v=FORMAT_VERSION, seq=self._seq, prev_hash=self.head)
        line["hash"] = entry_hash(line)
        data = canonical_bytes(line) + b"\n"
        with open(self.path, "ab") as stream:
            stream.write(data)
            stream.flush()
            if self.fsync:
                os.fsync(stream.fileno())
        self.head = line["hash"]
        self._seq += 1
