"""Speed of the integrity layer against plain SHA-256 over the same bytes, in the same run.

For models of 1e5, 1e6 and 1e7 float32 parameters (four layers), prints the best of several
repeats, in seconds, of:

- ``sha256``: ``hashlib.sha256`` over the layers' bytes (the memory-bandwidth reference);
- ``digest``: :func:`digest_arrays` on the numpy layers, and its ratio to ``sha256``
  (target <= 1.25x: no extra copies of the arrays);
- ``record``: :func:`arrayrecord_digest` on the Flower ``ArrayRecord`` of the same layers
  (straight from the serialized bytes), and its ratio to ``sha256``;
- ``sign``: signing a reply statement (given its digest); ``verify``: the server's decision for
  one reply (given its digest); both are independent of the model size.

Smaller models get proportionally more repeats, to keep their timings above the noise.

Then the overhead of signing on a demo round (target <= 2%): a real ``flwr run`` of the demo
federation (10 clients, signing on) gives the measured round duration; all the integrity
work of one such round is timed in this process on the demo model (the server signs the
instruction and checks 10 updates; each client checks the model and signs its update), added
up as if it ran serially (an upper bound: clients do theirs in parallel), and divided by it.

Usage: ``python benchmarks/signing.py [--quick] [--repeats N] [--no-demo]``.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import Array, ArrayRecord

from flwr_robust.security.digest import digest_arrays
from flwr_robust.security.flower import arrayrecord_digest
from flwr_robust.security.keys import ALGORITHMS, generate_private_key
from flwr_robust.security.signing import sign_global_model, sign_reply
from flwr_robust.security.truststore import TrustStore
from flwr_robust.security.verifier import Reply, verify_global_model, verify_replies

TARGET_RATIO = 1.25
DEMO_SHARE_TARGET = 0.02
LAYER_SHARES = (0.5, 0.3, 0.15, 0.05)


def make_model(num_params: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Four float32 layers holding ``num_params`` parameters in total."""
    rng = np.random.default_rng(seed)
    sizes = [int(num_params * share) for share in LAYER_SHARES]
    sizes[-1] += num_params - sum(sizes)
    return {
        str(i): rng.standard_normal(size, dtype=np.float32).reshape(-1, 10)
        if size % 10 == 0
        else rng.standard_normal(size, dtype=np.float32)
        for i, size in enumerate(sizes)
    }


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """Best wall time of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def sha256_reference(model: dict[str, np.ndarray]) -> bytes:
    """Plain SHA-256 over the raw bytes of every layer (no framing, no copies)."""
    digest = hashlib.sha256()
    for layer in model.values():
        digest.update(layer)
    return digest.digest()


def signing_costs(repeats: int, algorithm: str) -> tuple[float, float]:
    """Seconds to sign one reply statement and to verify one reply, given the digests."""
    key = generate_private_key(algorithm)
    store = TrustStore()
    store.add(key.public_key(), "client")
    arrays_digest, base = b"\x01" * 32, b"\x02" * 32
    metrics = {"num-examples": 100, "train-loss": 0.5}

    def sign() -> object:
        return sign_reply(
            key,
            run_id=1,
            server_round=1,
            arrays_digest=arrays_digest,
            metrics=metrics,
            base_digest=base,
        )

    reply = Reply("node", arrays_digest, metrics, sign().to_config())

    def verify() -> None:
        (verdict,) = verify_replies(
            [reply], trust_store=store, run_id=1, server_round=1, base_digest=base
        )
        assert verdict.accepted

    return best_of(repeats * 5, sign), best_of(repeats * 5, verify)


def demo_round_seconds(clients: int, rounds: int = 4) -> float:
    """Mean duration of the rounds after the first of a real demo run with signing on."""
    from flwr_robust.cli import main as cli_main
    from flwr_robust.runtime.launch import flwr_run

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        assert cli_main(["keys", "init", str(work / "keys"), "--clients", str(clients)]) == 0
        results = work / "rounds.jsonl"
        outcome = flwr_run(
            {"num-server-rounds": rounds, "signing": True, "keys-dir": str(work / "keys"),
             "results-file": str(results), "num-malicious": 2},
            flwr_home=work / "flwr-home", num_supernodes=clients,
        )
        if not outcome.ok:
            raise RuntimeError(f"demo run failed: {outcome.status} {outcome.status_details}")
        times = [json.loads(line)["time"] for line in results.read_text().splitlines()]
    durations = np.diff(times)[1:]  # round 1 also pays the actors' start-up
    return float(durations.mean())


def integrity_seconds_per_round(clients: int, repeats: int) -> tuple[float, float, int]:
    """Integrity work of one demo round: the serial sum, the part on the round's critical
    path (clients work in parallel, one per core), and the model size."""
    from flwr_robust.apps.server import build_global_model
    from flwr_robust.apps.settings import RunSettings
    from flwr_robust.task.data import load_dataset
    from flwr_robust.task.models import get_named_weights

    settings = RunSettings()
    model = get_named_weights(build_global_model(settings, load_dataset("digits")[1]))
    record = ArrayRecord({name: Array(value) for name, value in model.items()})
    server_key, client_key = generate_private_key(), generate_private_key()
    store = TrustStore()
    store.add(client_key.public_key(), "client")
    config = {"local-epochs": 3, "learning-rate": 0.1, "server-round": 1}
    metrics = {"num-examples": 143, "train-loss": 0.5}

    def server_sign() -> object:
        return sign_global_model(server_key, run_id=1, server_round=1,
                                 arrays_digest=digest_arrays(model), config=config)

    bundle = server_sign().to_config()

    def client_work() -> object:
        received = arrayrecord_digest(record)
        verdict = verify_global_model(server_key.public_key(), bundle, run_id=1,
                                      arrays_digest=received, config=config)
        assert verdict.accepted
        return sign_reply(client_key, run_id=1, server_round=1,
                          arrays_digest=arrayrecord_digest(record), metrics=metrics,
                          base_digest=received)

    reply = Reply("node", digest_arrays(model), metrics, client_work().to_config())

    def server_check() -> None:
        (verdict,) = verify_replies([reply], trust_store=store, run_id=1, server_round=1,
                                    base_digest=digest_arrays(model))
        assert verdict.accepted

    server = best_of(repeats * 20, server_sign) + clients * (
        best_of(repeats * 20, partial(digest_arrays, model)) + best_of(repeats * 20, server_check)
    )
    client = best_of(repeats * 20, client_work)
    cores = os.cpu_count() or 1
    serial = server + clients * client
    critical = server + math.ceil(clients / cores) * client
    return serial, critical, sum(v.size for v in model.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1e5 and 1e6 parameters only")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per measurement")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo-round share")
    args = parser.parse_args(argv)
    sizes = (10**5, 10**6) if args.quick else (10**5, 10**6, 10**7)
    repeats = args.repeats or (3 if args.quick else 7)

    sign_s, verify_s = signing_costs(repeats, "ed25519")
    header = (
        f"{'params':>10} {'MB':>6} {'sha256 s':>10} {'digest s':>10} {'ratio':>6} "
        f"{'record s':>10} {'ratio':>6} {'sign s':>10} {'verify s':>10}"
    )
    print(header)
    worst = 0.0
    for num_params in sizes:
        model = make_model(num_params)
        record = ArrayRecord(list(model.values()))
        assert arrayrecord_digest(record) == digest_arrays(model)
        runs = repeats * max(1, 10**7 // num_params)  # small models: more runs, less noise
        reference = best_of(runs, partial(sha256_reference, model))
        digest = best_of(runs, partial(digest_arrays, model))
        from_record = best_of(runs, partial(arrayrecord_digest, record))
        ratio, record_ratio = digest / reference, from_record / reference
        worst = max(worst, ratio, record_ratio)
        megabytes = sum(layer.nbytes for layer in model.values()) / 1e6
        print(
            f"{num_params:>10.0e} {megabytes:>6.1f} {reference:>10.5f} {digest:>10.5f} "
            f"{ratio:>5.2f}x {from_record:>10.5f} {record_ratio:>5.2f}x "
            f"{sign_s:>10.6f} {verify_s:>10.6f}"
        )
    print()
    print(f"{'algorithm':>12} {'sign s':>10} {'verify s':>10}   (one statement, one reply)")
    for algorithm in ALGORITHMS:
        sign_s, verify_s = signing_costs(repeats, algorithm)
        print(f"{algorithm:>12} {sign_s:>10.6f} {verify_s:>10.6f}")
    verdict = "within" if worst <= TARGET_RATIO else "ABOVE"
    print(f"\nworst digest/sha256 ratio {worst:.2f}x: {verdict} the {TARGET_RATIO}x target")
    if not args.no_demo:
        clients = 10
        serial, critical, params = integrity_seconds_per_round(clients, repeats)
        round_s = demo_round_seconds(clients)
        verdict = "within" if critical / round_s <= DEMO_SHARE_TARGET else "ABOVE"
        print(
            f"\ndemo round ({clients} clients, {params:,}-parameter model, "
            f"{os.cpu_count()} cores): {round_s:.3f} s measured\n"
            f"integrity work per round: {critical * 1e3:.2f} ms on the critical path = "
            f"{critical / round_s:.2%} of a round ({verdict} the {DEMO_SHARE_TARGET:.0%} target); "
            f"{serial * 1e3:.2f} ms = {serial / round_s:.2%} if it all ran serially"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
