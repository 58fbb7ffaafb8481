"""``flwr-robust experiment``: run a defence x attack grid and write its report.

``flwr-robust experiment CONFIG.toml [--output DIR] [--report-only] [--max-cells N]
[--defences A,B] [--attacks X,Y] [--list]``; ``python -m flwr_robust.experiments`` takes the
same arguments. The exit status is 0 when every attempted cell succeeded, 1 when some failed
(the report is written anyway and a rerun retries them) or on a config error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the command's arguments and handler to ``parser``."""
    parser.add_argument("config", type=Path, metavar="CONFIG.toml", help="experiment config")
    parser.add_argument("--output", type=Path, metavar="DIR",
                        help="output directory (default: the config's [experiment] output)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rebuild the tables and the report from the cells "
                        "finished so far")
    parser.add_argument("--max-cells", type=int, metavar="N",
                        help="run at most N unfinished cells this time")
    parser.add_argument("--defences", type=_names, default=(), metavar="A,B",
                        help="run only these defences (names of [defences.*] tables)")
    parser.add_argument("--attacks", type=_names, default=(), metavar="X,Y",
                        help="run only these attacks (names of [attacks.*] tables)")
    parser.add_argument("--list", action="store_true",
                        help="list the grid's cells and their state, run nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or cell lines")
    parser.set_defaults(handler=run)
    return parser


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str
) -> argparse.ArgumentParser:
    """Register the ``experiment`` command under ``name``."""
    return configure(subparsers.add_parser(
        name,
        help="run a defence x attack evaluation grid and write its report",
        description="Run a defence x attack x Byzantine fraction x partitioning x seed grid "
        "through Flower's simulation engine (one `flwr run` per cell, resumable), then write "
        "rounds.csv/jsonl, runs.jsonl, plots and summary.md. Config format: see "
        "flwr_robust/experiments/grid.py and configs/*.toml.",
    ))


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def run(args: argparse.Namespace) -> int:
    """Handler: validate the config, run (or list) the grid, write the report."""
    from .archive import archived_cells
    from .grid import load_config
    from .report import generate_report
    from .runner import FAILED, cell_dir, is_done, run_grid, select, write_tables

    config = load_config(args.config)
    output = (args.output or config.output).resolve()
    if args.max_cells is not None and args.max_cells < 0:
        raise ValueError(f"--max-cells must be >= 0, got {args.max_cells}")
    unknown = sorted(set(args.defences) - set(config.defences)) + sorted(
        set(args.attacks) - set(config.attacks))
    if unknown:
        raise ValueError(f"--defences/--attacks name no table of the config: {unknown}")
    cells = select(config.cells(), args.defences, args.attacks)
    if args.list:
        archived = archived_cells(config)
        for cell in cells:
            state = "done" if is_done(output, cell, config.rounds) else (
                "archived" if cell.cell_id in archived else
                "failed" if (cell_dir(output, cell) / FAILED).exists() else "pending")
            print(f"{state:8} {cell.cell_id}")
        print(f"{len(cells)} cells")
        return 0
    if args.report_only:
        rows, runs = write_tables(config, output)
        print(f"{output}: {rows} round rows of {len(config.cells())} cells, {runs} runs")
    else:
        progress = run_grid(config, output, defences=args.defences, attacks=args.attacks,
                            max_cells=args.max_cells, progress=not args.quiet)
        print(f"{output}: ran {progress.ran} cells ({progress.failed} failed), skipped "
              f"{progress.skipped} finished, {progress.remaining} of {progress.total} left")
    paths = generate_report(output)
    print(f"report: {paths[-1]} and {len(paths) - 1} plots in {paths[-1].parent / 'plots'}")
    archived = archived_cells(config)
    failed = sum((cell_dir(output, cell) / FAILED).exists() and cell.cell_id not in archived
                 for cell in cells)
    if failed:
        print(f"{failed} cells failed (details in summary.md); rerun to retry them",
              file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flwr_robust.experiments``: exit code 0 ok, 1 error or failed cells."""
    parser = configure(argparse.ArgumentParser(
        prog="python -m flwr_robust.experiments",
        description="Run a defence x attack evaluation grid and write its report.",
    ))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
