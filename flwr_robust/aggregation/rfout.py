"""RFOut-1d: per-coordinate outlier replacement (Rodriguez-Barroso et al., 2022)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .base import AggregationResult, Aggregator, check_float, result_from_flat
from .clipping import clip_factors
from .matrix import UpdateMatrix, weighted_rows
from .registry import register
from .tiles import num_tiles

logger = logging.getLogger("flwr.robust")

VARIANTS = ("faithful", "robust")



@register
class RFOut1d(Aggregator):
    """RFOut-1d (Rodriguez-Barroso, Martinez-Camara, Luzon, Herrera, Knowledge-Based Systems
    245, 2022, "Backdoor attacks-resilient aggregation based on Robust Filtering of Outliers
    in federated learning for image classification").

    Per coordinate, across the ``n`` clients, every value farther than ``threshold`` scales
    from the centre is replaced by the centre; then each client's (replaced) update is
    optionally clipped to norm ``clip_norm``, the updates are averaged without weights and
    optional Gaussian noise ``N(0, (noise_multiplier * clip_norm / n)^2)`` is added.

    ``variant="faithful"`` (default) is the authors' rule: centre = mean, scale = population
    standard deviation, strict ``>``. ``variant="robust"`` uses centre = median and
    scale = 1.4826 * MAD, which a group of outliers cannot drag along.

    Limit of the faithful rule (Samuelson's inequality): with the population standard
    deviation no value lies more than ``sqrt(n - 1)`` deviations from the mean, so the
    3-sigma rule can never fire with ``n <= 10`` clients (a warning is logged), and ``k``
    identical colluders sitting together are only caught when ``k < n / 10``: they inflate
    the deviation they are measured with. The robust variant has neither limit.

    Deviations from the authors' code: it works on model weights, clips whole weight
    vectors and loops over coordinates in Python. We work on updates (client weights minus
    the global model; mean, deviation, median and MAD all move with a translation, so the
    replaced values are the same, but clipping is only meaningful on updates) and vectorise.
    Example counts are ignored. ``scores`` are the fractions of each client's coordinates
    that were replaced; ``info["replaced"]`` counts all replaced values.

    Parameters
    ----------
    variant : {"faithful", "robust"}
        Centre and scale estimators, see above.
    threshold : float
        Number of scales beyond which a value is an outlier (3 in the paper).
    clip_norm : float, optional
        Per-client L2 bound applied after replacement.
    noise_multiplier : float
        ``z``; requires ``clip_norm``. 0 disables the noise.
    seed : int, optional
        Seed of the noise generator.
    """

    name = "rfout_1d"

    def __init__(
        self,
        variant: str = "faithful",
        threshold: float = 3.0,
        clip_norm: float | None = None,
        noise_multiplier: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.threshold = check_float("threshold", threshold, minimum=0.0, exclusive_minimum=True)
        self.clip_norm = check_float(
            "clip_norm", clip_norm, minimum=0.0, exclusive_minimum=True, allow_none=True
        )
        self.noise_multiplier = check_float("noise_multiplier", noise_multiplier, minimum=0.0)
        if self.noise_multiplier > 0 and self.clip_norm is None:
            raise ValueError("noise_multiplier > 0 needs clip_norm (the noise scale is z * C / n)")
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def can_fire(self, n: int) -> bool:
        """Whether any value can exceed the threshold with ``n`` clients."""
        return self.variant == "robust" or math.sqrt(max(n - 1, 0)) > self.threshold

    def _replaced_blocks(
        self, matrix: UpdateMatrix, replaced: np.ndarray
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Blocks of the updates with outliers replaced; counts go to ``replaced``."""
        from . import _kernels  # lazy: numba loads on first use

        network = _kernels.sorting_network(matrix.n)
        robust = self.variant == "robust"
        tile = 0
        for start, stop, block in matrix.blocks():
            tiles = num_tiles(stop - start)
            _kernels.replace_outliers(
                block, network, self.threshold, robust, replaced[tile : tile + tiles]
            )
            tile += tiles
            yield start, stop, block

    def translation_equivariant(self) -> bool:
        return self.clip_norm is None  # clipping bounds updates, not weights

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        n = matrix.n
        if not self.can_fire(n):
            logger.warning(
                "rfout_1d (faithful) cannot replace anything with n=%d clients: no value can "
                "lie more than sqrt(n-1)=%.2f population deviations from the mean, threshold "
                "is %.2f; use variant='robust' or more clients",
                n,
                math.sqrt(max(n - 1, 0)),
                self.threshold,
            )
        total_tiles = sum(num_tiles(stop - start) for start, stop in matrix.block_ranges(n))
        replaced = np.zeros((total_tiles, n), dtype=np.int64)
        weights = np.full(n, 1.0 / n)
        if self.clip_norm is not None:
            squared = np.zeros(n)
            for _, _, block in self._replaced_blocks(matrix, replaced):
                squared += np.einsum("ij,ij->i", block, block)
            weights = clip_factors(np.sqrt(squared), self.clip_norm) / n
            replaced[:] = 0
        flat = np.empty(matrix.d, dtype=np.float32)
        for start, stop, block in self._replaced_blocks(matrix, replaced):
            weighted_rows(weights, block, flat[start:stop])
        if self.noise_multiplier > 0:
            sigma = self.noise_multiplier * self.clip_norm / n
            flat += self._rng.normal(0.0, sigma, size=matrix.d).astype(np.float32)
        per_client = replaced.sum(axis=0)
        return result_from_flat(
            matrix,
            flat,
            range(n),
            scores=per_client / matrix.d,
            weights=weights,
            info={"replaced": int(per_client.sum()), "can_fire": int(self.can_fire(n))},
        )

