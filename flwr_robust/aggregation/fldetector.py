"""FLDetector: flag clients whose updates are inconsistent with an L-BFGS prediction."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import numpy as np

from .base import (
    AggregationResult,
    Aggregator,
    InvalidParameterError,
    check_int,
)
from .matrix import UpdateMatrix
from .registry import canonical_name, get_aggregator, register

logger = logging.getLogger("flwr.robust")

#: Values per chunk of the float64 products over the stored vectors.
CHUNK = 1 << 16
#: Gap statistic: reference data sets, largest number of clusters tried, generator seed.
GAP_REFERENCES = 20
GAP_MAX_CLUSTERS = 10
GAP_SEED = 0
#: Fewest scored clients the detection runs on.
MIN_SCORED = 3


def _products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b.T`` in float64 for float32 ``(m, d)`` and ``(k, d)`` arrays, chunk by chunk
    (einsum, not BLAS: see :func:`~.matrix.weighted_rows` on mixing thread pools)."""
    out = np.zeros((len(a), len(b)))
    for start in range(0, a.shape[1], CHUNK):
        x = a[:, start : start + CHUNK].astype(np.float64)
        y = b[:, start : start + CHUNK].astype(np.float64)
        out += np.einsum("ik,jk->ij", x, y)
    return out


def lbfgs_hvp_coefficients(
    gram: np.ndarray, directions: np.ndarray | None = None
) -> np.ndarray | None:
    """Coefficients ``c`` with ``H v = sum_j c_j a_j``, the L-BFGS Hessian-vector product
    (FLDetector's Algorithm 1, the compact form of Byrd, Nocedal, Schnabel 1994), from
    ``gram``, the Gram matrix of the stored global updates ``a_0..a_{m-1}`` (oldest first).

    The "gradient" of round ``k`` is ``g_k = -a_k`` and the model moved by ``a_k`` after it,
    so the pairs are ``s_j = a_{j-1}`` (``w_j - w_{j-1}``), ``y_j = a_{j-1} - a_j``
    (``g_j - g_{j-1}``) and by default ``v = a_{m-1}`` (``w_t - w_{t-1}``). ``directions``,
    shape ``(q, m)``, gives other vectors ``v = sum_j e_j a_j`` instead (one per row, e.g.
    ``w_t - w_s``, the sum of the last ``t - s`` updates); the result is then ``(q, m)``.
    Pairs without positive curvature (``s.y <= 0``) are skipped, as L-BFGS does. ``None``
    without a usable pair.
    """
    m = len(gram)
    if m < 2:
        return None
    pairs = m - 1
    select_s = np.eye(pairs, m)
    select_y = select_s - np.eye(pairs, m, k=1)
    ss = np.diag(select_s @ gram @ select_s.T)
    yy = np.diag(select_y @ gram @ select_y.T)
    sy = np.diag(select_s @ gram @ select_y.T)
    valid = np.flatnonzero(sy > 1e-12 * np.sqrt(ss * yy))
    if valid.size == 0:
        return None
    select_s, select_y = select_s[valid], select_y[valid]
    sy_matrix = select_s @ gram @ select_y.T  # (i, j) = s_i . y_j
    ss_matrix = select_s @ gram @ select_s.T
    sigma = sy_matrix[-1, -1] / ss_matrix[-1, -1]
    lower = np.tril(sy_matrix, -1)
    middle = np.block([[-np.diag(np.diag(sy_matrix)), lower.T], [lower, sigma * ss_matrix]])
    single = directions is None
    e = np.eye(1, m, m - 1) if directions is None else np.atleast_2d(directions)
    products = gram @ e.T  # (m, q): a_j . v
    rhs = np.concatenate([select_y @ products, sigma * (select_s @ products)])
    p = np.linalg.lstsq(middle, rhs, rcond=None)[0]
    coefficients = (
        -select_y.T @ p[: valid.size] - sigma * (select_s.T @ p[valid.size :]) + sigma * e.T
    ).T
    if not np.all(np.isfinite(coefficients)):
        return None
    return coefficients[0] if single else coefficients


def kmeans_1d_costs(values: np.ndarray, max_clusters: int) -> np.ndarray:
    """The optimal k-means within-cluster sums of squares of 1-D ``values`` for
    ``k = 1..max_clusters`` (exact: dynamic programming over the sorted values)."""
    x = np.sort(values)
    n = x.size
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    s2 = np.concatenate([[0.0], np.cumsum(x * x)])
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    length = np.maximum(j - i, 1)
    cost = np.maximum(s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / length, 0.0)
    cost[j <= i] = np.inf
    best = cost[0].copy()
    costs = [best[n]]
    for _ in range(1, max_clusters):
        best = np.min(best[:, None] + cost, axis=0)
        costs.append(best[n])
    return np.asarray(costs)


def gap_statistic_clusters(scores: np.ndarray) -> int:
    """The number of clusters the gap statistic (Tibshirani, Walther, Hastie, JRSS-B 2001)
    picks for 1-D ``scores``: the smallest ``k`` with ``Gap(k) >= Gap(k+1) - s_{k+1}``,
    references drawn uniformly over the scores' range (seeded: deterministic)."""
    distinct = np.unique(scores).size
    if distinct < 2:
        return 1
    low, high = float(scores.min()), float(scores.max())
    x = (scores - low) / (high - low)
    top = min(GAP_MAX_CLUSTERS, distinct)
    tiny = 1e-12  # log(0) when k reaches the number of distinct values
    observed = np.log(kmeans_1d_costs(x, top) + tiny)
    rng = np.random.default_rng(GAP_SEED)
    reference = np.log(
        np.array([kmeans_1d_costs(rng.random(x.size), top) for _ in range(GAP_REFERENCES)])
        + tiny
    )
    gap = reference.mean(axis=0) - observed
    spread = reference.std(axis=0) * np.sqrt(1.0 + 1.0 / GAP_REFERENCES)
    for k in range(top - 1):
        if gap[k] >= gap[k + 1] - spread[k + 1]:
            return k + 1
    return top


def upper_cluster(scores: np.ndarray) -> np.ndarray:
    """Mask of the higher of the optimal two 1-D k-means clusters (equal scores stay
    together, in the lower one)."""
    x = np.sort(scores)
    s1, s2 = np.cumsum(x), np.cumsum(x * x)
    splits = np.arange(1, x.size)
    left = s2[splits - 1] - s1[splits - 1] ** 2 / splits
    right_sum, right_sq = s1[-1] - s1[splits - 1], s2[-1] - s2[splits - 1]
    right = right_sq - right_sum**2 / (x.size - splits)
    cut = int(splits[np.argmin(left + right)])
    return scores > x[cut - 1]


@register
class FLDetector(Aggregator):
    """FLDetector (Zhang, Cao, Jia, Gong, KDD 2022, "FLDetector: Defending Federated
    Learning Against Model Poisoning Attacks via Detecting Malicious Clients").

    Each round it predicts every client's update from that client's previous update with
    an L-BFGS estimate of the Hessian: ``g_hat_i = g_i^{t-1} + H_t (w_t - w_{t-1})``, ``H_t``
    from the last ``N = fldetector_window`` global-model differences and global-update
    differences (:func:`lbfgs_hvp_coefficients`). The distances ``||g_hat_i - g_i||`` are
    normalised by their sum over the round's clients; a client's suspicious score is the
    mean of its last ``N`` normalised distances. Once ``N`` rounds have been scored, the
    gap statistic on the round's scores decides whether attackers are present (more than
    one cluster) and, if so, the higher cluster of a 1-D k-means with ``k = 2`` is rejected
    for the round. The remaining clients are aggregated by ``fldetector_base_rule`` (built
    with the other parameters by the registry; default the coordinate-wise median, one of
    the robust rules the paper combines FLDetector with).

    Assumption: the global model moves by exactly this rule's output each round (``w_{t+1}
    = w_t + a_t``, rounds consecutive): the model differences are the rule's own previous
    outputs and the "gradients" the negated updates (``g = -a``; a learning rate is
    absorbed into ``H``). If the server scales the aggregate or skips rounds, call
    :meth:`reset`. State is keyed by ``client_ids`` (required): the last ``N + 1`` outputs
    and, per client seen in the last ``N + 1`` rounds, its last update with its round
    (``4 * d`` bytes each) and its last ``N`` distances; a client not seen for more than
    ``N`` rounds is forgotten (bounded memory under churn). :meth:`reset` forgets all of it.

    Deviations: the paper removes detected clients for good and restarts training from a
    checkpoint; here flagged clients are rejected in the rounds they are flagged (a client
    that stays inconsistent keeps a high score and stays rejected). The paper assumes full
    participation; here a client last seen ``k`` rounds ago (``k <= N + 1``, within the
    stored outputs) is predicted across the gap, ``g_hat = g_s + H_t (w_t - w_s)`` with
    ``w_t - w_s`` the sum of the last ``k`` outputs, so skipping rounds does not escape
    scoring; a client with no stored update (new, renamed or forgotten) is not scored (score
    0) in that round: a Sybil that takes a fresh id every round is never scored, and only
    the base rule stands against it. The paper assumes the malicious clients are a
    minority: the higher k-means cluster is flagged only when it holds fewer than half of
    the scored clients; otherwise nobody is flagged (logged, ``info["majority_not_flagged"]
    = 1``), since a client sending the same update every round fits the prediction best and
    would otherwise push every honest (noisy) client into the higher cluster. L-BFGS pairs
    without positive curvature are skipped; without any pair nothing is scored. The
    detection needs at least 3 scored clients. The gap statistic uses 20 uniform reference
    sets (seeded), at most 10 clusters. ``scores`` are the suspicious scores (0 when not
    scored).

    Parameters
    ----------
    fldetector_window : int
        ``N``, the window of past rounds (10 in the paper).
    fldetector_base_rule : str
        Registry name of the rule aggregating the clients not flagged (not a wrapping rule).
    **base_params
        Parameters of the base rule (and ``pre`` with its stage's), as for ``reputation``.
    """

    name = "fldetector"
    stateful = True
    needs_client_ids = True
    wraps = "fldetector_base_rule"

    def __init__(
        self, fldetector_window: int = 10, fldetector_base_rule: str = "median", **base_params: Any
    ) -> None:
        self.fldetector_window = check_int("fldetector_window", fldetector_window, minimum=1)
        if not isinstance(fldetector_base_rule, str) or canonical_name(fldetector_base_rule) in (
            self.name, "reputation"
        ):
            raise InvalidParameterError(
                "fldetector_base_rule must name a registry rule that wraps none, got "
                f"{fldetector_base_rule!r}"
            )
        self.base = get_aggregator(fldetector_base_rule, **base_params)
        if self.base.wraps is not None:
            raise InvalidParameterError(
                f"fldetector_base_rule {fldetector_base_rule!r} wraps a rule itself"
            )
        self.fldetector_base_rule = canonical_name(fldetector_base_rule)
        self.base_params = dict(base_params)
        self._outputs: deque[np.ndarray] = deque(maxlen=self.fldetector_window + 1)
        self._round = 0
        self._seen: dict[Any, int] = {}  # client -> the last round it took part in
        self._previous: dict[Any, np.ndarray] = {}  # client -> its update of that round
        self._distances: dict[Any, deque[float]] = {}
        self._scored_rounds = 0

    def params(self) -> dict[str, Any]:
        own = {"fldetector_window": self.fldetector_window,
               "fldetector_base_rule": self.fldetector_base_rule}
        return {**own, **self.base_params}

    def min_clients(self) -> int:
        return self.base.min_clients()

    def reset(self) -> None:
        self._outputs.clear()
        self._round = 0
        self._seen.clear()
        self._previous.clear()
        self._distances.clear()
        self._scored_rounds = 0
        self.base.reset()

    def suspicious_score(self, client_id: Any) -> float | None:
        """The mean of the client's stored normalised distances (``None`` if none)."""
        window = self._distances.get(client_id)
        return float(np.mean(window)) if window else None

    def _check_size(self, d: int) -> None:
        if self._outputs and self._outputs[-1].size != d:
            raise ValueError(
                f"fldetector state has {self._outputs[-1].size} values per update, the updates "
                f"have {d}: the model changed; call reset()"
            )

    def _distances_to_prediction(
        self, matrix: UpdateMatrix, rows: np.ndarray, previous: np.ndarray, gaps: np.ndarray
    ) -> np.ndarray | None:
        """``||u_i^s + H (w_t - w_s) - u_i^t||`` for the client rows ``rows`` (their last
        updates ``previous``, same order, sent ``gaps`` rounds ago); ``None`` without a
        usable Hessian estimate."""
        stored = np.stack(self._outputs)
        m = len(stored)
        distinct, which = np.unique(gaps, return_inverse=True)
        directions = (np.arange(m)[None, :] >= m - distinct[:, None]).astype(np.float64)
        coefficients = lbfgs_hvp_coefficients(_products(stored, stored), directions)
        if coefficients is None:
            return None
        squared = np.zeros(rows.size)
        for start, stop, block in matrix.blocks(rows.tolist()):
            hvp = coefficients @ stored[:, start:stop].astype(np.float64)  # (gaps, width)
            diff = previous[:, start:stop].astype(np.float64) - hvp[which] - block
            squared += np.einsum("ij,ij->i", diff, diff)
        distances = np.sqrt(squared)
        return distances if np.all(np.isfinite(distances)) else None

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        assert client_ids is not None  # enforced by Aggregator.__call__ (needs_client_ids)
        self._check_size(matrix.d)
        n = matrix.n
        scores = np.zeros(n)
        gap_of = {
            c: self._round - self._seen[c] for c in client_ids if c in self._previous
        }
        rows = np.array(
            [i for i, c in enumerate(client_ids) if 0 < gap_of.get(c, 0) <= len(self._outputs)],
            np.int64,
        )
        if rows.size < n:
            logger.info(
                "fldetector: %d of %d clients have no stored update within the window; "
                "not scored this round", n - rows.size, n,
            )
        distances = None
        if rows.size and len(self._outputs) >= 2:
            previous = np.stack([self._previous[client_ids[i]] for i in rows])
            gaps = np.array([gap_of[client_ids[i]] for i in rows], np.int64)
            distances = self._distances_to_prediction(matrix, rows, previous, gaps)
            if distances is None:
                logger.info("fldetector: no usable Hessian estimate this round; nothing scored")
        flagged = np.zeros(n, dtype=bool)
        clusters = 0
        majority_not_flagged = 0
        if distances is not None:
            total = float(distances.sum())
            normalised = distances / total if total > 0 else np.zeros(rows.size)
            for i, value in zip(rows.tolist(), normalised.tolist(), strict=True):
                window = self._distances.setdefault(
                    client_ids[i], deque(maxlen=self.fldetector_window)
                )
                window.append(value)
                scores[i] = float(np.mean(window))
            self._scored_rounds += 1
            if self._scored_rounds >= self.fldetector_window and rows.size >= MIN_SCORED:
                clusters = gap_statistic_clusters(scores[rows])
                if clusters > 1:
                    upper = upper_cluster(scores[rows])
                    if 2 * int(upper.sum()) < rows.size:
                        flagged[rows[upper]] = True
                    else:
                        majority_not_flagged = 1
                        logger.info(
                            "fldetector: the higher-score cluster holds %d of %d scored "
                            "clients, not a minority; nobody flagged this round",
                            int(upper.sum()), rows.size,
                        )
        allowed = np.flatnonzero(~flagged)
        if allowed.size < self.base.min_clients():
            raise ValueError(
                f"fldetector flagged {n - allowed.size} of {n} clients; the {allowed.size} left "
                f"are fewer than {self.base!r} needs ({self.base.min_clients()})"
            )
        subset = allowed.size < n
        inner = self.base._aggregate(
            matrix.subset(allowed) if subset else matrix,
            None if num_examples is None else num_examples[allowed],
            [client_ids[i] for i in allowed],
        )
        self._remember(matrix, client_ids, inner.update)
        rejected = {
            int(i): f"FLDetector: suspicious score {scores[i]:.3g} in the higher k-means cluster"
            for i in np.flatnonzero(flagged)
        }
        rejected.update({int(allowed[i]): text for i, text in inner.rejected.items()})
        weights = None
        if inner.weights is not None:
            weights = np.zeros(n)
            weights[allowed] = inner.weights
        return AggregationResult(
            update=inner.update,
            kept=sorted(allowed[np.asarray(inner.kept, dtype=np.int64)].tolist()),
            scores=scores,
            rejected=dict(sorted(rejected.items())),
            weights=weights,
            info={
                **inner.info,
                "scored": int(0 if distances is None else rows.size),
                "flagged": int(flagged.sum()),
                "gap_clusters": int(clusters),
                "majority_not_flagged": majority_not_flagged,
            },
        )

    def _remember(
        self, matrix: UpdateMatrix, client_ids: list[Any], update: list[np.ndarray]
    ) -> None:
        """Store this round's output and client updates, and forget the clients not seen
        for more than ``fldetector_window`` rounds."""
        rows = np.empty((matrix.n, matrix.d), dtype=np.float32)
        for start, stop, block in matrix.blocks(list(range(matrix.n))):
            rows[:, start:stop] = block
        for client, row in zip(client_ids, rows, strict=True):
            self._previous[client] = row
            self._seen[client] = self._round
        flat = np.concatenate([np.asarray(layer, np.float32).reshape(-1) for layer in update])
        self._outputs.append(flat)
        oldest = self._round - self.fldetector_window
        for client in [c for c, seen in self._seen.items() if seen < oldest]:
            del self._seen[client]
            self._previous.pop(client, None)
            self._distances.pop(client, None)
        self._round += 1
