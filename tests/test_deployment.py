"""Flower's deployment runtime as real processes on 127.0.0.1 (``flwr_robust.runtime.deploy``).

One deployment serves the first four tests: a SuperLink and four SuperNodes, signing on,
two rounds through ``flwr run``. Partitions 0 and 1 are honest, partition 2 is Byzantine
(``scale``: its update times 10) and partition 3 is honest but the model it receives is
altered on the way (run config ``integrity-faults = "tamper-model@3"``), so it must refuse
it. Three valid updates remain per round: Krum's guarantee needs n > 2f + 2 (five updates
for f = 1), so the rule is Multi-Krum with f = 0 selecting the m = 2 most central updates,
which must be the honest ones.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from flwr_robust.cli import main as cli_main
from flwr_robust.runtime.deploy import (
    STATE_FILE,
    LocalDeployment,
    NodeSpec,
    process_alive,
    tagged_processes,
)
from flwr_robust.runtime.launch import RunOutcome

pytestmark = pytest.mark.deployment

HONEST, BYZANTINE, TAMPERED = (0, 1), 2, 3
ROUNDS = 2


@dataclass
class Finished:
    """A deployment that ran once and was stopped."""

    deployment: LocalDeployment
    outcome: RunOutcome
    records: list[dict]
    seconds: float

    def node(self, record: dict, partition: int) -> int:
        """The node id serving ``partition`` (from the server's roster)."""
        return next(int(n) for n, p in record["partitions"].items() if p == partition)


def leftovers(deployment: LocalDeployment) -> list[int]:
    """Processes of ``deployment`` still alive: every one it ever saw, and any process
    that carries its environment tag."""
    seen = [pid for pid, start in deployment.seen.items() if process_alive(pid, start)]
    return sorted(set(seen) | set(tagged_processes(deployment.tag)))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    run_dir = tmp_path_factory.mktemp("deployment")
    nodes = [NodeSpec(0), NodeSpec(1), NodeSpec(BYZANTINE, "byzantine", "scale"), NodeSpec(3)]
    deployment = LocalDeployment(run_dir, nodes, signing=True)
    results = run_dir / "rounds.jsonl"
    started = time.monotonic()
    with deployment:
        outcome = deployment.run(
            {
                "strategy": "multi_krum",
                "num-malicious": 0,
                "num-selected": 2,
                "num-server-rounds": ROUNDS,
                "local-epochs": 1,
                "integrity-faults": f"tamper-model@{TAMPERED}",
                "results-file": str(results),
            },
            timeout=420,
        )
    seconds = time.monotonic() - started
    lines = results.read_text().splitlines() if results.exists() else []
    records = [json.loads(line) for line in lines]
    return Finished(deployment, outcome, records, seconds)


def test_run_completes_through_flwr_run(finished: Finished) -> None:
    outcome = finished.outcome
    assert outcome.ok, (outcome.status, outcome.status_details, outcome.output[-3000:])
    assert [r["round"] for r in finished.records] == list(range(ROUNDS + 1))
    for rnd in range(ROUNDS + 1):
        assert f"round {rnd}: accuracy=" in outcome.output
    assert finished.records[-1]["accuracy"] > finished.records[0]["accuracy"] + 0.2
    print(f"deployment: started, ran {ROUNDS} rounds and stopped in {finished.seconds:.0f} s")


def test_byzantine_update_excluded_and_honest_kept_every_round(finished: Finished) -> None:
    assert finished.outcome.ok, finished.outcome.status_details
    for record in finished.records[1:]:
        rnd, byzantine = record["round"], finished.node(record, BYZANTINE)
        honest = sorted(finished.node(record, p) for p in HONEST)
        assert sorted(record["kept"]) == honest, record
        assert record["rejected"][str(byzantine)].startswith("excluded-by-rule: multi_krum")
        # one INFO line per round under `flwr run`; the per-node reasons are at DEBUG
        summary = (
            f"round {rnd}: multi_krum kept 2 of 4 replies; "
            "rejected 2 (error-reply 1, excluded-by-rule 1)"
        )
        assert summary in finished.outcome.output
        assert f"rejected node {byzantine}" not in finished.outcome.output
        # signing was on: every kept update carried a valid signature of a trusted key
        assert all(record["identities"][str(n)].startswith("key:") for n in honest)
        assert record["byzantine"] == [byzantine] and record["recall"] == 1.0


def test_node_refuses_a_tampered_model_and_the_server_records_it(finished: Finished) -> None:
    assert finished.outcome.ok, finished.outcome.status_details
    for record in finished.records[1:]:
        tampered = finished.node(record, TAMPERED)
        reason = record["rejected"][str(tampered)]
        assert reason.startswith("error-reply") and "refused: bad-signature" in reason, reason
        assert tampered not in record["kept"]
    node_log = (finished.deployment.logs_dir / f"supernode-{TAMPERED}.log").read_text()
    assert node_log.count("refused the instruction: bad-signature") == ROUNDS
    for partition in (*HONEST, BYZANTINE):
        log = (finished.deployment.logs_dir / f"supernode-{partition}.log").read_text()
        assert "refused the instruction" not in log


def test_every_process_is_stopped(finished: Finished) -> None:
    deployment = finished.deployment
    assert leftovers(deployment) == []
    # besides the SuperLink and the SuperNodes it started, it saw the SuperExecs, the
    # ServerApp and ClientApp processes they spawned, and stopped those too
    assert len(deployment.seen) > len(deployment.processes) + len(deployment.nodes)
    assert not (deployment.run_dir / STATE_FILE).exists()


def test_processes_are_stopped_when_the_body_raises(tmp_path: Path) -> None:
    deployment = LocalDeployment(tmp_path / "run", [NodeSpec(0)])
    with pytest.raises(KeyboardInterrupt), deployment:
        assert deployment.online_nodes() == 1
        assert deployment.running
        raise KeyboardInterrupt
    assert len(deployment.seen) >= 4  # SuperLink, SuperNode and their SuperExecs
    assert leftovers(deployment) == []


def test_up_and_down_from_the_command_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["deploy", "up", "--nodes", "2", "--byzantine", "1", "--attack", "sign_flip"]
    assert cli_main([*args, "--dir", str(run_dir)]) == 0
    deployment = LocalDeployment.attach(run_dir)
    try:
        assert deployment.running and deployment.online_nodes() == 2
        assert deployment.nodes[1] == NodeSpec(1, "byzantine", "sign_flip")
        command = (deployment.logs_dir / "supernode-1.log").read_text().splitlines()[0]
        node_config = shlex.split(command.removeprefix("$ "))[-1]
        assert node_config == "partition-id=1 num-partitions=2 role='byzantine' attack='sign_flip'"
        assert cli_main(["deploy", "down", "--dir", str(run_dir)]) == 0
    finally:
        deployment.stop()
    assert not deployment.running
    assert tagged_processes(deployment.tag) == {}
    assert not (run_dir / STATE_FILE).exists()
