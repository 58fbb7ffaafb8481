"""The compiled per-coordinate kernels against plain numpy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_robust.aggregation import _kernels
from flwr_robust.aggregation.tiles import num_tiles
from tests import reference_rules as ref


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 32, 50, 64, 65, 200])
def test_sorting_network_sorts_every_column(n: int) -> None:
    rng = np.random.default_rng(n)
    block = rng.standard_normal((n, 700)).astype(np.float32)
    network = _kernels.sorting_network(n)
    # Apply the comparators in numpy: an independent check of the network itself.
    values = block.copy()
    for a, b in network:
        lo, hi = np.minimum(values[a], values[b]), np.maximum(values[a], values[b])
        values[a], values[b] = lo, hi
    np.testing.assert_array_equal(values, np.sort(block, axis=0))


@pytest.mark.parametrize("n", range(1, 9))
def test_sorting_network_sorts_all_zero_one_inputs(n: int) -> None:
    # The 0-1 principle: a comparator network sorts everything iff it sorts all 0/1 inputs.
    network = _kernels.sorting_network(n)
    for bits in itertools.product([0.0, 1.0], repeat=n):
        values = list(bits)
        for a, b in network:
            values[a], values[b] = min(values[a], values[b]), max(values[a], values[b])
        assert values == sorted(bits)


def test_sorting_network_rejects_empty() -> None:
    with pytest.raises(ValueError, match="n >= 1"):
        _kernels.sorting_network(0)


def _block(n: int, c: int, seed: int, ties: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if ties:
        return rng.integers(-3, 4, size=(n, c)).astype(np.float32)
    return rng.standard_normal((n, c)).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    c=st.integers(1, 700),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_median_kernel_matches_numpy(n: int, c: int, seed: int, ties: bool) -> None:
    block = _block(n, c, seed, ties)
    out = np.empty(c, np.float32)
    _kernels.coordinate_median(block.copy(), _kernels.sorting_network(n), out)
    np.testing.assert_allclose(out, np.median(block.astype(np.float64), axis=0), rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), c=st.integers(1, 600), seed=st.integers(0, 2**16), data=st.data())
def test_trimmed_mean_kernel_matches_numpy(n: int, c: int, seed: int, data: st.DataObject) -> None:
    trim = data.draw(st.integers(0, (n - 1) // 2))
    block = _block(n, c, seed)
    out = np.empty(c, np.float32)
    _kernels.coordinate_trimmed_mean(block, _kernels.sorting_network(n), trim, out)
    np.testing.assert_allclose(out, ref.trimmed_mean(block.astype(np.float64), trim), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), c=st.integers(1, 400), seed=st.integers(0, 2**16), data=st.data())
def test_mean_around_median_kernel_matches_brute_force(
    n: int, c: int, seed: int, data: st.DataObject
) -> None:
    k = data.draw(st.integers(1, n))
    block = _block(n, c, seed)
    out = np.empty(c, np.float32)
    _kernels.coordinate_mean_around_median(block, _kernels.sorting_network(n), k, out)
    np.testing.assert_allclose(
        out, ref.mean_around_median(block.astype(np.float64), k), atol=1e-6
    )


def test_mean_around_median_hand_case() -> None:
    # Column [0, 1, 2, 10, 11]: median 2; the 3 closest are 0, 1, 2 -> mean 1.
    # Column [5, 5, 6, 100, -100]: median 5; the 3 closest are 5, 5, 6 -> 16/3.
    block = np.array([[0, 5], [1, 5], [2, 6], [10, 100], [11, -100]], dtype=np.float32)
    out = np.empty(2, np.float32)
    _kernels.coordinate_mean_around_median(block, _kernels.sorting_network(5), 3, out)
    np.testing.assert_allclose(out, [1.0, 16.0 / 3.0], rtol=1e-6)


@pytest.mark.parametrize("robust", [False, True])
@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), c=st.integers(1, 600), seed=st.integers(0, 2**16))
def test_replace_outliers_matches_reference(robust: bool, n: int, c: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((n, c)).astype(np.float32)
    outliers = rng.random((n, c)) < 0.05
    block[outliers] *= 50.0
    expected = ref.rfout(block.astype(np.float64), 3.0, robust)
    counts = np.zeros((num_tiles(c), n), np.int64)
    work = block.copy()
    _kernels.replace_outliers(work, _kernels.sorting_network(n), 3.0, robust, counts)
    np.testing.assert_allclose(work, expected, rtol=1e-5, atol=1e-5)
    assert counts.sum() == int(np.sum(np.abs(expected - block) > 0))
