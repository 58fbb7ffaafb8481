"""Pre-aggregation stages: linear maps of the updates applied before any rule.

Nearest-neighbour mixing, bucketing and adaptive robust clipping each turn the ``n`` client
updates ``X`` into ``m`` inputs ``Y = M X`` for a small mixing matrix ``M`` (``m x n``)
computed from norms or the Gram matrix. ``Y`` is never materialised: the rule runs on a
:class:`~flwr_robust.aggregation.matrix.MixedUpdateMatrix`, whose Gram matrix is
``M G M^T`` of the Gram matrix the stage already computed (so NNM followed by Krum builds
one Gram matrix) and whose weighted sums are ``X^T (M^T w)``.

Build one with ``get_aggregator(rule, pre="nnm", **params)``: every parameter goes to each
component (rule, stage) that takes a parameter of that name, so ``num_malicious`` is both
the rule's ``f`` and NNM's / ARC's ``f``.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .base import (
    AggregationResult,
    Aggregator,
    InvalidParameterError,
    check_int,
)
from .clipping import clip_factors
from .distance import squared_distances
from .matrix import AnchoredGram, MixedUpdateMatrix, UpdateMatrix


@dataclass(frozen=True)
class Mixing:
    """What a stage made of one round: ``Y = weights @ X``.

    Attributes
    ----------
    weights : np.ndarray
        ``(m, n)`` mixing matrix.
    home : np.ndarray
        ``(n,)``: the input each client is mapped to (its own mixed row for NNM and ARC,
        its bucket for bucketing); client scores are read from it.
    gram : AnchoredGram or None
        The clients' anchored Gram matrix when the stage computed it (reused by the rule).
    info : dict
        Stage diagnostics, reported with a ``pre_`` prefix.
    """

    weights: np.ndarray
    home: np.ndarray
    gram: AnchoredGram | None = None
    info: dict[str, float | int | str] = field(default_factory=dict)


class PreAggregation(ABC):
    """A stage mapping ``n`` client updates to ``m`` rule inputs by a mixing matrix."""

    name: ClassVar[str]
    #: Whether translating every input translates every mixed output alike.
    equivariant: ClassVar[bool] = False

    @abstractmethod
    def mixing(self, matrix: UpdateMatrix) -> Mixing:
        """The round's mixing matrix for the clients in ``matrix``."""

    def min_clients(self) -> int:
        """Smallest number of clients the stage is defined for."""
        return 1

    def output_rows(self, n: int) -> int:
        """Number of inputs the rule receives from ``n`` clients."""
        return n

    def clients_for_rows(self, rows: int) -> int:
        """Smallest ``n`` with ``output_rows(n) >= rows``."""
        return rows

    def params(self) -> dict[str, Any]:
        """The stage's constructor parameters and their values."""
        signature = inspect.signature(type(self).__init__)
        return {name: getattr(self, name) for name in signature.parameters if name != "self"}


def _required_f(stage: str, num_malicious: int | None) -> int:
    if num_malicious is None:
        raise InvalidParameterError(
            f"pre-aggregation {stage!r} needs num_malicious (f, the number of Byzantine "
            "clients to tolerate)"
        )
    return check_int("num_malicious", num_malicious, minimum=0)


class NearestNeighborMixing(PreAggregation):
    """Nearest Neighbor Mixing (Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan,
    AISTATS 2023, "Fixing by Mixing: A Recipe for Optimal Byzantine ML under
    Heterogeneity").

    Every update is replaced by the mean of its ``n - f`` nearest updates in Euclidean
    distance, itself included (distances from one Gram matrix, which the rule reuses).
    Between equally distant neighbours the lower client index is taken. Requires
    ``n >= 2f + 1``.

    Parameters
    ----------
    num_malicious : int
        ``f`` (required).
    """

    name = "nnm"
    equivariant = True

    def __init__(self, num_malicious: int | None = None) -> None:
        self.num_malicious = _required_f(self.name, num_malicious)

    def min_clients(self) -> int:
        return 2 * self.num_malicious + 1

    def mixing(self, matrix: UpdateMatrix) -> Mixing:
        n = matrix.n
        gram = matrix.anchored_gram()
        distances = squared_distances(gram.centered)
        np.fill_diagonal(distances, -1.0)  # each update is its own nearest neighbour
        neighbours = n - self.num_malicious
        nearest = np.argsort(distances, axis=1, kind="stable")[:, :neighbours]
        weights = np.zeros((n, n))
        weights[np.arange(n)[:, None], nearest] = 1.0 / neighbours
        return Mixing(weights, np.arange(n), gram, {"neighbours": neighbours})


class Bucketing(PreAggregation):
    """Bucketing (Karimireddy, He, Jaggi, ICLR 2022, "Byzantine-Robust Learning on
    Heterogeneous Datasets via Bucketing").

    The clients are shuffled by a seeded random permutation (a fresh one every round) and
    split into ``ceil(n / s)`` consecutive buckets of ``s = bucket_size``; each bucket's
    mean is one rule input. A last bucket with fewer than ``s`` members is averaged over
    its members. Each Byzantine client spoils at most one bucket, so the rule keeps its
    ``f`` but sees ``ceil(n / s)`` inputs (e.g. Krum then needs ``ceil(n / s) > 2f + 2``).
    The result depends on the permutation, so it is invariant to the clients' order only
    in distribution.

    Parameters
    ----------
    bucket_size : int
        ``s``, clients per bucket (the paper uses 2).
    seed : int, optional
        Seed of the permutations (draws continue across rounds).
    """

    name = "bucketing"
    equivariant = True

    def __init__(self, bucket_size: int = 2, seed: int | None = None) -> None:
        self.bucket_size = check_int("bucket_size", bucket_size, minimum=1)
        self.seed = check_int("seed", seed, minimum=0, allow_none=True)
        self._rng = np.random.default_rng(seed)

    def output_rows(self, n: int) -> int:
        return math.ceil(n / self.bucket_size)

    def clients_for_rows(self, rows: int) -> int:
        return self.bucket_size * (rows - 1) + 1

    def mixing(self, matrix: UpdateMatrix) -> Mixing:
        n = matrix.n
        bucket = np.empty(n, dtype=np.int64)
        bucket[self._rng.permutation(n)] = np.arange(n) // self.bucket_size
        sizes = np.bincount(bucket)
        weights = np.zeros((sizes.size, n))
        weights[bucket, np.arange(n)] = 1.0 / sizes[bucket]
        return Mixing(weights, bucket, None, {"buckets": int(sizes.size)})


class AdaptiveRobustClipping(PreAggregation):
    """Adaptive Robust Clipping, ARC (Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan,
    ICLR 2025, "Adaptive Gradient Clipping for Robust Federated Learning", arXiv:2405.14432;
    earlier arXiv versions carry other titles).

    With ``k = floor(2 (f / n) (n - f))``, every update is clipped to ``C``, the norm of
    the ``(k + 1)``-th largest update: the ``k`` largest are scaled down to norm ``C``, the
    others are unchanged. Requires ``n >= 2f + 1`` (then ``k < n``). Norms take one cheap
    pass over the data; the Gram matrix of the clipped updates, when the rule needs one,
    comes from the clients' Gram matrix (computed once).

    Parameters
    ----------
    num_malicious : int
        ``f`` (required).
    """

    name = "arc"

    def __init__(self, num_malicious: int | None = None) -> None:
        self.num_malicious = _required_f(self.name, num_malicious)

    def min_clients(self) -> int:
        return 2 * self.num_malicious + 1

    def mixing(self, matrix: UpdateMatrix) -> Mixing:
        n, f = matrix.n, self.num_malicious
        norms = np.sqrt(matrix.squared_norms())
        k = (2 * f * (n - f)) // n
        bound = float(np.sort(norms)[::-1][k])
        factors = clip_factors(norms, bound)
        info: dict[str, float | int | str] = {
            "clip_bound": bound,
            "clipped": int(np.sum(norms > bound)),
        }
        return Mixing(np.diag(factors), np.arange(n), None, info)


_STAGES: dict[str, type[PreAggregation]] = {
    stage.name: stage for stage in (NearestNeighborMixing, Bucketing, AdaptiveRobustClipping)
}


def available_pre_aggregations() -> list[str]:
    """Sorted names of the pre-aggregation stages."""
    return sorted(_STAGES)


def pre_aggregation_class(name: str) -> type[PreAggregation]:
    """The stage class called ``name`` (case and ``-``/``_`` insensitive)."""
    key = name.strip().lower().replace("-", "_")
    if key not in _STAGES:
        raise ValueError(
            f"unknown pre-aggregation {name!r}; available: "
            f"{', '.join(available_pre_aggregations())}"
        )
    return _STAGES[key]


class PreAggregated(Aggregator):
    """A rule run on the outputs of a pre-aggregation stage.

    The stage maps the ``n`` updates to ``m`` inputs ``Y = M X``; the rule runs on them
    unchanged (without example counts: a mixed input has no single claimant, so rules
    that would weight by counts weight uniformly). The rule's result is mapped back to
    the clients:

    - ``kept``: every client with a non-zero coefficient in ``M`` in at least one input
      the rule kept (with NNM a Byzantine client mixed into a kept input counts as kept:
      its values did contribute, with weight at most ``1 / (n - f)`` per input);
    - ``rejected``: the other clients, with the rule's reason for their own input;
    - ``weights``: ``M^T w`` when the rule reports weights ``w`` (the clients' effective
      coefficients in the output), else ``None``;
    - ``scores``: the score of each client's own input (its mixed row for NNM and ARC,
      its bucket for bucketing);
    - ``info``: the rule's, plus ``pre_aggregation``, ``mixed_inputs`` and the stage's
      diagnostics prefixed ``pre_``.

    ``name`` is the rule's registry name (the stage shows in ``repr``, ``params()`` and
    ``info``). Rules keeping per-client state cannot run after a stage (a mixed input has
    no identity); ``reputation`` instead applies the stage inside, to its base rule.

    Parameters
    ----------
    stage : PreAggregation
        The pre-aggregation stage.
    rule : Aggregator
        The rule aggregating the stage's outputs.
    """

    def __init__(self, stage: PreAggregation, rule: Aggregator) -> None:
        if rule.needs_client_ids or rule.wraps is not None:
            raise ValueError(
                f"{rule.name} keeps per-client state or wraps a rule: it cannot run after the "
                f"pre-aggregation stage {stage.name!r} (mixed inputs have no client identity)"
            )
        self.stage = stage
        self.rule = rule

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.rule.name

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return self.rule.stateful

    def params(self) -> dict[str, Any]:
        return {**self.rule.params(), "pre": self.stage.name, **self.stage.params()}

    def __repr__(self) -> str:
        return f"{type(self.rule).__name__}({self.describe()})"

    def reset(self) -> None:
        self.rule.reset()

    def translation_equivariant(self) -> bool:
        return self.stage.equivariant and self.rule.translation_equivariant()

    def min_clients(self) -> int:
        return max(
            self.stage.min_clients(), self.stage.clients_for_rows(self.rule.min_clients())
        )

    def _precondition_hint(self) -> str:
        hint = self.rule._precondition_hint().strip().strip("()")
        stage = f"{self.stage.name} needs n >= {self.stage.min_clients()}"
        return f" ({stage}; {hint or self.rule.name} on the {self.stage.name} outputs)"

    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        mixing = self.stage.mixing(matrix)
        mixed = MixedUpdateMatrix(matrix, mixing.weights, source_gram=mixing.gram)
        self.rule.check_num_clients(mixed.n)
        result = self.rule._aggregate(mixed, None, None)
        return self._to_clients(matrix.n, mixing, result)

    def _to_clients(self, n: int, mixing: Mixing, result: AggregationResult) -> AggregationResult:
        kept_rows = np.asarray(result.kept, dtype=np.int64)
        contributes = (mixing.weights[kept_rows] != 0).any(axis=0)
        kept = np.flatnonzero(contributes)
        rejected = {
            int(j): (
                f"{self.stage.name}: every input containing it was rejected by "
                f"{self.rule.name}; its own input {mixing.home[j]}: "
                f"{result.rejected.get(int(mixing.home[j]), 'not kept')}"
            )
            for j in np.flatnonzero(~contributes)
        }
        weights = None if result.weights is None else mixing.weights.T @ result.weights
        scores = None if result.scores is None else np.asarray(result.scores)[mixing.home]
        info = {
            **result.info,
            "pre_aggregation": self.stage.name,
            "mixed_inputs": int(mixing.weights.shape[0]),
            **{f"pre_{key}": value for key, value in mixing.info.items()},
        }
        return AggregationResult(
            update=result.update,
            kept=kept.tolist(),
            scores=scores,
            rejected=rejected,
            weights=weights,
            info=info,
        )
