"""Small builders of client updates shared by the aggregation tests."""

from __future__ import annotations

import numpy as np

from flwr_robust.aggregation import AggregationResult


def clients(*values) -> list[list[np.ndarray]]:
    return [[np.asarray(v, dtype=np.float32)] for v in values]


def rows(x: np.ndarray) -> list[list[np.ndarray]]:
    """Two layers per client, so layer boundaries are exercised."""
    return [[row[:3].reshape(3), row[3:].reshape(-1, 1)] for row in np.asarray(x, np.float32)]


def flat(result: AggregationResult) -> np.ndarray:
    return np.concatenate([layer.ravel() for layer in result.update])
