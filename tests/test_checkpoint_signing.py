"""Signed checkpoints (finding 15): who can write the directory cannot plant a model."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest

from flwr_robust.apps.server import Operations, integrity_hooks
from flwr_robust.apps.settings import RunSettings
from flwr_robust.cli import main
from flwr_robust.ops.checkpoint import (
    CheckpointError,
    CheckpointHook,
    CheckpointStore,
    resume_state,
)
from flwr_robust.security import keys
from flwr_robust.security.digest import digest_arrays
from tests.test_checkpoint import Driver, model


@pytest.fixture(scope="module")
def server_key() -> keys.PrivateKey:
    return keys.generate_private_key()


def read_raw(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The metadata and arrays of a checkpoint file, read without any check."""
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(bytes(npz["__meta__"]).decode("utf-8"))
        arrays = {name: npz[f"a{index}"] for index, name in enumerate(meta["names"])}
    return meta, arrays


def write_raw(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """What an attacker with write access to the directory does."""
    members = {f"a{index}": array for index, array in enumerate(arrays.values())}
    members["__meta__"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    with path.open("wb") as stream:
        np.savez(stream, **members)


@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256", "ecdsa-p384"])
def test_signed_round_trip(tmp_path: Path, algorithm: str) -> None:
    key = keys.generate_private_key(algorithm)
    store = CheckpointStore(tmp_path, signing_key=key)
    assert keys.key_id(store.verify_key) == keys.key_id(key)
    caller = {"rule": "median", "kept": [3, 1], "scores": {"1": 0.5, "3": [1.0, None]}}
    store.save(4, model(4.0), caller)
    reader = CheckpointStore(tmp_path, verify_key=key.public_key())
    for loaded in (store.load(4), reader.load(4)):
        assert list(loaded.arrays) == list(model(4.0))
        for name, array in model(4.0).items():
            np.testing.assert_array_equal(loaded.arrays[name], array)
        assert loaded.metadata["key_id"] == keys.key_id(key)
        assert bytes.fromhex(loaded.metadata["signature"])
        assert {k: loaded.metadata[k] for k in caller} == caller
    state = resume_state(tmp_path, key.public_key())
    assert state is not None and state[0] == 4
    assert reader.metadata(4)["digest"] == digest_arrays(model(4.0)).hex()


def test_resume_refuses_a_planted_model_with_a_recomputed_digest(
    tmp_path: Path, server_key: keys.PrivateKey
) -> None:
    """The attack of the audit: replace the latest checkpoint, recompute its digest."""
    store = CheckpointStore(tmp_path, keep_last=None, signing_key=server_key)
    store.save(1, model(1.0))
    store.save(2, model(2.0))
    meta, _ = read_raw(store.path_for(2))
    planted = model(66.0)
    write_raw(store.path_for(2), {**meta, "digest": digest_arrays(planted).hex()}, planted)
    with pytest.raises(CheckpointError, match="invalid signature"):
        resume_state(tmp_path, server_key.public_key())
    with pytest.raises(CheckpointError, match="invalid signature"):
        store.load(2)
    # Without a verify key the digest alone cannot tell (the documented limit).
    state = resume_state(tmp_path)
    assert state is not None and float(state[1]["bias"][0]) == 66.0


@pytest.mark.parametrize("how", ["stripped", "unsigned-store"])
def test_a_verifying_store_refuses_unsigned_checkpoints(
    tmp_path: Path, server_key: keys.PrivateKey, how: str
) -> None:
    store = CheckpointStore(tmp_path, keep_last=None, signing_key=server_key)
    store.save(1, model(1.0))
    planted = model(66.0)
    if how == "stripped":
        store.save(2, planted)
        meta, arrays = read_raw(store.path_for(2))
        del meta["signature"], meta["key_id"]
        write_raw(store.path_for(2), meta, arrays)
    else:
        CheckpointStore(tmp_path).save(2, planted)
    with pytest.raises(CheckpointError, match="unsigned checkpoint") as info:
        resume_state(tmp_path, server_key.public_key())
    assert keys.key_id(server_key) in str(info.value)
    with pytest.raises(CheckpointError, match="unsigned checkpoint"):
        store.metadata(2)


def test_a_verifying_store_refuses_checkpoints_of_another_key(
    tmp_path: Path, server_key: keys.PrivateKey
) -> None:
    other = keys.generate_private_key()
    CheckpointStore(tmp_path, signing_key=other).save(2, model(66.0))
    with pytest.raises(CheckpointError, match=f"signed by key '{keys.key_id(other)}', not"):
        resume_state(tmp_path, server_key.public_key())
    meta, arrays = read_raw(CheckpointStore(tmp_path).path_for(2))
    meta["key_id"] = keys.key_id(server_key)  # claims the server key, signed by the other
    write_raw(CheckpointStore(tmp_path).path_for(2), meta, arrays)
    with pytest.raises(CheckpointError, match="invalid signature"):
        resume_state(tmp_path, server_key.public_key())


@pytest.mark.parametrize("signature", ["zz", 5, ["00"]])
def test_malformed_signatures_are_refused(
    tmp_path: Path, server_key: keys.PrivateKey, signature: object
) -> None:
    store = CheckpointStore(tmp_path, signing_key=server_key)
    store.save(1, model(1.0))
    meta, arrays = read_raw(store.path_for(1))
    write_raw(store.path_for(1), {**meta, "signature": signature}, arrays)
    with pytest.raises(CheckpointError, match="malformed signature"):
        store.load(1)


def test_signed_metadata_covers_every_field(tmp_path: Path, server_key: keys.PrivateKey) -> None:
    store = CheckpointStore(tmp_path, signing_key=server_key)
    store.save(1, model(1.0), {"kept": [1, 2], "scores": {"1": 0.5}})
    meta, arrays = read_raw(store.path_for(1))
    changes = {
        "kept": [1, 2, 3], "scores": {"1": 0.9}, "time": "2000-01-01", "source": "initial",
        "names": list(reversed(meta["names"])),
    }
    for name, value in changes.items():
        write_raw(store.path_for(1), {**meta, name: value}, arrays)
        with pytest.raises(CheckpointError, match="invalid signature"):
            store.load(1)
    swapped = dict(reversed(list(arrays.items())))  # names and arrays reordered together
    write_raw(store.path_for(1), {**meta, "names": list(swapped)}, swapped)
    with pytest.raises(CheckpointError, match="invalid signature"):
        store.load(1)


@pytest.mark.parametrize("signed", [True, False])
def test_a_checkpoint_renamed_to_another_round_is_refused(
    tmp_path: Path, server_key: keys.PrivateKey, signed: bool
) -> None:
    store = CheckpointStore(tmp_path, keep_last=None, signing_key=server_key if signed else None)
    store.save(1, model(1.0))
    store.save(2, model(2.0))
    store.path_for(1).rename(store.path_for(3))  # an old model presented as the newest
    verify_key = server_key.public_key() if signed else None
    with pytest.raises(CheckpointError, match="metadata is of round 1, not 3"):
        resume_state(tmp_path, verify_key)


@pytest.mark.parametrize("names", [["bias", "bias"], [0, 1], "bias"])
def test_names_must_be_unique_strings(tmp_path: Path, names: object) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, model(1.0))
    meta, arrays = read_raw(store.path_for(1))
    write_raw(store.path_for(1), {**meta, "names": names}, arrays)
    with pytest.raises(CheckpointError, match="list of unique strings"):
        store.load(1)


@pytest.mark.parametrize(
    "content",
    [b"", b"PK\x03\x04 truncated", b"not a zip"],
)
def test_corrupt_files_are_checkpoint_errors(tmp_path: Path, content: bytes) -> None:
    store = CheckpointStore(tmp_path)
    store.path_for(1).write_bytes(content)
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        store.load(1)


def test_rollback_with_a_signed_store(tmp_path: Path, server_key: keys.PrivateKey) -> None:
    store = CheckpointStore(tmp_path, keep_last=None, signing_key=server_key)
    hook = CheckpointHook(store, max_accuracy_drop=0.2)
    hook.record_evaluation(0, {"accuracy": 0.1})
    loop = Driver(hook, model(0.0))
    loop.round(1, model(1.0), 0.6)
    loop.round(2, model(66.0), 0.2)  # poisoned
    assert [e.restored_round for e in hook.rollbacks] == [1]
    sent = loop.round(3, model(1.5), 0.65)
    for name, array in model(1.0).items():
        np.testing.assert_array_equal(sent[name], array)
    assert store.rounds() == [0, 1, 3] and store.rounds(bad=True) == [2]
    assert store.metadata(2, bad=True)["bad"] is True  # signed as bad
    state = resume_state(tmp_path, server_key.public_key())
    assert state is not None and state[0] == 3
    # Renaming the poisoned checkpoint back does not make it good again.
    store.path_for(3).unlink()
    store.path_for(2, bad=True).rename(store.path_for(2))
    with pytest.raises(CheckpointError, match="marked bad"):
        resume_state(tmp_path, server_key.public_key())


def test_a_signed_store_replaces_an_unverifiable_initial_checkpoint(
    tmp_path: Path, server_key: keys.PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    CheckpointStore(tmp_path).save(0, model(0.0))  # left by an unsigned run
    store = CheckpointStore(tmp_path, signing_key=server_key)
    hook = CheckpointHook(store)
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        hook.on_instruction(1, "train", model(0.0), {})
    assert "replacing the checkpoint of round 0" in caplog.text and "unsigned" in caplog.text
    assert store.load(0).metadata["key_id"] == keys.key_id(server_key)


def test_store_key_arguments(tmp_path: Path, server_key: keys.PrivateKey) -> None:
    reader = CheckpointStore(tmp_path, verify_key=server_key.public_key())
    with pytest.raises(ValueError, match="no signing_key"):
        reader.save(1, model(1.0))
    other = keys.generate_private_key().public_key()
    with pytest.raises(ValueError, match="not the public key of signing_key"):
        CheckpointStore(tmp_path, signing_key=server_key, verify_key=other)


def test_an_unsigned_store_behaves_as_before(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, model(1.0), {"signature": "caller's", "key_id": "x", "bad": True})
    loaded = store.load(1)
    assert not {"signature", "key_id", "bad"} & set(loaded.metadata)
    content = store.path_for(1).read_bytes()
    store.mark_bad(1)  # a plain rename
    assert store.path_for(1, bad=True).read_bytes() == content
    with zipfile.ZipFile(store.path_for(1, bad=True)) as npz:
        assert sorted(npz.namelist()) == ["__meta__.npy", "a0.npy", "a1.npy"]


# ---------------------------------------------------------------- the ServerApp's wiring
def _keys_dir(tmp_path: Path) -> Path:
    assert main(["keys", "init", str(tmp_path / "keys"), "--clients", "2"]) == 0
    return tmp_path / "keys"


def _settings(tmp_path: Path, **extra: object) -> tuple[RunSettings, dict]:
    run_config = {
        "signing": True,
        "keys-dir": str(tmp_path / "keys"),
        "checkpoint-dir": str(tmp_path / "ckpt"),
        **extra,
    }
    return RunSettings.from_run_config(run_config), run_config


def _checkpoint_hook(ops: Operations) -> CheckpointHook:
    (hook,) = [h for h in ops.hooks if isinstance(h, CheckpointHook)]
    return hook


def test_the_server_signs_and_verifies_checkpoints(tmp_path: Path) -> None:
    root = _keys_dir(tmp_path)
    server_id = keys.key_id(keys.load_public_key(root / "server.pub"))
    ops = Operations.from_settings(*_settings(tmp_path))
    store = _checkpoint_hook(ops).store
    assert store.signing_key is not None and keys.key_id(store.verify_key) == server_id
    store.save(0, model(0.0))
    store.save(1, model(1.0))
    resumed = Operations.from_settings(*_settings(tmp_path, resume=True))
    assert resumed.round_offset == 1 and resumed.resumed is not None
    assert _checkpoint_hook(resumed).store.signing_key is not None
    CheckpointStore(tmp_path / "ckpt").save(2, model(66.0))  # planted, unsigned
    with pytest.raises(CheckpointError, match="unsigned checkpoint"):
        Operations.from_settings(*_settings(tmp_path, resume=True))


def test_the_server_keeps_unsigned_checkpoints_without_signing(tmp_path: Path) -> None:
    ops = Operations.from_settings(*_settings(tmp_path, signing=False))
    store = _checkpoint_hook(ops).store
    assert store.signing_key is None and store.verify_key is None


def test_the_server_warns_about_writable_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _keys_dir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        integrity_hooks(root, run_id=1)
    assert "writable" not in caplog.text
    root.chmod(0o777)
    (root / "server.key").chmod(0o660)
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        integrity_hooks(root, run_id=1)
    assert f"{root} is writable by everyone (mode 0777)" in caplog.text
    assert f"{root / 'server.key'} is writable by its group" in caplog.text
