"""The attack contract (:class:`Attack`, :class:`AttackContext`) and the name -> attack registry.

A Byzantine ClientApp asks its attack three things: how to change its training data before honest
training (:meth:`Attack.poison_data`), how to change the resulting update
(:meth:`Attack.poison_update`), and which example count to claim
(:meth:`Attack.claimed_examples`). Every default is the honest behaviour, so an attack only
overrides what it changes. Client-side attacks never import Flower (only the server-side
simulation hook in :mod:`~flwr_robust.attacks.omniscient` does).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from ..aggregation.registry import canonical_name
from ..config import keyword_parameters, kwargs_from_config
from ..task.data import Dataset

__all__ = [
    "Attack",
    "AttackContext",
    "attack_class",
    "attack_parameters",
    "attack_params_from_config",
    "available_attacks",
    "get_attack",
    "register",
]

Layers = list[np.ndarray]


@dataclass(frozen=True)
class AttackContext:
    """What a Byzantine client knows when it crafts its update.

    Attributes
    ----------
    server_round : int
        The current round.
    num_clients : int
        ``n``, the number of clients in the round (or the federation).
    num_byzantine : int
        ``f``, the number of Byzantine clients among them.
    rng : np.random.Generator
        The only source of randomness an attack may use; the app derives it deterministically
        from the seed, the round and the partition id.
    global_weights : list[np.ndarray]
        The global model the server sent this round, in layer order.
    colluder_deltas : callable or None
        For colluding attacks: returns the honest deltas the colluding clients compute on their
        own data this round (one list of layers per colluder, the same list on every colluder).
        ``None`` for non-colluding attacks.
    colluder_index : int or None
        This client's 0-based position among the sorted partition ids of the Byzantine clients
        (e.g. DBA's choice of local trigger); ``None`` when unknown.
    previous_global_weights : list[np.ndarray] or None
        The global model this node received before this round's (the latest earlier one it
        saw), in layer order; ``None`` on its first participation (e.g. Neurotoxin's benign
        direction is ``global_weights - previous_global_weights``).
    colluder_rng : np.random.Generator or None
        Randomness shared by all colluders of the round (the same stream on every colluder),
        so that colluding attacks whose colluders send different values (e.g. Fang et al.'s
        sampled trimmed-mean attack) draw one joint crafted set and each sends member
        ``colluder_index``; ``None``: each colluder draws from its own ``rng``.
    """

    server_round: int
    num_clients: int
    num_byzantine: int
    rng: np.random.Generator
    global_weights: Layers
    colluder_deltas: Callable[[], list[Layers]] | None = None
    colluder_index: int | None = None
    previous_global_weights: Layers | None = None
    colluder_rng: np.random.Generator | None = None


class Attack:
    """Base class of every Byzantine behaviour; each method defaults to the honest one.

    Subclasses set ``name`` and ``paper``, take their parameters as keyword arguments whose names
    are unique across all attacks (they double as run-config keys in kebab-case), store each one
    under the same attribute name and validate it in ``__init__``.
    """

    name: ClassVar[str]
    #: Citation of the paper the attack follows.
    paper: ClassVar[str]
    #: Whether the attack needs ``AttackContext.colluder_deltas``.
    colluding: ClassVar[bool] = False
    #: Whether the client may skip honest training (the update does not depend on it).
    skips_training: ClassVar[bool] = False

    def poison_data(self, data: Dataset, rng: np.random.Generator) -> Dataset:
        """The data to train on instead of ``data`` (never modified; honest: ``data``)."""
        return data

    def poison_update(self, delta: Layers, context: AttackContext) -> Layers:
        """The update to send instead of ``delta`` (trained weights minus the global weights).

        Returns new arrays with the dtypes and shapes of ``delta``; never modifies its inputs.
        """
        return [np.array(layer, copy=True) for layer in delta]

    def claimed_examples(self, true_count: int) -> int:
        """The example count to report for ``true_count`` local training examples."""
        return int(true_count)

    def params(self) -> dict[str, Any]:
        """The attack's constructor parameters and their values, for logs."""
        return {name: getattr(self, name) for name in _constructor(type(self))}

    def __repr__(self) -> str:
        text = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({text})"


def scaled(delta: Layers, factor: float) -> Layers:
    """``factor * delta`` as new arrays of the layers' dtypes."""
    return [np.multiply(layer, factor).astype(layer.dtype, copy=False) for layer in delta]


# ------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, type[Attack]] = {}

AttackT = TypeVar("AttackT", bound=type[Attack])


def _constructor(cls: type[Attack]) -> dict[str, inspect.Parameter]:
    return keyword_parameters(cls.__init__)


def register(cls: AttackT) -> AttackT:
    """Class decorator: make ``cls`` available under ``cls.name``.

    Raises ``ValueError`` when the name is taken or a constructor parameter name is already
    used by another attack (parameter names double as run-config keys).
    """
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"attack name {cls.name!r} is already registered")
    for other in _REGISTRY.values():
        if other is cls:
            continue
        shared = set(_constructor(cls)) & set(_constructor(other))
        if shared:
            raise ValueError(
                f"attack {cls.name!r} reuses parameter name(s) {sorted(shared)} of "
                f"{other.name!r}; parameter names must be unique across attacks"
            )
    _REGISTRY[cls.name] = cls
    return cls


def available_attacks() -> list[str]:
    """Sorted names of every registered attack."""
    return sorted(_REGISTRY)


def attack_class(name: str) -> type[Attack]:
    """The attack class registered under ``name`` (kebab-case accepted)."""
    key = canonical_name(name) if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown attack {name!r}; available: {', '.join(available_attacks())}")
    return _REGISTRY[key]


def attack_parameters(name: str) -> dict[str, Any]:
    """Constructor parameters of attack ``name`` and their defaults."""
    return {p.name: p.default for p in _constructor(attack_class(name)).values()}


def get_attack(name: str, **params: Any) -> Attack:
    """Build attack ``name`` (kebab-case accepted) with its parameters as keyword arguments.

    Raises
    ------
    ValueError
        For an unknown attack, an unknown parameter or an invalid parameter value.
    """
    cls = attack_class(name)
    accepted = attack_parameters(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"attack {cls.name!r} does not take {', '.join(unknown)}; "
            f"its parameters are: {', '.join(accepted) or 'none'}"
        )
    return cls(**params)


def attack_params_from_config(name: str, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of attack ``name`` found in a Flower run config.

    Every constructor parameter ``foo_bar`` is read from the key ``foo-bar`` when present and
    converted to the parameter's annotated type (see :func:`flwr_robust.config.coerce`).
    Other keys are ignored.

    Raises
    ------
    ValueError
        For an unknown attack or a value of the wrong type.
    """
    return kwargs_from_config(attack_class(name).__init__, run_config)
