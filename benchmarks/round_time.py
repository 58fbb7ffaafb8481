"""Where a Flower round's time goes at the benchmark preset's size, and client-rounds per second.

One real ``flwr run`` (Flower's simulation engine, the bundled apps, FedAvg) per setting, and,
in this process, the same round's client training done serially as the reference::

    python benchmarks/round_time.py                          # the preset's size, two settings
    python benchmarks/round_time.py --rounds 8 --evaluate-every 4

A round's wall time (between the central evaluations of consecutive rounds, round 1 left out
because it includes the clients' start-up) is split into:

- client training: the serial time of the sampled clients' local training measured here,
  divided by the clients Flower runs at once (``min(cores, sampled)``): the part no framework
  can remove;
- central evaluation and aggregation: measured inside the run (``evaluation_seconds`` and the
  round report's ``seconds`` in the results file);
- the rest: Flower's engine, messaging, (de)serialisation and the clients' other work.

The "before" setting evaluates after every round; "after" evaluates every
``--evaluate-every`` rounds (and after the last), as the benchmark preset does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flwr_robust.aggregation import get_aggregator
from flwr_robust.runtime.launch import flwr_run
from flwr_robust.task.data import load_dataset, load_partition
from flwr_robust.task.models import build_model, get_named_weights
from flwr_robust.task.training import evaluate, train


def serial_training_seconds(args: argparse.Namespace) -> tuple[float, float, float]:
    """Seconds of one round's client training (the sampled clients one after another, one
    thread), of one central evaluation, and of FedAvg over the sampled updates."""
    torch.set_num_threads(1)
    options = {"max_train": args.clients * args.samples_per_client, "max_test": args.max_test}
    _, test = load_dataset("fashion_mnist", seed=args.seed, **options)
    model = build_model("cnn", input_shape=test.x.shape[1:], num_classes=test.num_classes,
                        seed=args.seed)
    start_weights = [w.copy() for w in get_named_weights(model).values()]
    partitions = [load_partition("fashion_mnist", partition, args.clients, seed=args.seed,
                                 **options)[0] for partition in range(args.sampled)]
    train(model, partitions[0], epochs=1, learning_rate=0.05, batch_size=args.batch_size)
    updates = []
    started = time.perf_counter()  # data loaded and torch warmed up: training alone
    for partition, local in enumerate(partitions):
        with torch.no_grad():
            for param, value in zip(model.parameters(), start_weights, strict=False):
                param.copy_(torch.from_numpy(value))
        train(model, local, epochs=1, learning_rate=0.05, batch_size=args.batch_size,
              momentum=0.9, seed=partition)
        updates.append([w - s for w, s in zip(get_named_weights(model).values(), start_weights,
                                               strict=True)])
    training = time.perf_counter() - started
    started = time.perf_counter()
    evaluate(model, test)
    evaluation = time.perf_counter() - started
    started = time.perf_counter()
    get_aggregator("fedavg")(updates)
    aggregation = time.perf_counter() - started
    return training, evaluation, aggregation


def measured_run(args: argparse.Namespace, evaluate_every: int, home: Path) -> dict[str, Any]:
    """One ``flwr run``; the per-round figures from its results file."""
    results = home / "results.jsonl"
    run_config = {
        "strategy": "fedavg", "dataset": "fashion_mnist", "model": "cnn",
        "max-train-samples": args.clients * args.samples_per_client,
        "max-test-samples": args.max_test, "num-server-rounds": args.rounds,
        "fraction-train": args.sampled / args.clients, "local-epochs": 1,
        "learning-rate": 0.05, "batch-size": args.batch_size, "seed": args.seed,
        "evaluate-every": evaluate_every, "results-file": str(results),
    }
    started = time.monotonic()
    outcome = flwr_run(run_config, flwr_home=home / "flwr-home", num_supernodes=args.clients,
                       timeout=3600)
    total = time.monotonic() - started
    if not outcome.ok:
        raise RuntimeError(f"flwr run failed: {outcome.status} {outcome.status_details}")
    records = [json.loads(line) for line in results.read_text().splitlines()]
    steady = records[2:]  # round r's time: from round r-1's evaluation to round r's
    walls = [b["time"] - a["time"] for a, b in zip(records[1:], steady, strict=False)]
    return {
        "total": total,
        "wall": statistics.mean(walls),
        "evaluation": statistics.mean(r["evaluation_seconds"] for r in steady),
        "aggregation": statistics.mean(r.get("seconds", 0.0) for r in steady),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--sampled", type=int, default=20)
    parser.add_argument("--samples-per-client", type=int, default=300)
    parser.add_argument("--max-test", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--evaluate-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    cores = len(os.sched_getaffinity(0))
    parallel = min(cores, args.sampled)
    serial, evaluation_here, aggregation_here = serial_training_seconds(args)
    training = serial / parallel
    print(f"{args.sampled} of {args.clients} clients x {args.samples_per_client} Fashion-MNIST "
          f"images x 1 epoch (CNN), test set {args.max_test}, {cores} cores")
    print(f"reference in this process: client training {serial:.2f} s serial "
          f"-> {training:.2f} s per round on {parallel} parallel clients; central evaluation "
          f"{evaluation_here:.2f} s; FedAvg {aggregation_here * 1e3:.1f} ms")
    header = (f"{'setting':<26}{'round s':>9}{'training':>10}{'eval':>8}{'aggr':>8}"
              f"{'other':>8}{'other %':>9}{'client-rounds/s':>17}")
    print(header)
    for label, every in (("before: evaluate each", 1),
                         (f"after: evaluate every {args.evaluate_every}", args.evaluate_every)):
        with tempfile.TemporaryDirectory() as directory:
            run = measured_run(args, every, Path(directory))
        other = run["wall"] - training - run["evaluation"] - run["aggregation"]
        print(f"{label:<26}{run['wall']:>9.2f}{training:>10.2f}{run['evaluation']:>8.2f}"
              f"{run['aggregation']:>8.3f}{other:>8.2f}{100 * other / run['wall']:>8.0f}%"
              f"{args.sampled / run['wall']:>17.2f}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
