"""Import time of ``flwr_robust.strategy`` against ``flwr.serverapp.strategy``, same run.

Each import runs in a fresh interpreter (nothing cached in ``sys.modules``), timed inside
that interpreter around the ``import`` statement only, so interpreter start-up is not
counted. The two modules alternate, and the best of ``--repeats`` is kept for each.
``flwr_robust.strategy`` imports Flower's strategies itself, so the ratio is
(Flower + flwr-robust) / Flower. Target: at most 1.3x. Heavy dependencies (scikit-learn,
numba, torch) must load on first use, not at import: the script also reports whether any
of them was imported.

Usage: ``python benchmarks/import_time.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

TARGET = 1.3
HEAVY = ("sklearn", "numba", "torch")
_PROBE = """
import json, sys, time
start = time.perf_counter()
import {module}
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def time_import(module: str) -> tuple[float, list[str]]:
    """Seconds to import ``module`` in a fresh interpreter, and the heavy modules it loaded."""
    code = _PROBE.format(module=module, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return float(result["seconds"]), list(result["heavy"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    modules = ("flwr.serverapp.strategy", "flwr_robust.strategy")
    best = {m: float("inf") for m in modules}
    heavy: dict[str, list[str]] = {}
    time_import(modules[1])  # warm the file-system cache and bytecode of both
    for _ in range(args.repeats):
        for module in modules:
            seconds, loaded = time_import(module)
            best[module] = min(best[module], seconds)
            heavy[module] = loaded
    ratio = best[modules[1]] / best[modules[0]]
    print(f"import time, best of {args.repeats} fresh interpreters:")
    for module in modules:
        print(f"  {module:26} {best[module]:.3f} s  heavy modules loaded: "
              f"{', '.join(heavy[module]) or 'none'}")
    verdict = "ok" if ratio <= TARGET else "ABOVE TARGET"
    print(f"  ratio {ratio:.2f}x (target <= {TARGET}x): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
