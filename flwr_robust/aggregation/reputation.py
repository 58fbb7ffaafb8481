"""Reputation: a stateful wrapper that excludes persistently rejected clients before any rule."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import (
    AggregationResult,
    Aggregator,
    InvalidParameterError,
    check_float,
)
from .matrix import UpdateMatrix
from .registry import canonical_name, get_aggregator, register

CONTRIBUTIONS = ("kept", "distance")


@register
class Reputation(Aggregator):
    """Per-client reputation around any registry rule (the ``base_rule``).

    Each client identity has a reputation ``r`` (``reputation_initial`` when first seen),
    updated after every round it takes part in as the exponential moving average
    ``r <- reputation_decay * r + (1 - reputation_decay) * s`` of a contribution score
    ``s`` in ``[0, 1]``:

    - ``reputation_score="kept"``: ``s = 1`` when the base rule kept the client, else 0;
    - ``reputation_score="distance"``: ``s = min(1, median_j(d_j) / d_i)`` with ``d_i`` the
      distance of the client's update to the round's aggregate (clients at most the median
      distance away score 1, farther ones proportionally less).

    Clients whose reputation is below ``reputation_threshold`` at the start of a round are
    excluded before the base rule runs (reason ``low reputation ...``); the base rule sees
    only the others. Excluded clients are still scored: 0 under ``"kept"`` (so exclusion is
    permanent until :meth:`reset`), by their distance under ``"distance"`` (so a client
    that behaves again recovers). Reputations are reported as ``scores``; they exclude,
    they do not re-weight: the base rule's own weighting (robust rules ignore claims) is
    kept. State is keyed by ``client_ids`` (required), persists across calls and is
    cleared by :meth:`reset` (which also resets the base rule).

    Raises ``ValueError`` when so many clients are excluded that the base rule's
    precondition fails (e.g. Krum's ``n > 2f + 2``), never silently re-admitting them.
    Example counts are forwarded to the base rule for the clients it sees.

    Parameters
    ----------
    base_rule : str
        Registry name of the wrapped rule (not ``reputation``).
    reputation_decay : float
        Weight of the past in the moving average, in ``[0, 1)``.
    reputation_threshold : float
        Clients with a reputation below it are excluded, in ``[0, 1]``.
    reputation_initial : float
        Reputation of a client not seen before, in ``[0, 1]``.
    reputation_score : {"kept", "distance"}
        The contribution score, see above.
    **base_params
        Parameters of the base rule (and ``pre`` for a pre-aggregation stage with its
        parameters), forwarded to :func:`~flwr_robust.aggregation.get_aggregator`.
    """

    name = "reputation"
    stateful = True
    needs_client_ids = True
    wraps = "base_rule"

    def __init__(
        self,
        base_rule: str = "multi_krum",
        reputation_decay: float = 0.8,
        reputation_threshold: float = 0.5,
        reputation_initial: float = 1.0,
        reputation_score: str = "kept",
        **base_params: Any,
    ) -> None:
        if not isinstance(base_rule, str) or canonical_name(base_rule) == self.name:
            raise InvalidParameterError(
                f"base_rule must name a registry rule other than reputation, got {base_rule!r}"
            )
        if reputation_score not in CONTRIBUTIONS:
            raise InvalidParameterError(
                f"reputation_score must be one of {CONTRIBUTIONS}, got {reputation_score!r}"
            )
        self.reputation_decay = check_float(
            "reputation_decay", reputation_decay, minimum=0.0, maximum=1.0,
            exclusive_maximum=True,
        )
        self.reputation_threshold = check_float(
            "reputation_threshold", reputation_threshold, minimum=0.0, maximum=1.0
        )
        self.reputation_initial = check_float(
            "reputation_initial", reputation_initial, minimum=0.0, maximum=1.0
        )
        self.reputation_score = reputation_score
        self.base = get_aggregator(base_rule, **base_params)
        self.base_rule = canonical_name(base_rule)
        self.base_params = dict(base_params)
        self._reputation: dict[Any, float] = {}

    def params(self) -> dict[str, Any]:
        own = (
            "base_rule", "reputation_decay", "reputation_threshold", "reputation_initial",
            "reputation_score",
        )
        return {**{name: getattr(self, name) for name in own}, **self.base_params}

    def min_clients(self) -> int:
        return self.base.min_clients()

    def translation_equivariant(self) -> bool:
        return self.base.translation_equivariant()

    def reset(self) -> None:
        self._reputation.clear()
        self.base.reset()

    def reputation(self, client_id: Any) -> float:
        """The current reputation of ``client_id`` (the initial value if unknown)."""
        return self._reputation.get(client_id, self.reputation_initial)

    def _contributions(
        self, matrix: UpdateMatrix, kept: np.ndarray, update: list[np.ndarray]
    ) -> np.ndarray:
        if self.reputation_score == "kept":
            scores = np.zeros(matrix.n)
            scores[kept] = 1.0
            return scores
        flat = np.concatenate([layer.reshape(-1) for layer in update])
        distances = np.sqrt(matrix.squared_distances_to(flat))
        typical = float(np.median(distances))
        near = distances <= typical  # also when the median distance is 0 (all at the aggregate)
        return np.where(near, 1.0, typical / np.maximum(distances, 1e-300))

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        assert client_ids is not None  # enforced by Aggregator.__call__ (needs_client_ids)
        before = np.array([self.reputation(i) for i in client_ids])
        allowed = np.flatnonzero(before >= self.reputation_threshold)
        if allowed.size < self.base.min_clients():
            raise ValueError(
                f"reputation excluded {matrix.n - allowed.size} of {matrix.n} clients (below "
                f"reputation_threshold={self.reputation_threshold}); the {allowed.size} left "
                f"are fewer than {self.base!r} needs ({self.base.min_clients()})"
            )
        excluded = allowed.size < matrix.n
        inner = self.base._aggregate(
            matrix.subset(allowed) if excluded else matrix,
            None if num_examples is None else num_examples[allowed],
            [client_ids[i] for i in allowed],
        )
        kept = allowed[np.asarray(inner.kept, dtype=np.int64)]
        after = self.reputation_decay * before + (1.0 - self.reputation_decay) * (
            self._contributions(matrix, kept, inner.update)
        )
        self._reputation.update(zip(client_ids, after.tolist(), strict=True))
        rejected = {
            int(i): (
                f"low reputation {before[i]:.3g} < reputation_threshold "
                f"{self.reputation_threshold:.3g}"
            )
            for i in np.setdiff1d(np.arange(matrix.n), allowed)
        }
        rejected.update({int(allowed[i]): text for i, text in inner.rejected.items()})
        weights = None
        if inner.weights is not None:
            weights = np.zeros(matrix.n)
            weights[allowed] = inner.weights
        return AggregationResult(
            update=inner.update,
            kept=sorted(kept.tolist()),
            scores=after,
            rejected=dict(sorted(rejected.items())),
            weights=weights,
            info={**inner.info, "excluded_low_reputation": int(matrix.n - allowed.size)},
        )
