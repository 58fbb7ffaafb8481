"""The smoke grid (configs/smoke.toml: fedavg, median, median on the legacy API x scale,
backdoor; 5 clients, 2 rounds) through the real runner and Flower's simulation engine, then
the report and a resume."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from flwr_robust.cli import main as cli_main

pytestmark = pytest.mark.integration

SMOKE = Path(__file__).resolve().parent.parent / "configs" / "smoke.toml"
CELLS = {
    f"{defence}--{attack}--f0.2--iid--s0": (defence, attack)
    for attack in ("scale", "backdoor") for defence in ("fedavg", "median", "median-legacy")
}


def test_smoke_grid_runs_reports_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "smoke"
    assert cli_main(["experiment", str(SMOKE), "--output", str(out)]) == 0, capsys.readouterr()
    assert "ran 6 cells (0 failed)" in capsys.readouterr().out

    with (out / "rounds.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 6 * 3
    assert {r["cell"] for r in rows} == set(CELLS)
    for cell in CELLS:
        assert [r["round"] for r in rows if r["cell"] == cell] == ["0", "1", "2"]
    for row in rows:
        assert row["n_byzantine"] == "1" and row["partitioner"] == "iid"
        assert (row["attack_success_rate"] != "") == (row["attack"] == "backdoor")
        if row["round"] != "0":
            assert row["aggregated"] == "True" and int(row["n_kept"]) >= 1
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 18

    runs = {r["cell"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert set(runs) == set(CELLS) and all(r["ok"] for r in runs.values())
    # one Byzantine client of 5 boosting its update tenfold: the median holds, FedAvg does not
    assert runs["median--scale--f0.2--iid--s0"]["final_accuracy"] > 0.7
    # the legacy-API cell ran the legacy strategy in the same batch and trained as well
    assert runs["median-legacy--scale--f0.2--iid--s0"]["final_accuracy"] > 0.7
    assert (runs["fedavg--scale--f0.2--iid--s0"]["final_accuracy"]
            < runs["median--scale--f0.2--iid--s0"]["final_accuracy"])

    for name in ("final_accuracy_iid", "asr_backdoor", "accuracy_scale_iid",
                 "accuracy_backdoor_iid"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    summary = (out / "summary.md").read_text()
    assert "6 runs finished, 0 failed, 0 not run yet (of 6 cells)" in summary
    assert "| defence | scale | backdoor |" in summary
    details = [line for line in summary.splitlines()
               if line.startswith(("| fedavg | ", "| median")) and line.count("|") == 9]
    assert [tuple(line.split(" | ")[:2]) for line in details] == [
        ("| fedavg", "scale"), ("| median", "scale"), ("| median-legacy", "scale"),
        ("| fedavg", "backdoor"), ("| median", "backdoor"), ("| median-legacy", "backdoor"),
    ]
    for line in details:
        cell = f"{line.split(' | ')[0][2:]}--{line.split(' | ')[1]}--f0.2--iid--s0"
        assert f"| {runs[cell]['final_accuracy']:.3f} |" in line

    start = time.monotonic()  # a second invocation finds every cell finished
    assert cli_main(["experiment", str(SMOKE), "--output", str(out)]) == 0
    assert "ran 0 cells (0 failed), skipped 6 finished" in capsys.readouterr().out
    assert time.monotonic() - start < 60
