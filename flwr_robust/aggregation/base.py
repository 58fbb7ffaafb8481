"""The aggregation contract: :class:`Aggregator` and :class:`AggregationResult`.

An aggregator maps ``n`` client updates (each a list of layer arrays, in Flower's layer
order) to one aggregated update of the same shapes, reporting which clients contributed,
per-client scores where the rule has them, and a reason for every client it left out.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .matrix import Layers, UpdateMatrix


@dataclass(frozen=True)
class AggregationResult:
    """What a rule made of one round's updates.

    Attributes
    ----------
    update : list[np.ndarray]
        The aggregated update, one float32 array per input layer, same shapes.
    kept : list[int]
        Indices (into the input list) of the clients whose values contributed, ascending.
    scores : np.ndarray or None
        Per-client scores where the rule has them (meaning documented by each rule).
    rejected : dict[int, str]
        Client index -> reason, for every client left out.
    weights : np.ndarray or None
        Effective weight of each client in the output where the output is a weighted mean
        of (possibly clipped) client updates; ``None`` for coordinate-wise rules.
    info : dict[str, float | int | str]
        Rule-specific diagnostics (e.g. iterations used, values replaced).
    """

    update: list[np.ndarray]
    kept: list[int]
    scores: np.ndarray | None = None
    rejected: dict[int, str] = field(default_factory=dict)
    weights: np.ndarray | None = None
    info: dict[str, float | int | str] = field(default_factory=dict)

    def in_input_order(self, order: np.ndarray) -> AggregationResult:
        """This result of clients ``order[0], order[1], ...`` with client indices mapped
        back to the input's positions."""

        def per_client(values: np.ndarray | None) -> np.ndarray | None:
            if values is None:
                return None
            out = np.empty_like(np.asarray(values))
            out[order] = values
            return out

        return AggregationResult(
            update=self.update,
            kept=sorted(int(order[i]) for i in self.kept),
            scores=per_client(self.scores),
            rejected=dict(sorted((int(order[i]), text) for i, text in self.rejected.items())),
            weights=per_client(self.weights),
            info=self.info,
        )


#: Leading values of each update compared to sort the clients (ties read further).
CANONICAL_PREFIX = 16


def canonical_order(
    updates: Sequence[Layers], client_ids: Sequence[Any] | None = None
) -> np.ndarray:
    """Client indices in the lexicographic order of their updates' values (layers in
    order, each flattened in C order; compared as float64).

    The first :data:`CANONICAL_PREFIX` values of every client decide almost always; clients
    equal on them are compared further, chunk by chunk, only as far as their first
    difference. Equal values are then ordered by their bytes (``-0.0`` and ``0.0`` differ)
    and identical updates by client identity (``str(client_id)``), so the order never
    depends on the input's: not even stateful rules, which key on the identities, can tell.
    """
    n = len(updates)
    if n < 2:
        return np.arange(n)
    prefix = np.array([_leading_values(client, CANONICAL_PREFIX) for client in updates])
    order = np.lexsort(prefix.T[::-1])
    same = np.all(prefix[order[1:]] == prefix[order[:-1]], axis=1)
    if not np.any(same):
        return order
    ids = [None] * n if client_ids is None else [str(i) for i in client_ids]

    def compare(a: int, b: int) -> int:
        by_value = _compare_updates(updates[a], updates[b])
        if by_value:
            return by_value
        by_bytes = _compare_bytes(updates[a], updates[b])
        if by_bytes or ids[a] is None or ids[a] == ids[b]:
            return by_bytes
        return -1 if ids[a] < ids[b] else 1  # type: ignore[operator]

    result = list(order)
    start = 0
    while start < n:  # sort each run of equal prefixes by full content
        stop = start + 1
        while stop < n and same[stop - 1]:
            stop += 1
        if stop - start > 1:
            result[start:stop] = sorted(result[start:stop], key=functools.cmp_to_key(compare))
        start = stop
    return np.asarray(result, dtype=np.int64)


def _leading_values(client: Layers, count: int) -> list[float]:
    values: list[float] = []
    for layer in client:
        if len(values) >= count:
            break
        flat = np.asarray(layer).reshape(-1)
        values.extend(float(v) for v in flat[: count - len(values)])
    return values + [0.0] * (count - len(values))  # every client has the same shapes


def _compare_bytes(a: Layers, b: Layers) -> int:
    """-1, 0 or 1: the comparison of two equal-valued updates' bytes."""
    for left, right in zip(a, b, strict=False):
        left_bytes = np.ascontiguousarray(left).tobytes()
        right_bytes = np.ascontiguousarray(right).tobytes()
        if left_bytes != right_bytes:
            return -1 if left_bytes < right_bytes else 1
    return 0


def _compare_updates(a: Layers, b: Layers, chunk: int = 1 << 16) -> int:
    """-1, 0 or 1: the lexicographic comparison of two updates' values (updates of other
    layouts compare by layout; :class:`UpdateMatrix` then refuses them)."""
    if len(a) != len(b):
        return -1 if len(a) < len(b) else 1
    for left, right in zip(a, b, strict=True):
        left, right = np.asarray(left).reshape(-1), np.asarray(right).reshape(-1)
        if left.size != right.size:
            return -1 if left.size < right.size else 1
        for start in range(0, left.size, chunk):
            x = left[start : start + chunk].astype(np.float64)
            y = right[start : start + chunk].astype(np.float64)
            differ = np.flatnonzero(x != y)
            if differ.size:
                return -1 if x[differ[0]] < y[differ[0]] else 1
    return 0


class Aggregator(ABC):
    """Base class of every aggregation rule.

    Subclasses set ``name``, validate their parameters in ``__init__``, implement
    :meth:`min_clients` (the smallest client count the rule is defined for) and
    :meth:`_aggregate`. Calling an aggregator never modifies its inputs.
    """

    name: ClassVar[str]
    #: Whether the rule keeps state across calls (see :meth:`reset`).
    stateful: ClassVar[bool] = False
    #: Whether calls must pass ``client_ids``: the rule keys per-client state by them.
    needs_client_ids: ClassVar[bool] = False
    #: For rules wrapping another registry rule: the name of the constructor parameter that
    #: names it (the wrapped rule's parameters are then accepted and forwarded).
    wraps: ClassVar[str | None] = None
    #: Whether ``rule(x_1 + t, ..., x_n + t) = rule(x_1, ..., x_n) + t`` for every
    #: translation ``t`` (see :meth:`translation_equivariant`).
    equivariant: ClassVar[bool] = False

    def translation_equivariant(self) -> bool:
        """Whether translating every input translates the output alike, with these
        parameters. Such a rule gives the same model from client weights as from client
        updates (weights minus the global model), so it needs no global model."""
        return self.equivariant

    def __call__(
        self,
        updates: Sequence[Layers],
        num_examples: Sequence[float] | None = None,
        *,
        client_ids: Sequence[Any] | None = None,
        base: Layers | None = None,
    ) -> AggregationResult:
        """Aggregate ``updates``.

        Parameters
        ----------
        updates : list of lists of np.ndarray
            ``updates[i]`` is client ``i``'s update as a list of layer arrays.
        num_examples : sequence of numbers, optional
            The example counts the clients claim. Each rule documents whether and how it
            uses them; they are client claims and never let one client dominate a robust rule.
        client_ids : sequence, optional
            Stable client identities (e.g. a signing key id or the Flower node id), used by
            stateful rules. Must be unique; required by rules with ``needs_client_ids``.
        base : list of np.ndarray, optional
            When given, ``updates`` are client weights and the rule aggregates
            ``updates[i] - base`` (computed block by block, without a full copy).

        Order independence: the rule always sees the clients in their *canonical order*,
        the lexicographic order of their updates' values (see :func:`canonical_order`),
        and the result is mapped back to the input positions. Every computation, rounding
        and tie-break included, is then the same for every order of the same clients, so
        the result is exactly invariant to the clients' order (and no client can pick its
        position to win a tie or to become a rule's reference point).
        """
        order = canonical_order(updates, client_ids)
        matrix = UpdateMatrix(updates, base=base, order=order)
        counts = _check_num_examples(num_examples, matrix.n)
        ids = _check_client_ids(client_ids, matrix.n)
        if ids is None and self.needs_client_ids:
            raise ValueError(
                f"{self.name} keeps per-client state: pass client_ids=[...] (stable client "
                "identities, e.g. signer key ids or node ids); state is never keyed by position"
            )
        self.check_num_clients(matrix.n)
        result = self._aggregate(
            matrix,
            None if counts is None else counts[order],
            None if ids is None else [ids[i] for i in order],
        )
        return result.in_input_order(order)

    @abstractmethod
    def _aggregate(
        self, matrix: UpdateMatrix, num_examples: np.ndarray | None, client_ids: list[Any] | None
    ) -> AggregationResult:
        """Rule-specific aggregation over a validated matrix."""

    def min_clients(self) -> int:
        """Smallest number of clients the rule is defined for, given its parameters."""
        return 1

    def check_num_clients(self, n: int) -> None:
        """Raise ``ValueError`` when the rule is not defined for ``n`` clients."""
        needed = self.min_clients()
        if n < needed:
            raise ValueError(
                f"{self.name} with {self.describe()} needs at least {needed} clients, got {n}"
                f"{self._precondition_hint()}"
            )

    def _precondition_hint(self) -> str:
        return ""

    def params(self) -> dict[str, Any]:
        """The rule's constructor parameters and their current values."""
        signature = inspect.signature(type(self).__init__)
        return {
            name: getattr(self, name)
            for name in signature.parameters
            if name != "self" and hasattr(self, name)
        }

    def describe(self) -> str:
        """Parameters as ``k=v`` text, for logs and errors."""
        return ", ".join(f"{k}={v}" for k, v in self.params().items()) or "no parameters"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    def reset(self) -> None:
        """Forget state kept across rounds (no-op for stateless rules)."""


# --------------------------------------------------------------------------- helpers
def result_from_flat(
    matrix: UpdateMatrix,
    flat: np.ndarray,
    kept: Sequence[int] | np.ndarray,
    *,
    reason: str | Callable[[int], str] = "not selected",
    scores: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    info: dict[str, float | int | str] | None = None,
) -> AggregationResult:
    """Build an :class:`AggregationResult`; clients not in ``kept`` get ``reason`` (a text,
    or a function of the client index)."""
    kept_sorted = sorted(int(i) for i in kept)
    kept_set = set(kept_sorted)
    explain = reason if callable(reason) else (lambda _: reason)
    rejected = {i: explain(i) for i in range(matrix.n) if i not in kept_set}
    return AggregationResult(
        update=matrix.unflatten(np.ascontiguousarray(flat, dtype=np.float32)),
        kept=kept_sorted,
        scores=scores,
        rejected=rejected,
        weights=weights,
        info=dict(info or {}),
    )


class InvalidParameterError(ValueError, TypeError):
    """A rule parameter of the wrong type or outside its range (catch either base)."""


def check_int(name: str, value: Any, *, minimum: int | None = None, allow_none: bool = False) -> Any:
    """Validate an integer parameter (bools are rejected)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidParameterError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidParameterError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
    allow_none: bool = False,
) -> Any:
    """Validate a finite real parameter within an (optionally open) interval."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(float(value)):
        raise InvalidParameterError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
        raise InvalidParameterError(
            f"{name} must be {'>' if exclusive_minimum else '>='} {minimum}, got {value}"
        )
    if maximum is not None and (value >= maximum if exclusive_maximum else value > maximum):
        raise InvalidParameterError(
            f"{name} must be {'<' if exclusive_maximum else '<='} {maximum}, got {value}"
        )
    return value


def _check_num_examples(num_examples: Sequence[float] | None, n: int) -> np.ndarray | None:
    if num_examples is None:
        return None
    counts = np.asarray(num_examples, dtype=np.float64)
    if counts.shape != (n,):
        raise ValueError(f"num_examples has shape {counts.shape}, expected ({n},)")
    if not np.all(np.isfinite(counts)) or np.any(counts <= 0):
        raise ValueError("num_examples must be finite and positive")
    return counts


def _check_client_ids(client_ids: Sequence[Any] | None, n: int) -> list[Any] | None:
    if client_ids is None:
        return None
    ids = list(client_ids)
    if len(ids) != n:
        raise ValueError(f"client_ids has {len(ids)} entries, expected {n}")
    if len(set(ids)) != n:
        raise ValueError("client_ids must be unique")
    return ids
