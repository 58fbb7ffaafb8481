"""Distance-based selection rules: Krum, Multi-Krum and Bulyan.

All three work from one Gram matrix of the (translated) updates per call: pairwise squared
distances are ``G_ii + G_jj - 2 G_ij``, so the d-dimensional data is read once for the
Gram matrix and once more for the output. The Gram matrix is finite and precise for any
finite inputs in any order (see :mod:`.matrix`), so outliers of any magnitude get large,
finite scores and are never selected because of an overflow.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import AggregationResult, Aggregator, check_int, result_from_flat
from .coordinate import coordinate_reduce
from .matrix import UpdateMatrix, squared_distances
from .registry import register


def krum_scores(distances: np.ndarray, num_malicious: int, candidates: np.ndarray) -> np.ndarray:
    """Krum score of each candidate within the candidate set.

    The score of ``i`` is the sum of its squared distances to its ``m - f - 2`` nearest other
    candidates (``m`` candidates). When fewer than ``f + 3`` candidates remain (only in
    Bulyan's last selection steps) the nearest neighbour alone is used.
    """
    m = len(candidates)
    if m == 1:
        return np.zeros(1)
    neighbours = max(m - num_malicious - 2, 1)
    sub = distances[np.ix_(candidates, candidates)].copy()
    np.fill_diagonal(sub, np.inf)
    nearest = np.partition(sub, neighbours - 1, axis=1)[:, :neighbours]
    return nearest.sum(axis=1)


def krum_ranking(scores: np.ndarray, distances: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Positions (into ``candidates``) by Krum score; equal scores by the sum of squared
    distances to all candidates (the more central first), then by the canonical order."""
    spread = distances[np.ix_(candidates, candidates)].sum(axis=1)
    return np.lexsort((spread, scores))


def _rank_note(scores: np.ndarray, threshold: float) -> Any:
    return lambda i: f"score {scores[i]:.6g} above the selection cut-off {threshold:.6g}"


@register
class Krum(Aggregator):
    """Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent").

    Scores every update by the sum of squared distances to its ``n - f - 2`` nearest other
    updates and returns the update with the lowest score. Requires ``n > 2f + 2``. Example
    counts are ignored. ``scores`` holds the Krum scores (lower is more central).

    Deviation: the paper leaves ties open. They are common (with one scored neighbour, two
    mutual nearest neighbours always score the same): the one with the smaller sum of
    squared distances to all others wins (the more central), then the first of the
    canonical order (see :meth:`Aggregator.__call__`); never a client's position.

    Parameters
    ----------
    num_malicious : int
        ``f``, the number of Byzantine clients to tolerate.
    """

    name = "krum"
    equivariant = True

    def __init__(self, num_malicious: int = 0) -> None:
        self.num_malicious = check_int("num_malicious", num_malicious, minimum=0)

    def min_clients(self) -> int:
        return 2 * self.num_malicious + 3

    def _precondition_hint(self) -> str:
        return " (Krum needs n > 2 * num_malicious + 2)"

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        distances = squared_distances(matrix.gram())
        candidates = np.arange(matrix.n)
        scores = krum_scores(distances, self.num_malicious, candidates)
        winner = int(krum_ranking(scores, distances, candidates)[0])
        flat = matrix.row(winner)
        return result_from_flat(
            matrix,
            flat,
            [winner],
            reason=_rank_note(scores, float(scores[winner])),
            scores=scores,
            weights=np.eye(matrix.n)[winner],
        )


@register
class MultiKrum(Aggregator):
    """Multi-Krum (Blanchard et al., NeurIPS 2017, section 5).

    Computes the Krum scores once, selects the ``num_selected`` updates with the lowest
    scores and returns their unweighted mean (example counts are ignored, so a client cannot
    buy weight by claiming more data). Requires ``n > 2f + 2``. Ties at the cut-off are
    broken as in :class:`Krum`.

    Parameters
    ----------
    num_malicious : int
        ``f``, the number of Byzantine clients to tolerate.
    num_selected : int, optional
        ``m``, updates averaged; ``n - f`` by default. Must be between 1 and ``n``.
    """

    name = "multi_krum"
    equivariant = True

    def __init__(self, num_malicious: int = 0, num_selected: int | None = None) -> None:
        self.num_malicious = check_int("num_malicious", num_malicious, minimum=0)
        self.num_selected = check_int("num_selected", num_selected, minimum=1, allow_none=True)

    def min_clients(self) -> int:
        return max(2 * self.num_malicious + 3, self.num_selected or 1)

    def _precondition_hint(self) -> str:
        return " (Multi-Krum needs n > 2 * num_malicious + 2 and n >= num_selected)"

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        selected_count = self.num_selected or matrix.n - self.num_malicious
        distances = squared_distances(matrix.gram())
        candidates = np.arange(matrix.n)
        scores = krum_scores(distances, self.num_malicious, candidates)
        selected = np.sort(krum_ranking(scores, distances, candidates)[:selected_count])
        weights = np.zeros(matrix.n)
        weights[selected] = 1.0 / selected_count
        flat = matrix.combine(weights[selected], rows=selected.tolist())
        cutoff = float(scores[selected].max())
        return result_from_flat(
            matrix, flat, selected, reason=_rank_note(scores, cutoff), scores=scores,
            weights=weights,
        )


@register
class Bulyan(Aggregator):
    """Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018, "The Hidden Vulnerability of
    Distributed Learning in Byzantium").

    1. Select ``theta = n - 2f`` updates by Krum applied recursively: each step scores the
       remaining candidates among themselves, moves the lowest-scoring one to the selection.
    2. Per coordinate, average the ``beta = theta - 2f`` selected values closest to the
       selected values' median.

    Requires ``n >= 4f + 3``. Example counts are ignored. ``scores`` are the Krum scores of
    the first selection step. Deviation: when fewer than ``f + 3`` candidates remain in the
    last selection steps, Krum's neighbour count ``m - f - 2`` drops below one; we then score
    by the distance to the nearest remaining candidate.

    Parameters
    ----------
    num_malicious : int
        ``f``, the number of Byzantine clients to tolerate.
    """

    name = "bulyan"
    equivariant = True

    def __init__(self, num_malicious: int = 0) -> None:
        self.num_malicious = check_int("num_malicious", num_malicious, minimum=0)

    def min_clients(self) -> int:
        return 4 * self.num_malicious + 3

    def _precondition_hint(self) -> str:
        return " (Bulyan needs n >= 4 * num_malicious + 3)"

    def select(self, distances: np.ndarray) -> tuple[list[int], np.ndarray]:
        """Recursive Krum selection: the ``theta`` selected indices and first-step scores
        (ties broken as in :class:`Krum`)."""
        n = distances.shape[0]
        theta = n - 2 * self.num_malicious
        remaining = np.arange(n)
        selected: list[int] = []
        first_scores = np.zeros(n)
        for step in range(theta):
            scores = krum_scores(distances, self.num_malicious, remaining)
            if step == 0:
                first_scores = scores
            best = int(krum_ranking(scores, distances, remaining)[0])
            selected.append(int(remaining[best]))
            remaining = np.delete(remaining, best)
        return sorted(selected), first_scores

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        f = self.num_malicious
        selected, scores = self.select(squared_distances(matrix.gram()))
        beta = len(selected) - 2 * f
        flat = coordinate_reduce(
            matrix, "coordinate_mean_around_median", beta, rows=selected
        )
        return result_from_flat(
            matrix,
            flat,
            selected,
            reason=f"not among the theta={len(selected)} updates selected by recursive Krum",
            scores=scores,
            info={"theta": len(selected), "beta": beta},
        )
