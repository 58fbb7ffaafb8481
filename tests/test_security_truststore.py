"""Trust store: file round trip, lookups, revocation, reload for rotation, validation."""

import json
import os

import pytest

from flwr_robust.security import keys, truststore
from flwr_robust.security.errors import TrustStoreError
from flwr_robust.security.truststore import TrustEntry, TrustStore


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "truststore.json"


def _store(path, *algorithms: str) -> tuple[TrustStore, list]:
    store = TrustStore()
    public = [keys.generate_private_key(a).public_key() for a in algorithms]
    for i, key in enumerate(public):
        store.add(key, f"client-{i}")
    store.save(path)
    return store, public


def _fields(entry: TrustEntry) -> tuple:
    return (
        entry.key_id,
        entry.algorithm,
        entry.name,
        entry.added_at,
        entry.revoked,
        entry.revoked_at,
        keys.key_id(entry.public_key),
    )


def test_round_trip_all_algorithms(store_path):
    store, public = _store(store_path, "ed25519", "ecdsa-p256", "ecdsa-p384")
    store.revoke(keys.key_id(public[1]))
    store.save()
    loaded = TrustStore.load(store_path)
    assert [_fields(e) for e in loaded] == [_fields(e) for e in store]
    assert [e.name for e in loaded] == ["client-0", "client-1", "client-2"]
    assert [e.algorithm for e in loaded] == ["ed25519", "ecdsa-p256", "ecdsa-p384"]
    doc = json.loads(store_path.read_text())
    assert doc["format"] == "flwr-robust-truststore" and doc["version"] == 1
    assert doc["keys"][0]["public_key"].startswith("-----BEGIN PUBLIC KEY-----")
    assert doc["keys"][1]["revoked"] is True and doc["keys"][1]["revoked_at"]


def test_lookups_and_revocation(store_path):
    store, public = _store(store_path, "ed25519", "ed25519")
    kid = keys.key_id(public[0])
    assert store.get(kid).name == "client-0"
    assert store.is_trusted(kid)
    assert store.get("0" * 32) is None and not store.is_trusted("0" * 32)
    revoked = store.revoke(kid)
    assert revoked.revoked and revoked.revoked_at is not None
    assert store.get(kid).revoked and not store.is_trusted(kid)
    assert store.revoke(kid) == revoked  # idempotent
    with pytest.raises(TrustStoreError, match="revoked"):
        store.add(public[0], "again")
    with pytest.raises(TrustStoreError, match="not in the trust store"):
        store.revoke("0" * 32)


def test_add_refuses_duplicates(store_path):
    store, public = _store(store_path, "ed25519")
    with pytest.raises(TrustStoreError, match="already in the trust store"):
        store.add(public[0], "other-name")
    with pytest.raises(TrustStoreError, match="already used"):
        store.add(keys.generate_private_key().public_key(), "client-0")
    with pytest.raises(TrustStoreError, match="non-empty"):
        store.add(keys.generate_private_key().public_key(), "")


def test_find_by_exact_name_or_full_id(store_path):
    store, public = _store(store_path, "ed25519", "ecdsa-p256")
    kid = keys.key_id(public[1])
    assert store.find(kid).name == "client-1"
    assert store.find("client-1").key_id == kid
    with pytest.raises(TrustStoreError, match="no key named 'nobody'"):
        store.find("nobody")
    for prefix in (kid[:8], kid[:31], kid.upper()):
        with pytest.raises(TrustStoreError, match="prefixes are not accepted"):
            store.find(prefix)


def test_find_never_resolves_a_prefix_to_a_key_named_like_it():
    """Finding 16: a key named after another key's id prefix must not be found by it."""
    target = TrustEntry.from_public_key(keys.generate_private_key().public_key(), "target")
    decoy = TrustEntry.from_public_key(
        keys.generate_private_key().public_key(), target.key_id[:8]
    )
    store = TrustStore([target, decoy])
    assert store.find(target.key_id[:8]) == decoy  # its exact name
    assert store.find(target.key_id) == target
    with pytest.raises(TrustStoreError, match="no key"):
        store.find(target.key_id[:10])


def test_find_refuses_a_name_that_is_another_keys_id():
    victim = TrustEntry.from_public_key(keys.generate_private_key().public_key(), "victim")
    impostor = TrustEntry.from_public_key(
        keys.generate_private_key().public_key(), victim.key_id
    )
    store = TrustStore([victim, impostor])  # e.g. a hand-edited file
    with pytest.raises(TrustStoreError, match="ambiguous") as info:
        store.find(victim.key_id)
    assert victim.key_id in str(info.value) and impostor.key_id in str(info.value)
    assert store.find("victim") == victim
    assert store.find(impostor.key_id) == impostor
    # a key named after its own id is not ambiguous
    own = keys.generate_private_key().public_key()
    assert store.add(own, keys.key_id(own)) == store.find(keys.key_id(own))


def test_add_refuses_names_that_collide_with_key_ids(store_path):
    store, public = _store(store_path, "ed25519")
    with pytest.raises(TrustStoreError, match="is the key id of another key"):
        store.add(keys.generate_private_key().public_key(), keys.key_id(public[0]))
    new = keys.generate_private_key().public_key()
    store.add(keys.generate_private_key().public_key(), keys.key_id(new))
    with pytest.raises(TrustStoreError, match="is the name of another key"):
        store.add(new, "fresh")


def test_reload_detects_rotation_and_revocation(store_path):
    server_view, public = _store(store_path, "ed25519")
    server_view = TrustStore.load(store_path)
    assert not server_view.reload_if_changed()
    operator = TrustStore.load(store_path)  # e.g. the CLI, another process
    new_key = keys.generate_private_key("ecdsa-p384").public_key()
    operator.add(new_key, "rotated")
    operator.revoke(keys.key_id(public[0]))
    operator.save()
    assert not server_view.is_trusted(keys.key_id(new_key))
    assert server_view.reload_if_changed()
    assert server_view.is_trusted(keys.key_id(new_key))
    assert not server_view.is_trusted(keys.key_id(public[0]))
    assert not server_view.reload_if_changed()


def test_reload_ignores_rewrite_with_same_content(store_path):
    store, _ = _store(store_path, "ed25519")
    content = store_path.read_bytes()
    store_path.unlink()
    store_path.write_bytes(content)  # new inode and mtime, same content
    assert not store.reload_if_changed()


def test_reload_keeps_entries_on_invalid_file(store_path):
    store, public = _store(store_path, "ed25519")
    store_path.write_text("{ not json")
    with pytest.raises(TrustStoreError, match="not valid JSON"):
        store.reload_if_changed()
    assert store.is_trusted(keys.key_id(public[0]))


def _keys_json(entries: list) -> str:
    return json.dumps({"format": "flwr-robust-truststore", "version": 1, "keys": entries})


def _wrong_key_id_type(store_path) -> None:
    doc = json.loads(store_path.read_text())
    doc["keys"][0]["key_id"] = [doc["keys"][0]["key_id"]]
    store_path.write_text(json.dumps(doc))


def _replace_with_directory(store_path) -> None:
    store_path.unlink()
    store_path.mkdir()


def _replace_with_fifo(store_path) -> None:
    store_path.unlink()
    os.mkfifo(store_path)


BROKEN_FILES = {
    "deleted": (lambda path: path.unlink(), "cannot read the trust store"),
    "directory": (_replace_with_directory, "not a regular file"),
    "fifo": (_replace_with_fifo, "not a regular file"),
    "deep-json": (lambda path: path.write_text("[" * 100_000), "nested too deeply"),
    "deep-object": (lambda path: path.write_text('{"a":' * 100_000), "nested too deeply"),
    "huge-integer": (lambda path: path.write_text("1" * 10_000), "not valid JSON"),
    "not-utf-8": (lambda path: path.write_bytes(b'{"format": "\xff\xfe"}'), "not UTF-8"),
    "utf-16": (
        lambda path: path.write_bytes(_keys_json([]).encode("utf-16")), "not UTF-8"
    ),
    "entries-of-wrong-type": (
        lambda path: path.write_text(_keys_json([1, "x", None])), "must be an object"
    ),
    "key-id-a-list": (_wrong_key_id_type, "'key_id' must be a string, got list"),
    "public-key-a-number": (
        lambda path: path.write_text(_keys_json([{
            "key_id": "0" * 32, "public_key": 5, "algorithm": "ed25519",
            "added_at": "2025-01-01T00:00:00+00:00",
        }])),
        "'public_key' must be a string",
    ),
    "timestamp-an-object": (
        lambda path: _entry_json(path, revoked=True, revoked_at={"day": 1}),
        "invalid timestamp <dict>: not a string",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_failed_reload_raises_trust_store_error_and_keeps_the_last_good_keys(store_path, case):
    """Finding 14: any unreadable or unparsable file is a TrustStoreError, state unchanged."""
    _, public = _store(store_path, "ed25519", "ecdsa-p256")
    server_view = TrustStore.load(store_path)
    before = [_fields(e) for e in server_view]
    good = store_path.read_bytes()
    spoil, message = BROKEN_FILES[case]
    spoil(store_path)
    for _ in range(2):  # the next round tries again and fails the same way
        with pytest.raises(TrustStoreError, match=message):
            server_view.reload_if_changed()
        assert [_fields(e) for e in server_view] == before
        assert all(server_view.is_trusted(keys.key_id(key)) for key in public)
    with pytest.raises(TrustStoreError, match=message):
        TrustStore.load(store_path)
    if store_path.is_dir():
        store_path.rmdir()
    store_path.unlink(missing_ok=True)
    store_path.write_bytes(good)  # restored: nothing changed since the last good load
    assert not server_view.reload_if_changed()
    assert [_fields(e) for e in server_view] == before


def test_a_file_over_the_size_limit_is_refused(store_path, monkeypatch):
    store, _ = _store(store_path, "ed25519")
    monkeypatch.setattr(truststore, "MAX_FILE_BYTES", store_path.stat().st_size - 1)
    with pytest.raises(TrustStoreError, match="allowed"):
        TrustStore.load(store_path)
    store_path.write_bytes(store_path.read_bytes() + b" ")
    with pytest.raises(TrustStoreError, match="allowed"):
        store.reload_if_changed()
    assert len(store) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of their mode")
def test_an_unreadable_file_is_a_trust_store_error(store_path):
    store, _ = _store(store_path, "ed25519")
    store_path.write_text(store_path.read_text() + "\n")
    store_path.chmod(0)
    with pytest.raises(TrustStoreError, match="Permission denied"):
        store.reload_if_changed()
    assert len(store) == 1


def test_save_is_atomic_and_leaves_no_temporary_files(store_path):
    _store(store_path, "ed25519", "ed25519")
    assert os.listdir(store_path.parent) == ["truststore.json"]


def _entry_json(store_path, **changes: object) -> None:
    _store(store_path, "ed25519")
    doc = json.loads(store_path.read_text())
    for name, value in changes.items():
        if value is KeyError:
            del doc["keys"][0][name]
        else:
            doc["keys"][0][name] = value
    store_path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"key_id": "0" * 32}, "not the id of its public key"),
        ({"algorithm": "ecdsa-p256"}, "does not match"),
        ({"public_key": "garbage"}, "cannot parse public key"),
        ({"added_at": KeyError}, "lacks field"),
        ({"added_at": "yesterday"}, "invalid timestamp"),
        ({"added_at": "2025-01-01T00:00:00"}, "no time zone"),
        ({"revoked": True}, "disagree"),
        ({"revoked": "no"}, "disagree"),
        ({"name": 5}, "name"),
    ],
)
def test_load_rejects_inconsistent_entries(store_path, changes, message):
    _entry_json(store_path, **changes)
    with pytest.raises(TrustStoreError, match=message):
        TrustStore.load(store_path)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"format": "other", "version": 1, "keys": []}, "not a flwr-robust-truststore"),
        ({"format": "flwr-robust-truststore", "version": 2, "keys": []}, "version"),
        ({"format": "flwr-robust-truststore", "version": 1, "keys": {}}, "must be a list"),
        ({"format": "flwr-robust-truststore", "version": 1, "keys": [3]}, "must be an object"),
    ],
)
def test_load_rejects_bad_documents(store_path, doc, message):
    store_path.write_text(json.dumps(doc))
    with pytest.raises(TrustStoreError, match=message):
        TrustStore.load(store_path)


def test_load_rejects_duplicate_ids(store_path):
    _store(store_path, "ed25519")
    doc = json.loads(store_path.read_text())
    doc["keys"].append(dict(doc["keys"][0], name="twin"))
    store_path.write_text(json.dumps(doc))
    with pytest.raises(TrustStoreError, match="already in the trust store"):
        TrustStore.load(store_path)


def test_store_without_path():
    store = TrustStore()
    with pytest.raises(TrustStoreError, match="no file"):
        store.reload_if_changed()
    with pytest.raises(TrustStoreError, match="no path"):
        store.save()
