"""The server's privacy policy as a strategy hook (both Flower APIs, any rule)."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..aggregation.base import check_float
from ..strategy.hooks import StrategyHook
from ..validation import reason, reason_code
from .mod import BUDGET_EXHAUSTED

if TYPE_CHECKING:
    from ..strategy.engine import ClientReply, RoundReport

logger = logging.getLogger("flwr.robust")

PRIVACY_UNREPORTED = "privacy-unreported"
PRIVACY_OVER_BUDGET = "privacy-over-budget"
#: Rejection codes of the hook (and the client's own refusal code, seen in error replies).
PRIVACY_CODES = frozenset((PRIVACY_UNREPORTED, PRIVACY_OVER_BUDGET, BUDGET_EXHAUSTED))
#: Where :meth:`PrivacyPolicyHook.on_round_end` puts the round's figures in the report.
INFO_KEY = "privacy"
_EXHAUSTED = f"refused: {BUDGET_EXHAUSTED}:"  # in the text of the client's error reply


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


class PrivacyPolicyHook(StrategyHook):
    """Rejects training replies whose reported privacy does not meet the policy, and records
    every round's per-client epsilon and budget exhaustions.

    A reply is rejected as ``privacy-unreported`` when its metrics lack a finite
    ``epsilon-spent`` or ``dp-delta`` (only when a policy is set), and as
    ``privacy-over-budget`` when the epsilon is infinite or exceeds ``max_epsilon`` or the delta
    ``max_delta``. With signing on, place it after signature verification: the figures are
    then the ones the client signed. The figures are the client's own claim; the hook cannot
    check that the noise was added (a Byzantine client may lie), only enforce what honest
    clients report.

    :meth:`on_round_end` puts ``{"epsilon-spent": {node: eps}, "budget-exhausted": [nodes]}``
    in ``report.info["privacy"]`` (the results file and the Prometheus hook read it): the
    epsilons of the replies that reached the hook, and the nodes whose error reply says
    ``privacy-budget-exhausted``. ``counts`` totals rejections and exhaustions by code.

    Parameters
    ----------
    max_epsilon : float or None
        Largest epsilon accepted; ``None``: report only (nothing is rejected unless
        ``max_delta`` is set).
    max_delta : float or None
        Largest delta accepted; ``None``: any.
    """

    def __init__(self, max_epsilon: float | None = None, max_delta: float | None = None) -> None:
        self.max_epsilon = check_float("max_epsilon", max_epsilon, minimum=0.0,
                                       exclusive_minimum=True, allow_none=True)
        self.max_delta = check_float("max_delta", max_delta, minimum=0.0, maximum=1.0,
                                     exclusive_minimum=True, allow_none=True)
        self.counts: Counter[str] = Counter()
        self._epsilons: dict[int, dict[int, float]] = {}

    @property
    def enforcing(self) -> bool:
        """Whether a policy is set (otherwise the hook only reports)."""
        return self.max_epsilon is not None or self.max_delta is not None

    def on_replies(
        self,
        server_round: int,
        global_arrays: dict[str, np.ndarray],
        replies: Sequence[ClientReply],
    ) -> dict[int, str]:
        rejected: dict[int, str] = {}
        seen = self._epsilons.setdefault(server_round, {})
        for reply in replies:
            problem = self._problem(reply.metrics)
            epsilon = _number(reply.metrics.get("epsilon-spent"))
            if epsilon is not None:
                seen[reply.node_id] = epsilon
            if problem is not None:
                self.counts[reason_code(problem)] += 1
                rejected[reply.node_id] = problem
        return rejected

    def _problem(self, metrics: Mapping[str, Any]) -> str | None:
        if not self.enforcing:
            return None
        raw = metrics.get("epsilon-spent")
        if isinstance(raw, float) and raw == math.inf:
            return reason(PRIVACY_OVER_BUDGET, "the reply reports an infinite epsilon")
        epsilon = _number(raw)
        delta = _number(metrics.get("dp-delta"))
        if epsilon is None or delta is None:
            return reason(PRIVACY_UNREPORTED, "the reply reports no finite 'epsilon-spent' "
                          "and 'dp-delta'")
        if self.max_epsilon is not None and epsilon > self.max_epsilon:
            return reason(PRIVACY_OVER_BUDGET, f"epsilon {epsilon:.4g} > policy maximum "
                          f"{self.max_epsilon:g}")
        if self.max_delta is not None and delta > self.max_delta:
            return reason(PRIVACY_OVER_BUDGET, f"delta {delta:g} > policy maximum "
                          f"{self.max_delta:g}")
        return None

    def on_round_end(
        self, report: RoundReport, new_arrays: dict[str, np.ndarray] | None
    ) -> None:
        exhausted = sorted(
            node_id for node_id, text in report.rejected.items()
            if _EXHAUSTED in text
        )
        self.counts[BUDGET_EXHAUSTED] += len(exhausted)
        if exhausted:
            logger.info("round %d: %d node(s) declined with a spent privacy budget: %s",
                        report.server_round, len(exhausted), exhausted)
        epsilons = self._epsilons.pop(report.server_round, {})
        for stale in [r for r in self._epsilons if r < report.server_round]:
            del self._epsilons[stale]
        report.info[INFO_KEY] = {
            "epsilon-spent": {str(k): v for k, v in sorted(epsilons.items())},
            "budget-exhausted": exhausted,
        }
