"""Compiled per-coordinate kernels shared by the coordinate-wise rules.

Every kernel takes a block of shape ``(n, c)``: ``n`` clients (rows) by ``c`` coordinates
(columns), as built by :class:`~flwr_robust.aggregation.matrix.UpdateMatrix`. Work runs over
column tiles of ``TILE`` coordinates in parallel; inside a tile each column is sorted by a
fixed comparator network applied row by row, so every compare-exchange is a branch-free
``min``/``max`` over ``TILE`` contiguous floats (SIMD), instead of a data-dependent
selection per coordinate. Batcher's odd-even merge sort (Batcher, 1968) is used because its
comparators only ever move +inf padding further down, so the network for ``n`` inputs is
the power-of-two network with every comparator touching an index ``>= n`` removed.

The blocks are the aggregation core's own scratch buffers: kernels that say so may
overwrite them. Inputs are finite (reply validation rejects NaN/Inf before aggregation).
"""

from __future__ import annotations

from functools import lru_cache

import numba
import numpy as np

from .tiles import TILE

_JIT = {"cache": True, "nogil": True}
OUTLIER_MARGIN = 1.0 + 1e-9  # see replace_outliers


@lru_cache(maxsize=64)
def sorting_network(n: int) -> np.ndarray:
    """Comparator pairs ``(i, j)``, ``i < j``, of Batcher's odd-even merge sort for ``n`` keys."""
    if n < 1:
        raise ValueError(f"sorting_network needs n >= 1, got {n}")
    size = 1
    while size < n:
        size *= 2
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    network = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    network.setflags(write=False)
    return network


@numba.njit(inline="always", **_JIT)
def _sort_tile(tile, network):  # pragma: no cover - compiled
    """Sort every column of ``tile`` ascending with the comparator ``network``."""
    for q in range(network.shape[0]):
        lo = tile[network[q, 0]]
        hi = tile[network[q, 1]]
        for j in range(TILE):
            a = lo[j]
            b = hi[j]
            lo[j] = min(a, b)
            hi[j] = max(a, b)


@numba.njit(inline="always", **_JIT)
def _load_sorted_tile(block, start, width, network, tile):  # pragma: no cover - compiled
    """Copy ``block[:, start:start+width]`` into ``tile`` and sort each column ascending."""
    n = block.shape[0]
    for i in range(n):
        for j in range(width):
            tile[i, j] = block[i, start + j]
        for j in range(width, TILE):
            tile[i, j] = 0.0
    _sort_tile(tile, network)


@numba.njit(inline="always", **_JIT)
def _sorted_median(tile, n, j):  # pragma: no cover - compiled
    """Median of the sorted column ``j`` of ``tile`` (mean of the middle two for even n)."""
    mid = n // 2
    if n % 2 == 1:
        return np.float64(tile[mid, j])
    return 0.5 * (np.float64(tile[mid - 1, j]) + np.float64(tile[mid, j]))


@numba.njit(parallel=True, **_JIT)
def coordinate_median(block, network, out):  # pragma: no cover - compiled
    """``out[j]`` = median of column ``j``; mean of the two middle values for even ``n``."""
    n, c = block.shape
    for t in numba.prange((c + TILE - 1) // TILE):
        start = t * TILE
        width = min(TILE, c - start)
        tile = np.empty((n, TILE), np.float32)
        _load_sorted_tile(block, start, width, network, tile)
        for j in range(width):
            out[start + j] = _sorted_median(tile, n, j)


@numba.njit(parallel=True, **_JIT)
def coordinate_trimmed_mean(block, network, trim, out):  # pragma: no cover - compiled
    """``out[j]`` = mean of column ``j`` without its ``trim`` smallest and ``trim`` largest."""
    n, c = block.shape
    kept = n - 2 * trim
    for t in numba.prange((c + TILE - 1) // TILE):
        start = t * TILE
        width = min(TILE, c - start)
        tile = np.empty((n, TILE), np.float32)
        _load_sorted_tile(block, start, width, network, tile)
        acc = np.zeros(TILE, np.float64)
        for r in range(trim, n - trim):
            for j in range(TILE):
                acc[j] += tile[r, j]
        for j in range(width):
            out[start + j] = acc[j] / kept


@numba.njit(parallel=True, **_JIT)
def coordinate_mean_around_median(block, network, k, out):  # pragma: no cover - compiled
    """``out[j]`` = mean of the ``k`` values of column ``j`` closest to the column's median.

    In sorted order the ``k`` values nearest to the median form a contiguous window. Moving
    the window one step right changes its sum of absolute deviations by
    ``|v[s+k] - med| - |v[s] - med|``; these changes are <= 0 left of the median, increase
    across it and are >= 0 right of it, so the first window of least deviation starts one
    after the last strictly negative change (or at 0). Only the entering and leaving
    deviations are compared, never running totals, so values of any magnitude cannot
    cancel the small ones. Between values equally far from the median (always the case for
    the two middle values of an even count) the lower one is taken, so the result depends
    only on the values, never on the clients' order.
    """
    n, c = block.shape
    for t in numba.prange((c + TILE - 1) // TILE):
        start = t * TILE
        width = min(TILE, c - start)
        tile = np.empty((n, TILE), np.float32)
        _load_sorted_tile(block, start, width, network, tile)
        med = np.empty(TILE, np.float64)
        first = np.zeros(TILE, np.int64)
        for j in range(TILE):
            med[j] = _sorted_median(tile, n, j)
        for s in range(n - k):
            for j in range(TILE):
                entering = abs(np.float64(tile[s + k, j]) - med[j])
                leaving = abs(np.float64(tile[s, j]) - med[j])
                first[j] = s + 1 if entering < leaving else first[j]
        total = np.zeros(TILE, np.float64)
        for r in range(n):  # row by row over the tile: contiguous and branch-free
            for j in range(TILE):
                inside = first[j] <= r < first[j] + k
                total[j] += np.float64(tile[r, j]) if inside else 0.0
        for j in range(width):
            out[start + j] = total[j] / k


@numba.njit(parallel=True, **_JIT)
def replace_outliers(block, network, threshold, robust, replaced):  # pragma: no cover
    """Replace, in place, each value farther than ``threshold`` scales from its column centre.

    Faithful rule (``robust=False``): centre = mean, scale = population standard deviation,
    outliers become the mean. Robust rule: centre = median, scale = 1.4826 * MAD (consistent
    for Gaussian data), outliers become the median; where MAD is 0, every value that differs
    from the median is an outlier. A value must exceed the bound by more than rounding
    (relative ``OUTLIER_MARGIN``): values exactly at it, as one far outlier among ten clients
    is (Samuelson's bound), would otherwise be replaced or not by the rounding of the sums,
    which depends on the clients' order. ``replaced[t, i]`` counts the replaced values of
    client ``i`` in tile ``t`` (shape ``(num_tiles, n)``, zero on entry).
    """
    n, c = block.shape
    for t in numba.prange((c + TILE - 1) // TILE):
        start = t * TILE
        width = min(TILE, c - start)
        centre = np.empty(TILE, np.float64)
        bound = np.empty(TILE, np.float64)
        if robust:
            tile = np.empty((n, TILE), np.float32)
            _load_sorted_tile(block, start, width, network, tile)
            for j in range(width):
                centre[j] = _sorted_median(tile, n, j)
            for i in range(n):
                for j in range(width):
                    tile[i, j] = abs(np.float64(block[i, start + j]) - centre[j])
            _sort_tile(tile, network)  # padding columns (zeros) sort harmlessly
            for j in range(width):
                bound[j] = threshold * 1.4826 * _sorted_median(tile, n, j) * OUTLIER_MARGIN
        else:
            for j in range(width):
                centre[j] = 0.0
                bound[j] = 0.0
            for i in range(n):
                for j in range(width):
                    centre[j] += block[i, start + j]
            for j in range(width):
                centre[j] /= n
            for i in range(n):
                for j in range(width):
                    dev = np.float64(block[i, start + j]) - centre[j]
                    bound[j] += dev * dev
            for j in range(width):
                bound[j] = threshold * np.sqrt(bound[j] / n) * OUTLIER_MARGIN
        for i in range(n):
            count = 0
            for j in range(width):
                if abs(np.float64(block[i, start + j]) - centre[j]) > bound[j]:
                    block[i, start + j] = centre[j]
                    count += 1
            replaced[t, i] += count

