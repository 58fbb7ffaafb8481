"""The committed archive of finished cells: a fresh machine skips them, no cell is lost."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from flwr_robust.experiments import archive, report, runner
from tests.test_experiments import FakeRun, small_config


def with_archive(path: Path):
    return dataclasses.replace(small_config(), archive=path)


def test_finished_cells_reach_the_archive_and_a_fresh_output_skips_them(tmp_path: Path) -> None:
    store = tmp_path / "committed" / "cells.csv"
    cfg = with_archive(store)
    runner.run_grid(cfg, tmp_path / "machine-a", run=FakeRun(), progress=False)
    with store.open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 4 * 3 and {r["cell"] for r in rows} == {c.cell_id for c in cfg.cells()}
    assert all(r["fingerprint"] and r["seconds"] for r in rows)
    # machine B has no results/ directory: nothing runs, the tables come from the archive
    fresh = FakeRun()
    progress = runner.run_grid(cfg, tmp_path / "machine-b", run=fresh, progress=False)
    assert fresh.calls == [] and progress.skipped == 4 and progress.remaining == 0
    here = report.read_jsonl(tmp_path / "machine-a" / "rounds.jsonl")
    there = report.read_jsonl(tmp_path / "machine-b" / "rounds.jsonl")
    assert there == here  # the same typed rows, None and booleans included
    runs = report.read_jsonl(tmp_path / "machine-b" / "runs.jsonl")
    assert {r["status"] for r in runs} == {"archived"} and all(r["ok"] for r in runs)


def test_slices_accumulate_and_foreign_rows_are_kept(tmp_path: Path) -> None:
    store = tmp_path / "cells.csv"
    store.write_text("cell,round,fingerprint\nother--cell,0,abc\n")
    cfg = with_archive(store)
    runner.run_grid(cfg, tmp_path / "a", run=FakeRun(), max_cells=1, progress=False)
    assert set(archive.read_archive(store)) == {"other--cell", cfg.cells()[0].cell_id}
    second = FakeRun()
    runner.run_grid(cfg, tmp_path / "b", run=second, max_cells=2, progress=False)
    assert len(second.calls) == 2  # the archived first cell is skipped
    assert len(archive.read_archive(store)) == 1 + 3


def test_changed_settings_or_incomplete_rows_are_run_again(tmp_path: Path) -> None:
    store = tmp_path / "cells.csv"
    cfg = with_archive(store)
    runner.run_grid(cfg, tmp_path / "a", run=FakeRun(), progress=False)
    lines = store.read_text().splitlines()
    first, second = cfg.cells()[0].cell_id, cfg.cells()[1].cell_id
    # the first cell's last round is lost, the second was measured with other settings
    kept = [line for i, line in enumerate(lines)
            if not (line.startswith(first) and i == 3)]
    store.write_text("\n".join(line.replace(archive.fingerprint(cfg.cells()[1], cfg), "0" * 16)
                               if line.startswith(second) else line for line in kept) + "\n")
    assert set(archive.archived_cells(cfg)) == {c.cell_id for c in cfg.cells()[2:]}
    rerun = FakeRun()
    runner.run_grid(cfg, tmp_path / "b", run=rerun, progress=False)
    assert len(rerun.calls) == 2
    fresh = archive.read_archive(store)
    assert all(r["fingerprint"] == archive.fingerprint(cfg.cells()[1], cfg) for r in fresh[second])


def test_fingerprint_follows_the_settings() -> None:
    cfg = small_config()
    cell = cfg.cells()[0]
    assert archive.fingerprint(cell, cfg) == archive.fingerprint(cell, cfg)
    other = dataclasses.replace(cell, run_config={**cell.run_config, "local-epochs": 99})
    assert archive.fingerprint(other, cfg) != archive.fingerprint(cell, cfg)
    assert archive.fingerprint(cell, dataclasses.replace(cfg, rounds=cfg.rounds + 1)) != \
        archive.fingerprint(cell, cfg)


def test_every_batch_reaches_the_archive_before_the_grid_ends(tmp_path: Path) -> None:
    store = tmp_path / "cells.csv"
    cfg = dataclasses.replace(with_archive(store), cells_per_run=1)
    seen: list[int] = []

    class Recording(FakeRun):
        def run_one(self, run_config, partial_on_fail=False, **kwargs):  # type: ignore[override]
            seen.append(len(archive.read_archive(store)))
            return super().run_one(run_config, partial_on_fail, **kwargs)

    runner.run_grid(cfg, tmp_path / "out", run=Recording(), progress=False)
    assert seen == [0, 1, 2, 3]  # each run starts with the earlier cells archived
