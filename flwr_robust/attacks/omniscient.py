"""THREAT-MODEL SIMULATION ONLY: omniscient colluding attacks injected on the server side.

Never part of a normal run. See :class:`OmniscientAttackHook`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..aggregation.base import check_int
from ..strategy.hooks import StrategyHook
from .base import attack_class, available_attacks, get_attack
from .colluding import ColludingAttack

if TYPE_CHECKING:
    from ..strategy.engine import ClientReply

__all__ = ["OmniscientAttackHook"]

logger = logging.getLogger("flwr.robust")


class OmniscientAttackHook(StrategyHook):
    """THREAT-MODEL SIMULATION: replaces the Byzantine replies of each round by omniscient
    colluding updates (ALIE, IPM, Min-Max, Min-Sum, Fang, Mimic, ...) computed from the honest
    replies of the same round.

    **This is not a defence and must never be active in a normal run.** It simulates the
    full-knowledge attackers of the colluding attacks' papers (e.g. Baruch et al., NeurIPS
    2019; Xie et al., UAI 2019; Fang et al., USENIX Security 2020; Shejwalkar & Houmansadr,
    NDSS 2021), who know every honest update of the round, which clients cannot do in a real
    federation (the client-side colluding attacks only know the colluders' own updates). Evaluation
    runs stack it on the strategy, with the ground-truth Byzantine node ids from the run
    config, to measure a defence against that stronger adversary. A warning is logged at
    construction.

    In :meth:`on_replies` it splits the round's valid replies by node id, computes the honest
    deltas (reply arrays minus the global arrays, per named layer, in ascending node-id
    order), crafts one malicious delta per Byzantine reply with the attack's
    :meth:`~flwr_robust.attacks.colluding.ColludingAttack.craft_colluders` (``n`` = the
    replies it sees, ``f`` = the Byzantine ones among them, the ``i``-th crafted delta for the
    ``i``-th Byzantine node id in ascending order; randomness from ``seed`` and the round) and
    sets every Byzantine reply's ``arrays`` to a new dict of read-only arrays
    ``global + malicious delta`` (same dtypes). The hook holds one attack object for the
    whole run, so stateful attacks (e.g. ``mimic``'s warm-up) keep their state across rounds.
    Honest replies, their arrays and the replaced arrays are never modified; it rejects
    nothing. Place it after signature verification hooks: it stands for attackers that sign
    their crafted update themselves.

    Parameters
    ----------
    attack : str
        The colluding attack to simulate (e.g. ``"alie"``, ``"min-max"``; kebab-case
        accepted).
    byzantine_ids : iterable of int
        Flower node ids of the Byzantine clients (ground truth), not empty.
    params : mapping, optional
        The attack's parameters (e.g. ``{"alie_z": 1.0}`` or ``{"ipm_epsilon": 0.5}``).
    seed : int, default=0
        Seed of the attack's randomness: round ``r`` draws from
        ``np.random.default_rng([seed, r])``.
    """

    def __init__(
        self,
        attack: str,
        byzantine_ids: Iterable[int],
        params: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        built = get_attack(attack, **dict(params or {}))
        if not built.colluding:
            raise ValueError(
                f"attack {built.name!r} is not colluding; the omniscient simulation takes "
                f"{', '.join(n for n in available_attacks() if attack_class(n).colluding)}"
            )
        self.attack = cast(ColludingAttack, built)
        self.byzantine_ids = frozenset(int(node_id) for node_id in byzantine_ids)
        if not self.byzantine_ids:
            raise ValueError("byzantine_ids must name at least one node")
        self.seed = check_int("seed", seed, minimum=0)
        logger.warning(
            "THREAT-MODEL SIMULATION: omniscient %r replaces the replies of nodes %s with "
            "updates crafted from the honest replies; never use this outside evaluation",
            self.attack,
            sorted(self.byzantine_ids),
        )

    def on_replies(
        self,
        server_round: int,
        global_arrays: dict[str, np.ndarray],
        replies: Sequence[ClientReply],
    ) -> dict[int, str]:
        ordered = sorted(replies, key=lambda r: r.node_id)
        byzantine = [r for r in ordered if r.node_id in self.byzantine_ids]
        honest = [r for r in ordered if r.node_id not in self.byzantine_ids]
        if not byzantine:
            return {}
        if not honest:
            logger.warning(
                "round %d: omniscient %s has no honest reply to learn from; replies unchanged",
                server_round,
                self.attack.name,
            )
            return {}
        names = list(global_arrays)
        honest_deltas = [
            [r.arrays[name] - global_arrays[name] for name in names]  # type: ignore[index]
            for r in honest
        ]
        crafted_deltas = self.attack.craft_colluders(
            honest_deltas,
            len(replies),
            len(byzantine),
            np.random.default_rng([self.seed, server_round]),
        )
        for reply, crafted in zip(byzantine, crafted_deltas, strict=True):
            new_arrays = {}
            for name, delta in zip(names, crafted, strict=True):
                dtype = reply.arrays[name].dtype  # type: ignore[index]
                array = (global_arrays[name] + delta).astype(dtype, copy=False)
                array.setflags(write=False)
                new_arrays[name] = array
            reply.arrays = new_arrays
        logger.info(
            "round %d: omniscient %s replaced the arrays of nodes %s",
            server_round,
            self.attack.name,
            sorted(r.node_id for r in byzantine),
        )
        return {}
