"""THREAT-MODEL SIMULATION ONLY: omniscient ALIE / IPM injected on the server side.

Never part of a normal run. See :class:`OmniscientAttackHook`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..strategy.hooks import StrategyHook
from .base import attack_class, available_attacks, get_attack
from .colluding import ColludingAttack

if TYPE_CHECKING:
    from ..strategy.engine import ClientReply

__all__ = ["OmniscientAttackHook"]

logger = logging.getLogger("flwr.robust")


class OmniscientAttackHook(StrategyHook):
    """THREAT-MODEL SIMULATION: replaces the Byzantine replies of each round by an omniscient
    ALIE or IPM update computed from the honest replies of the same round.

    **This is not a defence and must never be active in a normal run.** It simulates the
    omniscient attackers of Baruch et al. (NeurIPS 2019) and Xie et al. (UAI 2019), who know
    every honest update of the round, which clients cannot do in a real federation (the
    client-side ``alie`` / ``ipm`` attacks only know the colluders' own updates). Evaluation
    runs stack it on the strategy, with the ground-truth Byzantine node ids from the run
    config, to measure a defence against that stronger adversary. A warning is logged at
    construction.

    In :meth:`on_replies` it splits the round's valid replies by node id, computes the honest
    deltas (reply arrays minus the global arrays, per named layer), crafts the malicious delta
    with the attack's :meth:`~flwr_robust.attacks.colluding.ColludingAttack.craft` (``n`` = the
    replies it sees, ``f`` = the Byzantine ones among them) and sets every Byzantine reply's
    ``arrays`` to a new dict of read-only arrays ``global + malicious delta`` (same dtypes).
    Honest replies, their arrays and the replaced arrays are never modified; it rejects
    nothing. Place it after signature verification hooks: it stands for attackers that sign
    their crafted update themselves.

    Parameters
    ----------
    attack : {"alie", "ipm"}
        The colluding attack to simulate (kebab-case accepted).
    byzantine_ids : iterable of int
        Flower node ids of the Byzantine clients (ground truth), not empty.
    params : mapping, optional
        The attack's parameters (e.g. ``{"alie_z": 1.0}`` or ``{"ipm_epsilon": 0.5}``).
    """

    def __init__(
        self,
        attack: str,
        byzantine_ids: Iterable[int],
        params: Mapping[str, Any] | None = None,
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
        byzantine = [r for r in replies if r.node_id in self.byzantine_ids]
        honest = [r for r in replies if r.node_id not in self.byzantine_ids]
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
        crafted = self.attack.craft(honest_deltas, len(replies), len(byzantine))
        for reply in byzantine:
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
