"""The committed record of an experiment's finished cells (``[experiment] archive``).

A long grid runs in slices, possibly on different machines. Its ``results/`` directory is not
committed, but the archive CSV is: one row per finished cell and round (the round rows of
``rounds.csv`` plus the cell's ``fingerprint`` and run ``seconds``). A cell found in the archive
with the fingerprint of its current settings and every round is finished: the runner skips it
and the report reads its rows. After every slice, the archive is rewritten with every finished
cell (those already archived and those finished locally), in grid order, so that no measured
cell is lost.

The fingerprint covers what determines a cell's result apart from the code: its run config,
the rounds and the number of clients. Rows of a cell whose settings changed no longer match
and are dropped at the next write; rows of cells outside the config are kept as they are.
To measure again after a change of the code, delete the cells' rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

from .grid import Cell, ExperimentConfig
from .report import run_metrics

Row = dict[str, Any]

_INTS = ("n_byzantine", "seed", "round", "n_kept", "n_rejected")
_FLOATS = ("fraction", "alpha", "accuracy", "loss", "attack_success_rate", "precision",
           "recall", "seconds")


def fingerprint(cell: Cell, config: ExperimentConfig) -> str:
    """A short hash of what determines ``cell``'s result apart from the code."""
    settings = {"run-config": cell.run_config, "rounds": config.rounds,
                "clients": config.clients}
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _typed(row: dict[str, str]) -> Row:
    out: Row = {}
    for key, text in row.items():
        if text == "" or text is None:
            out[key] = None
        elif key in _INTS:
            out[key] = int(text)
        elif key in _FLOATS:
            out[key] = float(text)
        elif key == "aggregated":
            out[key] = text == "True"
        else:
            out[key] = text
    return out


def read_archive(path: Path) -> dict[str, list[Row]]:
    """The archive's typed rows per cell id (empty when the file does not exist)."""
    if not path.exists():
        return {}
    cells: dict[str, list[Row]] = {}
    with path.open(encoding="utf-8", newline="") as stream:
        for row in csv.DictReader(stream):
            typed = _typed(row)
            cells.setdefault(str(typed["cell"]), []).append(typed)
    return cells


def archived_cells(config: ExperimentConfig) -> dict[str, tuple[list[Row], Row]]:
    """Cell id -> (round rows, run row) of every cell of ``config`` that its archive holds
    complete (rounds ``0..rounds``) and with the fingerprint of its current settings."""
    if config.archive is None:
        return {}
    stored = read_archive(config.archive)
    found: dict[str, tuple[list[Row], Row]] = {}
    for cell in config.cells():
        rows = sorted(stored.get(cell.cell_id, []), key=lambda r: r["round"])
        if [r["round"] for r in rows] != list(range(config.rounds + 1)):
            continue
        if any(r.get("fingerprint") != fingerprint(cell, config) for r in rows):
            continue
        rounds = [{k: v for k, v in r.items() if k not in ("fingerprint", "seconds")}
                  for r in rows]
        run = {**cell.labels(), "ok": True, "status": "archived", "details": "",
               "seconds": rows[0].get("seconds"), **run_metrics(rounds)}
        found[cell.cell_id] = (rounds, run)
    return found


def write_archive(
    config: ExperimentConfig, rounds: list[Row], runs: list[Row], columns: tuple[str, ...]
) -> int:
    """Rewrite ``config.archive`` with the finished cells' ``rounds`` (their run rows in
    ``runs`` give the seconds), keeping the rows of cells outside the config; returns the
    number of cells written. Does nothing without an archive."""
    if config.archive is None:
        return 0
    by_id = {cell.cell_id: cell for cell in config.cells()}
    seconds = {r["cell"]: r.get("seconds") for r in runs if r.get("ok")}
    rows = [
        {**row, "fingerprint": fingerprint(by_id[row["cell"]], config),
         "seconds": seconds.get(row["cell"])}
        for row in rounds
    ]
    kept = [row for cell_id, cell_rows in read_archive(config.archive).items()
            if cell_id not in by_id for row in cell_rows]
    config.archive.parent.mkdir(parents=True, exist_ok=True)
    with config.archive.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=[*columns, "fingerprint", "seconds"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows + kept)
    return len({row["cell"] for row in rows + kept})


__all__ = ["archived_cells", "fingerprint", "read_archive", "write_archive"]
