"""Checkpoints: exact round trips, pruning, integrity, the rollback policy, resume, CLI."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest

from flwr_robust.aggregation import get_aggregator
from flwr_robust.cli import main
from flwr_robust.ops.audit import AuditLog, verify_audit_log
from flwr_robust.ops.checkpoint import (
    CheckpointError,
    CheckpointHook,
    CheckpointStore,
    RollbackEvent,
    resume_state,
)
from flwr_robust.security.digest import digest_arrays
from flwr_robust.strategy.engine import ClientReply, RobustAggregation, RoundReport


def model(value: float) -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.full((2, 3), value, np.float32),
        "bias": np.full(3, value, np.float32),
    }


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "z.last": rng.standard_normal((4, 5)).astype(np.float32),
        "a/first": rng.integers(0, 9, size=7).astype(np.int64),
        "scalar": np.array(3.5, dtype=np.float16),
        "big-endian": np.arange(3, dtype=">f8"),
    }
    store = CheckpointStore(tmp_path / "ckpt")
    path = store.save(5, arrays, {"rule": "median"})
    assert path.name == "round-000005.npz"
    loaded = store.load(5)
    assert list(loaded.arrays) == list(arrays)  # order kept, not sorted
    for name, array in arrays.items():
        assert loaded.arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded.arrays[name], array)
    assert loaded.round == 5 and loaded.metadata["rule"] == "median"
    assert loaded.digest == digest_arrays(arrays).hex()
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["round-000005.npz"]  # no temp


def test_keep_last_prunes_oldest_but_protected(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2)
    for rnd in range(1, 5):
        store.save(rnd, model(rnd), protect={1})
    assert store.rounds() == [1, 3, 4]
    store.save(5, model(5))
    assert store.rounds() == [4, 5]
    assert CheckpointStore(tmp_path / "all", keep_last=None).prune() == []
    with pytest.raises(ValueError, match="keep_last must be an int >= 1 or None"):
        CheckpointStore(tmp_path, keep_last=0)


def test_tampered_checkpoint_fails_its_digest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, model(1.0))
    other = CheckpointStore(tmp_path / "other")
    other.save(1, model(2.0))
    # Same structure, other values: swap the array member, keep the metadata.
    with zipfile.ZipFile(store.path_for(1)) as good, zipfile.ZipFile(other.path_for(1)) as bad:
        members = {name: good.read(name) for name in good.namelist()}
        members["a0.npy"] = bad.read("a0.npy")
    with zipfile.ZipFile(store.path_for(1), "w") as target:
        for name, data in members.items():
            target.writestr(name, data)
    with pytest.raises(CheckpointError, match="does not match the recorded"):
        store.load(1)
    with pytest.raises(CheckpointError, match="does not match"):
        resume_state(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint of round 9"):
        store.load(9)


class Driver:
    """Plays the Flower loop around a CheckpointHook: instruction, round end, evaluation."""

    def __init__(self, hook: CheckpointHook, initial: dict) -> None:
        self.hook, self.model = hook, initial

    def round(self, rnd: int, new: dict | None, accuracy: float) -> dict:
        """Returns the model sent for training in round ``rnd``."""
        sent = self.hook.global_model_override(rnd) or self.model
        self.hook.on_instruction(rnd, "train", sent, {})
        self.hook.on_round_end(RoundReport(rnd, "median", 3, aggregated=new is not None), new)
        if new is not None:
            self.model = new
        self.hook.record_evaluation(rnd, {"accuracy": accuracy})
        return sent


def test_poisoned_round_rolls_back_to_the_last_good_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path, keep_last=1)
    events: list[RollbackEvent] = []
    hook = CheckpointHook(store, max_accuracy_drop=0.2, on_rollback=[events.append])
    hook.record_evaluation(0, {"accuracy": 0.1})  # initial model: the baseline
    loop = Driver(hook, model(0.0))
    loop.round(1, model(1.0), 0.6)
    assert store.rounds() == [0, 1]  # keep_last=1, but round 0 is the last good one
    assert hook.global_model_override(2) is None  # normal round: no override
    loop.round(2, model(2.0), 0.7)
    assert store.rounds() == [1, 2]
    assert hook.last_good == (2, 0.7)
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        loop.round(3, model(66.0), 0.3)  # poisoned: 0.4 below round 2
    assert "training resumes from the checkpoint of round 2" in caplog.text
    assert len(events) == 1 and hook.rollbacks == events
    event = events[0]
    assert (event.round, event.model_round, event.restored_round) == (3, 3, 2)
    assert event.restored_digest == digest_arrays(model(2.0)).hex()
    assert store.rounds(bad=True) == [3] and 3 not in store.rounds()
    # Round 4 is sent the good model; it keeps the global model (too few replies), so the
    # loop still holds the poisoned one and round 5 must be sent the good model again.
    sent = loop.round(4, None, 0.3)
    for name, array in model(2.0).items():
        np.testing.assert_array_equal(sent[name], array)
    assert len(events) == 1  # the same poisoned model evaluated again: no new event
    assert hook.global_model_override(5) is not None
    loop.round(5, model(2.5), 0.72)  # aggregated on the restored model
    assert hook.global_model_override(6) is None and hook.last_good == (5, 0.72)
    assert store.rounds() == [2, 5]  # round 2 was still the last good one when 5 was saved
    assert resume_state(tmp_path)[0] == 5


def test_small_drops_and_gains_do_not_roll_back(tmp_path: Path) -> None:
    hook = CheckpointHook(CheckpointStore(tmp_path), max_accuracy_drop=0.2)
    loop = Driver(hook, model(0.0))
    for rnd, accuracy in enumerate((0.5, 0.4, 0.25, 0.9, 0.75), start=1):
        loop.round(rnd, model(rnd), accuracy)
    assert hook.rollbacks == [] and hook.last_good == (5, 0.75)
    assert hook.global_model_override(6) is None


def test_without_max_drop_it_only_checkpoints(tmp_path: Path) -> None:
    hook = CheckpointHook(CheckpointStore(tmp_path, keep_last=None))
    loop = Driver(hook, model(0.0))
    loop.round(1, model(1.0), 0.9)
    loop.round(2, model(2.0), 0.0)
    assert hook.rollbacks == [] and CheckpointStore(tmp_path).rounds() == [0, 1, 2]
    assert CheckpointStore(tmp_path).load(0).metadata["source"] == "initial"


def test_a_directory_of_another_run_is_refused_or_its_initial_model_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(0, model(0.0))
    store.save(1, model(1.0))
    with pytest.raises(CheckpointError, match=r"checkpoints of rounds after 0 \(1\) from another"):
        CheckpointHook(store)
    CheckpointHook(store, round_offset=1)  # resuming from round 1 is fine
    store.path_for(1).unlink()
    hook = CheckpointHook(store)
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        hook.on_instruction(1, "train", model(5.0), {})
    assert "replacing the checkpoint of round 0" in caplog.text
    assert store.metadata(0)["digest"] == digest_arrays(model(5.0)).hex()


def test_rollback_reaches_the_strategy_engine_and_the_audit_log(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    hook = CheckpointHook(
        CheckpointStore(tmp_path / "ckpt"), max_accuracy_drop=0.1,
        on_rollback=[audit.record_rollback],
    )
    engine = RobustAggregation(get_aggregator("fedavg"), hooks=[hook, audit])
    good = model(1.0)
    hook.record_evaluation(0, {"accuracy": 0.5})
    hook.on_instruction(1, "train", model(0.0), {})
    engine.aggregate(1, model(0.0), _replies(good))
    hook.record_evaluation(1, {"accuracy": 0.8})
    engine.aggregate(2, good, _replies(model(9.0)))
    hook.record_evaluation(2, {"accuracy": 0.2})
    override = engine.model_override(3)
    assert override is not None and digest_arrays(override) == digest_arrays(good)
    engine.aggregate(3, override, _replies(model(1.5)))
    assert engine.model_override(4) is None
    result = verify_audit_log(tmp_path / "audit.jsonl")
    assert result.ok and result.rounds == 3, result


def test_resume_state_and_round_offset(tmp_path: Path) -> None:
    assert resume_state(tmp_path / "empty") is None
    store = CheckpointStore(tmp_path, keep_last=None)
    store.save(3, model(3.0))
    store.save(4, model(4.0))
    store.mark_bad(4)
    state = resume_state(tmp_path)
    assert state is not None and state[0] == 3
    np.testing.assert_array_equal(state[1]["bias"], model(3.0)["bias"])
    hook = CheckpointHook(store, round_offset=state[0])
    loop = Driver(hook, state[1])
    loop.round(1, model(5.0), 0.5)  # Flower round 1 = global round 4
    assert store.rounds() == [3, 4] and store.rounds(bad=True) == [4]
    assert store.load(4).metadata["source"] == "aggregated"


def test_cli_lists_and_checks_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, model(1.0))
    store.save(2, model(2.0))
    store.mark_bad(2)
    assert main(["audit", "checkpoints", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert digest_arrays(model(1.0)).hex() in out and "bad" in out
    assert out.strip().endswith("2 checkpoints, 0 invalid")
    store.path_for(1).write_bytes(b"not a zip")
    assert main(["audit", "checkpoints", str(tmp_path)]) == 1
    assert "INVALID" in capsys.readouterr().out
    assert main(["audit", "checkpoints", str(tmp_path / "missing")]) == 2


def _replies(arrays: dict) -> list[ClientReply]:
    return [ClientReply(1, arrays=arrays, num_examples=10)]
