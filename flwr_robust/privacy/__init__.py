"""Differential privacy that composes with robust aggregation.

- :mod:`.local`: client-level local DP (clip the update to ``C``, add ``N(0, (sigma*C)^2)``)
  and the per-client privacy ledger, accounted with Google's ``dp-accounting`` (RDP).
- :mod:`.mod`: :func:`local_dp_mod`, the Flower client mod (inside the integrity mod, so the
  noised update is the signed one).
- :mod:`.hooks`: :class:`PrivacyPolicyHook`, the server's epsilon policy.
"""

from .hooks import (
    BUDGET_EXHAUSTED,
    PRIVACY_CODES,
    PRIVACY_OVER_BUDGET,
    PRIVACY_UNREPORTED,
    PrivacyPolicyHook,
)
from .local import LocalDP, NodeDP, PrivacyLedger, clip_and_noise, epsilon_spent
from .mod import local_dp_mod

__all__ = [
    "BUDGET_EXHAUSTED",
    "PRIVACY_CODES",
    "PRIVACY_OVER_BUDGET",
    "PRIVACY_UNREPORTED",
    "LocalDP",
    "NodeDP",
    "PrivacyLedger",
    "PrivacyPolicyHook",
    "clip_and_noise",
    "epsilon_spent",
    "local_dp_mod",
]
