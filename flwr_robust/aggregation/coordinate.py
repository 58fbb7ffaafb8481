"""Coordinate-wise rules: median and trimmed mean (Yin et al., ICML 2018).

Both sort every coordinate across the clients with the compiled kernels of
:mod:`._kernels`, block by block, so their extra memory is one block plus the output.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .base import AggregationResult, Aggregator, check_float, check_int, result_from_flat
from .matrix import UpdateMatrix
from .registry import register

logger = logging.getLogger("flwr.robust")


def coordinate_reduce(
    matrix: UpdateMatrix, kernel: str, *args: Any, rows: list[int] | None = None
) -> np.ndarray:
    """Run the compiled kernel named ``kernel`` (``kernel(block, network, *args, out)``,
    see :mod:`._kernels`) over all blocks
    of the selected rows (all clients by default)."""
    from . import _kernels  # lazy: numba loads on first use

    network = _kernels.sorting_network(matrix.n if rows is None else len(rows))
    compiled = getattr(_kernels, kernel)
    out = np.empty(matrix.d, dtype=np.float32)
    for start, stop, block in matrix.blocks(rows):
        compiled(block, network, *args, out[start:stop])
    return out


@register
class Median(Aggregator):
    """Coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, ICML 2018, "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates").

    For an even number of clients the median of a coordinate is the mean of its two middle
    values. Example counts are ignored: every client has one vote per coordinate.

    Parameters
    ----------
    num_malicious : int, optional
        Number of Byzantine clients to tolerate. Only used to check the precondition
        ``n >= 2 * num_malicious + 1`` (the median's breakdown point is just under 1/2).
    """

    name = "median"
    equivariant = True

    def __init__(self, num_malicious: int | None = None) -> None:
        self.num_malicious = check_int("num_malicious", num_malicious, minimum=0, allow_none=True)

    def min_clients(self) -> int:
        return 2 * (self.num_malicious or 0) + 1

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        flat = coordinate_reduce(matrix, "coordinate_median")
        return result_from_flat(matrix, flat, range(matrix.n))


@register
class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018).

    Per coordinate, the ``t`` largest and ``t`` smallest client values are removed and the
    rest averaged. ``t = num_malicious`` when given (the paper's beta = f / n), otherwise
    ``t = floor(trim_ratio * n)``. Example counts are ignored.

    Parameters
    ----------
    num_malicious : int, optional
        Values trimmed from each end per coordinate. Requires ``n >= 2 * num_malicious + 1``.
    trim_ratio : float, optional
        Fraction trimmed from each end, in ``[0, 0.5)``; used when ``num_malicious`` is not
        given (default 0.1 when neither is). Giving both is an error.
    """

    name = "trimmed_mean"
    equivariant = True

    def __init__(self, num_malicious: int | None = None, trim_ratio: float | None = None) -> None:
        if num_malicious is not None and trim_ratio is not None:
            raise ValueError("give either num_malicious or trim_ratio, not both")
        self.num_malicious = check_int("num_malicious", num_malicious, minimum=0, allow_none=True)
        if num_malicious is None and trim_ratio is None:
            trim_ratio = 0.1
        self.trim_ratio = check_float(
            "trim_ratio", trim_ratio, minimum=0.0, maximum=0.5, exclusive_maximum=True,
            allow_none=True,
        )

    def trimmed_per_side(self, n: int) -> int:
        """Values removed from each end of a coordinate with ``n`` clients."""
        if self.num_malicious is not None:
            return self.num_malicious
        return int(np.floor(self.trim_ratio * n))

    def min_clients(self) -> int:
        return 2 * (self.num_malicious or 0) + 1

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        trim = self.trimmed_per_side(matrix.n)
        if trim == 0 and self.num_malicious is None:
            logger.warning(
                "trimmed_mean with trim_ratio=%g trims nothing with n=%d clients: it is a plain "
                "mean; set num_malicious or a trim_ratio of at least %.3g",
                self.trim_ratio, matrix.n, 1.0 / matrix.n,
            )
        flat = coordinate_reduce(matrix, "coordinate_trimmed_mean", trim)
        return result_from_flat(matrix, flat, range(matrix.n), info={"trimmed_per_side": trim})


@register
class MeaMed(Aggregator):
    """Mean around the median (Xie, Koyejo, Gupta, 2018, "Generalized Byzantine-tolerant
    SGD", arXiv:1802.10116).

    Per coordinate, the mean of the ``n - f`` client values closest to the coordinate's
    median (the median of an even count is the mean of its two middle values; between
    values equally far from it the lower one is taken). ``f = 0`` gives the plain mean.
    Example counts are ignored: every client has one vote per coordinate.

    Parameters
    ----------
    num_malicious : int
        ``f`` (the paper's ``b``), the number of Byzantine values per coordinate to
        tolerate. Requires ``n >= 2 * num_malicious + 1``: the median the values are
        centred on must itself be robust.
    """

    name = "meamed"
    equivariant = True

    def __init__(self, num_malicious: int = 0) -> None:
        self.num_malicious = check_int("num_malicious", num_malicious, minimum=0)

    def min_clients(self) -> int:
        return 2 * self.num_malicious + 1

    def _precondition_hint(self) -> str:
        return " (meamed needs n >= 2 * num_malicious + 1)"

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        averaged = matrix.n - self.num_malicious
        flat = coordinate_reduce(matrix, "coordinate_mean_around_median", averaged)
        return result_from_flat(
            matrix, flat, range(matrix.n), info={"averaged_per_coordinate": averaged}
        )
