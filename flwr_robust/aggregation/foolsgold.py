"""FoolsGold: down-weighting clients whose update histories look alike (sybils)."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from .base import AggregationResult, Aggregator, check_float, result_from_flat
from .clustering import cosine_similarities
from .matrix import UpdateMatrix, _safe_products
from .registry import register

logger = logging.getLogger("flwr.robust")

#: Largest squared norm a stored history may have in one block: every value and every
#: product of the block's Gram matrix then stays far inside float32's safe range (HUGE =
#: 2**100 in :mod:`.matrix`).
_ROW_LIMIT = 2.0**80


def _shrink_factor(values: np.ndarray) -> float:
    """The power of two that brings the squared norm of ``values`` (finite float32) to at
    most a quarter of ``_ROW_LIMIT``."""
    exact = values.astype(np.float64)
    squared = float(exact @ exact)
    if not math.isfinite(squared):  # only deltas beyond float32 (an absurd global model)
        raise ValueError("foolsgold: an update is not finite in float32; history not updated")
    return 2.0 ** -(math.ceil(0.5 * math.log2(squared / _ROW_LIMIT)) + 1)


def _products(block: np.ndarray, torch: Any) -> np.ndarray:
    """``block @ block.T`` in float32 (float64 where float32 products are unsafe)."""
    part = (torch.from_numpy(block) @ torch.from_numpy(block).T).numpy().astype(np.float64)
    if _safe_products(part) or not np.all(np.isfinite(block)):
        return part
    exact = block.astype(np.float64)
    return exact @ exact.T


def foolsgold_weights(similarities: np.ndarray, kappa: float) -> np.ndarray:
    """FoolsGold's per-client weights in ``[0, 1]`` from the pairwise cosine similarities
    of the clients' histories (Fung et al., Algorithm 1).

    ``v_i = max_{j != i} cs_ij``; pardoning: ``cs_ij *= v_i / v_j`` where ``v_j > v_i > 0``;
    ``alpha_i = 1 - max_{j != i} cs_ij`` clipped to ``[0, 1]`` and divided by its maximum;
    then ``kappa * (ln(alpha / (1 - alpha)) + 0.5)`` clipped to ``[0, 1]`` (``alpha = 1``
    maps to 1, ``alpha = 0`` to 0, the logit's limits).
    """
    n = len(similarities)
    if n == 1:
        return np.ones(1)
    cs = similarities.copy()
    np.fill_diagonal(cs, 0.0)
    others = ~np.eye(n, dtype=bool)
    v = np.where(others, cs, -np.inf).max(axis=1)
    pardon = (v[None, :] > v[:, None]) & (v[:, None] > 0)
    ratio = v[:, None] / np.where(pardon, v[None, :], 1.0)
    cs = np.where(pardon, cs * ratio, cs)
    alpha = np.clip(1.0 - np.where(others, cs, -np.inf).max(axis=1), 0.0, 1.0)
    top = alpha.max()
    if top <= 0:
        return np.zeros(n)
    alpha = alpha / top
    with np.errstate(divide="ignore"):
        logit = np.log(alpha) - np.log1p(-alpha)
    return np.clip(kappa * (logit + 0.5), 0.0, 1.0)


@register
class FoolsGold(Aggregator):
    """FoolsGold (Fung, Yoon, Beschastnikh, RAID 2020, "The Limitations of Federated
    Learning in Sybil Settings").

    Keeps, per client identity, the history ``H_i`` = sum of all updates the client has
    sent. Each round it adds the current updates, computes the cosine similarities of the
    present clients' histories (one Gram matrix, built in the same pass that updates the
    histories), turns them into weights (:func:`foolsgold_weights`: pardoning, then the
    logit with confidence ``kappa``) and returns the weighted mean of the *current* updates
    ``sum_i w_i x_i / sum_i w_i``. Sybils pushing the same objective accumulate similar
    histories and get weight near 0; diverse honest clients keep weight near 1. Clients
    absent from a round keep their history untouched. State is keyed by ``client_ids``
    (required: never by list position); :meth:`reset` forgets it.

    Deviations: the paper can weight features by their importance in the output layer; we
    use the full update (no feature weighting). The paper adds ``sum_i w_i x_i`` to the
    model; we normalise by ``sum_i w_i`` so the step does not grow with the number of
    clients. When every weight is 0 (e.g. all histories identical) the update is zero
    and a warning is logged. FoolsGold targets sybils; a single outlier or attackers with
    dissimilar updates keep full weight (combine it with a norm bound against those).
    Example counts are ignored. Histories cost ``4 * d`` bytes per known client.

    ``scores`` are each client's largest history cosine similarity to another present
    client (before pardoning); ``weights`` the normalised coefficients of the output.

    Parameters
    ----------
    kappa : float
        Confidence of the logit (the paper's ``kappa``, default 1); larger values push
        weights towards 0 or 1.
    """

    name = "foolsgold"
    stateful = True
    needs_client_ids = True

    def __init__(self, kappa: float = 1.0) -> None:
        self.kappa = check_float("kappa", kappa, minimum=0.0, exclusive_minimum=True)
        self._history: dict[Any, np.ndarray] = {}
        self._scale: dict[Any, float] = {}  # stored history = true history / scale

    def reset(self) -> None:
        self._history.clear()
        self._scale.clear()

    def history(self, client_id: Any) -> np.ndarray | None:
        """The summed past updates of ``client_id`` (float64; ``None`` if unknown)."""
        found = self._history.get(client_id)
        if found is None:
            return None
        return found.astype(np.float64) * self._scale.get(client_id, 1.0)

    def _update_histories(self, matrix: UpdateMatrix, ids: list[Any]) -> np.ndarray:
        """Add the updates to the histories; return the Gram matrix of the stored histories
        (each a positive multiple of the client's true history: cosines are the same).

        A history is stored as float32 values times a power-of-two scale (1 until needed),
        its squared norm in every block at most ``_ROW_LIMIT``, so every stored value is at
        most ``2**40``: far below half a float32 step at float32's largest value, so adding
        any finite float32 update rounds but never overflows. Where a block's Gram matrix
        shows a client above the limit, that client's stored values (all blocks so far) are
        scaled down by a power of two (exact) and its scale up, so histories of any finite
        updates stay finite, their products stay in float32's safe range (see
        :mod:`.matrix`) and their cosines exact.
        """
        import torch

        for client, stored in self._history.items():
            if stored.size != matrix.d:
                raise ValueError(
                    f"foolsgold history of client {client!r} has {stored.size} values, the "
                    f"updates have {matrix.d}: the model changed; call reset()"
                )
        histories = [self._history.setdefault(i, np.zeros(matrix.d, np.float32)) for i in ids]
        scales = np.array([self._scale.get(i, 1.0) for i in ids])
        gram = np.zeros((matrix.n, matrix.n))
        for start, stop, block in matrix.blocks():
            for row, history in enumerate(histories):
                if scales[row] != 1.0:
                    block[row] *= np.float32(1.0 / scales[row])  # power of two: exact
                part = history[start:stop]
                part += block[row]
                block[row] = part
            part = _products(block, torch)
            large = np.flatnonzero(~(np.diag(part) <= _ROW_LIMIT))  # NaN/Inf included
            if large.size:
                for row in large.tolist():
                    shrink = _shrink_factor(histories[row][start:stop])
                    histories[row][:stop] *= np.float32(shrink)
                    block[row] = histories[row][start:stop]
                    gram[row, :] *= shrink
                    gram[:, row] *= shrink
                    scales[row] /= shrink
                part = _products(block, torch)
            gram += part
        for client, scale in zip(ids, scales, strict=True):
            if scale != 1.0:
                self._scale[client] = float(scale)
        return (gram + gram.T) / 2.0

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        assert client_ids is not None  # enforced by Aggregator.__call__ (needs_client_ids)
        similarities = cosine_similarities(self._update_histories(matrix, client_ids))
        raw = foolsgold_weights(similarities, self.kappa)
        others = similarities.copy()
        np.fill_diagonal(others, -np.inf)
        scores = others.max(axis=1) if matrix.n > 1 else np.zeros(1)
        total = raw.sum()
        if total <= 0:
            logger.warning("foolsgold: every client got weight 0; returning a zero update")
            weights = np.zeros(matrix.n)
            flat = np.zeros(matrix.d, dtype=np.float32)
        else:
            weights = raw / total
            flat = matrix.combine(weights)
        return result_from_flat(
            matrix,
            flat,
            np.flatnonzero(weights > 0),
            reason=lambda i: (
                f"weight 0: history cosine similarity {scores[i]:.3g} to another client "
                "(sybil-like)"
            ),
            scores=scores,
            weights=weights,
            info={"zero_weight": int(np.sum(weights == 0))},
        )
