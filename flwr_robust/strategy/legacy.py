"""Legacy API strategies: drop-in replacements for ``flwr.server.strategy.FedAvg``."""

from __future__ import annotations

import logging

from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.strategy.aggregate import weighted_loss_avg

from ._common import RobustStrategyMixin, rule_strategies
from .metrics import conforming
from .rounds import LegacyRounds

logger = logging.getLogger("flwr.robust")


class RobustStrategy(RobustStrategyMixin, FedAvg):
    """Flower legacy-API ``FedAvg`` with robust aggregation inside ``aggregate_fit``.

    Same behaviour as :class:`flwr_robust.strategy.RobustStrategy` (validation, hooks,
    deltas against the global model sent, robust rule, reports), for applications built on
    ``flwr.server.strategy`` and ``ServerApp(server_fn=...)`` / ``start_grid``. Failures
    (exceptions) are counted; failed results are rejected with a reason. With
    ``accept_failures=False`` any failure keeps the global model, as in Flower's FedAvg.

    Parameters
    ----------
    aggregator : Aggregator or str, optional
        The rule, or its registry name (its parameters then come as keyword arguments).
    hooks : sequence of StrategyHook
        Hooks applied around every round.
    max_num_examples : int
        Claimed example counts above this are rejected.
    **kwargs
        The rule's parameters and every parameter of ``flwr.server.strategy.FedAvg``
        (``fraction_fit``, ``min_fit_clients``, ``evaluate_fn``, ...).
        ``min_fit_clients`` and ``min_available_clients`` default to the rule's minimum
        number of clients when that is larger than Flower's default.
    """

    _flower_base = FedAvg
    _rounds_class = LegacyRounds
    _min_nodes_param = "min_fit_clients"
    _min_available_param = "min_available_clients"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.engine.aggregator!r})"

    # ------------------------------------------------------------------ training
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """FedAvg's sampling; remembers the global model and adds the hooks' entries.

        A hook's ``global_model_override`` (e.g. a rollback) replaces the model sent.
        """
        return self.rounds.configure(
            server_round, "train", parameters,
            lambda sent: super(RobustStrategy, self).configure_fit(
                server_round, sent, client_manager
            ),
            FitIns,
        )

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate, filter and robustly aggregate the results of ``server_round``."""
        global_arrays, replies, exceptions, sampled = self.rounds.take(
            server_round, results, failures
        )
        if failures and not self.accept_failures:
            logger.warning(
                "round %d: %d failures and accept_failures=False: global model kept",
                server_round, len(failures),
            )
            return None, {}
        new_arrays, report = self.engine.aggregate(server_round, global_arrays, replies, sampled)
        report.info["exceptions"] = exceptions
        parameters = None
        if new_arrays is not None:
            parameters = ndarrays_to_parameters(list(new_arrays.values()))
        metrics: dict[str, Scalar] = {}
        kept = set(report.kept)
        if self.fit_metrics_aggregation_fn is not None:
            kept_results = [results[r.source][1] for r in replies
                            if r.node_id in kept and r.source is not None]
            positions, kept_metrics = conforming([res.metrics for res in kept_results])
            if positions:
                metrics = dict(self.fit_metrics_aggregation_fn(
                    [(kept_results[i].num_examples, m)
                     for i, m in zip(positions, kept_metrics, strict=True)]
                ))
        metrics.update(report.metrics())
        return parameters, metrics

    # ---------------------------------------------------------------- evaluation
    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """FedAvg's sampling, plus the hooks' entries (e.g. the model's signature)."""
        return self.rounds.configure(
            server_round, "evaluate", parameters,
            lambda sent: super(RobustStrategy, self).configure_evaluate(
                server_round, sent, client_manager
            ),
            EvaluateIns,
        )

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """FedAvg's weighted loss over the evaluation results that pass validation and the
        hooks (duplicates, unsampled nodes, non-finite losses and forged results are left
        out, with the reason logged); the metrics function sees the results whose metrics
        conform to the round's layout (see :mod:`.metrics`)."""
        global_arrays, replies, sampled = self.rounds.take_evaluation(server_round, results)
        valid, _ = self.engine.screen_evaluation(server_round, global_arrays, replies, sampled)
        if not valid:
            return None, {}
        kept = [results[r.source][1] for r in valid if r.source is not None]
        loss = weighted_loss_avg([(res.num_examples, res.loss) for res in kept])
        metrics: dict[str, Scalar] = {}
        if self.evaluate_metrics_aggregation_fn is not None:
            positions, maps = conforming([res.metrics for res in kept])
            if positions:
                metrics = dict(self.evaluate_metrics_aggregation_fn(
                    [(kept[i].num_examples, m) for i, m in zip(positions, maps, strict=True)]
                ))
        return loss, metrics


# One subclass per rule (``class Krum(RobustStrategy): rule = "krum"``), see RULE_STRATEGIES.
(Median, TrimmedMean, Krum, MultiKrum, Bulyan, GeometricMedian, NormClipping, CenteredClipping,
 RFOut1d, MeaMed, Flame, FoolsGold, ClusterFilter, Reputation) = rule_strategies(
    RobustStrategy, __name__
)
