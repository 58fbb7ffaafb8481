"""Byzantine client behaviours for evaluating robust aggregation.

>>> from flwr_robust.attacks import get_attack, available_attacks
>>> attack = get_attack("scale", scale_factor=20.0)
>>> attack.poison_update(delta, context)

A Byzantine ClientApp trains on ``attack.poison_data(data, rng)`` (unless
``attack.skips_training``), sends ``global + attack.poison_update(delta, context)`` and claims
``attack.claimed_examples(count)`` examples. Colluding attacks (``attack.colluding``) need
``AttackContext.colluder_deltas``. :class:`OmniscientAttackHook` (imported lazily, it pulls in
the Flower strategies) is a server-side threat-model simulation, never part of a normal run.
"""

from __future__ import annotations

from typing import Any

from . import adaptive, backdoor, colluding, data, model  # noqa: F401 (registers the attacks)
from .adaptive import FangKrum, FangTrim, Mimic, MinMax, MinSum
from .backdoor import DBA, ConstrainAndScale, Neurotoxin
from .base import (
    Attack,
    AttackContext,
    attack_class,
    attack_parameters,
    attack_params_from_config,
    available_attacks,
    get_attack,
)
from .colluding import ALIE, IPM, ColludingAttack, alie_delta, alie_z_max, ipm_delta
from .data import (
    Backdoor,
    LabelFlip,
    Trigger,
    TriggerAttack,
    apply_trigger,
    attack_success_rate,
    poisoned_training,
)
from .model import FreeRider, Gaussian, NumExamplesInflation, Scale, SignFlip, Zero

__all__ = [
    "ALIE",
    "DBA",
    "IPM",
    "Attack",
    "AttackContext",
    "Backdoor",
    "ColludingAttack",
    "ConstrainAndScale",
    "FangKrum",
    "FangTrim",
    "FreeRider",
    "Gaussian",
    "LabelFlip",
    "Mimic",
    "MinMax",
    "MinSum",
    "Neurotoxin",
    "NumExamplesInflation",
    "OmniscientAttackHook",
    "Scale",
    "SignFlip",
    "Trigger",
    "TriggerAttack",
    "Zero",
    "alie_delta",
    "alie_z_max",
    "apply_trigger",
    "attack_class",
    "attack_parameters",
    "attack_params_from_config",
    "attack_success_rate",
    "available_attacks",
    "get_attack",
    "ipm_delta",
    "poisoned_training",
]


def __getattr__(name: str) -> Any:
    """Import :class:`OmniscientAttackHook` on first use (it needs the strategy package)."""
    if name == "OmniscientAttackHook":
        from .omniscient import OmniscientAttackHook

        return OmniscientAttackHook
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
