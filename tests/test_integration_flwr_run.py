"""End to end through Flower's real simulation engine (`flwr run`), both strategy APIs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flwr_robust.cli import main as cli_main
from flwr_robust.runtime.launch import flwr_run

pytestmark = pytest.mark.integration


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("api", "strategy", "extra"),
    [
        ("message", "krum", {"num-malicious": 1}),
        ("legacy", "trimmed_mean", {"num-malicious": 1}),
        # issue 13's rules and attacks, one client of five attacking
        ("legacy", "fltrust", {"attack": "fang_trim", "attack-omniscient": True,
                               "byzantine-fraction": 0.2}),
        ("message", "dnc", {"num-malicious": 1, "attack": "min_max", "byzantine-fraction": 0.2}),
    ],
)
def test_flwr_run_trains_and_logs_accuracy(
    tmp_path: Path, api: str, strategy: str, extra: dict
) -> None:
    results = tmp_path / "rounds.jsonl"
    outcome = flwr_run(
        {
            "api": api,
            "strategy": strategy,
            "num-server-rounds": 2,
            "results-file": str(results),
            **extra,
        },
        flwr_home=tmp_path / "flwr-home",
        num_supernodes=5,
        timeout=600,
    )
    assert outcome.ok, (outcome.status, outcome.status_details, outcome.output[-3000:])
    for rnd in (0, 1, 2):
        assert f"round {rnd}: accuracy=" in outcome.output
    records = read_jsonl(results)
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records:
        assert {"round", "accuracy", "loss", "kept", "rejected"} <= set(record)
    for record in records[1:]:
        assert record["rule"] == strategy and record["aggregated"]
        assert len(record["kept"]) + len(record["rejected"]) == 5
        if strategy == "krum":
            assert len(record["kept"]) == 1
            assert all(v.startswith("excluded-by-rule: krum") for v in record["rejected"].values())
    assert records[-1]["accuracy"] > records[0]["accuracy"] + 0.2, records


@pytest.mark.parametrize("api", ["message", "legacy"])
def test_flwr_run_with_signing_rejects_tampering_and_rogue_keys(tmp_path: Path, api: str) -> None:
    keys = tmp_path / "keys"
    assert cli_main(["keys", "init", str(keys), "--clients", "6"]) == 0
    results = tmp_path / "rounds.jsonl"
    outcome = flwr_run(
        {
            "api": api,
            "strategy": "median",
            "num-server-rounds": 2,
            "signing": True,
            "keys-dir": str(keys),
            "integrity-faults": "tamper-model@2,tamper-update@4,rogue-key@5",
            "results-file": str(results),
        },
        flwr_home=tmp_path / "flwr-home",
        num_supernodes=6,
        timeout=600,
    )
    assert outcome.ok, (outcome.status, outcome.status_details, outcome.output[-3000:])
    records = read_jsonl(results)
    for record in records[1:]:
        by_partition = {p: int(n) for n, p in record["partitions"].items()}
        rejected = {int(n): why for n, why in record["rejected"].items()}
        assert sorted(record["kept"]) == sorted(by_partition[p] for p in (0, 1, 3))
        assert rejected[by_partition[2]].startswith("error-reply") and "refused: bad-signature" in (
            rejected[by_partition[2]]
        )
        assert rejected[by_partition[4]].startswith("bad-signature:")
        assert rejected[by_partition[5]].startswith("unknown-key:")
        assert all(v.startswith("key:") for n, v in record["identities"].items()
                   if int(n) in record["kept"])
    assert records[-1]["accuracy"] > records[0]["accuracy"] + 0.2


USER_APP = Path(__file__).parent / "user_app"


def test_a_users_own_server_app_shows_the_robust_log_lines(tmp_path: Path) -> None:
    """A Flower quickstart with only the strategy import changed: under `flwr run` the
    raised minimum, the robust summary and one line per round reach Flower's output, with
    no set-up call in the app."""
    outcome = flwr_run(
        {}, flwr_home=tmp_path / "flwr-home", num_supernodes=5, app_dir=USER_APP,
        app_files=("pyproject.toml", "quickstart_app.py"), timeout=600,
    )
    assert outcome.ok, (outcome.status, outcome.status_details, outcome.output[-3000:])
    out = outcome.output
    assert "Krum(num_malicious=1) needs at least 5 replies per round" in out, out[-3000:]
    assert "Robust aggregation: Krum(num_malicious=1)" in out
    for rnd in (1, 2):
        assert f"round {rnd}: krum kept 1 of 5 replies; rejected 4 (excluded-by-rule 4)" in out
    assert "rejected node" not in out  # per-node reasons stay at DEBUG
