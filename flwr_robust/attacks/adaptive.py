"""Adaptive colluding model-poisoning attacks: Min-Max, Min-Sum (and their aggregation-tailored
variant), Fang et al.'s Krum and trimmed-mean attacks, and Mimic.

Knowledge. Every attack here crafts from a list of honest deltas (see
:class:`~flwr_robust.attacks.colluding.ColludingAttack`). On the server-side threat-model
simulation (:class:`~flwr_robust.attacks.omniscient.OmniscientAttackHook`) these are the real
deltas of the round's ``n - f`` honest clients: the papers' *full knowledge*. On a client they
are the deltas the colluders compute on their own data (``AttackContext.colluder_deltas``):
the papers' *partial knowledge*, where the attackers estimate the benign statistics from their
own benign updates. Where a paper treats the two cases differently, the attack decides by
counting: it has full knowledge when it holds at least ``n - f`` honest deltas
(:func:`knows_all_honest`), which is exactly the omniscient hook's case (and a client's only
with a Byzantine majority).

Simulated rules. The tailored Min-Max / Min-Sum and Fang's Krum attack run an aggregation rule
of :mod:`flwr_robust.aggregation` on the honest deltas plus ``f'`` crafted ones. With full
knowledge ``f' = f`` (the server's own input). With partial knowledge the attackers only hold
``k`` benign deltas and, as in Shejwalkar & Houmansadr's released partial-knowledge
experiments, simulate a population of that size with ``f' = max(1, floor(f * k / n))``
Byzantine members (:func:`simulated_byzantine`). The rule is built with
``num_malicious = f'`` where it takes one, lowered to the largest value for which the rule is
defined on ``k + f'`` clients (Krum needs ``k + f' >= 2 num_malicious + 3``).

Statistics are computed in float64, one layer of the honest deltas at a time; crafted values
are clipped to the finite range of the output dtype, so outputs stay finite for any finite
input.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..aggregation import Aggregator, aggregator_class, aggregator_parameters, get_aggregator
from ..aggregation.base import InvalidParameterError, check_float, check_int
from .base import Layers, register
from .colluding import ColludingAttack, _stack_layers

__all__ = [
    "PERTURBATIONS",
    "FangKrum",
    "FangTrim",
    "Mimic",
    "MinMax",
    "MinSum",
    "PerturbationStatistics",
    "knows_all_honest",
    "perturbation_statistics",
    "search_gamma",
    "simulated_byzantine",
]

logger = logging.getLogger("flwr.robust")

#: Shejwalkar & Houmansadr's perturbation vectors: inverse unit vector, inverse standard
#: deviation, inverse sign.
PERTURBATIONS = ("unit_vec", "std", "sign")


# ------------------------------------------------------------------------------ shared helpers
def knows_all_honest(num_honest: int, num_clients: int, num_byzantine: int) -> bool:
    """Whether ``num_honest`` honest deltas are the papers' full knowledge (all ``n - f``)."""
    return num_honest >= num_clients - num_byzantine


def simulated_byzantine(num_honest: int, num_clients: int, num_byzantine: int) -> int:
    """Byzantine members ``f'`` of the attackers' simulated population (see the module
    docstring): ``f`` with full knowledge, else ``max(1, floor(f * k / n))``."""
    if knows_all_honest(num_honest, num_clients, num_byzantine):
        return num_byzantine
    return max(1, num_byzantine * num_honest // max(num_clients, 1))


def _simulated_rule(name: str, num_inputs: int, num_byzantine: int) -> Aggregator:
    """Rule ``name`` for ``num_inputs`` clients, ``num_malicious`` as large as possible up to
    ``num_byzantine`` (for rules that take it)."""
    if "num_malicious" not in aggregator_parameters(name):
        rule = get_aggregator(name)
        if rule.min_clients() <= num_inputs:
            return rule
    else:
        for f in range(num_byzantine, -1, -1):
            rule = get_aggregator(name, num_malicious=f)
            if rule.min_clients() <= num_inputs:
                return rule
    raise ValueError(
        f"the attackers cannot simulate {name!r} on {num_inputs} updates (honest deltas plus "
        f"{num_byzantine} crafted): it needs at least {rule.min_clients()}; more colluders "
        "(or the omniscient simulation) give the attack more honest deltas"
    )


def _cast(values: np.ndarray, like: Any) -> np.ndarray:
    """``values`` as the dtype of ``like``, clipped to its finite range (floating dtypes)."""
    dtype = np.asarray(like).dtype
    if np.issubdtype(dtype, np.floating):
        info = np.finfo(dtype)
        values = np.clip(values, info.min, info.max)
    return np.asarray(values).astype(dtype, copy=False)


def _flat_stacks(deltas: list[Layers]) -> Iterator[np.ndarray]:
    """Per layer, the ``(k, size)`` float64 stack of the ``k`` deltas' flattened layer."""
    for stack in _stack_layers(deltas):
        yield stack.reshape(len(deltas), -1)


def _squared_distances(gram: np.ndarray) -> np.ndarray:
    diagonal = np.diag(gram)
    return np.maximum(diagonal[:, None] + diagonal[None, :] - 2.0 * gram, 0.0)


def search_gamma(succeeds: Callable[[float], bool], gamma_init: float, tau: float) -> float:
    """Shejwalkar & Houmansadr's Algorithm 1: the largest scaling ``gamma`` found for which
    ``succeeds(gamma)`` holds.

    Starts at ``gamma_init``; after a success ``gamma`` moves up by ``step``, after a failure
    down by ``step``; ``step`` starts at ``gamma_init / 2`` and halves every iteration. Stops
    when the last success lies within ``tau`` of the current ``gamma`` and returns it (``0``
    when nothing succeeded). The search therefore covers ``(0, 2 * gamma_init)``.
    """
    gamma, step, succeeded = gamma_init, gamma_init / 2.0, 0.0
    while abs(succeeded - gamma) > tau and step > 0.0:
        if succeeds(gamma):
            succeeded = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2.0
    return succeeded


@dataclass(frozen=True)
class PerturbationStatistics:
    """What the gamma search needs about ``k`` honest deltas and a perturbation ``p``.

    Attributes
    ----------
    mean, perturbation : list[np.ndarray]
        The honest mean and ``p`` per layer (float64, layer shapes).
    gram : np.ndarray
        ``(k, k)`` Gram matrix of the honest deltas centred on their mean.
    along : np.ndarray
        ``<x_i - mean, p>`` per honest delta.
    p_squared : float
        ``||p||^2``.
    like : list[np.ndarray]
        Layers of the first honest delta (their dtypes are the outputs').
    """

    mean: list[np.ndarray]
    perturbation: list[np.ndarray]
    gram: np.ndarray
    along: np.ndarray
    p_squared: float
    like: Layers

    def crafted(self, gamma: float) -> Layers:
        """``mean + gamma * p`` in the honest deltas' dtypes."""
        return [
            _cast(m + gamma * p, ref)
            for m, p, ref in zip(self.mean, self.perturbation, self.like, strict=True)
        ]

    def squared_distances(self, gamma: float) -> np.ndarray:
        """``||mean + gamma p - x_i||^2`` for every honest ``x_i``."""
        return np.diag(self.gram) - 2.0 * gamma * self.along + gamma**2 * self.p_squared

    def benign_squared_distances(self) -> np.ndarray:
        """``(k, k)`` pairwise ``||x_i - x_j||^2`` of the honest deltas."""
        return _squared_distances(self.gram)


def perturbation_statistics(honest_deltas: list[Layers], perturbation: str) -> PerturbationStatistics:
    """The statistics of ``honest_deltas`` for the perturbation ``"unit_vec"``
    (``-mean / ||mean||``), ``"std"`` (``-std``, population std) or ``"sign"``
    (``-sign(mean)``), in one pass over the layers."""
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
    k = len(honest_deltas)
    means: list[np.ndarray] = []
    raw: list[np.ndarray] = []
    gram = np.zeros((k, k))
    along = np.zeros(k)
    raw_squared = mean_squared = 0.0
    for stack, ref in zip(_flat_stacks(honest_deltas), honest_deltas[0], strict=True):
        mean = stack.mean(axis=0)
        centred = stack - mean
        if perturbation == "unit_vec":
            p = -mean
        elif perturbation == "std":
            p = -np.sqrt(np.mean(centred**2, axis=0))
        else:
            p = -np.sign(mean)
        gram += centred @ centred.T
        along += centred @ p
        raw_squared += float(p @ p)
        mean_squared += float(mean @ mean)
        shape = np.shape(ref)
        means.append(mean.reshape(shape))
        raw.append(p.reshape(shape))
    scale = 1.0
    if perturbation == "unit_vec":
        norm = math.sqrt(mean_squared)
        scale = 1.0 / norm if norm > 0.0 else 0.0
    return PerturbationStatistics(
        mean=means,
        perturbation=[scale * p for p in raw],
        gram=(gram + gram.T) / 2.0,
        along=scale * along,
        p_squared=scale**2 * raw_squared,
        like=honest_deltas[0],
    )


# ------------------------------------------------------------------- Shejwalkar & Houmansadr
class _ScaledPerturbation(ColludingAttack):
    """Shared machinery of :class:`MinMax` and :class:`MinSum`: ``mean + gamma * p`` with
    ``gamma`` from :func:`search_gamma`, under the attack's own constraint (AGR-agnostic) or
    the tailored objective against a named rule."""

    paper = (
        "Shejwalkar, Houmansadr, NDSS 2021 (Manipulating the Byzantine: Optimizing Model "
        "Poisoning Attacks and Defenses for Federated Learning)"
    )
    _perturbation: str
    _gamma_init: float
    _tau: float
    _target_rule: str | None

    def _configure(
        self, prefix: str, perturbation: str, gamma_init: float, tau: float, target_rule: str | None
    ) -> None:
        if perturbation not in PERTURBATIONS:
            raise InvalidParameterError(
                f"{prefix}_perturbation must be one of {PERTURBATIONS}, got {perturbation!r}"
            )
        self._perturbation = perturbation
        self._gamma_init = check_float(
            f"{prefix}_gamma_init", gamma_init, minimum=0.0, exclusive_minimum=True
        )
        self._tau = check_float(f"{prefix}_tau", tau, minimum=0.0, exclusive_minimum=True)
        if target_rule is not None:
            if not isinstance(target_rule, str):
                raise InvalidParameterError(
                    f"{prefix}_target_rule must be a rule name, got {target_rule!r}"
                )
            try:
                target_rule = aggregator_class(target_rule).name
            except ValueError as error:
                raise InvalidParameterError(f"{prefix}_target_rule: {error}") from None
        self._target_rule = target_rule

    def _agnostic_condition(self, stats: PerturbationStatistics) -> Callable[[float], bool]:
        """The attack's AGR-agnostic constraint as a function of ``gamma``."""
        raise NotImplementedError

    @staticmethod
    def _tailored_condition(
        target_rule: str, honest: list[Layers], stats: PerturbationStatistics, n: int, f: int
    ) -> Callable[[float], bool]:
        """The AGR-tailored oracle: the rule still uses a crafted update and the aggregate's
        distance to the honest mean did not decrease from the best ``gamma`` so far."""
        k = len(honest)
        f_sim = simulated_byzantine(k, n, f)
        rule = _simulated_rule(target_rule, k + f_sim, f_sim)
        ids = list(range(k + f_sim))

        def outcome(gamma: float) -> tuple[bool, float]:
            rule.reset()
            result = rule([*honest, *([stats.crafted(gamma)] * f_sim)], client_ids=ids)
            deviation = sum(
                float(np.sum((np.asarray(u, dtype=np.float64) - m) ** 2))
                for u, m in zip(result.update, stats.mean, strict=True)
            )
            crafted_kept = sum(i >= k for i in result.kept)
            # a rule that keeps at least f' updates must keep every crafted one (Multi-Krum,
            # as the authors require); one that selects fewer (Krum) must select a crafted one
            used = crafted_kept == f_sim if len(result.kept) >= f_sim else crafted_kept > 0
            return used, deviation

        best = [outcome(0.0)[1]]

        def succeeds(gamma: float) -> bool:
            used, deviation = outcome(gamma)
            if used and deviation > best[0]:  # strict: a plateau does not push gamma up
                best[0] = deviation
                return True
            return False

        return succeeds

    def gamma(self, honest_deltas: list[Layers], num_clients: int, num_byzantine: int) -> float:
        """The scaling ``gamma`` the attack uses on these honest deltas."""
        return self._solve(honest_deltas, num_clients, num_byzantine)[0]

    def _solve(
        self, honest: list[Layers], n: int, f: int
    ) -> tuple[float, PerturbationStatistics]:
        if len(honest) == 1 and self._target_rule is None:
            logger.warning("%s from a single honest delta: gamma is 0, the attack is void", self.name)
        stats = perturbation_statistics(honest, self._perturbation)
        if self._target_rule is None:
            condition = self._agnostic_condition(stats)
        else:
            condition = self._tailored_condition(self._target_rule, honest, stats, n, f)
        gamma = search_gamma(condition, self._gamma_init, self._tau)
        if gamma >= 2.0 * self._gamma_init - 2.0 * self._tau:
            logger.warning(
                "%s: gamma reached the search's ceiling 2 * gamma_init = %g without meeting its "
                "constraint; a larger %s_gamma_init gives a stronger attack",
                self.name, 2.0 * self._gamma_init, self.name,
            )
        return gamma, stats

    def craft(self, honest_deltas: list[Layers], num_clients: int, num_byzantine: int) -> Layers:
        gamma, stats = self._solve(honest_deltas, num_clients, num_byzantine)
        return stats.crafted(gamma)


_SCALED_DOC = """
    Every colluder sends ``mean + gamma * p`` of the honest deltas, with the perturbation
    ``p`` one of the paper's ``"unit_vec"`` (``-mean / ||mean||``), ``"std"`` (``-std``) and
    ``"sign"`` (``-sign(mean)``), and ``gamma`` found by the paper's Algorithm 1
    (:func:`search_gamma`: start ``gamma_init``, steps halving from ``gamma_init / 2``, stop
    within ``tau``) as the largest scaling satisfying {constraint}. Distances are computed
    from the centred Gram matrix of the honest deltas, so the search costs ``O(k)`` per step.

    AGR-tailored variant (``{prefix}_target_rule``): ``gamma`` maximises instead the paper's
    tailored objective, the distance of the named rule's aggregate (simulated on the honest
    deltas plus the crafted copies, see the module docstring) from the honest mean, with the
    same search: a step succeeds when the rule still uses the crafted updates (a rule that
    keeps at least ``f'`` updates, e.g. Multi-Krum, keeps all of them; one that selects fewer,
    e.g. Krum, selects one of them) and the distance strictly grew (as in the authors' code,
    so that a plateau, e.g. once a trimmed mean trims the crafted values, does not push
    ``gamma`` up). The constraint above is then not applied, so ``min_max`` and
    ``min_sum`` with the same target rule are the same attack. The rule gets
    ``num_malicious`` and its other parameters' defaults.

    Deviations: updates are deltas (``weights - global``), not gradients: ``-mean`` and
    ``-sign(mean)`` reverse the benign update either way; ``-std`` on deltas is ``+std`` on
    the equivalent gradients (``delta = -lr * gradient``), as for :class:`ALIE`. The std is
    the population std (ddof 0, defined for a single delta; the authors' code uses ddof 1).
    The default perturbation is ``"std"``, the one of the authors' released CIFAR-10
    experiments (the paper evaluates all three; the best depends on dataset and rule).
    Partial knowledge (client path) uses the colluders' own deltas as the benign set, as the
    paper's partial-knowledge attacks do. Algorithm 1 never exceeds ``2 * gamma_init``
    (the steps sum to ``gamma_init``); when ``gamma`` ends there, the constraint never bound
    (e.g. ``"unit_vec"`` when ``gamma_init`` is small next to the honest distances) and a
    warning says so, as the authors' code would silently stop there too.

    Parameters
    ----------
    {prefix}_perturbation : {{"std", "unit_vec", "sign"}}, default="std"
        The perturbation vector ``p``.
    {prefix}_gamma_init : float, default=10.0
        The search's initial ``gamma`` (the paper's ``gamma_init``), > 0.
    {prefix}_tau : float, default=1e-5
        The search's stopping threshold (the paper's ``tau``), > 0.
    {prefix}_target_rule : str or None, default=None
        Registry name of the rule to tailor the attack to; ``None`` for the AGR-agnostic
        attack.
"""


@register
class MinMax(_ScaledPerturbation):
    __doc__ = (
        """Min-Max (Shejwalkar, Houmansadr, NDSS 2021, "Manipulating the Byzantine: Optimizing
    Model Poisoning Attacks and Defenses for Federated Learning"), AGR-agnostic.
"""
        + _SCALED_DOC.format(
            prefix="min_max",
            constraint=(
                "Min-Max's constraint: the largest distance from the malicious update to any "
                "honest delta is at most the largest distance between two honest deltas"
            ),
        )
    )

    name = "min_max"

    def __init__(
        self,
        min_max_perturbation: str = "std",
        min_max_gamma_init: float = 10.0,
        min_max_tau: float = 1e-5,
        min_max_target_rule: str | None = None,
    ) -> None:
        self._configure(
            "min_max", min_max_perturbation, min_max_gamma_init, min_max_tau, min_max_target_rule
        )
        self.min_max_perturbation = self._perturbation
        self.min_max_gamma_init = self._gamma_init
        self.min_max_tau = self._tau
        self.min_max_target_rule = self._target_rule

    def _agnostic_condition(self, stats: PerturbationStatistics) -> Callable[[float], bool]:
        bound = float(stats.benign_squared_distances().max())
        return lambda gamma: float(stats.squared_distances(gamma).max()) <= bound


@register
class MinSum(_ScaledPerturbation):
    __doc__ = (
        """Min-Sum (Shejwalkar, Houmansadr, NDSS 2021, "Manipulating the Byzantine: Optimizing
    Model Poisoning Attacks and Defenses for Federated Learning"), AGR-agnostic.
"""
        + _SCALED_DOC.format(
            prefix="min_sum",
            constraint=(
                "Min-Sum's constraint: the sum of squared distances from the malicious update "
                "to the honest deltas is at most the largest such sum of an honest delta (the "
                "bound as the paper states it; the authors' released code takes the smallest "
                "such sum instead, a stealthier, weaker attack)"
            ),
        )
    )

    name = "min_sum"

    def __init__(
        self,
        min_sum_perturbation: str = "std",
        min_sum_gamma_init: float = 10.0,
        min_sum_tau: float = 1e-5,
        min_sum_target_rule: str | None = None,
    ) -> None:
        self._configure(
            "min_sum", min_sum_perturbation, min_sum_gamma_init, min_sum_tau, min_sum_target_rule
        )
        self.min_sum_perturbation = self._perturbation
        self.min_sum_gamma_init = self._gamma_init
        self.min_sum_tau = self._tau
        self.min_sum_target_rule = self._target_rule

    def _agnostic_condition(self, stats: PerturbationStatistics) -> Callable[[float], bool]:
        bound = float(stats.benign_squared_distances().sum(axis=1).max())
        return lambda gamma: float(stats.squared_distances(gamma).sum()) <= bound


# ---------------------------------------------------------------------------- Fang et al.
_FANG_PAPER = (
    "Fang, Cao, Jia, Gong, USENIX Security 2020 (Local Model Poisoning Attacks to "
    "Byzantine-Robust Federated Learning)"
)


def _mean_and_sign(honest: list[Layers]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    means = [stack.mean(axis=0) for stack in _stack_layers(honest)]
    return means, [np.sign(m) for m in means]


@register
class FangKrum(ColludingAttack):
    """Fang et al.'s attack on Krum (Fang, Cao, Jia, Gong, USENIX Security 2020, "Local Model
    Poisoning Attacks to Byzantine-Robust Federated Learning").

    The first colluder sends ``delta_1 = -lambda * s``, ``s`` the sign of the honest mean
    delta (the direction the benign updates move each parameter: ``delta_1`` is the received
    global model moved against it). ``lambda`` starts at the paper's upper bound

        ``1 / ((m - 2c - 1) sqrt(d)) * min_i sum_{l in G(i)} ||x_l - x_i||
        + 1 / sqrt(d) * max_i ||x_i||``

    over the honest deltas ``x_i`` (``||x_i||`` is the distance of the honest model to the
    global one, ``G(i)`` the ``m - c - 2`` honest deltas nearest ``x_i``, ``m`` clients of
    which ``c`` are Byzantine) and is halved until our Krum (``get_aggregator("krum")``,
    simulated on the honest deltas plus the crafted ones) selects a crafted update, or until
    it falls below ``fang_krum_threshold`` (the paper's 1e-5; the search then ends just below
    it, as in the paper). The other colluders send updates close to ``delta_1``: copies of it
    (the paper's constraint ``w'_i = w'_1``, the default), or with ``fang_krum_epsilon > 0``
    points drawn uniformly in the ball of that radius around ``delta_1`` (from the colluders'
    shared randomness), which the Krum check then includes.

    Knowledge: with the omniscient hook (full knowledge) ``x_i`` are the ``n - f`` honest
    deltas and ``m = n``, ``c = f``, Krum's own input. On a client (partial knowledge) they
    are the colluders' own benign deltas, which the paper treats as if they were the benign
    ones; ``m`` and ``c`` are then those of the simulated population (``k`` benign plus
    ``f'`` crafted, see the module docstring), and the neighbour count and denominator are
    clamped to at least 1.

    Deviation: the paper attacks local models; on deltas (models minus the global model that
    all share) Krum's choice is the same, since Krum is translation-equivariant.

    Parameters
    ----------
    fang_krum_threshold : float, default=1e-5
        ``lambda`` below which the halving stops, > 0.
    fang_krum_epsilon : float, default=0.0
        Radius of the ball around ``delta_1`` the other colluders' updates are drawn from;
        0 sends copies.
    """

    name = "fang_krum"
    paper = _FANG_PAPER

    def __init__(self, fang_krum_threshold: float = 1e-5, fang_krum_epsilon: float = 0.0) -> None:
        self.fang_krum_threshold = check_float(
            "fang_krum_threshold", fang_krum_threshold, minimum=0.0, exclusive_minimum=True
        )
        self.fang_krum_epsilon = check_float("fang_krum_epsilon", fang_krum_epsilon, minimum=0.0)

    def lambda_bound(self, honest_deltas: list[Layers], num_clients: int, num_byzantine: int) -> float:
        """The paper's upper bound of ``lambda`` for these honest deltas."""
        k = len(honest_deltas)
        f_sim = simulated_byzantine(k, num_clients, num_byzantine)
        m = num_clients if knows_all_honest(k, num_clients, num_byzantine) else k + f_sim
        gram = np.zeros((k, k))
        squared_norms = np.zeros(k)
        d = 0
        for stack in _flat_stacks(honest_deltas):
            centred = stack - stack.mean(axis=0)
            gram += centred @ centred.T
            squared_norms += np.einsum("ij,ij->i", stack, stack)
            d += stack.shape[1]
        distances = np.sqrt(_squared_distances((gram + gram.T) / 2.0))
        np.fill_diagonal(distances, np.inf)
        neighbours = min(max(m - f_sim - 2, 1), k - 1)
        nearest = 0.0
        if neighbours > 0:
            nearest = float(np.sort(distances, axis=1)[:, :neighbours].sum(axis=1).min())
        denominator = max(m - 2 * f_sim - 1, 1)
        return nearest / (denominator * math.sqrt(d)) + math.sqrt(float(squared_norms.max()) / d)

    def _offsets(self, like: Layers, count: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
        """``count`` points drawn uniformly in the ``fang_krum_epsilon`` ball around 0."""
        offsets = []
        d = sum(int(np.size(layer)) for layer in like)
        for _ in range(count):
            direction = [rng.standard_normal(np.shape(layer)) for layer in like]
            norm = math.sqrt(sum(float(np.sum(v**2)) for v in direction))
            radius = self.fang_krum_epsilon * float(rng.random()) ** (1.0 / d)
            offsets.append([v * (radius / norm if norm > 0.0 else 0.0) for v in direction])
        return offsets

    def craft_colluders(
        self,
        honest_deltas: list[Layers],
        num_clients: int,
        num_byzantine: int,
        rng: np.random.Generator,
    ) -> list[Layers]:
        k = len(honest_deltas)
        f_sim = simulated_byzantine(k, num_clients, num_byzantine)
        _, signs = _mean_and_sign(honest_deltas)
        like = honest_deltas[0]
        offsets = (
            self._offsets(like, num_byzantine - 1, rng) if self.fang_krum_epsilon > 0.0 else []
        )

        def members(lam: float, count: int) -> list[Layers]:
            first = [-lam * s for s in signs]
            out = [[_cast(v, ref) for v, ref in zip(first, like, strict=True)]]
            for offset in offsets[: count - 1]:
                out.append(
                    [_cast(v + o, ref) for v, o, ref in zip(first, offset, like, strict=True)]
                )
            return out + [out[0]] * (count - len(out))

        krum = _simulated_rule("krum", k + f_sim, f_sim)
        lam = self.lambda_bound(honest_deltas, num_clients, num_byzantine)
        while lam >= self.fang_krum_threshold:
            if krum([*honest_deltas, *members(lam, f_sim)]).kept[0] >= k:
                break
            lam /= 2.0
        return members(lam, num_byzantine)


@register
class FangTrim(ColludingAttack):
    """Fang et al.'s attack on the trimmed mean and the median (Fang, Cao, Jia, Gong, USENIX
    Security 2020, "Local Model Poisoning Attacks to Byzantine-Robust Federated Learning").

    Per coordinate ``j``, with ``s_j`` the sign of the honest mean delta, every colluder sends
    a value drawn uniformly (independently per colluder and coordinate, from the colluders'
    shared randomness) just beyond the honest values on the side opposite to ``s_j``:

    - full knowledge (the omniscient hook: the honest deltas' max ``w_max`` and min
      ``w_min``): for ``s_j = -1`` in ``[w_max, b w_max]`` when ``w_max > 0`` else
      ``[w_max, w_max / b]``; for ``s_j = 1`` in ``[w_min / b, w_min]`` when ``w_min > 0``
      else ``[b w_min, w_min]`` (the paper's ``b = 2`` by default);
    - partial knowledge (a client: the colluders' own benign deltas, whose mean ``mu`` and
      std ``sigma`` the paper uses): ``[mu + 3 sigma, mu + 4 sigma]`` for ``s_j = -1`` and
      ``[mu - 4 sigma, mu - 3 sigma]`` for ``s_j = 1``.

    Coordinates where the honest mean is exactly 0 (``s_j = 0``) get the mean.

    Deviations: the intervals are applied to deltas instead of local models, so ``b``
    scales the benign update's extreme rather than the extreme weight (the model intervals
    would depend on the weights' offset, the delta intervals only on the update, as in later
    re-implementations on updates); ``sigma`` is the population std (ddof 0).

    Parameters
    ----------
    fang_trim_b : float, default=2.0
        ``b`` of the full-knowledge intervals, > 1.
    """

    name = "fang_trim"
    paper = _FANG_PAPER

    def __init__(self, fang_trim_b: float = 2.0) -> None:
        self.fang_trim_b = check_float("fang_trim_b", fang_trim_b, minimum=1.0, exclusive_minimum=True)

    def intervals(
        self, honest_deltas: list[Layers], num_clients: int, num_byzantine: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer, the ``(low, high)`` float64 bounds of the crafted values."""
        b = self.fang_trim_b
        full = knows_all_honest(len(honest_deltas), num_clients, num_byzantine)
        out = []
        for stack in _stack_layers(honest_deltas):
            mean = stack.mean(axis=0)
            if full:
                top, bottom = stack.max(axis=0), stack.min(axis=0)
                above = (top, np.where(top > 0, b * top, top / b))
                below = (np.where(bottom > 0, bottom / b, b * bottom), bottom)
            else:
                sigma = stack.std(axis=0)
                above = (mean + 3.0 * sigma, mean + 4.0 * sigma)
                below = (mean - 4.0 * sigma, mean - 3.0 * sigma)
            sign = np.sign(mean)
            low = np.where(sign < 0, above[0], np.where(sign > 0, below[0], mean))
            high = np.where(sign < 0, above[1], np.where(sign > 0, below[1], mean))
            out.append((low, high))
        return out

    def craft_colluders(
        self,
        honest_deltas: list[Layers],
        num_clients: int,
        num_byzantine: int,
        rng: np.random.Generator,
    ) -> list[Layers]:
        if len(honest_deltas) == 1 and not knows_all_honest(1, num_clients, num_byzantine):
            logger.warning("fang_trim from a single honest delta: its std is 0, the attack is void")
        crafted: list[list[np.ndarray]] = [[] for _ in range(num_byzantine)]
        bounds = self.intervals(honest_deltas, num_clients, num_byzantine)
        for (low, high), ref in zip(bounds, honest_deltas[0], strict=True):
            draws = rng.random((num_byzantine, *low.shape))
            values = low + draws * (high - low)
            for member, value in zip(crafted, values, strict=True):
                member.append(_cast(value, ref))
        return crafted


# ---------------------------------------------------------------------------------- Mimic
@register
class Mimic(ColludingAttack):
    """Mimic (Karimireddy, He, Jaggi, ICLR 2022, "Byzantine-Robust Learning on Heterogeneous
    Datasets via Bucketing").

    Every colluder sends an exact copy of one honest worker's delta, the worker ``i*`` that
    maximises ``<z, x_i>`` along ``z``, the estimated top principal direction of the honest
    deltas (the most extreme worker along the direction of largest heterogeneity): copying it
    over-represents its data and biases robust rules that assume homogeneous honest workers.

    State (kept on the attack object across calls of :meth:`craft`, one call per round):
    during the first ``mimic_warmup`` rounds ``z`` and the running honest mean ``mu`` are
    updated online as in the paper's warm-up (``mu <- (t mu + mean_t) / (t + 1)``,
    ``z <- (t z + v / ||v||) / (t + 1)`` normalised, with
    ``v = sum_i <x_i - mu, z> (x_i - mu)``, one power step per round) and ``i*`` is chosen
    anew each round; afterwards ``z`` is frozen and the colluders keep copying the same worker
    ``i*`` (its position in the honest list: the omniscient hook lists honest clients by node
    id; when the number of honest deltas changes, ``i*`` is chosen again along the frozen
    ``z``; under client sampling the same position may hold another worker, as the crafting
    interface carries no identities). The omniscient hook keeps one attack object for the run; a ClientApp builds its
    attack per instruction, so on clients every round is the first warm-up round.

    Deviations: the first round's ``z`` is the exact top principal direction of the centred
    honest deltas (from their ``k x k`` Gram matrix) instead of one power step from a random
    vector, so no randomness is needed; its sign is chosen so that the most extreme worker
    lies on the positive side. On a client (partial knowledge) the colluders can only copy one
    of their own honest deltas, chosen the same way.

    Parameters
    ----------
    mimic_warmup : int, default=1
        Rounds of the warm-up (the authors' released default), >= 1.
    """

    name = "mimic"
    paper = (
        "Karimireddy, He, Jaggi, ICLR 2022 (Byzantine-Robust Learning on Heterogeneous "
        "Datasets via Bucketing)"
    )

    def __init__(self, mimic_warmup: int = 1) -> None:
        self.mimic_warmup = check_int("mimic_warmup", mimic_warmup, minimum=1)
        self.reset()

    def reset(self) -> None:
        """Forget the warm-up state (the next round is the first)."""
        self.rounds = 0
        self.mean: np.ndarray | None = None
        self.direction: np.ndarray | None = None
        self.target: int | None = None
        self._num_honest = 0

    def _flat(self, honest: list[Layers]) -> Iterator[tuple[slice, np.ndarray]]:
        start = 0
        for stack in _flat_stacks(honest):
            yield slice(start, start + stack.shape[1]), stack
            start += stack.shape[1]

    def _first_direction(self, honest: list[Layers]) -> np.ndarray:
        k = len(honest)
        gram = np.zeros((k, k))
        for _, stack in self._flat(honest):
            centred = stack - stack.mean(axis=0)
            gram += centred @ centred.T
        values, vectors = np.linalg.eigh((gram + gram.T) / 2.0)
        u = vectors[:, -1] if values[-1] > 0.0 else np.zeros(k)
        if -u.min() > u.max():
            u = -u
        return self._combine(honest, u, np.zeros(0))

    def _combine(self, honest: list[Layers], weights: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """Normalised ``sum_i weights_i (x_i - mean)`` (``mean`` empty: the current mean)."""
        parts = []
        for where, stack in self._flat(honest):
            centre = stack.mean(axis=0) if mean.size == 0 else mean[where]
            parts.append(weights @ (stack - centre))
        vector = np.concatenate(parts)
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0.0 else vector

    def _warmup_step(self, honest: list[Layers]) -> None:
        assert self.mean is not None and self.direction is not None
        t = self.rounds
        current = np.concatenate([stack.mean(axis=0) for _, stack in self._flat(honest)])
        self.mean = (t * self.mean + current) / (t + 1)
        weights = np.zeros(len(honest))
        for where, stack in self._flat(honest):
            weights += (stack - self.mean[where]) @ self.direction[where]
        step = self._combine(honest, weights, self.mean)
        direction = (t * self.direction + step) / (t + 1)
        norm = float(np.linalg.norm(direction))
        self.direction = direction / norm if norm > 0.0 else direction

    def _choose(self, honest: list[Layers]) -> int:
        assert self.direction is not None
        scores = np.zeros(len(honest))
        for where, stack in self._flat(honest):
            scores += stack @ self.direction[where]
        return int(np.argmax(scores))

    def craft(self, honest_deltas: list[Layers], num_clients: int, num_byzantine: int) -> Layers:
        d = sum(int(np.size(layer)) for layer in honest_deltas[0])
        if self.direction is not None and self.direction.size != d:
            self.reset()  # a different model: start over
        if self.rounds < self.mimic_warmup:
            if self.rounds == 0:
                self.mean = np.concatenate(
                    [stack.mean(axis=0) for _, stack in self._flat(honest_deltas)]
                )
                self.direction = self._first_direction(honest_deltas)
            else:
                self._warmup_step(honest_deltas)
            self.target = self._choose(honest_deltas)
        elif self.target is None or len(honest_deltas) != self._num_honest:
            self.target = self._choose(honest_deltas)
        self._num_honest = len(honest_deltas)
        self.rounds += 1
        return [np.array(layer, copy=True) for layer in honest_deltas[self.target]]
