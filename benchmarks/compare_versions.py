"""Speed of the aggregation rules in this checkout against another git revision, measured in
alternating child processes on the same inputs, each ratio against the same reference
(``x.sum(axis=0)`` on the stacked updates) measured in that process.

    python benchmarks/compare_versions.py d655b74            # n=50, d=1e6, f=10, 3 rounds
    python benchmarks/compare_versions.py HEAD~3 --rounds 5

The other revision is checked out in a temporary git worktree (removed afterwards) and
imported through ``PYTHONPATH``. Every (rule, version, round) runs in a fresh process that
first runs the rule once on a small input, so lazy imports and JIT compilation never fall
inside a timing, and no rule runs in the allocator state another rule left behind (measured:
that alone moved single rules by 10-70% between runs). The table reports, per rule, the best
ratio over the rounds.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

#: label -> registry parameters given f (a selection of aggregation.py's rules)
RULES = {
    "fedavg": lambda f: {},
    "median": lambda f: {},
    "trimmed_mean": lambda f: {"num_malicious": f},
    "krum": lambda f: {"num_malicious": f},
    "multi_krum": lambda f: {"num_malicious": f},
    "geometric_median": lambda f: {},
    "bulyan": lambda f: {"num_malicious": f},
    "rfout_1d": lambda f: {},
    "norm_clip": lambda f: {},
    "centered_clip": lambda f: {},
    "meamed": lambda f: {"num_malicious": f},
    "flame": lambda f: {"seed": 0},
    "foolsgold": lambda f: {},
    "reputation": lambda f: {"num_malicious": f},
    "krum/nnm": lambda f: {"num_malicious": f, "pre": "nnm"},
    "median/nnm": lambda f: {"num_malicious": f, "pre": "nnm"},
    "multi_krum/arc": lambda f: {"num_malicious": f, "pre": "arc"},
}


def child(label: str, n: int, d: int, f: int, repeats: int) -> None:
    """Print ``seconds / reference`` of rule ``label`` for this process's flwr_robust."""
    from aggregation import make_updates

    from flwr_robust.aggregation import get_aggregator

    def call(updates: list) -> None:
        name = label.split("/")[0]
        get_aggregator(name, **RULES[label](f))(updates, client_ids=list(range(len(updates))))

    call(make_updates(n, 4096, seed=2))
    updates = make_updates(n, d)
    stacked = np.stack([np.concatenate(client) for client in updates])

    def best(fn) -> float:
        fn()
        fastest = float("inf")
        for _ in range(repeats):
            gc.collect()
            start = time.perf_counter()
            fn()
            fastest = min(fastest, time.perf_counter() - start)
        return fastest

    reference = best(lambda: stacked.sum(axis=0))
    print(best(lambda: call(updates)) / reference)


def measure(label: str, path: Path | None, args: argparse.Namespace) -> float:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = str(path)
    command = [sys.executable, __file__, "--child", label, "--n", str(args.n), "--d",
               str(args.d), "--f", str(args.f), "--repeats", str(args.repeats)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True,
                          cwd=path or ROOT)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("revision", nargs="?", help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--d", type=int, default=1_000_000)
    parser.add_argument("--f", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", metavar="RULE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.n, args.d, args.f, args.repeats)
        return
    if not args.revision:
        parser.error("give a git revision")
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other),
                        args.revision], check=True, capture_output=True)
        try:
            best: dict[str, dict[str, float]] = {"other": {}, "this": {}}
            for _ in range(args.rounds):
                for label in RULES:
                    for side, path in (("other", other), ("this", None)):
                        ratio = measure(label, path, args)
                        best[side][label] = min(best[side].get(label, ratio), ratio)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(other)], check=True, capture_output=True)
    print(f"n={args.n}, d={args.d:,}, f={args.f}; best ratio to the reference over "
          f"{args.rounds} alternating rounds")
    print(f"{'rule':<18}{args.revision:>12}{'this':>10}{'change':>9}")
    for label in RULES:
        before, after = best["other"][label], best["this"][label]
        print(f"{label:<18}{before:>11.2f}x{after:>9.2f}x{after / before - 1:>+9.0%}")


if __name__ == "__main__":
    main()
