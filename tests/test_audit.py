"""The JSONL audit log: contents, hash chain, lineage, tampering, appending, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flwr_robust.cli import main
from flwr_robust.ops.anomaly import AnomalyDetectionHook
from flwr_robust.ops.audit import (
    GENESIS_HASH,
    AuditError,
    AuditLog,
    canonical_bytes,
    entry_hash,
    verify_audit_log,
)
from flwr_robust.ops.checkpoint import RollbackEvent
from flwr_robust.security.digest import digest_arrays
from flwr_robust.strategy.engine import RoundReport


def model(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, np.float32), "b": np.full(3, value, np.float32)}


def hexdigest(value: float) -> str:
    return digest_arrays(model(value)).hex()


def run_round(log: AuditLog, rnd: int, base: float, new: float | None, **report) -> None:
    log.on_replies(rnd, model(base), [])
    fields = {"kept": [1, 2], "aggregated": new is not None, "num_replies": 3,
              "rejected": {3: "excluded-by-rule: krum: far away"}, "scores": {1: 0.5, 2: 0.7},
              "identities": {1: "key-a", 2: "key-b", 3: "node-3"}, **report}
    log.on_round_end(RoundReport(rnd, "krum", **fields), None if new is None else model(new))


def write_run(path: Path) -> AuditLog:
    """start, round 1, evaluation 1, round 2 (kept), evaluation 2, rollback, round 3."""
    log = AuditLog(path)
    run_round(log, 1, 0.0, 1.0)
    log.record_evaluation(1, {"accuracy": 0.8, "loss": float("nan")})
    run_round(log, 2, 1.0, None, kept=[], note="kept the global model")
    log.record_evaluation(2, {"accuracy": 0.3})
    log.record_rollback(RollbackEvent(2, 0.3, 1, 0, 0.5, hexdigest(0.0), 0.2, "t"))
    run_round(log, 3, 0.0, 3.0)
    return log


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_lines_record_rounds_digests_and_evaluations(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = write_run(path)
    entries = [json.loads(line) for line in lines(path)]
    assert [e["type"] for e in entries] == [
        "start", "round", "evaluation", "round", "evaluation", "rollback", "round"
    ]
    first, kept, last = entries[1], entries[3], entries[6]
    assert first["round"] == 1 and first["rule"] == "krum" and first["status"] == "aggregated"
    assert first["kept"] == [1, 2]
    assert first["rejected"] == {"3": "excluded-by-rule: krum: far away"}
    assert first["scores"] == {"1": 0.5, "2": 0.7} and first["identities"]["1"] == "key-a"
    assert first["base_digest"] == hexdigest(0.0) and first["model_digest"] == hexdigest(1.0)
    assert first["prev_model_digest"] is None
    assert kept["status"] == "kept_global" and kept["model_digest"] == hexdigest(1.0)
    assert kept["prev_model_digest"] == hexdigest(1.0)
    assert entries[2]["metrics"] == {"accuracy": 0.8, "loss": "nan"}
    assert last["base_digest"] == hexdigest(0.0)  # restored by the rollback
    for index, entry in enumerate(entries):
        assert entry["seq"] == index and entry["hash"] == entry_hash(entry)
        assert entry["prev_hash"] == (entries[index - 1]["hash"] if index else GENESIS_HASH)
        assert lines(path)[index] == canonical_bytes(entry) + b"\n"
    result = verify_audit_log(path)
    assert result.ok and result.lines == 7 and result.rounds == 3, result
    assert result.head == log.head == entries[-1]["hash"]


def _edit_reason(data: list[bytes]) -> None:
    data[1] = data[1].replace(b"far away", b"far awaz")


def _edit_digest(data: list[bytes]) -> None:
    digest = hexdigest(1.0).encode()
    data[1] = data[1].replace(digest, digest[:-1] + (b"0" if digest[-1:] != b"0" else b"1"))


def _edit_whitespace(data: list[bytes]) -> None:
    data[3] = data[3].replace(b'"type":', b'"type": ')


def _swap(data: list[bytes]) -> None:
    data[2], data[3] = data[3], data[2]


def _truncate_last(data: list[bytes]) -> None:
    data[-1] = data[-1][:40]


TAMPERING = {
    "byte in a reason": (_edit_reason, 2, "hash does not match"),
    "model digest": (_edit_digest, 2, "hash does not match"),
    "whitespace": (_edit_whitespace, 4, "not in canonical form"),
    "deleted line": (lambda d: d.pop(3), 4, "prev_hash is not the previous line's hash"),
    "deleted first line": (lambda d: d.pop(0), 1, "prev_hash is not the genesis value"),
    "reordered lines": (_swap, 3, "prev_hash is not the previous line's hash"),
    "duplicated line": (lambda d: d.insert(2, d[1]), 3, "prev_hash"),
    "truncated write": (_truncate_last, 7, "incomplete line"),
    "garbage line": (lambda d: d.insert(5, b"{not json\n"), 6, "not valid JSON"),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_any_modification_breaks_the_chain_at_its_line(tmp_path: Path, case: str) -> None:
    path = tmp_path / "audit.jsonl"
    write_run(path)
    edit, bad_line, problem = TAMPERING[case]
    data = lines(path)
    edit(data)
    path.write_bytes(b"".join(data))
    result = verify_audit_log(path)
    assert not result.ok and result.bad_line == bad_line, result
    assert problem in result.problem
    assert f"BROKEN at line {bad_line} of" in result.summary()


def test_lineage_rejects_a_model_from_nowhere(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    run_round(log, 1, 0.0, 1.0)
    run_round(log, 2, 7.0, 8.0)  # starts from a model no line produced or restored
    result = verify_audit_log(path)
    assert not result.ok and result.bad_line == 3
    assert "lineage: round 2 started from model" in result.problem


def test_appending_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = write_run(path)
    second = AuditLog(path, round_offset=3)
    run_round(second, 1, 3.0, 4.0)  # Flower round 1 of the resumed run = global round 4
    entries = [json.loads(line) for line in lines(path)]
    assert entries[7]["type"] == "start" and entries[7]["prev_hash"] == first.head
    assert entries[7]["round_offset"] == 3
    assert entries[8]["round"] == 4 and entries[8]["prev_model_digest"] == hexdigest(3.0)
    result = verify_audit_log(path)
    assert result.ok and result.lines == 9 and result.rounds == 4


def test_a_broken_log_is_not_continued(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_run(path)
    data = lines(path)
    _edit_reason(data)
    path.write_bytes(b"".join(data))
    with pytest.raises(AuditError, match="BROKEN at line 2"):
        AuditLog(path)


def test_anomaly_flags_of_the_round_are_recorded(tmp_path: Path) -> None:
    detector = AnomalyDetectionHook("flag")
    detector.last_round, detector.flags = 1, {3: ("anomaly-norm: big",)}
    log = AuditLog(tmp_path / "a.jsonl", anomaly=detector)
    run_round(log, 1, 0.0, 1.0)
    entry = json.loads(lines(tmp_path / "a.jsonl")[1])
    assert entry["anomaly_flags"] == {"3": ["anomaly-norm: big"]}


def test_cli_verify_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    log = write_run(path)
    assert main(["audit", "verify", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: ok: 7 lines, 3 rounds, head {log.head}"
    assert main(["audit", "verify", str(path), "--head", log.head]) == 0
    data = lines(path)
    path.write_bytes(b"".join(data[:-1]))  # cut the last line: the chain alone cannot tell
    assert main(["audit", "verify", str(path)]) == 0
    assert main(["audit", "verify", str(path), "--head", log.head]) == 1
    assert "cut from or added to the end" in capsys.readouterr().out
    _swap(data)
    path.write_bytes(b"".join(data))
    assert main(["audit", "verify", str(path)]) == 1
    assert "BROKEN at line 3 of 7" in capsys.readouterr().out
    assert main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == 2
    assert "No such file" in capsys.readouterr().err
    assert main(["audit", "verify"]) == 2  # usage error
