"""Federated averaging, the non-robust baseline."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import AggregationResult, Aggregator, result_from_flat
from .matrix import UpdateMatrix
from .registry import register


@register
class FedAvg(Aggregator):
    """Weighted mean of the updates (McMahan et al., AISTATS 2017, "Communication-Efficient
    Learning of Deep Networks from Decentralized Data").

    Example counts: the weights are the claimed ``num_examples`` (uniform when absent), as
    in the paper. This is exactly what makes FedAvg fragile: one client claiming a huge
    count dominates the result, and one arbitrary update moves it arbitrarily far.
    """

    name = "fedavg"
    equivariant = True

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        counts = np.ones(matrix.n) if num_examples is None else num_examples
        weights = counts / counts.sum()
        flat = matrix.combine(weights)
        return result_from_flat(matrix, flat, range(matrix.n), weights=weights)
