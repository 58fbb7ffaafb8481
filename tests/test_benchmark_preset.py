"""The Fashion-MNIST benchmark preset (configs/benchmark.toml): its design, and a smoke run of
it, shrunk in size only, through the real runner, Flower's engine and the archive."""

from __future__ import annotations

import csv
import tomllib
from pathlib import Path

import pytest

from flwr_robust.experiments import archive, grid, runner
from flwr_robust.experiments.report import generate_report
from flwr_robust.task.data import FASHION_MNIST_DIR

PRESET = Path(__file__).resolve().parent.parent / "configs" / "benchmark.toml"


def test_preset_is_the_issue_design() -> None:
    cfg = grid.load_config(PRESET)
    assert cfg.clients == 50 and cfg.sampled_clients("fedavg") == 20
    assert len(cfg.seeds) >= 3 and cfg.fractions == (0.2,)
    assert cfg.partitionings == (("iid", None), ("dirichlet", 0.5), ("dirichlet", 0.1))
    assert cfg.run_config["dataset"] == "fashion_mnist" and cfg.run_config["model"] == "cnn"
    assert cfg.archive == Path("docs/benchmark/cells.csv")
    auto = {c.run_config.get("num-malicious") for c in cfg.cells() if c.defence == "krum"}
    assert auto == {4}  # 20% of the 20 clients a round samples
    assert any(d.get("pre-aggregation") == "nnm" for d in cfg.defences.values())
    assert any(d.get("pre-aggregation") == "bucketing" for d in cfg.defences.values())


@pytest.mark.integration
@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                    reason="real Fashion-MNIST absent (.ci/run installs dataset-fashion-mnist)")
def test_preset_smoke_run(tmp_path: Path) -> None:
    raw = tomllib.loads(PRESET.read_text())
    raw["experiment"].update(
        output=str(tmp_path / "out"), archive=str(tmp_path / "cells.csv"), clients=10,
        rounds=2, seeds=[0], partitionings=["dirichlet-0.5"], **{"cells-per-run": 4},
    )
    raw["run-config"].update({"max-train-samples": 400, "max-test-samples": 300})
    raw["defences"] = {k: raw["defences"][k] for k in ("fedavg", "median_nnm")}
    raw["attacks"] = {k: raw["attacks"][k] for k in ("none", "min_max")}
    cfg = grid.parse_config(raw)
    progress = runner.run_grid(cfg, cfg.output, progress=False)
    assert (progress.ran, progress.failed) == (4, 0)
    with (cfg.output / "rounds.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 4 * 3
    # evaluate-every = 5: round 0 and the last round only
    assert [r["accuracy"] != "" for r in rows[:3]] == [True, False, True]
    assert set(archive.read_archive(cfg.archive)) == {c.cell_id for c in cfg.cells()}
    assert generate_report(cfg.output)[-1].read_text().startswith("# Experiment `benchmark`")
