"""Clustering defences: FLAME (HDBSCAN on cosine distances, clipping, noise) and a
largest-cluster filter (k-means, k = 2 by default, or HDBSCAN).

Both work from one ``n x n`` Gram matrix of the updates: cosine and Euclidean distances,
and an exact ``n``-dimensional embedding for k-means, come from it, so the d-dimensional
data is read once for the Gram matrix and once for the output.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

from .base import (
    AggregationResult,
    Aggregator,
    InvalidParameterError,
    check_float,
    check_int,
    result_from_flat,
)
from .clipping import clip_factors
from .distance import squared_distances
from .geometric import distances_to_combination
from .matrix import UpdateMatrix
from .registry import register

logger = logging.getLogger("flwr.robust")

NO_CLUSTER_REASON = "no cluster found: the round is skipped (zero update)"


def cosine_similarities(gram: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarities from an uncentred Gram matrix. A zero update has no
    direction: its similarity is 0 to every other update (and to itself)."""
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    scale = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-300), 0.0)
    cosines = np.clip(gram * scale[:, None] * scale[None, :], -1.0, 1.0)
    np.fill_diagonal(cosines, (norms > 0).astype(np.float64))
    return cosines


def cosine_distances(gram: np.ndarray) -> np.ndarray:
    """``1 - cos`` between every pair (zero diagonal, in ``[0, 2]``)."""
    distances = 1.0 - cosine_similarities(gram)
    np.fill_diagonal(distances, 0.0)
    return distances


def hdbscan_labels(
    distances: np.ndarray, min_cluster_size: int, min_samples: int | None = None
) -> np.ndarray:
    """HDBSCAN cluster labels (``-1`` = noise) of a precomputed distance matrix, with a
    single cluster allowed."""
    from sklearn.cluster import HDBSCAN  # lazy: scikit-learn takes ~0.7 s to import

    model = HDBSCAN(
        metric="precomputed",
        min_cluster_size=min_cluster_size,
        min_samples=min_samples,
        allow_single_cluster=True,
        copy=True,
    )
    return model.fit(distances).labels_


def _no_cluster_result(
    matrix: UpdateMatrix,
    rule: str,
    scores: np.ndarray,
    info: dict[str, Any],
    largest: int | None = None,
) -> AggregationResult:
    """The skipped round: zero update, every client rejected. ``largest`` is the size of
    the largest cluster when clusters exist but none holds a majority."""
    if largest is None:
        reason, flag = NO_CLUSTER_REASON, {"no_cluster": 1}
        logger.warning(
            "%s: HDBSCAN labelled all %d updates as noise; skipping the round (zero update)",
            rule, matrix.n,
        )
    else:
        reason = (
            f"no cluster holds a majority (largest {largest} of {matrix.n}): the round is "
            "skipped (zero update)"
        )
        flag = {"no_majority": 1}
        logger.warning(
            "%s: the largest cluster holds %d of %d updates, not a majority; skipping the "
            "round (zero update)", rule, largest, matrix.n,
        )
    return result_from_flat(
        matrix,
        np.zeros(matrix.d, dtype=np.float32),
        [],
        reason=reason,
        scores=scores,
        weights=np.zeros(matrix.n),
        info={**info, **flag},
    )


@register
class Flame(Aggregator):
    """FLAME (Nguyen, Rieger, Chen, Yalame, Moellering, Fereidooni, Marchal, Miettinen,
    Mirhoseini, Zeitouni, Koushanfar, Sadeghi, Schneider, USENIX Security 2022, "FLAME:
    Taming Backdoors in Federated Learning").

    1. Pairwise cosine distances ``1 - cos(x_i, x_j)`` of the updates, from one uncentred
       Gram matrix.
    2. HDBSCAN on them with ``min_cluster_size = n // 2 + 1``, ``min_samples = 1`` and a
       single cluster allowed: only a cluster holding a majority can form. Its members are
       admitted; noise points (and any other cluster) are rejected.
    3. Every admitted update is clipped to ``S``, the median L2 norm of all ``n`` updates.
    4. The clipped updates are averaged (unweighted) and Gaussian noise
       ``N(0, (noise_lambda * S)^2)`` is added to every coordinate.

    Deviations: the paper measures cosine distances between the local *models*; we use the
    updates (local model minus the global model), on which directions are meaningful (the
    norms ``||W_i - G||`` the paper clips with are the update norms, as here). When HDBSCAN
    labels every update as noise (no majority cluster: FLAME cannot tell the benign
    majority), the round is skipped: the update is zero, every client is rejected with a
    reason, a warning is logged and ``info["no_cluster"] = 1``. A zero update has no
    direction and is at cosine distance 1 from all others. Example counts are ignored (the
    paper averages without weights).

    Expect benign rejections: when the majority cluster is HDBSCAN's root (a single
    cluster), scikit-learn labels as noise every point that leaves it before its densest
    core, so FLAME often admits little more than ``n // 2 + 1`` updates even when all are
    benign (measured here: 6 of 7 tightly grouped honest updates next to 3 colluders).

    ``scores`` are each update's mean cosine distance to the admitted updates (itself
    excluded); ``weights`` the clipped coefficients in the output; ``info`` has the clipping
    bound, the noise standard deviation and the cluster counts.

    Parameters
    ----------
    noise_lambda : float
        ``lambda``, the noise level relative to ``S``; 0.001 by default (the value the
        paper uses for image classification); 0 disables the noise.
    seed : int, optional
        Seed of the noise generator (draws continue across rounds).
    """

    name = "flame"

    def __init__(self, noise_lambda: float = 0.001, seed: int | None = None) -> None:
        self.noise_lambda = check_float("noise_lambda", noise_lambda, minimum=0.0)
        self.seed = check_int("seed", seed, minimum=0, allow_none=True)
        self._rng = np.random.default_rng(seed)

    def min_clients(self) -> int:
        return 2

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        n = matrix.n
        gram = matrix.gram(centered=False)
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        distances = cosine_distances(gram)
        labels = hdbscan_labels(distances, min_cluster_size=n // 2 + 1, min_samples=1)
        bound = float(np.median(norms))
        noise_std = self.noise_lambda * bound
        clusters, sizes = np.unique(labels[labels >= 0], return_counts=True)
        info: dict[str, Any] = {
            "clip_bound": bound,
            "noise_std": noise_std,
            "clusters": int(clusters.size),
            "noise_points": int(np.sum(labels < 0)),
        }
        if clusters.size == 0:
            return _no_cluster_result(matrix, self.name, distances.sum(1) / max(n - 1, 1), info)
        admitted = np.flatnonzero(labels == clusters[np.argmax(sizes)])
        weights = np.zeros(n)
        weights[admitted] = clip_factors(norms[admitted], bound) / admitted.size
        flat = matrix.combine(weights[admitted], rows=admitted.tolist())
        if noise_std > 0:
            noise = self._rng.standard_normal(matrix.d, dtype=np.float32)
            flat += noise * np.float32(noise_std)
        others = admitted.size - np.isin(np.arange(n), admitted)
        scores = distances[:, admitted].sum(axis=1) / np.maximum(others, 1)
        size_of = dict(zip(clusters.tolist(), sizes.tolist(), strict=True))

        def reason(i: int) -> str:
            if labels[i] < 0:
                return (
                    f"HDBSCAN noise, outside the majority cluster of {admitted.size} (mean "
                    f"cosine distance {scores[i]:.3g} to it)"
                )
            return f"in a minority cluster of {size_of[int(labels[i])]}"

        info["admitted"] = int(admitted.size)
        info["clipped"] = int(np.sum(norms[admitted] > bound))
        return result_from_flat(
            matrix, flat, admitted, reason=reason, scores=scores, weights=weights, info=info
        )


METHODS = ("kmeans", "hdbscan")
METRICS = ("cosine", "euclidean")


def embed(gram: np.ndarray) -> np.ndarray:
    """``n`` points in ``R^n`` with the inner products ``gram`` (up to rounding), so with
    the same pairwise distances as the rows the Gram matrix was computed from."""
    values, vectors = np.linalg.eigh(gram)
    return vectors * np.sqrt(np.maximum(values, 0.0))[None, :]


def farthest_point_seeds(distances: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` distinct points: the two farthest apart, then repeatedly the point
    farthest from those chosen (ties to the earlier index); fewer when fewer points differ."""
    first, second = np.unravel_index(np.argmax(distances), distances.shape)
    seeds = [int(first), int(second)]
    nearest = np.minimum(distances[first], distances[second])
    while len(seeds) < count:
        candidate = int(np.argmax(nearest))
        if nearest[candidate] <= 0:
            break
        seeds.append(candidate)
        nearest = np.minimum(nearest, distances[candidate])
    return seeds


@register
class ClusterFilter(Aggregator):
    """Largest-cluster filter: cluster the updates, keep the largest cluster, average it.

    A heuristic without a formal robustness guarantee, in the spirit of clustering-based
    defences such as Auror (Shen, Tople, Saxena, ACSAC 2016, "Auror: Defending against
    Poisoning Attacks in Collaborative Deep Learning Systems", which clusters features of
    the updates into two groups) and of clustered federated learning's cosine-similarity
    splits (Sattler, Mueller, Samek, "Clustered Federated Learning: Model-Agnostic
    Distributed Multitask Optimization Under Privacy Constraints", IEEE Transactions on
    Neural Networks and Learning Systems, 2021).
    It assumes the benign clients form the largest group; colluders that outnumber them, or
    hide inside their spread (ALIE), are kept.

    - ``method="kmeans"``: k-means with ``k = n_clusters`` (2 by default; at most the
      number of distinct updates). It runs on an exact ``n``-dimensional embedding of the
      updates (same pairwise distances, from the Gram matrix), starting from the two
      updates farthest apart and then, for ``k > 2``, from the update farthest from those
      already chosen (farthest-point seeding; ties to the earlier update), so it is
      deterministic and independent of the clients' order (no seed needed). With no
      attacker present it still splits the honest updates and keeps only the largest part.
    - ``method="hdbscan"``: HDBSCAN on the pairwise distances (``min_cluster_size``, a
      single cluster allowed); noise points are rejected. When every update is noise the
      round is skipped (zero update, all rejected, warning, ``info["no_cluster"] = 1``).
    - ``metric="euclidean"`` (default) clusters the updates themselves;
      ``metric="cosine"`` clusters directions (updates scaled to unit norm, cosine distance
      ``1 - cos``), blind to magnitude: a boosted update in the benign direction, or
      attackers along it, stay in the benign cluster.

    Measured (tests/test_aggregation_properties.py, 12 honest + 3 attackers): HDBSCAN with
    the Euclidean metric keeps the output within the honest spread under far, colluding and
    boosted sign-flip attackers; k-means fails when the attackers are scattered far away
    (with ``k = 2`` it isolates one of them and keeps the others with the honest group).
    Without attackers every variant drops a sizeable part of the honest updates.

    A cluster is kept only when it holds a strict majority (more than ``n / 2``) of the
    updates, so there is never a tie, and a small group of identical (Sybil) updates can
    win only by being the majority. Otherwise (e.g. ``k >= 3`` splitting the honest
    updates, or HDBSCAN labelling most of them as noise) the round is skipped: zero update,
    every client rejected with a reason, a warning, ``info["no_majority"] = 1``. With
    k-means ``min_clients`` is ``n_clusters`` (at least one update per cluster). Example counts
    are ignored (unweighted mean). ``scores`` are, per ``metric``, the cosine distance of
    each update to the mean direction of the kept updates, or its Euclidean distance to
    their mean.

    Parameters
    ----------
    method : {"kmeans", "hdbscan"}
        The clustering algorithm.
    metric : {"cosine", "euclidean"}
        What is clustered, see above.
    min_cluster_size : int
        HDBSCAN's smallest cluster (capped at ``n``); unused by k-means.
    n_clusters : int
        k-means' ``k`` (at least 2, at most the number of clients); unused by HDBSCAN.
    """

    name = "cluster"

    def __init__(
        self,
        method: str = "kmeans",
        metric: str = "euclidean",
        min_cluster_size: int = 2,
        n_clusters: int = 2,
    ) -> None:
        if method not in METHODS:
            raise InvalidParameterError(f"method must be one of {METHODS}, got {method!r}")
        if metric not in METRICS:
            raise InvalidParameterError(f"metric must be one of {METRICS}, got {metric!r}")
        self.method = method
        self.metric = metric
        self.min_cluster_size = check_int("min_cluster_size", min_cluster_size, minimum=2)
        self.n_clusters = check_int("n_clusters", n_clusters, minimum=2)

    def min_clients(self) -> int:
        return self.n_clusters if self.method == "kmeans" else 2

    def translation_equivariant(self) -> bool:
        return self.metric == "euclidean"

    def _labels(self, inner: np.ndarray, distances: np.ndarray) -> np.ndarray:
        n = len(distances)
        if self.method == "hdbscan":
            return hdbscan_labels(distances, min_cluster_size=min(self.min_cluster_size, n))
        if not np.any(distances > 0):
            return np.zeros(n, dtype=np.int64)
        from sklearn.cluster import KMeans  # lazy, see hdbscan_labels

        points = embed(inner)
        seeds = farthest_point_seeds(distances, self.n_clusters)
        model = KMeans(n_clusters=len(seeds), init=points[seeds], n_init=1)
        with warnings.catch_warnings():  # seeds apart by rounding only: fewer clusters, fine
            warnings.filterwarnings("ignore", message="Number of distinct clusters")
            return model.fit(points).labels_

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        n = matrix.n
        if self.metric == "cosine":
            inner = cosine_similarities(matrix.gram(centered=False))
            distances = 1.0 - inner
            np.fill_diagonal(distances, 0.0)
        else:
            inner = matrix.gram()
            distances = np.sqrt(squared_distances(inner))
        labels = self._labels(inner, distances)
        clusters = np.unique(labels[labels >= 0])
        info: dict[str, Any] = {
            "clusters": int(clusters.size),
            "noise_points": int(np.sum(labels < 0)),
        }
        if clusters.size == 0:
            return _no_cluster_result(matrix, self.name, distances.sum(1) / max(n - 1, 1), info)
        sizes = np.array([np.sum(labels == label) for label in clusters])
        if 2 * int(sizes.max()) <= n:
            return _no_cluster_result(
                matrix, self.name, distances.sum(1) / max(n - 1, 1), info, int(sizes.max())
            )
        kept = np.flatnonzero(labels == clusters[np.argmax(sizes)])
        weights = np.zeros(n)
        weights[kept] = 1.0 / kept.size
        flat = matrix.combine(weights[kept], rows=kept.tolist())
        projected = inner @ weights
        if self.metric == "cosine":
            centre_norm = np.sqrt(max(float(weights @ projected), 0.0))
            scores = 1.0 - projected / max(centre_norm, 1e-300)
        else:
            scores = distances_to_combination(inner, weights)
        info["kept_cluster_size"] = int(kept.size)

        def reason(i: int) -> str:
            where = "HDBSCAN noise" if labels[i] < 0 else (
                f"in a cluster of {int(np.sum(labels == labels[i]))}"
            )
            return f"{where}, not the largest cluster ({kept.size} updates)"

        return result_from_flat(
            matrix, flat, kept, reason=reason, scores=scores, weights=weights, info=info
        )
