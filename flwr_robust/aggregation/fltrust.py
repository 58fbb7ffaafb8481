"""FLTrust: trust scores from a server update computed on a clean root dataset."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .base import AggregationResult, Aggregator, InvalidParameterError, result_from_flat
from .clustering import cosine_similarities
from .matrix import UpdateMatrix
from .registry import register

logger = logging.getLogger("flwr.robust")

#: Global weights (layers in order) -> the server's update from training them on its root data.
ServerUpdateFn = Callable[[list[np.ndarray]], Sequence[np.ndarray]]

MISSING_PROVIDER = (
    "fltrust needs the server's own update every round: set server_update_fn, a function "
    "of the global weights (list of layer arrays) returning the update obtained by training "
    "them on the server's clean root dataset (FLTrust(server_update_fn=...), or the "
    "strategy's server_update_fn=...; the bundled server app sets it from run config "
    "'fltrust-root-size')"
)


@register
class FLTrust(Aggregator):
    """FLTrust (Cao, Fang, Liu, Gong, NDSS 2021, "FLTrust: Byzantine-robust Federated
    Learning via Trust Bootstrapping").

    The server holds a small clean *root dataset* and, each round, computes its own update
    ``g_0`` by training the current global model on it with the clients' local training
    hyperparameters (the paper's default root set has 100 samples). Then, for every client
    update ``g_i``:

    - trust score ``TS_i = ReLU(cos(g_i, g_0))``;
    - magnitude normalisation ``g_i' = g_i * ||g_0|| / ||g_i||`` (every update is moved onto
      the sphere of radius ``||g_0||``; ``g_0`` itself is not rescaled, as in the paper);
    - aggregate ``sum_i TS_i g_i' / sum_i TS_i``, applied by the strategy with global
      learning rate 1, as every rule here.

    The output is a convex combination of vectors of norm ``||g_0||``: its norm never
    exceeds ``||g_0||``, whatever the clients send. ``scores`` are the trust scores,
    ``weights`` each client's coefficient on its raw update (``TS_i ||g_0|| / ||g_i|| /
    sum TS``), ``kept`` the clients with a positive trust score.

    The server update comes from ``server_update_fn(global_weights)``, called once per
    aggregation with a copy of the global model the updates build on (the ``base`` of the
    call, which the strategies pass; without ``base`` the updates are taken relative to the
    zero model, as :class:`~.matrix.UpdateMatrix` does, and the function receives zeros).
    It must return the server's update (trained weights minus ``global_weights``, layers in
    the same order and shapes), trained with the clients' local hyperparameters. The bundled
    server app builds it from run config ``fltrust-root-size``; in your own ServerApp pass
    it to the strategy of either API, or assign ``rule.server_update_fn`` later::

        def server_update(weights):             # weights: list of arrays, model order
            set_weights(model, weights)
            train(model, root_data, epochs=..., learning_rate=...)  # as the clients do
            return [w - g for w, g in zip(get_weights(model), weights)]

        strategy = flwr_robust.strategy.FLTrust(server_update_fn=server_update)

    The rule also runs behind a pre-aggregation stage (it then scores the stage's outputs).

    Deviations and cases the paper leaves open:

    - The paper aggregates gradient-like updates and steps ``w - alpha g``; here updates are
      model deltas (client weights minus the global model), i.e. the negated, scaled form:
      cosines and norm ratios are the same, and the aggregate is added to the model.
    - A client update of norm 0 has no direction: trust score 0 (the paper divides by it).
    - When every trust score is 0 the paper's average is undefined: the round's update is
      zero (the model is kept), every client is rejected with the reason and a warning is
      logged.
    - A server update that is not finite, or of norm 0, cannot score anyone: the round is
      skipped the same way (zero update, every client rejected with the reason).
    - Without ``server_update_fn`` aggregation raises a ``ValueError`` saying what to
      configure (the strategies turn it into a failed round that keeps the model).
    - Example counts are ignored, as in the paper (they are client claims).

    Parameters
    ----------
    server_update_fn : callable, optional
        Global weights (list of layer arrays, layer order) -> the server update (same
        shapes). Not a run-config parameter (a run config cannot carry a function).
    """

    name = "fltrust"

    def __init__(self, server_update_fn: ServerUpdateFn | None = None) -> None:
        if server_update_fn is not None and not callable(server_update_fn):
            raise InvalidParameterError(
                f"server_update_fn must be callable or None, got {server_update_fn!r}"
            )
        self.server_update_fn = server_update_fn

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        server = self._server_update(matrix)
        if isinstance(server, str):
            return _skipped(matrix, server, None, {})
        exact = server.astype(np.float64)
        server_norm = float(np.sqrt(np.dot(exact, exact)))
        if server_norm == 0.0:
            return _skipped(matrix, "the server update is zero (no direction to trust)", None,
                            {"server_update_norm": 0.0})
        gram = matrix.with_extra_rows([server]).gram(centered=False)
        cosines = cosine_similarities(gram)[: matrix.n, matrix.n]
        norms = np.sqrt(np.maximum(np.diag(gram)[: matrix.n], 0.0))
        trust = np.maximum(cosines, 0.0)  # 0 for a zero update (no direction)
        info: dict[str, float | int | str] = {
            "server_update_norm": server_norm,
            "trust_sum": float(trust.sum()),
        }

        def reason(i: int) -> str:
            if norms[i] == 0:
                return "trust score 0: zero update (no direction)"
            return f"trust score 0: cosine {cosines[i]:.4g} with the server update is not positive"

        total = float(trust.sum())
        if total == 0.0:
            return _skipped(matrix, reason, trust, info)
        weights = trust * (server_norm / np.maximum(norms, 1e-300)) / total
        flat = matrix.combine(weights)
        return result_from_flat(
            matrix, flat, np.flatnonzero(trust > 0), reason=reason, scores=trust,
            weights=weights, info=info,
        )

    def _server_update(self, matrix: UpdateMatrix) -> np.ndarray | str:
        """The flat float32 server update, or why the round cannot use it."""
        if self.server_update_fn is None:
            raise ValueError(MISSING_PROVIDER)
        base = matrix.base_layers()
        if base is None:
            weights = [np.zeros(shape, dtype=np.float32) for shape in matrix.shapes]
        else:
            weights = [np.array(layer, copy=True) for layer in base]
        update = self.server_update_fn(weights)
        if not isinstance(update, Sequence):
            raise TypeError(
                f"server_update_fn must return a list of layer arrays, got {type(update).__name__}"
            )
        layers = list(update)
        if len(layers) != len(matrix.shapes) or any(
            np.shape(layer) != shape for layer, shape in zip(layers, matrix.shapes, strict=False)
        ):
            raise ValueError(
                f"server_update_fn returned layers of shapes "
                f"{[np.shape(layer) for layer in layers]}, expected {matrix.shapes}"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            flat = np.concatenate(
                [np.asarray(layer, dtype=np.float32).reshape(-1) for layer in layers]
            )
        if not np.all(np.isfinite(flat)):
            return "the server update is not finite (in float32)"
        return flat


def _skipped(
    matrix: UpdateMatrix,
    reason: str | Callable[[int], str],
    scores: np.ndarray | None,
    info: dict[str, float | int | str],
) -> AggregationResult:
    """A zero update with every client rejected: the round keeps the model."""
    text = reason if isinstance(reason, str) else "every trust score is 0"
    logger.warning("fltrust: %s; skipping the round (zero update)", text)
    return result_from_flat(
        matrix,
        np.zeros(matrix.d, dtype=np.float32),
        [],
        reason=reason,
        scores=scores,
        weights=np.zeros(matrix.n),
        info={**info, "skipped": text},
    )

