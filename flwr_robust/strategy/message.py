"""Message API strategies: drop-in replacements for ``flwr.serverapp.strategy.FedAvg``."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ._common import RobustStrategyMixin, rule_strategies
from .metrics import conforming_contents
from .rounds import MessageRounds

logger = logging.getLogger("flwr.robust")


class RobustStrategy(RobustStrategyMixin, FedAvg):
    """Flower Message-API ``FedAvg`` with robust aggregation of client updates.

    Each round it remembers the global model it sends, rejects invalid replies (error
    replies, missing/extra arrays, wrong shape or dtype, NaN/Inf, missing or implausible
    example counts) with a logged reason, lets the hooks filter the rest, aggregates the
    client deltas with the rule and adds the result to the global model. When too few valid
    replies remain for the rule, the global model is kept and the round says why. Reply
    contents are read through zero-copy read-only views and never modified.

    Parameters
    ----------
    aggregator : Aggregator or str, optional
        The rule, or its registry name (its parameters then come as keyword arguments).
        Defaults to the class's rule (``fedavg`` for this base class).
    hooks : sequence of StrategyHook
        Hooks applied around every round (signing, signature checks, telemetry, ...).
    max_num_examples : int
        Claimed example counts above this are rejected.
    **kwargs
        The rule's parameters, and every parameter of
        ``flwr.serverapp.strategy.FedAvg`` (``fraction_train``, ``min_train_nodes``, ...).
        ``min_train_nodes`` and ``min_available_nodes`` default to the rule's minimum number
        of clients when that is larger than Flower's default.
    """

    _flower_base = FedAvg
    _rounds_class = MessageRounds
    _min_nodes_param = "min_train_nodes"
    _min_available_param = "min_available_nodes"

    def summary(self) -> None:
        """Log the robust settings, then FedAvg's."""
        self._log_robust_summary()
        super().summary()

    # ------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling; remembers the global model and adds the hooks' entries.

        A hook's :meth:`~StrategyHook.global_model_override` (e.g. a rollback) replaces the
        model sent, and the next aggregation builds on the replacement.
        """
        return self.rounds.configure(
            server_round, "train", arrays,
            lambda sent: super(RobustStrategy, self).configure_train(
                server_round, sent, config, grid
            ),
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, filter and robustly aggregate the replies of ``server_round``."""
        global_arrays, messages, client_replies, sampled = self.rounds.take(
            server_round, replies, self.weighted_by_key
        )
        new_arrays, report = self.engine.aggregate(
            server_round, global_arrays, client_replies, sampled
        )
        arrays = None
        if new_arrays is not None:
            arrays = ArrayRecord({name: Array(np.asarray(a)) for name, a in new_arrays.items()})
        kept = set(report.kept)
        kept_contents = [
            messages[r.source].content for r in client_replies
            if r.node_id in kept and r.source is not None
        ]
        metrics = _aggregated_metrics(
            self.train_metrics_aggr_fn, kept_contents, self.weighted_by_key
        )
        metrics.update(report.metrics())
        return arrays, metrics

    # ---------------------------------------------------------------- evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling, plus the hooks' entries (e.g. the model's signature)."""
        return self.rounds.configure(
            server_round, "evaluate", arrays,
            lambda sent: super(RobustStrategy, self).configure_evaluate(
                server_round, sent, config, grid
            ),
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted metrics over the evaluation replies that pass validation and the hooks
        (an evaluation reply can be as hostile as a training one: duplicates, unsampled
        nodes, non-finite or forged metrics are left out, with the reason logged)."""
        global_arrays, messages, client_replies, sampled = self.rounds.take_evaluation(
            server_round, replies, self.weighted_by_key
        )
        valid, report = self.engine.screen_evaluation(
            server_round, global_arrays, client_replies, sampled
        )
        if not valid:
            return None
        contents = [messages[r.source].content for r in valid if r.source is not None]
        metrics = _aggregated_metrics(
            self.evaluate_metrics_aggr_fn, contents, self.weighted_by_key
        )
        metrics.update(report.metrics())
        return metrics


def _aggregated_metrics(
    aggregate_fn: Any, contents: list[RecordDict], weighted_by_key: str
) -> MetricRecord:
    """``aggregate_fn`` over the replies whose metrics conform to the round's layout (see
    :mod:`.metrics`); exceptions of the function itself propagate, as in Flower."""
    _, consistent = conforming_contents(contents)
    if not consistent:
        return MetricRecord()
    return aggregate_fn(consistent, weighted_by_key)


# One subclass per rule (``class Krum(RobustStrategy): rule = "krum"``), see RULE_STRATEGIES.
(Median, TrimmedMean, Krum, MultiKrum, Bulyan, GeometricMedian, NormClipping, CenteredClipping,
 RFOut1d, MeaMed, Flame, FoolsGold, ClusterFilter, Reputation) = rule_strategies(
    RobustStrategy, __name__
)
