"""Slow, obviously-correct reference versions of the rules, written from the papers' text.

They loop over clients and pairs in plain Python/numpy float64 and exist only to check the
vectorised core on small random inputs. Where a definition leaves ties open (values equally
far from a median) they resolve to the lower value, as the core does.
"""

from __future__ import annotations

import numpy as np


def flat(updates: list[list[np.ndarray]]) -> np.ndarray:
    return np.stack([np.concatenate([layer.ravel() for layer in u]) for u in updates]).astype(
        np.float64
    )


def krum_scores(x: np.ndarray, f: int, candidates: list[int]) -> dict[int, float]:
    m = len(candidates)
    k = max(m - f - 2, 1)
    scores = {}
    for i in candidates:
        dists = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in candidates if j != i)
        scores[i] = sum(dists[:k]) if dists else 0.0
    return scores


def krum_order(x: np.ndarray, f: int, candidates: list[int]) -> list[int]:
    """Candidates by Krum score; exact ties by the sum of squared distances to all
    candidates, then to the lexicographically smaller update (the core's canonical order),
    never to the smaller index."""
    scores = krum_scores(x, f, candidates)
    spread = {i: sum(float(np.sum((x[i] - x[j]) ** 2)) for j in candidates) for i in candidates}
    return sorted(candidates, key=lambda i: (round(scores[i], 9), spread[i], tuple(x[i])))


def krum(x: np.ndarray, f: int) -> tuple[int, np.ndarray]:
    best = krum_order(x, f, list(range(len(x))))[0]
    return best, x[best]


def multi_krum(x: np.ndarray, f: int, m: int) -> tuple[list[int], np.ndarray]:
    chosen = sorted(krum_order(x, f, list(range(len(x))))[:m])
    return chosen, x[chosen].mean(axis=0)


def bulyan(x: np.ndarray, f: int) -> tuple[list[int], np.ndarray]:
    n = len(x)
    theta = n - 2 * f
    remaining = list(range(n))
    selected = []
    for _ in range(theta):
        best = krum_order(x, f, remaining)[0]
        selected.append(best)
        remaining.remove(best)
    beta = theta - 2 * f
    chosen = x[sorted(selected)]
    out = np.empty(x.shape[1])
    for j in range(x.shape[1]):
        column = chosen[:, j]
        med = np.median(column)
        nearest = sorted(column, key=lambda v: (abs(v - med), v))[:beta]
        out[j] = np.mean(nearest)
    return sorted(selected), out


def trimmed_mean(x: np.ndarray, t: int) -> np.ndarray:
    s = np.sort(x, axis=0)
    return s[t : len(x) - t].mean(axis=0)


def mean_around_median(x: np.ndarray, k: int) -> np.ndarray:
    out = np.empty(x.shape[1])
    for j in range(x.shape[1]):
        column = x[:, j]
        med = np.median(column)
        out[j] = np.mean(sorted(column, key=lambda v: (abs(v - med), v))[:k])
    return out


def geometric_median(x: np.ndarray, iterations: int = 2000) -> np.ndarray:
    z = x.mean(axis=0)
    for _ in range(iterations):
        d = np.maximum(np.linalg.norm(x - z, axis=1), 1e-12)
        w = 1.0 / d
        z = (w[:, None] * x).sum(axis=0) / w.sum()
    return z


def rfout(x: np.ndarray, threshold: float = 3.0, robust: bool = False) -> np.ndarray:
    y = x.copy()
    for j in range(x.shape[1]):
        column = x[:, j]
        if robust:
            centre = np.median(column)
            scale = 1.4826 * np.median(np.abs(column - centre))
        else:
            centre = column.mean()
            scale = column.std()
        for i in range(len(column)):
            if abs(column[i] - centre) > threshold * scale:
                y[i, j] = centre
    return y
