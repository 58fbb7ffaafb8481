"""Experiment grids: config validation, grid expansion, resumable runner, tables and report
(with a fake ``flwr_run``; the real engine runs in test_experiments_integration.py)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from flwr_robust.cli import main as cli_main
from flwr_robust.experiments import grid, report, runner
from flwr_robust.experiments.grid import ConfigError, parse_config
from flwr_robust.runtime.launch import RunOutcome

BASE = """
[experiment]
name = "unit"
output = "out"
clients = 10
rounds = 2
seeds = [0, 1]
fractions = [0.1, 0.2]
partitionings = ["iid", "dirichlet-0.5"]

[run-config]
local-epochs = 1

[defences.fedavg]
strategy = "fedavg"

[defences.krum]
strategy = "krum"
num-malicious = "auto"

[defences.rfout-robust]
strategy = "rfout_1d"
variant = "robust"

[attacks.none]

[attacks.scale]
attack = "scale"
scale-factor = 5.0

[attacks.backdoor]
attack = "backdoor"
backdoor-target = 3
"""


def base() -> dict[str, Any]:
    return tomllib.loads(BASE)


def config(**experiment: Any) -> grid.ExperimentConfig:
    raw = base()
    raw["experiment"].update(experiment)
    return parse_config(raw)


# ------------------------------------------------------------------------------ validation
def _set(raw: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split("/")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("defences/krum/strategy", "no_such_rule", r"\[defences.krum\].*unknown aggregator"),
        ("attacks/scale/attack", "no_such_attack", r"\[attacks.scale\].*unknown attack"),
        ("run-config/not-a-key", 1, r"\[run-config\].*'not-a-key' is not a run-config key"),
        ("defences/krum/not-a-key", 1, r"\[defences.krum\].*'not-a-key' is not a run-config"),
        ("defences/krum/variant", "robust", (r"\[defences.krum\]: 'variant' is not a parameter of "
                                            r"rule 'krum' \(those are: num-malicious\)")),
        ("attacks/scale/backdoor-target", 1, (r"\[attacks.scale\]: 'backdoor-target' is not a "
                                             r"parameter of attack 'scale'")),
        ("attacks/scale/num-malicious", 1, (r"\[attacks.scale\]: 'num-malicious' is not a "
                                            r"parameter of an attack")),
        ("defences/krum/scale-factor", 1.0, (r"\[defences.krum\]: 'scale-factor' is not a "
                                             r"parameter of a defence")),
        ("defences/krum/attack", "scale", r"\[defences.krum\]: 'attack' belongs in an"),
        ("attacks/scale/strategy", "krum", r"\[attacks.scale\]: 'strategy' belongs in a"),
        ("defences/krum/pre-aggregation", "nope", r"\[defences.krum\].*unknown pre-aggregation"),
        ("defences/krum/bucket-size", 2, r"\[defences.krum\]: 'bucket-size' is not a param"),
        ("defences/krum/num-malicious", "two", r"\[defences.krum\].*'num-malicious' must be int"),
        ("defences/rfout-robust/variant", "auto", r"\[defences.rfout-robust\].*only allowed"),
        ("defences/rfout-robust/variant", "sideways", r"\[defences.rfout-robust\].*variant"),
        ("attacks/scale/scale-factor", -1.0, r"\[attacks.scale\].*scale_factor"),
        ("attacks/scale/scale-factor", [1.0], r"\[attacks.scale\].*must be a scalar"),
        ("attacks/none/scale-factor", 2.0, r"\[attacks.none\] has no 'attack'.*scale-factor"),
        ("run-config/seed", 3, r"\[run-config\].*set by the grid"),
        ("run-config/local-epochs", 0, r"\[run-config\]: run config 'local-epochs' must be >= 1"),
        ("run-config/learning-rate", "fast", r"\[run-config\]: .*'learning-rate' must be float"),
        ("defences/krum/byzantine-fraction", 0.1, r"\[defences.krum\].*set by the grid"),
        ("experiment/clients", "10", r"\[experiment\] clients must be int"),
        ("experiment/colour", "red", r"\[experiment\]: unknown key"),
        ("experiment/fractions", [0.2, 1.5], r"fractions: 1.5 is not in \(0, 1\)"),
        ("experiment/fractions", [0.01], r"0.01 of 10 clients is 0 Byzantine"),
        ("experiment/fractions", [0.2, 0.2], r"fractions has duplicates"),
        ("experiment/seeds", [], r"seeds must not be empty"),
        ("experiment/partitionings", ["dirichlet-x"], r"'dirichlet-x' is not 'iid'"),
        ("experiment/partitionings", ["pathological"], r"'pathological' is not 'iid'"),
        ("experiment/name", "a/b", r"name 'a/b' must be"),
        ("defences/krum/fractions", [0.3], r"\[defences.krum\] fractions: \[0.3\] not in"),
        ("defences/krum", "krum", r"\[defences\] entry 'krum' must be a table"),
        ("extra", {}, r"unknown top-level table"),
    ],
)
def test_invalid_configs_name_the_offending_entry(path: str, value: Any, message: str) -> None:
    raw = base()
    _set(raw, path, value)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_rule_preconditions_are_checked_for_every_fraction_before_running() -> None:
    raw = base()
    raw["experiment"]["fractions"] = [0.2, 0.4]  # krum with f = 4 needs n > 10
    with pytest.raises(ConfigError, match=r"\[defences.krum\] x \[attacks.none\] \(clean "
                                          r"baseline\): krum with num_malicious=4.*Krum needs"):
        parse_config(raw)
    del raw["attacks"]["none"]
    with pytest.raises(ConfigError, match=r"\[defences.krum\] x \[attacks.scale\] at Byzantine "
                                          r"fraction 0.4 \(4 of 10 clients\).*Krum needs"):
        parse_config(raw)
    raw["defences"]["krum"]["fractions"] = [0.2]  # restricting the defence resolves it
    cells = parse_config(raw).cells()
    assert not [c for c in cells if c.defence == "krum" and c.fraction == 0.4]
    assert [c for c in cells if c.defence == "fedavg" and c.fraction == 0.4]


def test_pre_aggregation_stage_parameters_are_accepted_with_their_stage() -> None:
    raw = base()
    raw["defences"]["fedavg"].update({"pre-aggregation": "bucketing", "bucket-size": 2})
    cell = parse_config(raw).cell("fedavg", "scale", 0.2, "iid", None, 0)
    assert cell.run_config["pre-aggregation"] == "bucketing"
    assert type(grid.build_rule(cell.run_config)).__name__ == "PreAggregated"


def test_missing_tables_and_keys() -> None:
    raw = base()
    del raw["defences"]
    with pytest.raises(ConfigError, match=r"at least one \[defences.<name>\]"):
        parse_config(raw)
    raw = base()
    del raw["experiment"]["rounds"]
    with pytest.raises(ConfigError, match=r"\[experiment\] lacks rounds"):
        parse_config(raw)


def test_attack_and_defence_may_not_set_the_same_key() -> None:
    raw = base()
    raw["defences"]["fedavg"]["max-num-examples"] = 100
    raw["attacks"]["scale"]["max-num-examples"] = 200
    with pytest.raises(ConfigError, match=r"\[attacks.scale\] sets \['max-num-examples'\]"):
        parse_config(raw)


def test_load_config_reports_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[experiment\nname = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        grid.load_config(path)


def test_declared_keys_come_from_pyproject() -> None:
    keys = grid.declared_keys()
    assert {"strategy", "num-malicious", "scale-factor", "results-file"} <= keys
    assert "not-a-key" not in keys


def test_presets_are_valid() -> None:
    root = Path(__file__).resolve().parent.parent / "configs"
    quick = grid.load_config(root / "quick.toml")
    assert quick.clients == 20 and quick.fractions == (0.2,)
    assert {p for p, _ in quick.partitionings} == {"iid", "dirichlet"}
    assert grid.load_config(root / "smoke.toml").cells()
    assert len(grid.load_config(root / "full.toml").cells()) > len(quick.cells())


# ------------------------------------------------------------------------------- expansion
def test_grid_expansion_counts_and_clean_baseline() -> None:
    cfg = config()
    cells = cfg.cells()
    # seeds x partitionings x (clean: defences + attacks x fractions x defences)
    assert len(cells) == 2 * 2 * (3 + 2 * 2 * 3)
    assert len({c.cell_id for c in cells}) == len(cells)
    clean = [c for c in cells if c.attack == "none"]
    assert len(clean) == 2 * 2 * 3
    for cell in clean:
        assert cell.fraction == 0.0 and cell.num_byzantine == 0
        assert "attack" not in cell.run_config and "byzantine-fraction" not in cell.run_config
    attacked = [c for c in cells if c.attack != "none"]
    assert {c.fraction for c in attacked} == {0.1, 0.2}
    for cell in attacked:
        assert cell.run_config["byzantine-fraction"] == cell.fraction
        assert cell.run_config["attack"] == cell.attack
    first = cells[0]
    assert first.seed == 0 and first.cell_id == "fedavg--none--f0--iid--s0"
    assert cells[-1].seed == 1  # seeds outermost: one full pass of the grid per seed


def test_cell_run_config_merges_all_layers() -> None:
    cell = config().cell("krum", "backdoor", 0.2, "dirichlet", 0.5, 1)
    assert cell.run_config == {
        "local-epochs": 1, "strategy": "krum", "num-malicious": 2, "attack": "backdoor",
        "backdoor-target": 3, "num-server-rounds": 2, "partitioner": "dirichlet",
        "dirichlet-alpha": 0.5, "seed": 1, "byzantine-fraction": 0.2,
    }
    assert cell.cell_id == "krum--backdoor--f0.2--dirichlet-0.5--s1"
    assert cell.num_byzantine == 2


def test_auto_num_malicious_follows_the_cell() -> None:
    cells = config(clients=20, fractions=[0.1, 0.3]).cells()
    krum = {(c.attack, c.fraction): c.run_config["num-malicious"]
            for c in cells if c.defence == "krum"}
    assert krum[("scale", 0.1)] == 2 and krum[("scale", 0.3)] == 6
    assert krum[("none", 0.0)] == 6  # clean baseline: the largest fraction the defence runs at
    assert all("num-malicious" not in c.run_config for c in cells if c.defence == "fedavg")


def test_auto_num_malicious_with_client_sampling_is_the_expected_count_per_round() -> None:
    raw = base()
    raw["experiment"].update(clients=50, fractions=[0.2])
    raw["run-config"]["fraction-train"] = 0.4  # 20 of 50 clients per round, 10 Byzantine
    cfg = parse_config(raw)
    krum = {c.attack: c.run_config["num-malicious"] for c in cfg.cells() if c.defence == "krum"}
    assert set(krum.values()) == {4} and cfg.sampled_clients("krum") == 20
    # the precondition is checked for the sampled round: Krum with f=4 needs n > 2f+2 = 10
    raw["experiment"]["clients"] = 25  # 10 per round, f = round(5 * 10 / 25) = 2
    raw["experiment"]["fractions"] = [0.44]  # 11 Byzantine -> 4 per round: 10 <= 2*4+2
    with pytest.raises(grid.ConfigError, match="with 10 clients sampled per round"):
        parse_config(raw)


def test_byzantine_count_matches_the_client_app() -> None:
    assert grid.byzantine_count(0.2, 20) == 4
    assert grid.byzantine_count(0.1, 5) == round(0.5)  # Python's rounding, as the ClientApp


# ---------------------------------------------------------------------------------- runner
class FakeRun:
    """Stands in for ``flwr_run``: writes plausible per-round records to the results file."""

    def __init__(self, fail: set[str] = frozenset(), short: set[str] = frozenset()) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail, self.short = fail, short

    def __call__(self, run_config: dict[str, Any], **kwargs: Any) -> RunOutcome:
        assert kwargs["num_supernodes"] == 10 and kwargs["flwr_home"].name == "flwr-home"
        if "experiment-cells" not in run_config:
            return self.run_one(run_config, **kwargs)
        # A batch: the ServerApp runs the cells back to back; a failing cell stops short
        # (round 0 only) and the run ends failed, the other cells' results stand.
        outcomes = [self.run_one(cell, partial_on_fail=True, **kwargs)
                    for cell in json.loads(run_config["experiment-cells"])]
        failed = [o for o in outcomes if not o.ok]
        if failed:
            return RunOutcome(0, "boom", 7, "finished:failed", f"{len(failed)} cells failed")
        return RunOutcome(0, "fine", 7, "finished:completed", "")

    def run_one(self, run_config: dict[str, Any], partial_on_fail: bool = False,
                **kwargs: Any) -> RunOutcome:
        self.calls.append({**run_config, **kwargs})
        key = f"{run_config['strategy']}/{run_config.get('attack', '')}"
        rounds = run_config["num-server-rounds"] - (key in self.short)
        if partial_on_fail and key in self.fail:
            rounds = 0
        path = Path(run_config["results-file"])
        assert path.is_absolute()
        with path.open("a") as stream:
            for rnd in range(rounds + 1):
                record = {
                    "round": rnd, "accuracy": 0.1 + 0.3 * rnd, "loss": 2.0 - rnd,
                    "attack_success_rate": 0.5 if run_config.get("attack") == "backdoor"
                    else None,
                    "precision": 1.0 if rnd else None, "recall": 0.5 if rnd else None,
                    "kept": [1, 2, 3][: rnd + 1], "rejected": {"9": "outlier"} if rnd else {},
                }
                if rnd:
                    record["aggregated"] = True
                stream.write(json.dumps(record) + "\n")
        if key in self.fail:
            return RunOutcome(0, "boom", 7, "finished:failed", "ServerApp raised")
        return RunOutcome(0, "fine", 7, "finished:completed", "")


def small_config() -> grid.ExperimentConfig:
    raw = base()
    raw["experiment"].update(seeds=[0], fractions=[0.2], partitionings=["iid"])
    del raw["defences"]["rfout-robust"], raw["attacks"]["none"]
    return parse_config(raw)


def test_runner_runs_every_cell_and_writes_tables(tmp_path: Path) -> None:
    cfg, fake = small_config(), FakeRun()
    progress = runner.run_grid(cfg, tmp_path, run=fake, progress=False)
    assert (progress.total, progress.ran, progress.failed, progress.remaining) == (4, 4, 0, 0)
    assert len(fake.calls) == 4
    for cell in cfg.cells():
        directory = runner.cell_dir(tmp_path, cell)
        assert (directory / "done.json").exists() and (directory / "flwr.log").read_text()
        assert not (directory / "flwr-home").exists()  # removed after a successful run
    with (tmp_path / "rounds.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 4 * 3 and tuple(rows[0]) == runner.ROUND_COLUMNS
    assert rows[0]["cell"] == "fedavg--scale--f0.2--iid--s0" and rows[0]["alpha"] == ""
    assert [r["round"] for r in rows[:3]] == ["0", "1", "2"]
    assert rows[2]["n_kept"] == "3" and rows[2]["n_rejected"] == "1"
    jsonl = report.read_jsonl(tmp_path / "rounds.jsonl")
    assert len(jsonl) == 12 and jsonl[0]["aggregated"] is None and jsonl[1]["aggregated"]
    runs = report.read_jsonl(tmp_path / "runs.jsonl")
    assert [r["ok"] for r in runs] == [True] * 4
    assert runs[0]["final_accuracy"] == pytest.approx(0.7)
    assert runs[0]["mean_precision"] == 1.0 and runs[0]["final_asr"] is None
    assert runs[2]["attack"] == "backdoor" and runs[2]["final_asr"] == 0.5
    assert json.loads((tmp_path / "experiment.json").read_text())["cells"] == 4


def test_finished_cells_are_skipped_and_broken_ones_rerun(tmp_path: Path) -> None:
    cfg = small_config()
    runner.run_grid(cfg, tmp_path, run=FakeRun(), progress=False)
    again = FakeRun()
    progress = runner.run_grid(cfg, tmp_path, run=again, progress=False)
    assert again.calls == [] and progress.skipped == 4
    cells = cfg.cells()
    (runner.cell_dir(tmp_path, cells[0]) / "done.json").unlink()  # interrupted before marker
    partial = runner.cell_dir(tmp_path, cells[1]) / "results.jsonl"
    partial.write_text("\n".join(partial.read_text().splitlines()[:2]) + "\n")  # truncated
    third = FakeRun()
    runner.run_grid(cfg, tmp_path, run=third, progress=False)
    assert [c["results-file"] for c in third.calls] == [
        str(runner.cell_dir(tmp_path, c).resolve() / "results.jsonl") for c in cells[:2]
    ]
    # a rerun starts from an empty results file (the ServerApp appends)
    assert len(report.read_jsonl(partial)) == 3
    assert len(report.read_jsonl(tmp_path / "rounds.jsonl")) == 12


def test_failed_cells_are_recorded_and_the_grid_continues(tmp_path: Path) -> None:
    cfg = small_config()
    fake = FakeRun(fail={"krum/scale"}, short={"fedavg/backdoor"})
    progress = runner.run_grid(cfg, tmp_path, run=fake, progress=False)
    assert len(fake.calls) == 4 and progress.failed == 2 and progress.remaining == 2
    runs = {r["cell"]: r for r in report.read_jsonl(tmp_path / "runs.jsonl")}
    failed = runs["krum--scale--f0.2--iid--s0"]
    assert not failed["ok"] and failed["status"] == "finished:failed"
    assert "1 cells failed" in failed["details"] and failed["log"].endswith("flwr.log")
    short = runs["fedavg--backdoor--f0.2--iid--s0"]
    assert not short["ok"] and "expected 0..2" in short["details"]
    assert len(report.read_jsonl(tmp_path / "rounds.jsonl")) == 2 * 3  # finished cells only
    retry = FakeRun()
    runner.run_grid(cfg, tmp_path, run=retry, progress=False)
    assert sorted(c["strategy"] + "/" + c["attack"] for c in retry.calls) == [
        "fedavg/backdoor", "krum/scale"]
    assert all(r["ok"] for r in report.read_jsonl(tmp_path / "runs.jsonl"))


def test_max_cells_and_filters(tmp_path: Path) -> None:
    cfg = small_config()
    fake = FakeRun()
    progress = runner.run_grid(cfg, tmp_path, run=fake, max_cells=1, progress=False)
    assert len(fake.calls) == 1 and progress.remaining == 3
    fake = FakeRun()
    runner.run_grid(cfg, tmp_path, run=fake, attacks=["backdoor"], defences=["krum"],
                    progress=False)
    assert [(c["strategy"], c["attack"]) for c in fake.calls] == [("krum", "backdoor")]
    assert len(report.read_jsonl(tmp_path / "runs.jsonl")) == 2


# ---------------------------------------------------------------------------------- report
def synthetic_rows() -> list[dict[str, Any]]:
    """Two seeds of fedavg/krum x none/scale/backdoor on iid and dirichlet-0.5, 2 rounds."""
    final = {  # (defence, attack) -> final accuracy per seed
        ("fedavg", "none"): (0.9, 0.8), ("krum", "none"): (0.85, 0.85),
        ("fedavg", "scale"): (0.1, 0.1), ("krum", "scale"): (0.8, 0.6),
        ("fedavg", "backdoor"): (0.88, 0.86), ("krum", "backdoor"): (0.8, 0.84),
    }
    rows = []
    for partitioner, alpha in (("iid", None), ("dirichlet", 0.5)):
        for (defence, attack), accuracies in final.items():
            fraction = 0.0 if attack == "none" else 0.2
            for seed, accuracy in enumerate(accuracies):
                cell = grid.Cell(defence, attack, fraction, 2 if fraction else 0, partitioner,
                                 alpha, seed, {})
                for rnd in range(3):
                    detect = defence == "krum" and attack != "none" and rnd > 0
                    rows.append({
                        **cell.labels(), "round": rnd,
                        "accuracy": 0.1 + (accuracy - 0.1) * rnd / 2, "loss": 1.0,
                        "attack_success_rate": (0.9 if defence == "fedavg" else 0.1 * seed)
                        if attack == "backdoor" else None,
                        "precision": 0.5 if detect else None,
                        "recall": 1.0 if detect else None,
                        "n_kept": 3, "n_rejected": 1, "aggregated": rnd > 0,
                    })
    return rows


def test_run_metrics() -> None:
    rows = [r for r in synthetic_rows() if r["cell"] == "krum--scale--f0.2--iid--s1"]
    metrics = report.run_metrics(list(reversed(rows)))
    assert metrics["final_accuracy"] == pytest.approx(0.6) and metrics["rounds"] == 2
    assert metrics["mean_precision"] == 0.5 and metrics["final_asr"] is None
    assert report.run_metrics([])["final_accuracy"] is None


def test_report_from_synthetic_rows(tmp_path: Path) -> None:
    runner.write_jsonl(tmp_path / "rounds.jsonl", synthetic_rows())
    failed = {"cell": "median--scale--f0.2--iid--s0", "ok": False, "status": "finished:failed",
              "details": "ServerApp | raised", "seconds": 12.0, "log": "cells/x/flwr.log"}
    runner.write_jsonl(tmp_path / "runs.jsonl", [failed])
    (tmp_path / "experiment.json").write_text(
        json.dumps({"name": "synthetic", "clients": 10, "rounds": 2, "cells": 30}))
    paths = report.generate_report(tmp_path)
    names = {p.name for p in paths}
    assert names == {
        "summary.md", "final_accuracy_iid.png", "final_accuracy_dirichlet-0.5.png",
        "asr_backdoor.png", *(f"accuracy_{a}_{p}.png" for a in ("none", "scale", "backdoor")
                              for p in ("iid", "dirichlet-0.5")),
    }
    for path in paths:
        assert path.stat().st_size > 1000
        if path.suffix == ".png":
            assert path.read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# Experiment `synthetic`")
    assert "24 runs finished, 1 failed, 5 not run yet (of 30 cells)" in summary
    assert summary.count("## iid") == 1 and summary.count("## dirichlet-0.5") == 1
    # overview: defence x attack, accuracy (and ASR for backdoor columns), mean ± 95% CI
    # half-width over 2 seeds (t = 12.706: 0.071 std -> 0.635); bold: not significantly
    # different from the column's best (2 seeds separate nothing but the constant ASRs)
    assert "| defence | none | scale | backdoor |" in summary
    assert ("| fedavg | **0.850 ± 0.635** | **0.100 ± 0.000** | **0.870 ± 0.127** / "
            "0.900 ± 0.000 |") in summary
    assert ("| krum | **0.850 ± 0.000** | **0.700 ± 1.271** | **0.820 ± 0.254** / "
            "**0.050 ± 0.635** |") in summary
    # details: one row per defence x attack x fraction, precision/recall where defined
    header = "| defence | attack | Byzantine | accuracy | ASR | precision | recall | seeds |"
    assert summary.count(header) == 2
    assert ("| krum | scale | 0.2 (2) | 0.700 ± 1.271 | — | 0.50 ± 0.00 | 1.00 ± 0.00 | 2 |"
            in summary)
    assert "| fedavg | none | 0 (0) | 0.850 ± 0.635 | — | — | — | 2 |" in summary
    detail_rows = [line for line in summary.splitlines()
                   if line.startswith(("| fedavg | ", "| krum | ")) and line.count("|") == 9]
    assert len(detail_rows) == 2 * 6
    assert "## Failed cells" in summary and "median--scale--f0.2--iid--s0" in summary
    assert "ServerApp \\| raised" in summary
    assert "![asr_backdoor]" not in summary and "(plots/asr_backdoor.png)" in summary


def test_report_single_seed_has_no_std_and_no_optional_columns(tmp_path: Path) -> None:
    rows = [r for r in synthetic_rows() if r["seed"] == 0 and r["attack"] != "backdoor"
            and r["defence"] == "fedavg"]
    runner.write_jsonl(tmp_path / "rounds.jsonl", rows)
    paths = report.generate_report(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    tables = summary.split("## iid")[1]
    assert "±" not in tables and "ASR" not in tables
    assert "| defence | attack | Byzantine | accuracy | seeds |" in summary
    assert "| fedavg | **0.900** | **0.100** |" in summary
    assert not any(p.name.startswith("asr_") for p in paths)


def test_confidence_interval_by_hand() -> None:
    # k = 3, mean 2, s = 1, t_{0.975, 2} = 4.302653: half-width 4.302653 / sqrt(3)
    mean, half = report.confidence_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / 3**0.5, rel=1e-6)
    assert report.confidence_interval([0.7]) == (0.7, 0.0)
    mean, half = report.confidence_interval([0.5, 0.5, 0.5, 0.5])
    assert (mean, half) == (0.5, 0.0)
    with pytest.raises(ValueError):
        report.confidence_interval([])


def test_welch_p_value_matches_scipy() -> None:
    from scipy.stats import ttest_1samp, ttest_ind

    for a, b in (([0.9, 0.91, 0.89], [0.5, 0.52, 0.51, 0.4]), ([1.0, 2.0, 3.5], [2.0, 2.5])):
        expected = ttest_ind(a, b, equal_var=False).pvalue
        assert report.welch_p_value(a, b) == pytest.approx(expected, rel=1e-9)
    # one constant group: the other's variance alone (t-test with k_b - 1 degrees)
    assert report.welch_p_value([2.0, 2.0, 2.0], [1.0, 2.0, 3.5]) == pytest.approx(
        ttest_1samp([1.0, 2.0, 3.5], popmean=2.0).pvalue, rel=1e-9)


def test_indistinguishable_by_welch_test() -> None:
    # far apart with small spread: different; overlapping noisy groups: not
    assert not report.indistinguishable([0.90, 0.91, 0.89], [0.50, 0.52, 0.51])
    assert report.indistinguishable([0.90, 0.70, 0.80], [0.85, 0.65, 0.95])
    # constant groups compare by their means; one seed supports no test
    assert report.indistinguishable([0.1, 0.1], [0.1, 0.1])
    assert not report.indistinguishable([0.1, 0.1], [0.2, 0.2])
    assert not report.indistinguishable([0.9], [0.8]) and report.indistinguishable([0.8], [0.8])
    assert not report.indistinguishable([], [0.8])


def test_best_marks_highest_and_lowest() -> None:
    def group(values: list[float]) -> report.Group:
        return report.Group(0, [{"final_accuracy": v, "final_asr": 1 - v} for v in values])

    column = {"a": group([0.90, 0.91, 0.89]), "b": group([0.88, 0.92, 0.90]),
              "c": group([0.50, 0.52, 0.51])}
    assert report.best_marks(column, "final_accuracy", highest=True) == {"a", "b"}
    assert report.best_marks(column, "final_asr", highest=False) == {"a", "b"}
    assert report.best_marks(column, "missing", highest=True) == set()


def test_report_without_rows_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no results"):
        report.generate_report(tmp_path)
    assert report.main([str(tmp_path)]) == 1


# ------------------------------------------------------------------------------------- CLI
def write_config(tmp_path: Path, raw_text: str = BASE, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(raw_text)
    return path


def test_cli_list_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path)
    out = tmp_path / "out"
    assert cli_main(["experiment", str(path), "--output", str(out), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "pending  fedavg--none--f0--iid--s0" and lines[-1] == "60 cells"
    bad = write_config(tmp_path, BASE.replace('strategy = "krum"', 'strategy = "krumm"'), "b.toml")
    assert cli_main(["experiment", str(bad), "--list"]) == 1
    assert "[defences.krum]" in capsys.readouterr().err
    assert cli_main(["experiment", str(path), "--attacks", "nope", "--list"]) == 1
    assert "['nope']" in capsys.readouterr().err


def test_cli_report_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, BASE.replace("seeds = [0, 1]", "seeds = [0]"))
    out = tmp_path / "out"
    cfg = grid.load_config(path)
    runner.run_cell(cfg.cells()[0], cfg, out, run=FakeRun())
    assert cli_main(["experiment", str(path), "--output", str(out), "--report-only"]) == 0
    assert "3 round rows of 30 cells, 1 runs" in capsys.readouterr().out
    assert (out / "summary.md").exists() and (out / "plots" / "final_accuracy_iid.png").exists()
    assert "1 runs finished, 0 failed, 29 not run yet" in (out / "summary.md").read_text()


def test_python_m_entry_point(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    listing = subprocess.run(
        [sys.executable, "-m", "flwr_robust.experiments", str(path), "--list"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[-1] == "60 cells"


def test_one_cell_per_run_keeps_each_run_separate(tmp_path: Path) -> None:
    raw = base()
    raw["experiment"].update(seeds=[0], fractions=[0.2], partitionings=["iid"])
    raw["experiment"]["cells-per-run"] = 1
    del raw["defences"]["rfout-robust"], raw["attacks"]["none"]
    cfg = parse_config(raw)
    fake = FakeRun(fail={"krum/scale"})
    progress = runner.run_grid(cfg, tmp_path, run=fake, progress=False)
    assert len(fake.calls) == 4 and progress.failed == 1
    assert all("experiment-cells" not in call for call in fake.calls)
    runs = {r["cell"]: r for r in report.read_jsonl(tmp_path / "runs.jsonl")}
    assert runs["krum--scale--f0.2--iid--s0"]["details"] == "ServerApp raised"


def test_batches_split_by_cells_per_run(tmp_path: Path) -> None:
    raw = base()
    raw["experiment"].update(seeds=[0], fractions=[0.2], partitionings=["iid"])
    raw["experiment"]["cells-per-run"] = 3
    del raw["defences"]["rfout-robust"], raw["attacks"]["none"]
    cfg = parse_config(raw)
    runs: list[int] = []

    def counting(run_config: dict[str, Any], **kwargs: Any) -> RunOutcome:
        cells = json.loads(run_config.get("experiment-cells", "[0]"))
        runs.append(len(cells))
        return FakeRun()(run_config, **kwargs)

    runner.run_grid(cfg, tmp_path, run=counting, progress=False)
    assert runs == [3, 1]
    assert len(report.read_jsonl(tmp_path / "rounds.jsonl")) == 4 * 3
