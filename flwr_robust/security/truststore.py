"""The server's trust store: which client keys may sign updates.

File format (JSON, UTF-8), version 1::

    {
      "format": "flwr-robust-truststore",
      "version": 1,
      "keys": [
        {"key_id": "<32 hex>", "name": "client-0" | null, "algorithm": "ed25519",
         "public_key": "-----BEGIN PUBLIC KEY-----\\n...", "revoked": false,
         "added_at": "2025-01-01T00:00:00+00:00", "revoked_at": null},
        ...
      ]
    }

Loading checks every entry: the key id must be the id of the PEM key and the algorithm its
algorithm, names are unique. Files are written atomically (temporary file + rename), so a
server calling :meth:`TrustStore.reload_if_changed` between rounds never sees a partial file.
Any failure to read or parse the file (missing, not a regular file, unreadable, larger than
:data:`MAX_FILE_BYTES`, not UTF-8, invalid or too deeply nested JSON, entries of the wrong
type) is a :class:`~flwr_robust.security.errors.TrustStoreError`, and a store that fails to
reload keeps its last good entries.
Revocation is permanent: a revoked key stays listed (so it is reported as revoked rather than
unknown) and cannot be added again; issue a new key instead. Keys are looked up by exact name
or full key id only (:meth:`TrustStore.find`), never by a prefix.
"""

import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from flwr_robust._files import atomic_write
from flwr_robust.security.errors import SecurityError, TrustStoreError
from flwr_robust.security.keys import (
    PublicKey,
    algorithm_of,
    key_id,
    public_key_from_bytes,
    public_key_to_pem,
)

logger = logging.getLogger("flwr.robust")

FORMAT = "flwr-robust-truststore"
VERSION = 1
#: Larger trust store files are refused (about 100,000 keys fit).
MAX_FILE_BYTES = 64 * 1024 * 1024


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _brief(value: object) -> str:
    """A short printable form of a JSON value for messages (containers by type only)."""
    if value is None or isinstance(value, bool | int | float | str):
        return repr(value)[:80]
    return f"<{type(value).__name__}>"


@dataclass(frozen=True)
class TrustEntry:
    """One client key; ``key_id`` and ``algorithm`` must be those of ``public_key``."""

    key_id: str
    public_key: PublicKey
    algorithm: str
    name: str | None
    added_at: datetime
    revoked: bool = False
    revoked_at: datetime | None = None

    def __post_init__(self) -> None:
        if key_id(self.public_key) != self.key_id:
            raise TrustStoreError(f"key id {self.key_id} is not the id of its public key")
        if algorithm_of(self.public_key) != self.algorithm:
            raise TrustStoreError(
                f"key {self.key_id}: algorithm {self.algorithm!r} does not match its "
                f"{algorithm_of(self.public_key)} public key"
            )
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise TrustStoreError(f"key {self.key_id}: name must be a non-empty string or null")
        if not isinstance(self.revoked, bool) or self.revoked != (self.revoked_at is not None):
            raise TrustStoreError(f"key {self.key_id}: 'revoked' and 'revoked_at' disagree")

    @classmethod
    def from_public_key(cls, public_key: PublicKey, name: str | None = None) -> "TrustEntry":
        """Create an active entry for ``public_key``, added now."""
        return cls(
            key_id=key_id(public_key),
            public_key=public_key,
            algorithm=algorithm_of(public_key),
            name=name,
            added_at=_now(),
        )

    def to_json(self) -> dict[str, object]:
        """Return the JSON object of this entry."""
        return {
            "key_id": self.key_id,
            "name": self.name,
            "algorithm": self.algorithm,
            "public_key": public_key_to_pem(self.public_key).decode("ascii"),
            "revoked": self.revoked,
            "added_at": self.added_at.isoformat(),
            "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat(),
        }

    @classmethod
    def from_json(cls, obj: object) -> "TrustEntry":
        """Parse and check one JSON entry."""
        if not isinstance(obj, dict):
            raise TrustStoreError(f"an entry must be an object, got {type(obj).__name__}")
        label = _brief(obj.get("key_id"))
        try:
            for name in ("key_id", "public_key", "algorithm", "added_at"):
                if not isinstance(obj[name], str):
                    raise TrustStoreError(
                        f"entry {label}: {name!r} must be a string, got {type(obj[name]).__name__}"
                    )
            return cls(
                key_id=obj["key_id"],
                public_key=public_key_from_bytes(obj["public_key"].encode("utf-8")),
                algorithm=obj["algorithm"],
                name=obj.get("name"),
                added_at=cast(datetime, _parse_time(obj["added_at"])),  # a string: checked
                revoked=obj.get("revoked", False),
                revoked_at=_parse_time(obj.get("revoked_at")),
            )
        except KeyError as exc:
            raise TrustStoreError(f"entry {label} lacks field {exc}") from None
        except TrustStoreError:
            raise
        except SecurityError as exc:
            raise TrustStoreError(f"entry {label}: {exc}") from exc


def _parse_time(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TrustStoreError(f"invalid timestamp {_brief(value)}: not a string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise TrustStoreError(f"invalid timestamp {value!r}") from exc
    if parsed.tzinfo is None:
        raise TrustStoreError(f"timestamp {value!r} has no time zone")
    return parsed


class TrustStore:
    """Key id -> :class:`TrustEntry`, optionally backed by a JSON file."""

    def __init__(self, entries: Iterable[TrustEntry] = (), path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self._entries: dict[str, TrustEntry] = {}
        self._stat: tuple[int, int, int] | None = None
        self._content_hash: bytes | None = None
        for entry in entries:
            self._insert(entry, self._entries)

    @staticmethod
    def _insert(entry: TrustEntry, entries: dict[str, TrustEntry]) -> None:
        if entry.key_id in entries:
            raise TrustStoreError(f"key {entry.key_id} is already in the trust store")
        if entry.name is not None and any(e.name == entry.name for e in entries.values()):
            raise TrustStoreError(f"name {entry.name!r} is already used by another key")
        entries[entry.key_id] = entry

    @classmethod
    def load(cls, path: str | Path) -> "TrustStore":
        """Load a trust store file."""
        store = cls(path=path)
        store.reload_if_changed()
        return store

    def _parse(self, content: bytes) -> dict[str, TrustEntry]:
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TrustStoreError(f"{self.path}: not UTF-8 text: {exc}") from exc
        try:
            doc = json.loads(text)
        except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
            raise TrustStoreError(f"{self.path}: not valid JSON: {exc}") from exc
        except RecursionError:
            raise TrustStoreError(f"{self.path}: not valid JSON: nested too deeply") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise TrustStoreError(f"{self.path}: not a {FORMAT} file")
        if doc.get("version") != VERSION:
            raise TrustStoreError(f"{self.path}: unsupported version {_brief(doc.get('version'))}")
        if not isinstance(doc.get("keys"), list):
            raise TrustStoreError(f"{self.path}: 'keys' must be a list")
        entries: dict[str, TrustEntry] = {}
        try:
            for obj in doc["keys"]:
                self._insert(TrustEntry.from_json(obj), entries)
        except TrustStoreError as exc:
            raise TrustStoreError(f"{self.path}: {exc}") from exc
        return entries

    def reload_if_changed(self) -> bool:
        """Reload from :attr:`path` if the file changed; return whether entries changed.

        A change is detected by inode, size and mtime, then confirmed by a content hash. When
        the file cannot be read or parsed, :class:`TrustStoreError` is raised and the store is
        left as it was (same entries, and the next call tries again).
        """
        if self.path is None:
            raise TrustStoreError("this trust store has no file to reload from")
        try:
            signature, content = self._read(self.path, self._stat)
            if content is None:
                return False
            content_hash = hashlib.sha256(content).digest()
            if content_hash == self._content_hash:
                self._stat = signature
                return False
            entries = self._parse(content)
        except OSError as exc:
            raise TrustStoreError(f"{self.path}: cannot read the trust store: {exc}") from exc
        except MemoryError:
            raise TrustStoreError(f"{self.path}: out of memory loading the trust store") from None
        self._entries = self._keep_revocations(entries)
        self._stat, self._content_hash = signature, content_hash
        return True

    def _keep_revocations(self, entries: dict[str, TrustEntry]) -> dict[str, TrustEntry]:
        """``entries`` with every key this store has seen revoked still revoked: a reload of
        an older file (a restored backup) must never trust a revoked key again."""
        for kid, old in self._entries.items():
            new = entries.get(kid)
            if old.revoked and new is not None and not new.revoked:
                logger.warning("trust store: key %s (%s) was revoked before; it stays revoked",
                               kid, old.name or "unnamed")
                entries[kid] = replace(new, revoked=True, revoked_at=old.revoked_at)
        return entries

    @staticmethod
    def _read(
        path: Path, known: tuple[int, int, int] | None
    ) -> tuple[tuple[int, int, int], bytes | None]:
        """``(inode, size, mtime)`` of the regular file ``path`` and its content (``None``
        when that matches ``known``). Opened once and without blocking, so the stat and the
        content are of one file and a FIFO put in its place cannot hang the server."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise TrustStoreError(f"{path}: not a regular file")
            if info.st_size > MAX_FILE_BYTES:
                raise TrustStoreError(
                    f"{path}: {info.st_size} bytes, more than the {MAX_FILE_BYTES} allowed"
                )
            signature = (info.st_ino, info.st_size, info.st_mtime_ns)
            if signature == known:
                return signature, None
            with os.fdopen(fd, "rb", closefd=False) as stream:
                content = stream.read(MAX_FILE_BYTES + 1)
        finally:
            os.close(fd)
        if len(content) > MAX_FILE_BYTES:
            raise TrustStoreError(f"{path}: more than the {MAX_FILE_BYTES} bytes allowed")
        return signature, content

    def save(self, path: str | Path | None = None) -> None:
        """Write the store atomically to ``path`` (default :attr:`path`, which it becomes)."""
        if path is not None:
            self.path = Path(path)
        if self.path is None:
            raise TrustStoreError("no path to save the trust store to")
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "keys": [entry.to_json() for entry in self._entries.values()],
        }
        content = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
        atomic_write(self.path, content)
        stat = os.stat(self.path)
        self._stat = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        self._content_hash = hashlib.sha256(content).digest()

    def get(self, key_id: str) -> TrustEntry | None:
        """Return the entry of ``key_id`` (revoked or not), or None."""
        return self._entries.get(key_id)

    def is_trusted(self, key_id: str) -> bool:
        """Return whether ``key_id`` is listed and not revoked."""
        entry = self._entries.get(key_id)
        return entry is not None and not entry.revoked

    def add(self, public_key: PublicKey, name: str | None = None) -> TrustEntry:
        """Add an active key (in memory; call :meth:`save`). Refuses known ids and names, and
        a name that is another key's id or a key whose id is another key's name (either would
        make :meth:`find` ambiguous)."""
        entry = TrustEntry.from_public_key(public_key, name)
        existing = self._entries.get(entry.key_id)
        if existing is not None and existing.revoked:
            raise TrustStoreError(f"key {entry.key_id} was revoked and cannot be added again")
        if name is not None and name != entry.key_id and name in self._entries:
            raise TrustStoreError(f"name {name!r} is the key id of another key")
        if any(e.name == entry.key_id for e in self._entries.values()):
            raise TrustStoreError(f"key id {entry.key_id} is the name of another key")
        self._insert(entry, self._entries)
        return entry

    def revoke(self, key_id: str) -> TrustEntry:
        """Mark ``key_id`` revoked (in memory; call :meth:`save`); revoking twice is a no-op."""
        entry = self._entries.get(key_id)
        if entry is None:
            raise TrustStoreError(f"key {key_id} is not in the trust store")
        if not entry.revoked:
            entry = replace(entry, revoked=True, revoked_at=_now())
            self._entries[key_id] = entry
        return entry

    def find(self, key_id_or_name: str) -> TrustEntry:
        """Return the entry whose name or full key id is exactly ``key_id_or_name``.

        Prefixes are not accepted: a name may look like the start of another key's id. A
        string that is the name of one entry and the key id of another is refused.
        """
        by_id = self._entries.get(key_id_or_name)
        by_name = next((e for e in self._entries.values() if e.name == key_id_or_name), None)
        if by_id is not None and by_name is not None and by_id is not by_name:
            raise TrustStoreError(
                f"{key_id_or_name!r} is ambiguous: it is the key id of key {by_id.key_id} "
                f"({by_id.name or 'unnamed'}) and the name of key {by_name.key_id}"
            )
        entry = by_id or by_name
        if entry is None:
            raise TrustStoreError(
                f"no key named {key_id_or_name!r} and none with that key id in the trust "
                "store (give an exact name or the full key id; prefixes are not accepted)"
            )
        return entry

    def __iter__(self) -> Iterator[TrustEntry]:
        return iter(tuple(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)
