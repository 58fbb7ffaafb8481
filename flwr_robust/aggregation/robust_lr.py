"""Robust learning rate (RLR): per-coordinate sign voting flips the server learning rate."""

from __future__ import annotations

import logging
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
from .matrix import UpdateMatrix
from .registry import register

logger = logging.getLogger("flwr.robust")

FLOAT32_MAX = float(np.finfo(np.float32).max)


def sign_sums(matrix: UpdateMatrix) -> np.ndarray:
    """``sum_i sign(x_i)`` per coordinate (float64, exact: integers below 2**53)."""
    out = np.empty(matrix.d, dtype=np.float64)
    for start, stop, block in matrix.blocks(list(range(matrix.n))):
        out[start:stop] = np.sign(block, out=block).sum(axis=0, dtype=np.float64)
    return out


@register
class RobustLR(Aggregator):
    """Robust learning rate (Ozdayi, Kantarcioglu, Gel, AAAI 2021, "Defending against
    Backdoors in Federated Learning with Robust Learning Rate").

    For every coordinate ``k`` the server learning rate is
    ``eta_k = rlr_server_lr`` when ``|sum_i sign(x_i[k])| >= rlr_threshold`` and
    ``-rlr_server_lr`` otherwise; the output is ``eta * sum_i n_i x_i / sum_i n_i``, the
    paper's example-count-weighted mean (``rlr_weighted=False``, or no counts: unweighted).
    Where too few clients agree on the direction (a backdoor pushed by a minority), the
    step is reversed, moving the model away from it.

    ``rlr_threshold`` is a count of clients: the paper advises a value above the number of
    corrupt clients; 4 is the value it uses with 10 clients. ``min_clients`` is
    ``rlr_threshold + 2``: with ``n`` clients the vote ``|sum_i sign|`` on a coordinate
    without zeros takes the values ``n, n - 2, ...``, and one dissenter against all others
    gives ``n - 2``; below ``theta + 2`` clients that lone dissent (one attacker) would
    reverse every coordinate, and below ``theta`` every step would be reversed anyway. The weights are client claims: like FedAvg, the rule bounds no magnitude,
    so one client (by its count or its update) can dominate the mean; RLR defends against
    backdoors, not against arbitrary updates. Not translation equivariant (signs depend on
    the origin). An output beyond float32's range (``rlr_server_lr > 1`` on huge updates)
    saturates at the float32 limit, with a warning.

    ``kept`` is every client (no client is excluded); ``weights`` is ``None`` (the output is
    not a weighted mean of the updates once coordinates are flipped); ``info`` has the
    number and fraction of flipped coordinates.

    Parameters
    ----------
    rlr_threshold : int
        ``theta``, the agreement count a coordinate needs to keep a positive learning rate.
    rlr_server_lr : float
        ``eta``, the server learning rate (1: the mean's step).
    rlr_weighted : bool
        Weight the mean by the claimed example counts, as the paper does.
    """

    name = "robust_lr"

    def __init__(
        self, rlr_threshold: int = 4, rlr_server_lr: float = 1.0, rlr_weighted: bool = True
    ) -> None:
        self.rlr_threshold = check_int("rlr_threshold", rlr_threshold, minimum=1)
        self.rlr_server_lr = check_float(
            "rlr_server_lr", rlr_server_lr, minimum=0.0, exclusive_minimum=True
        )
        if not isinstance(rlr_weighted, bool):
            raise InvalidParameterError(f"rlr_weighted must be a bool, got {rlr_weighted!r}")
        self.rlr_weighted = rlr_weighted

    def min_clients(self) -> int:
        return self.rlr_threshold + 2

    def _precondition_hint(self) -> str:
        return (
            " (with fewer than rlr_threshold + 2 clients a single dissenting client would "
            "flip every coordinate)"
        )

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        n = matrix.n
        counts = num_examples if self.rlr_weighted and num_examples is not None else np.ones(n)
        mean = matrix.combine(counts / counts.sum()).astype(np.float64)
        agree = np.abs(sign_sums(matrix)) >= self.rlr_threshold
        step = mean * np.where(agree, self.rlr_server_lr, -self.rlr_server_lr)
        saturated = int(np.sum(np.abs(step) > FLOAT32_MAX))
        if saturated:
            logger.warning(
                "robust_lr: %d coordinates beyond float32 after the server learning rate; "
                "saturated", saturated,
            )
            np.clip(step, -FLOAT32_MAX, FLOAT32_MAX, out=step)
        flipped = int(np.sum(~agree))
        return result_from_flat(
            matrix,
            step,
            range(n),
            info={
                "flipped": flipped,
                "flipped_fraction": flipped / matrix.d,
                "saturated": saturated,
            },
        )
