"""Speed and memory of the aggregation core against Flower's built-ins and a bandwidth reference.

Inputs are ``n`` clients, each a list of float32 layer arrays (as Flower delivers them);
every rule starts from those lists, so building any stacked matrix counts in its time. The
reference is ``x.sum(axis=0)`` on the already-stacked ``(n, d)`` array: one streaming read
of all updates, the least any aggregation must do. Flower's built-ins are the aggregation
functions its strategies call (``flwr.server.strategy.aggregate``), on the same lists.

Extra memory is the rise of the process's peak resident set (VmHWM, reset before each
rule) over the resident set before the call: everything the rule allocates, numpy, torch
and compiled kernels alike. Every call passes client identities (stateful rules need them;
FoolsGold's per-client histories, 4*d bytes per client, are allocated in the warm-up call
and so are not counted as extra memory). Labels ``rule/stage`` run a pre-aggregation stage.

    python benchmarks/aggregation.py            # n=50, d=1e6, f=10, plus scaling in n
    python benchmarks/aggregation.py --quick    # a small smoke run
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from flwr_robust.aggregation import get_aggregator

# rule -> (registry parameters given f, target ratio to the reference)
RULES: dict[str, tuple[Callable[[int], dict], float | None]] = {
    "fedavg": (lambda f: {}, None),
    "median": (lambda f: {}, 10.0),
    "trimmed_mean": (lambda f: {"num_malicious": f}, 12.0),
    "krum": (lambda f: {"num_malicious": f}, 4.0),
    "multi_krum": (lambda f: {"num_malicious": f}, 5.0),
    "geometric_median": (lambda f: {}, 6.0),
    "bulyan": (lambda f: {"num_malicious": f}, 15.0),
    "rfout_1d": (lambda f: {}, 10.0),
    "rfout_1d/robust": (lambda f: {"variant": "robust"}, None),
    "norm_clip": (lambda f: {}, None),
    "centered_clip": (lambda f: {}, None),
    "meamed": (lambda f: {"num_malicious": f}, None),
    "flame": (lambda f: {"seed": 0}, None),
    "cluster": (lambda f: {}, None),
    "cluster/hdbscan": (lambda f: {"method": "hdbscan"}, None),
    "foolsgold": (lambda f: {}, None),
    "dnc": (lambda f: {"num_malicious": f}, None),
    "signguard": (lambda f: {}, None),
    "robust_lr": (lambda f: {}, None),
    # the server update is client 0's update (every trust score positive, as for honest
    # clients); the root-data training is the app's cost, not the rule's
    "fltrust": (lambda f: {}, None),
    # a fresh rule: its first round (the base rule, plus storing the n updates: 4*n*d bytes)
    "fldetector": (lambda f: {"num_malicious": f}, None),
    "reputation": (lambda f: {"base_rule": "multi_krum", "num_malicious": f}, None),
    "krum/nnm": (lambda f: {"num_malicious": f, "pre": "nnm"}, None),
    "median/nnm": (lambda f: {"num_malicious": f, "pre": "nnm"}, None),
    "median/bucketing": (lambda f: {"pre": "bucketing", "seed": 0}, None),
    "multi_krum/arc": (lambda f: {"num_malicious": f, "pre": "arc"}, None),
}
MEMORY_TARGET = 1.5  # peak extra memory / size of the n updates


def make_updates(n: int, d: int, seed: int = 0) -> list[list[np.ndarray]]:
    """``n`` clients with layers of decreasing size (a dense model's shape mix) summing to d."""
    sizes = []
    remaining = d
    while remaining > 1024:
        size = remaining // 2
        sizes += [size - size % 64, 64]
        remaining -= sizes[-1] + sizes[-2]
    sizes.append(remaining)
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(d).astype(np.float32)
    clients = []
    for _ in range(n):
        flat = base + 0.1 * rng.standard_normal(d).astype(np.float32)
        clients.append([part.copy() for part in np.split(flat, np.cumsum(sizes)[:-1])])
    return clients


def flower_builtins(f: int) -> dict[str, Callable[[list[list[np.ndarray]]], object]]:
    """Flower 1.41's aggregation functions for the rules it has, on the same inputs."""
    from flwr.server.strategy import aggregate as fa

    def pairs(updates: list[list[np.ndarray]]) -> list[tuple[list[np.ndarray], int]]:
        return [(u, 1) for u in updates]

    return {
        "median": lambda u: fa.aggregate_median(pairs(u)),
        "trimmed_mean": lambda u: fa.aggregate_trimmed_avg(pairs(u), f / len(u)),
        "krum": lambda u: fa.aggregate_krum(pairs(u), f, 0),
        "multi_krum": lambda u: fa.aggregate_krum(pairs(u), f, len(u) - f),
        "bulyan": lambda u: fa.aggregate_bulyan(
            pairs(u), f, fa.aggregate_krum, to_keep=0
        ),
        "fedavg": lambda u: fa.aggregate(pairs(u)),
    }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn: Callable[[], object], repeats: int) -> float:
    """Best-of-``repeats`` seconds, after one warm-up call (JIT, lazy imports, threads)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def rule_call(label: str, f: int, updates: list[list[np.ndarray]]) -> Callable[[], object]:
    """One aggregation of ``updates`` by a fresh rule (stateful rules start clean)."""
    name = label.split("/")[0]
    params = RULES[label][0](f)
    if name == "fltrust":
        params["server_update_fn"] = lambda _weights: [layer.copy() for layer in updates[0]]
    ids = list(range(len(updates)))
    return lambda: get_aggregator(name, **params)(updates, client_ids=ids)


def memory_child(label: str, n: int, d: int, f: int) -> None:
    """Child-process body: print the peak extra resident bytes of one aggregation.

    The parent runs this with ``MALLOC_MMAP_THRESHOLD_`` fixed so every large buffer is a
    fresh mapping returned to the system when freed: the peak then measures exactly what
    the rule holds at once. A warm-up on a small input first pays the one-off costs (JIT,
    imports, thread pools) outside the measurement.
    """
    rule_call(label, f, make_updates(n, 4096, seed=1))()
    updates = make_updates(n, d)
    call = rule_call(label, f, updates)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    call()
    print(1024 * (_status_kib("VmHWM") - before))


def memory_in_child(label: str, n: int, d: int, f: int) -> float | None:
    """Peak extra resident bytes of one aggregation, measured in a fresh process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    command = [sys.executable, __file__, "--memory-child", label,
               "--n", str(n), "--d", str(d), "--f", str(f)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"  (memory of {label} not measured: {done.stderr.strip()[-200:]})")
        return None
    return float(done.stdout.strip().splitlines()[-1])


def reference_time(updates: list[list[np.ndarray]], repeats: int) -> float:
    stacked = np.stack([np.concatenate(u) for u in updates])
    return measure(lambda: stacked.sum(axis=0), repeats + 2)


def warm_up(n: int, f: int) -> None:
    """Every rule once on a small input, before any large array exists: imports (lazy:
    numba, scikit-learn, torch) and JIT compilation happen here, and the allocator state
    the timings run in does not depend on which rule first imported what."""
    small = make_updates(n, 4096, seed=2)
    for label in RULES:
        rule_call(label, f, small)()


def run_main(
    n: int, d: int, f: int, repeats: int, with_flower: bool, with_memory: bool = True,
    only: set[str] | frozenset[str] = frozenset(),
) -> bool:
    warm_up(n, f)
    updates = make_updates(n, d)
    size = 4 * n * d
    reference = reference_time(updates, repeats)
    builtins = flower_builtins(f) if with_flower else {}
    print(f"\nn={n} clients, d={d:,} float32 parameters, f={f}; updates {size / 2**20:.0f} MiB")
    print(f"reference x.sum(axis=0) on the stacked (n, d) array: {reference * 1e3:.1f} ms\n")
    header = (
        f"{'rule':<18}{'seconds':>9}{'ratio':>8}{'target':>8}{'extra MiB':>11}{'mem ratio':>10}"
        f"{'flower s':>10}{'speedup':>9}  verdict"
    )
    print(header)
    print("-" * len(header))
    all_ok = True
    for label, (params, target) in RULES.items():
        if only and label not in only:
            continue
        name = label.split("/")[0]
        seconds = measure(rule_call(label, f, updates), repeats)
        ratio = seconds / reference
        extra = memory_in_child(label, n, d, f) if with_memory else None
        mem_ratio = None if extra is None else extra / size
        flower = None
        if name in builtins and "/" not in label:
            flower_repeats = 1 if name == "bulyan" else repeats
            flower = measure(partial(builtins[name], updates), flower_repeats)
        verdict = []
        if target is not None and ratio > target:
            verdict.append("SLOWER THAN TARGET")
        if mem_ratio is not None and mem_ratio > MEMORY_TARGET:
            verdict.append("MEMORY OVER TARGET")
        if flower is not None and seconds >= flower:
            verdict.append("NOT FASTER THAN FLOWER")
        all_ok &= not verdict
        print(
            f"{label:<18}{seconds:>9.3f}{ratio:>7.1f}x"
            f"{(f'{target:.0f}x' if target else '-'):>8}"
            f"{('-' if extra is None else f'{extra / 2**20:.1f}'):>11}"
            f"{('-' if mem_ratio is None else f'{mem_ratio:.3f}'):>10}"
            f"{('-' if flower is None else f'{flower:.3f}'):>10}"
            f"{('-' if flower is None else f'{flower / seconds:.1f}x'):>9}"
            f"  {', '.join(verdict) or 'ok'}"
        )
    return all_ok


#: rule -> parameters given f, for the hostile-input timings
HOSTILE_RULES = ("median", "krum", "multi_krum", "geometric_median", "centered_clip",
                 "foolsgold", "krum/nnm")


def hostile_updates(updates: list[list[np.ndarray]], kind: str) -> list[list[np.ndarray]]:
    """``updates`` with client 0 replaced by a hostile one.

    ``anchor``: far away (1e6 x the honest values) and sorted into the middle of the
    canonical order, so it becomes the Gram matrices' anchor and forces the second pass
    around the coordinate-wise median. ``huge``: values of 1e19, whose squares overflow
    float32, so every block's products are redone in float64.
    """
    hostile = [[layer.copy() for layer in client] for client in updates]
    firsts = sorted(float(client[0].reshape(-1)[0]) for client in updates[1:])
    for layer in hostile[0]:
        layer *= 1e6 if kind == "anchor" else 0.0
        if kind == "huge":
            layer += np.float32(1e19)
    hostile[0][0].reshape(-1)[0] = firsts[len(firsts) // 2] + 1e-3  # the middle position
    return hostile


def run_hostile(n: int, d: int, f: int, repeats: int) -> None:
    print(f"\nHostile inputs, n={n}, d={d:,}: seconds, and ratio to the same rule on honest "
          "updates (measured in this run)")
    updates = make_updates(n, d)
    variants = {kind: hostile_updates(updates, kind) for kind in ("anchor", "huge")}
    print(f"{'rule':<18}{'honest s':>10}{'anchor s':>10}{'ratio':>8}{'huge s':>10}{'ratio':>8}")
    for label in HOSTILE_RULES:
        honest = measure(rule_call(label, f, updates), repeats)
        row = f"{label:<18}{honest:>10.3f}"
        for kind in ("anchor", "huge"):
            seconds = measure(rule_call(label, f, variants[kind]), repeats)
            row += f"{seconds:>10.3f}{seconds / honest:>7.1f}x"
        print(row)


def run_scaling(ns: list[int], d: int, repeats: int) -> None:
    print(f"\nScaling in n at d={d:,} (seconds, and ratio to the reference at the same n)")
    labels = [label for label in RULES if "/" not in label]
    print(f"{'n':>5}{'ref ms':>9}" + "".join(f"{label[:12]:>14}" for label in labels))
    for n in ns:
        f = max((n - 3) // 4, 0)
        updates = make_updates(n, d, seed=n)
        reference = reference_time(updates, repeats)
        cells = []
        for label in labels:
            seconds = measure(rule_call(label, f, updates), repeats)
            cells.append(f"{seconds:>7.3f}({seconds / reference:>4.1f}x)")
        print(f"{n:>5}{reference * 1e3:>9.1f}" + "".join(f"{c:>14}" for c in cells))
        del updates
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--d", type=int, default=1_000_000)
    parser.add_argument("--f", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scaling", default="10,25,50,100,200", help="client counts, '' to skip")
    parser.add_argument("--no-flower", action="store_true", help="skip Flower's built-ins")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory column")
    parser.add_argument("--quick", action="store_true", help="n=20, d=2e5, f=4, no scaling")
    parser.add_argument("--rules", default="", help="only these labels, e.g. dnc,fltrust")
    parser.add_argument("--memory-child", metavar="RULE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.n, args.d, args.f)
        return
    if args.quick:
        args.n, args.d, args.f, args.repeats, args.scaling = 20, 200_000, 4, 2, ""
    only = {label for label in args.rules.split(",") if label}
    unknown = sorted(only - set(RULES))
    if unknown:
        parser.error(f"--rules: unknown {unknown}; known: {', '.join(RULES)}")
    ok = run_main(args.n, args.d, args.f, args.repeats, not args.no_flower, not args.no_memory,
                  only)
    if only:  # a selection: the main table only
        print("\nall targets met" if ok else "\nsome targets NOT met (see verdicts)")
        return
    run_hostile(args.n, args.d, args.f, args.repeats)
    if args.scaling:
        run_scaling([int(v) for v in args.scaling.split(",")], args.d, max(args.repeats - 2, 1))
    print("\nall targets met" if ok else "\nsome targets NOT met (see verdicts)")


if __name__ == "__main__":
    main()
