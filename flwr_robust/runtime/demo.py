"""``flwr-robust demo``: the main job, a robust federated run on the bundled digits data.

Runs the app through Flower's simulation engine (``flwr run``): 10 clients, 2 of them
Byzantine (scaling attack), Multi-Krum with f = 2, signed models and updates, a hash-chained
audit log, and per-round central accuracy. Prints a round table at the end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .launch import flwr_run

DEFAULT_WORKDIR = Path(".demo")


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    """Register ``flwr-robust demo``."""
    parser = subparsers.add_parser(name, help="run the demo federation (flwr run, digits)",
                                   description=__doc__)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="keys, results, audit log and Flower state (default: ./.demo)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--byzantine", type=int, default=2, help="Byzantine clients")
    parser.add_argument("--attack", default="scale")
    parser.add_argument("--strategy", default="multi_krum")
    parser.add_argument("--api", choices=("message", "legacy"), default="message")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-signing", action="store_true", help="switch signing off")
    parser.set_defaults(handler=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """Generate keys if needed, run the federation, print the per-round table."""
    from ..security.keydir import init_key_dir

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    keys = workdir / "keys"
    signing = not args.no_signing
    last_client_key = keys / "clients" / f"client-{args.clients - 1}.key"
    if signing and (not (keys / "truststore.json").exists() or not last_client_key.exists()):
        init_key_dir(keys, args.clients, force=True)
    results = workdir / "rounds.jsonl"
    audit = workdir / "audit.jsonl"
    for stale in (results, audit):
        stale.unlink(missing_ok=True)
    run_config = {
        "strategy": args.strategy,
        "api": args.api,
        "num-server-rounds": args.rounds,
        "num-malicious": args.byzantine,
        "results-file": str(results),
        "audit-file": str(audit),
        "signing": signing,
        "keys-dir": str(keys) if signing else "",
    }
    if args.byzantine:
        run_config.update(
            {"attack": args.attack,
             "byzantine-ids": ",".join(str(i) for i in range(args.byzantine))}
        )
    print(f"flwr-robust demo: {args.clients} clients ({args.byzantine} Byzantine, "
          f"attack {args.attack!r}), strategy {args.strategy!r}, {args.rounds} rounds, "
          f"signing {'on' if signing else 'off'}; Flower's output follows.\n", flush=True)
    outcome = flwr_run(
        run_config, flwr_home=workdir / "flwr-home", num_supernodes=args.clients, echo=True
    )
    if not outcome.ok:
        print(f"\nthe run did not complete: {outcome.status} {outcome.status_details}")
        return 1
    print_table(results)
    print(f"\nper-round records: {results}\naudit log (verify with "
          f"`flwr-robust audit verify {audit}`): {audit}")
    return 0


def print_table(results: Path) -> None:
    """The round table: accuracy, kept/rejected counts, Byzantine detection."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    print(f"\n{'round':>5} {'accuracy':>9} {'loss':>7} {'kept':>5} {'rejected':>8} "
          f"{'byzantine rejected':>19}")
    for row in rows:
        byzantine = {str(n) for n in row.get("byzantine", [])}
        caught = sum(1 for node in row["rejected"] if node in byzantine)
        caught_text = f"{caught}/{len(byzantine)}" if row["round"] and byzantine else "-"
        quality = ("        -       -" if row["accuracy"] is None else
                   f"{row['accuracy']:>9.4f} {row['loss']:>7.4f}")
        print(f"{row['round']:>5} {quality} "
              f"{len(row['kept']):>5} {len(row['rejected']):>8} {caught_text:>19}")
