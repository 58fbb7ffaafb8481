"""The colluding-attack contract (:class:`ColludingAttack`) and two attacks crafted from honest
statistics: ALIE and IPM (the adaptive ones are in :mod:`~flwr_robust.attacks.adaptive`).

The maths (:func:`alie_z_max`, :func:`alie_delta`, :func:`ipm_delta`) is shared by the client-side
colluding attacks, which only know the updates the colluders compute on their own data, and by
the server-side threat-model simulation :class:`~flwr_robust.attacks.omniscient.OmniscientAttackHook`,
which knows the honest clients' updates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
from scipy.stats import norm

from ..aggregation.base import check_float
from .base import Attack, AttackContext, Layers, register

__all__ = ["ALIE", "IPM", "ColludingAttack", "alie_delta", "alie_z_max", "ipm_delta"]

logger = logging.getLogger("flwr.robust")


def _stack_layers(deltas: list[Layers]) -> Iterator[np.ndarray]:
    """Per layer, the (k, *shape) float64 stack of ``k`` clients' deltas (shapes checked
    first; one layer's stack in memory at a time)."""
    if not deltas:
        raise ValueError("need at least one delta to estimate honest statistics")
    shapes = [np.shape(layer) for layer in deltas[0]]
    for i, delta in enumerate(deltas):
        if [np.shape(layer) for layer in delta] != shapes:
            raise ValueError(f"delta {i} has layer shapes that differ from delta 0's {shapes}")
    return (
        np.stack([np.asarray(delta[j], dtype=np.float64) for delta in deltas])
        for j in range(len(shapes))
    )


def alie_z_max(num_clients: int, num_byzantine: int) -> float:
    """ALIE's z (Baruch et al. 2019): ``s = floor(n/2 + 1) - f``, ``z = Phi^-1((n - s) / n)``.

    ``s`` is the number of honest clients the attackers must win over to form a majority with
    their ``f`` votes; ``z`` keeps the malicious value closer to the mean than that many honest
    values in expectation. Some later implementations use ``(n - f - s) / (n - f)`` (the honest
    share only), which gives a smaller z; pass ``alie_z`` to :class:`ALIE` for that.

    Raises ``ValueError`` when z is not finite (``f >= floor(n/2) + 1`` or ``n <= 2``).
    """
    if num_clients < 1 or not 0 <= num_byzantine <= num_clients:
        raise ValueError(
            f"need 0 <= num_byzantine <= num_clients and num_clients >= 1, "
            f"got n={num_clients}, f={num_byzantine}"
        )
    s = math.floor(num_clients / 2 + 1) - num_byzantine
    z = float(norm.ppf((num_clients - s) / num_clients))
    if not math.isfinite(z):
        raise ValueError(
            f"ALIE's z is not finite for n={num_clients}, f={num_byzantine} (s={s}); "
            "pass alie_z explicitly"
        )
    return z


def alie_delta(deltas: list[Layers], z: float) -> Layers:
    """Per coordinate ``mean - z * std`` over ``deltas`` (population std, ddof=0).

    Returns one array per layer with the dtype of ``deltas[0]``'s layer; inputs are not
    modified. Statistics are computed in float64.
    """
    return [
        (stack.mean(axis=0) - z * stack.std(axis=0)).astype(np.asarray(ref).dtype, copy=False)
        for stack, ref in zip(_stack_layers(deltas), deltas[0], strict=True)
    ]


def ipm_delta(deltas: list[Layers], epsilon: float) -> Layers:
    """``-epsilon * mean(deltas)`` per layer, with the dtypes of ``deltas[0]``'s layers."""
    return [
        (-epsilon * stack.mean(axis=0)).astype(np.asarray(ref).dtype, copy=False)
        for stack, ref in zip(_stack_layers(deltas), deltas[0], strict=True)
    ]


class ColludingAttack(Attack):
    """An attack whose updates are crafted from a set of honest deltas.

    On a client, the honest deltas are those the colluders compute on their own data
    (``AttackContext.colluder_deltas``); the omniscient simulation hook passes the honest
    clients' real deltas instead. Subclasses override :meth:`craft` (every colluder sends the
    same update) or :meth:`craft_colluders` (the colluders send different members of one
    jointly crafted set).
    """

    colluding = True

    def craft(self, honest_deltas: list[Layers], num_clients: int, num_byzantine: int) -> Layers:
        """The malicious delta every one of ``num_byzantine`` of ``num_clients`` clients sends,
        from honest deltas."""
        raise NotImplementedError(f"attack {self.name!r} crafts per colluder: use craft_colluders")

    def craft_colluders(
        self,
        honest_deltas: list[Layers],
        num_clients: int,
        num_byzantine: int,
        rng: np.random.Generator,
    ) -> list[Layers]:
        """One malicious delta per colluder (``num_byzantine`` of them, colluder ``i`` sends
        member ``i``), from honest deltas; ``rng`` is shared by the colluders.

        Default: ``num_byzantine`` references to the single :meth:`craft` update.
        """
        return [self.craft(honest_deltas, num_clients, num_byzantine)] * num_byzantine

    def poison_update(self, delta: Layers, context: AttackContext) -> Layers:
        if context.colluder_deltas is None:
            raise ValueError(
                f"attack {self.name!r} is colluding: AttackContext.colluder_deltas must return "
                "the honest deltas of the colluding clients"
            )
        if context.num_byzantine < 1:
            raise ValueError("a colluding client needs AttackContext.num_byzantine >= 1")
        honest = context.colluder_deltas()
        rng = context.rng if context.colluder_rng is None else context.colluder_rng
        crafted = self.craft_colluders(honest, context.num_clients, context.num_byzantine, rng)
        # A node outside the colluders' list (colluder_index == their count) wraps around.
        mine = crafted[(context.colluder_index or 0) % len(crafted)]
        if [c.shape for c in mine] != [np.shape(layer) for layer in delta]:
            raise ValueError("colluder_deltas() layer shapes differ from this client's delta")
        return [c.astype(layer.dtype, copy=False) for c, layer in zip(mine, delta, strict=True)]


@register
class ALIE(ColludingAttack):
    """A Little Is Enough (Baruch, Baruch, Goldberg, NeurIPS 2019, "A Little Is Enough:
    Circumventing Defenses For Distributed Learning").

    Every colluder sends the same per-coordinate ``mean - z * std`` of honest deltas, with
    ``z = Phi^-1((n - s) / n)``, ``s = floor(n/2 + 1) - f`` (:func:`alie_z_max`) unless
    ``alie_z`` is given. The shift is small enough to stay inside the honest spread, so
    statistics- and distance-based rules keep it (Krum even selects it: the f identical copies
    are each other's nearest neighbours), yet it points the same way in every coordinate and
    every round, so its effect accumulates.

    Direction: the paper fixes the magnitude (``z`` standard deviations) and states the rule on
    the gradients the workers send; as ``std >= 0``, either sign stays inside the ``+-z*std``
    band the defences tolerate. We send ``mean - z * std`` on deltas, i.e. ``mean + z * std``
    on the equivalent gradients (``delta = -lr * gradient`` for SGD), one fixed, documented
    direction shared by this attack and the omniscient simulation.

    Threat model (deviation from the paper): the paper's attackers know the mean and std of
    all honest updates (omniscient). Here the colluders only know the updates computed on the
    colluding clients' own data (``AttackContext.colluder_deltas``), a noisier estimate (a
    single colluder has std 0 and sends its honest delta). For the paper's omniscient threat
    model in simulation, use :class:`~flwr_robust.attacks.omniscient.OmniscientAttackHook`.

    Parameters
    ----------
    alie_z : float or None, default=None
        ``z``; ``None`` derives it from ``n`` and ``f`` of the round.
    """

    name = "alie"
    paper = "Baruch, Baruch, Goldberg, NeurIPS 2019 (A Little Is Enough)"

    def __init__(self, alie_z: float | None = None) -> None:
        self.alie_z = check_float("alie_z", alie_z, allow_none=True)

    def craft(self, honest_deltas: list[Layers], num_clients: int, num_byzantine: int) -> Layers:
        z = self.alie_z if self.alie_z is not None else alie_z_max(num_clients, num_byzantine)
        if len(honest_deltas) == 1:
            logger.warning("ALIE from a single honest delta: its std is 0, the attack is void")
        return alie_delta(honest_deltas, z)


@register
class IPM(ColludingAttack):
    """Inner Product Manipulation (Xie, Koyejo, Gupta, UAI 2019, PMLR 115 (2020), "Fall of
    Empires: Breaking Byzantine-tolerant SGD by Inner Product Manipulation").

    Every colluder sends ``-ipm_epsilon * mean`` of the honest deltas, so that the aggregate's
    inner product with the true update turns negative. The paper studies two regimes: a small
    epsilon (default 0.1) keeps the Byzantine updates close to the origin, inside the honest
    cloud when updates are noisy, so that selection rules such as Krum can prefer them; a large
    epsilon (e.g. 100) is the "large epsilon" regime, which overwhelms mean-like rules outright
    but is far from the honest updates. Which regime breaks which defence is measured, not
    assumed, by the evaluation.

    Threat model (deviation from the paper): the paper's attackers know the honest clients'
    updates. Here the colluders only know the updates computed on the colluding clients' own
    data (``AttackContext.colluder_deltas``). For the paper's omniscient threat model in
    simulation, use :class:`~flwr_robust.attacks.omniscient.OmniscientAttackHook`.

    Parameters
    ----------
    ipm_epsilon : float, default=0.1
        Scale of the reversed mean, > 0.
    """

    name = "ipm"
    paper = "Xie, Koyejo, Gupta, UAI 2019, PMLR 115 (2020) (Fall of Empires: IPM)"

    def __init__(self, ipm_epsilon: float = 0.1) -> None:
        self.ipm_epsilon = check_float(
            "ipm_epsilon", ipm_epsilon, minimum=0.0, exclusive_minimum=True
        )

    def craft(self, honest_deltas: list[Layers], num_clients: int, num_byzantine: int) -> Layers:
        return ipm_delta(honest_deltas, self.ipm_epsilon)
