"""Rules that iterate towards a robust centre: geometric median and centered clipping.

Both keep their iterate as an affine combination ``z = sum_j c_j x_j`` (``sum_j c_j = 1``)
of the update rows, so distances ``||x_i - z||^2 = G_ii - 2 (G c)_i + c^T G c`` come from
the Gram matrix alone: the d-dimensional data is read once to build ``G`` and once for the
final weighted sum, however many iterations run. Affine combinations make these distances
translation invariant, so the translated (well-conditioned) Gram matrix can be used.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import AggregationResult, Aggregator, check_float, check_int, result_from_flat
from .matrix import UpdateMatrix, squared_distances
from .registry import register


def robust_start(gram: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Coefficients of a starting point among the majority: the ``alpha``-weighted mean of
    the ``n // 2 + 1`` rows nearest to the medoid (the row with the smallest
    ``alpha``-weighted sum of distances to the others). With fewer than half the rows far
    away, the medoid and its nearest half are rows of the majority. (Ties go to the first
    row of the canonical order; that matters where the minimiser is not unique, e.g. for
    collinear updates of an even count, where Weiszfeld stays where it starts.)
    """
    distances = np.sqrt(squared_distances(gram))
    medoid = int(np.argmin(distances @ alpha))
    nearest = np.argsort(distances[medoid], kind="stable")[: len(alpha) // 2 + 1]
    coefficients = np.zeros(len(alpha))
    coefficients[nearest] = alpha[nearest] / alpha[nearest].sum()
    return coefficients


def distances_to_combination(gram: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """``||x_i - sum_j c_j x_j||`` for every row ``i`` (``c`` must sum to one)."""
    projected = gram @ coefficients
    squared = np.diag(gram) - 2.0 * projected + coefficients @ projected
    return np.sqrt(np.maximum(squared, 0.0))


@register
class GeometricMedian(Aggregator):
    """Geometric median by the smoothed Weiszfeld algorithm (RFA: Pillutla, Kakade,
    Harchaoui, IEEE Trans. Signal Processing 70, 2022, "Robust Aggregation for Federated
    Learning").

    Minimises ``sum_i a_i max(nu, ||z - x_i||)``. Each iteration re-weights
    ``b_i = a_i / max(nu, ||z - x_i||)`` and sets ``z`` to the ``b``-weighted mean, until the
    iterate moves by less than ``tol`` times the median distance of the updates to it, or
    ``max_iter`` iterations. Breakdown point 1/2.

    Deviations from RFA, both for robustness to outliers of any magnitude: RFA starts from
    the mean and stops when the objective improves by less than ``tol`` relative to its
    value. An outlier drags the mean arbitrarily far and dominates the objective, so that
    rule stops early, far from the minimiser (measured: 4 honest N(0, 1) vectors and one at
    1e12 in every coordinate gave a result 2.7e5 from the honest mean, the minimiser being
    0.9 from it). Here the start is the mean of the ``n // 2 + 1`` updates nearest to the
    medoid (the update with the smallest weighted sum of distances to the others), which
    lies among the majority, and the stopping rule compares the step with the spread of the
    majority (the median distance), which no minority can inflate.

    Example counts: ignored by default (``a_i`` uniform). RFA weights clients by their data
    size; ``use_num_examples=True`` does so, but the counts are client claims, so a client
    claiming a huge count can then pull the median to itself.

    ``scores`` are the distances of each update to the returned median; ``weights`` the
    final Weiszfeld weights; ``info`` reports ``iterations`` and ``converged``.

    Parameters
    ----------
    num_malicious : int, optional
        Only checks the precondition ``n >= 2 * num_malicious + 1``.
    nu : float
        Smoothing: distances below ``nu`` count as ``nu`` (avoids division by zero when the
        iterate meets an update).
    tol : float
        The iteration stops once a step is shorter than ``tol`` times the median distance
        of the updates to the iterate.
    max_iter : int
        Upper bound on Weiszfeld iterations.
    use_num_examples : bool
        Weight clients by their claimed example counts (see above).
    """

    name = "geometric_median"
    equivariant = True

    def __init__(
        self,
        num_malicious: int | None = None,
        nu: float = 1e-6,
        tol: float = 1e-6,
        max_iter: int = 100,
        use_num_examples: bool = False,
    ) -> None:
        self.num_malicious = check_int("num_malicious", num_malicious, minimum=0, allow_none=True)
        self.nu = check_float("nu", nu, minimum=0.0, exclusive_minimum=True)
        self.tol = check_float("tol", tol, minimum=0.0, exclusive_minimum=True)
        self.max_iter = check_int("max_iter", max_iter, minimum=1)
        self.use_num_examples = bool(use_num_examples)

    def min_clients(self) -> int:
        return 2 * (self.num_malicious or 0) + 1

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        gram = matrix.gram()
        alpha = np.ones(matrix.n)
        if self.use_num_examples and num_examples is not None:
            alpha = num_examples.astype(np.float64)
        alpha = alpha / alpha.sum()
        coefficients = robust_start(gram, alpha)
        distances = distances_to_combination(gram, coefficients)
        converged = False
        iterations = 0
        while iterations < self.max_iter:
            iterations += 1
            beta = alpha / np.maximum(distances, self.nu)
            new = beta / beta.sum()
            step = new - coefficients
            moved = float(np.sqrt(max(float(step @ gram @ step), 0.0)))
            coefficients = new
            distances = distances_to_combination(gram, coefficients)
            if moved <= self.tol * max(float(np.median(distances)), self.nu):
                converged = True
                break
        objective = float(alpha @ np.maximum(distances, self.nu))
        flat = matrix.combine(coefficients)
        return result_from_flat(
            matrix,
            flat,
            range(matrix.n),
            scores=distances,
            weights=coefficients,
            info={"iterations": iterations, "converged": int(converged), "objective": objective},
        )


@register
class CenteredClipping(Aggregator):
    """Centered clipping (Karimireddy, He, Jaggi, ICML 2021, "Learning from History for
    Byzantine Robust Optimization").

    Starting from ``v`` (the previous round's aggregate, kept by this object; zero in the
    first round or after :meth:`reset`), repeats ``iterations`` times
    ``v <- v + (1/n) sum_i (x_i - v) min(1, radius / ||x_i - v||)``.
    Every update moves the centre by at most ``radius / n``, so ``f`` Byzantine updates
    shift it by at most ``f * radius / n`` per iteration. Example counts are ignored.

    Deviations from the paper: the paper clips worker momenta around the previous
    aggregate momentum; here the inputs are client updates and the history is the previous
    aggregated update. ``radius=None`` (default) picks, at each iteration, the median of the
    distances ``||x_i - v||`` (an adaptive choice; the paper's tau is a tuned constant).

    ``scores`` are the final distances ``||x_i - v||``; ``weights`` the coefficients of the
    clients in the returned update.

    Parameters
    ----------
    num_malicious : int, optional
        Only checks the precondition ``n >= 2 * num_malicious + 1``.
    radius : float, optional
        Clipping radius tau; adaptive (median distance) when ``None``.
    iterations : int
        Clipping iterations per round (the paper uses 1 with momentum; 3 without).
    """

    name = "centered_clip"
    stateful = True

    def __init__(
        self, num_malicious: int | None = None, radius: float | None = None, iterations: int = 3
    ) -> None:
        self.num_malicious = check_int("num_malicious", num_malicious, minimum=0, allow_none=True)
        self.radius = check_float(
            "radius", radius, minimum=0.0, exclusive_minimum=True, allow_none=True
        )
        self.iterations = check_int("iterations", iterations, minimum=1)
        self._previous: np.ndarray | None = None

    def min_clients(self) -> int:
        return 2 * (self.num_malicious or 0) + 1

    def reset(self) -> None:
        self._previous = None

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        n = matrix.n
        previous = self._previous
        if previous is None or previous.size != matrix.d:
            previous = np.zeros(matrix.d, dtype=np.float32)
        extended = matrix.with_extra_rows([previous])
        gram = extended.gram()
        coefficients = np.zeros(n + 1)
        coefficients[n] = 1.0
        for _ in range(self.iterations):
            distances = distances_to_combination(gram, coefficients)[:n]
            radius = self.radius if self.radius is not None else float(np.median(distances))
            scale = np.minimum(1.0, radius / np.maximum(distances, 1e-300)) / n
            coefficients = coefficients * (1.0 - scale.sum())
            coefficients[:n] += scale
        distances = distances_to_combination(gram, coefficients)[:n]
        flat = extended.combine(coefficients)
        self._previous = flat.copy()
        return result_from_flat(
            matrix,
            flat,
            range(n),
            scores=distances,
            weights=coefficients[:n],
            info={"history_weight": float(coefficients[n])},
        )
