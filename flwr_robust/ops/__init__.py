"""Operations hooks for any strategy: anomaly detection (:mod:`.anomaly`), Prometheus metrics
(:mod:`.telemetry`), the hash-chained audit log (:mod:`.audit`), checkpoints with rollback and
resume (:mod:`.checkpoint`), and their command line (:mod:`.cli`).

>>> from flwr_robust.ops import AnomalyDetectionHook

The hooks load on first access, so the command line can use :mod:`.cli` without Flower.
"""

from typing import Any

__all__ = ["ANOMALY_CODES", "MODES", "AnomalyDetectionHook", "UpdateStats"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import anomaly

        return getattr(anomaly, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
