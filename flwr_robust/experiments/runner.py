"""Running an experiment grid through ``flwr run``, resumably.

Cells run in batches of ``cells-per-run``: one Flower simulation run executes the batch's
cells back to back (run config ``experiment-cells``), each from a fresh model with its own
settings, so the simulation engine's start-up (~20 s on 2 cores) is paid once per batch.

Output directory layout::

    OUT/cells/<cell-id>/results.jsonl   the ServerApp's per-round records (``results-file``)
    OUT/cells/<cell-id>/flwr.log        Flower's output of the run the cell was part of
    OUT/cells/<cell-id>/flwr-home/      the run's FLWR_HOME (kept only when the run failed)
    OUT/cells/<cell-id>/done.json       written only after a successful, complete run
    OUT/cells/<cell-id>/failed.json     status and details of the last failed attempt
    OUT/rounds.jsonl, OUT/rounds.csv    one row per finished run and round (:data:`ROUND_COLUMNS`)
    OUT/runs.jsonl                      one row per attempted run: status, seconds, final metrics
    OUT/experiment.json                 name, clients, rounds and number of cells of the grid

A cell is finished when its ``done.json`` exists and its results file holds rounds
``0..rounds``, or when the config's archive holds it (see :mod:`.archive`; a local result takes
precedence); every other cell (never run, failed, interrupted) is run again from scratch.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..runtime.launch import RunOutcome, flwr_run
from .archive import archived_cells, write_archive
from .grid import Cell, ExperimentConfig
from .report import read_jsonl, run_metrics

ROUND_COLUMNS = (
    "cell", "defence", "attack", "fraction", "n_byzantine", "partitioner", "alpha", "seed",
    "round", "accuracy", "loss", "attack_success_rate", "precision", "recall", "n_kept",
    "n_rejected", "aggregated",
)
RESULTS = "results.jsonl"
LOG = "flwr.log"
DONE = "done.json"
FAILED = "failed.json"
HOME = "flwr-home"

#: ``flwr_run``'s signature as the runner calls it (tests pass a fake).
RunFunction = Callable[..., RunOutcome]


def cell_dir(output: Path, cell: Cell) -> Path:
    """The directory of ``cell``'s files."""
    return output / "cells" / cell.cell_id


def complete(records: Sequence[dict[str, Any]], rounds: int) -> bool:
    """Whether ``records`` are exactly rounds ``0..rounds`` in order."""
    return [r.get("round") for r in records] == list(range(rounds + 1))


def is_done(output: Path, cell: Cell, rounds: int) -> bool:
    """Whether ``cell`` finished successfully (done marker and complete results)."""
    directory = cell_dir(output, cell)
    return (directory / DONE).exists() and complete(read_jsonl(directory / RESULTS), rounds)


def round_rows(cell: Cell, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round record of ``cell``'s run (:data:`ROUND_COLUMNS`)."""
    labels = cell.labels()
    return [
        {
            **labels,
            "round": record["round"],
            "accuracy": record.get("accuracy"),
            "loss": record.get("loss"),
            "attack_success_rate": record.get("attack_success_rate"),
            "precision": record.get("precision"),
            "recall": record.get("recall"),
            "n_kept": len(record.get("kept") or []),
            "n_rejected": len(record.get("rejected") or {}),
            "aggregated": record.get("aggregated"),
        }
        for record in records
    ]


def run_cell(
    cell: Cell, config: ExperimentConfig, output: Path, run: RunFunction = flwr_run
) -> dict[str, Any]:
    """Run ``cell`` alone from scratch; see :func:`run_batch`."""
    return run_batch([cell], config, output, run)[0]


def run_batch(
    cells: Sequence[Cell], config: ExperimentConfig, output: Path, run: RunFunction = flwr_run
) -> list[dict[str, Any]]:
    """Run ``cells`` from scratch in one Flower run and record each cell's outcome
    (``done.json`` or ``failed.json``).

    A cell is ok when its results file holds every round (the ServerApp writes a round's
    record only once it is complete) and, for a run of one cell, the run completed; in a
    run of several cells one cell's failure does not void the others. Returns one row per cell: its labels, ``ok``, Flower's ``status`` and
    details, ``seconds`` (the run's time divided among its cells) and the final metrics.
    """
    directories = [cell_dir(output, cell) for cell in cells]
    home = directories[0] / HOME
    for directory in directories:
        for stale in (directory / DONE, directory / FAILED, directory / RESULTS):
            stale.unlink(missing_ok=True)
        shutil.rmtree(directory / HOME, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
    overrides = [
        {**cell.run_config, "results-file": str((directory / RESULTS).resolve())}
        for cell, directory in zip(cells, directories, strict=True)
    ]
    run_config = overrides[0] if len(cells) == 1 else {
        "experiment-cells": json.dumps(overrides), "num-server-rounds": config.rounds,
    }
    start = time.monotonic()
    outcome = run(
        run_config, flwr_home=home, num_supernodes=config.clients, client_cpus=config.client_cpus,
        timeout=config.timeout * len(cells),
    )
    seconds = (time.monotonic() - start) / len(cells)
    rows = []
    for cell, directory in zip(cells, directories, strict=True):
        (directory / LOG).write_text(outcome.output, encoding="utf-8")
        records = read_jsonl(directory / RESULTS)
        ok = (complete(records, config.rounds) and outcome.returncode == 0
              and (outcome.ok or len(cells) > 1))
        details = ""
        if not complete(records, config.rounds):
            details = (f"results file holds rounds {[r.get('round') for r in records]}, "
                       f"expected 0..{config.rounds}")
            if not outcome.ok:
                details += f"; run {outcome.status}: {outcome.status_details}"
        elif not ok:
            details = outcome.status_details
        row = {
            **cell.labels(), "ok": ok, "status": outcome.status, "details": details,
            "seconds": round(seconds, 1), **run_metrics(round_rows(cell, records)),
        }
        if ok:
            (directory / DONE).write_text(json.dumps(row) + "\n", encoding="utf-8")
        else:
            row["log"] = str(directory / LOG)
            (directory / FAILED).write_text(json.dumps(row) + "\n", encoding="utf-8")
        rows.append(row)
    if all(row["ok"] for row in rows):
        shutil.rmtree(home, ignore_errors=True)
    return rows


def summary_line(row: dict[str, Any]) -> str:
    """One line about a finished run for the console."""
    if not row["ok"]:
        return (f"{row['cell']}: FAILED ({row['status']}: {row['details'][:200]}) in "
                f"{row['seconds']:.0f} s, see {row['log']}")
    text = f"{row['cell']}: accuracy {row['final_accuracy']:.3f}"
    if row["final_asr"] is not None:
        text += f", ASR {row['final_asr']:.3f}"
    for key in ("precision", "recall"):
        if row[f"mean_{key}"] is not None:
            text += f", {key} {row[f'mean_{key}']:.2f}"
    return f"{text} in {row['seconds']:.0f} s"


def select(
    cells: Sequence[Cell], defences: Sequence[str] = (), attacks: Sequence[str] = ()
) -> list[Cell]:
    """The cells of the named defences and attacks (all when a filter is empty)."""
    return [
        c for c in cells
        if (not defences or c.defence in defences) and (not attacks or c.attack in attacks)
    ]


@dataclass(frozen=True)
class GridProgress:
    """What one invocation of :func:`run_grid` did."""

    total: int
    skipped: int
    ran: int
    failed: int
    remaining: int


def run_grid(
    config: ExperimentConfig,
    output: Path,
    *,
    defences: Sequence[str] = (),
    attacks: Sequence[str] = (),
    max_cells: int | None = None,
    run: RunFunction = flwr_run,
    progress: bool = True,
) -> GridProgress:
    """Run the unfinished cells (optionally filtered, at most ``max_cells``) in order, then
    rewrite the tables of every finished cell (:func:`write_tables`)."""
    output = output.resolve()
    cells = select(config.cells(), defences, attacks)
    archived = archived_cells(config)
    pending = [c for c in cells
               if c.cell_id not in archived and not is_done(output, c, config.rounds)]
    todo = pending if max_cells is None else pending[:max_cells]
    if progress and len(pending) < len(cells):
        from_archive = sum(c.cell_id in archived for c in cells)
        tqdm.write(f"{len(cells) - len(pending)} of {len(cells)} cells already finished "
                   f"({from_archive} in the archive {config.archive})" if from_archive else
                   f"{len(cells) - len(pending)} of {len(cells)} cells already finished")
    failed = 0
    bar = tqdm(total=len(todo), desc=config.name, unit="cell", disable=not progress)
    size = config.cells_per_run
    for batch in (todo[i : i + size] for i in range(0, len(todo), size)):
        bar.set_postfix_str(f"{batch[0].cell_id} (+{len(batch) - 1})")
        for row in run_batch(batch, config, output, run):
            failed += not row["ok"]
            if progress:
                tqdm.write(summary_line(row))
        if config.archive is not None:  # after every batch: an interrupted slice loses none
            rounds, runs = collect(config, output)
            write_archive(config, rounds, runs, ROUND_COLUMNS)
        bar.update(len(batch))
    bar.close()
    write_tables(config, output)
    return GridProgress(len(cells), len(cells) - len(pending), len(todo), failed,
                        len(pending) - len(todo) + failed)


def collect(
    config: ExperimentConfig, output: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Round rows of every finished cell (run here, else from the archive) and run rows of
    every attempted one, in grid order."""
    rounds: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    archived = archived_cells(config)
    for cell in config.cells():
        directory = cell_dir(output, cell)
        if is_done(output, cell, config.rounds):
            rounds += round_rows(cell, read_jsonl(directory / RESULTS))
            runs += read_jsonl(directory / DONE)
        elif cell.cell_id in archived:
            rounds += archived[cell.cell_id][0]
            runs.append(archived[cell.cell_id][1])
        elif (directory / FAILED).exists():
            runs += read_jsonl(directory / FAILED)
    return rounds, runs


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON lines."""
    with path.open("w", encoding="utf-8") as stream:
        for row in rows:
            stream.write(json.dumps(row) + "\n")


def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` as CSV with ``columns`` (``None`` as an empty field)."""
    with path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_tables(config: ExperimentConfig, output: Path) -> tuple[int, int]:
    """(Re)write ``rounds.jsonl``, ``rounds.csv``, ``runs.jsonl`` and ``experiment.json``
    from the cell directories and the archive, and the archive itself when the config has
    one; returns the numbers of round rows and run rows."""
    output.mkdir(parents=True, exist_ok=True)
    rounds, runs = collect(config, output)
    write_archive(config, rounds, runs, ROUND_COLUMNS)
    write_jsonl(output / "rounds.jsonl", rounds)
    write_csv(output / "rounds.csv", rounds, ROUND_COLUMNS)
    write_jsonl(output / "runs.jsonl", runs)
    meta = {"name": config.name, "clients": config.clients, "rounds": config.rounds,
            "cells": len(config.cells())}
    (output / "experiment.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return len(rounds), len(runs)


__all__ = [
    "ROUND_COLUMNS",
    "GridProgress",
    "cell_dir",
    "collect",
    "complete",
    "is_done",
    "round_rows",
    "run_batch",
    "run_cell",
    "run_grid",
    "select",
    "write_tables",
]
