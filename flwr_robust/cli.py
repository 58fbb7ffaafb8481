"""The ``flwr-robust`` command line.

Subcommands live in their own modules and are registered in :data:`SUBCOMMANDS` as
``(name, add_parser)`` pairs, where ``add_parser(subparsers, name)`` adds an
``argparse`` parser and sets a ``handler(args) -> int`` default on every leaf parser.
Handlers report user errors by raising ``ValueError`` (which every
``flwr_robust.security`` error is) or ``OSError``; :func:`main` prints them and exits 1.
Keep ``add_parser`` cheap: import heavy dependencies (torch, flwr) inside the handlers.
"""

import argparse
import sys
from collections.abc import Callable, Sequence

from flwr_robust.experiments import cli as experiment_cli
from flwr_robust.ops import cli as ops_cli
from flwr_robust.runtime import demo, deploy_cli
from flwr_robust.security import cli as keys_cli

AddParser = Callable[
    ["argparse._SubParsersAction[argparse.ArgumentParser]", str], argparse.ArgumentParser
]

SUBCOMMANDS: list[tuple[str, AddParser]] = [
    ("demo", demo.add_parser),
    ("keys", keys_cli.add_parser),
    ("audit", ops_cli.add_parser),
    ("deploy", deploy_cli.add_parser),
    ("experiment", experiment_cli.add_parser),
]


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="flwr-robust",
        description="Byzantine-robust aggregation and model/update integrity for Flower.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, add_parser in SUBCOMMANDS:
        add_parser(subparsers, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 error, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return args.handler(args)
    except (OSError, ValueError) as exc:
        print(f"flwr-robust: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
