"""Legacy API strategies: drop-in replacements for ``flwr.server.strategy.FedAvg``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Unpack

from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as FlowerFedAvg
from flwr.server.strategy.aggregate import aggregate_krum, weighted_loss_avg

from ..records import tensor_views
from ._common import RobustArguments, RobustStrategyMixin, constructor_arguments
from ._rules import (
    CenteredClippingRule,
    ClusterFilterRule,
    DnCRule,
    FlameRule,
    FLDetectorRule,
    FLTrustRule,
    FoolsGoldRule,
    GeometricMedianRule,
    MeaMedRule,
    NormClippingRule,
    ReputationRule,
    RFOut1dRule,
    RobustLRRule,
    SignGuardRule,
)
from .metrics import conforming
from .rounds import LegacyRounds

logger = logging.getLogger("flwr.robust")


class RobustStrategy(RobustStrategyMixin, FlowerFedAvg):
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

    _flower_base = FlowerFedAvg
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
        if self._raised_minimums:
            self._log_why_waiting(client_manager.num_available())
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
        """Validate, filter and robustly aggregate the results of ``server_round``.

        Works without a prior :meth:`configure_fit` too, as Flower's strategies do: the
        results then build on the latest model this strategy sent, produced or was given
        (``initial_parameters``); see :meth:`flwr_robust.strategy.RobustStrategy.aggregate_train`.
        No results: ``(None, {})``, as in Flower.
        """
        if self.initial_parameters is not None:
            self.rounds.produced(tensor_views(self.initial_parameters.tensors), initial=True)
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
        self.rounds.produced(new_arrays)
        report.info["exceptions"] = exceptions
        if not results:
            return None, {}
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
        conform to the round's layout (see :mod:`.metrics`). With failures and
        ``accept_failures=False``: ``(None, {})``, as in Flower."""
        global_arrays, replies, sampled = self.rounds.take_evaluation(server_round, results)
        valid, _ = self.engine.screen_evaluation(server_round, global_arrays, replies, sampled)
        if not valid or (failures and not self.accept_failures):
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


EvaluateFn = Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]
ConfigFn = Callable[[int], dict[str, Scalar]]
MetricsAggregation = Callable[[list[tuple[int, dict[str, Scalar]]]], dict[str, Scalar]]


class LegacyArguments(RobustArguments, total=False):
    """Keyword arguments of the rule strategies: Flower's legacy ``FedAvg`` parameters and
    the robust ones (:class:`~flwr_robust.strategy._common.RobustArguments`)."""

    fraction_fit: float
    fraction_evaluate: float
    min_fit_clients: int | None
    min_evaluate_clients: int
    min_available_clients: int | None
    evaluate_fn: EvaluateFn | None
    on_fit_config_fn: ConfigFn | None
    on_evaluate_config_fn: ConfigFn | None
    accept_failures: bool
    initial_parameters: Parameters | None
    fit_metrics_aggregation_fn: MetricsAggregation | None
    evaluate_metrics_aggregation_fn: MetricsAggregation | None


# ------------------------------------------------------------- Flower's strategy names
# Same keyword-only signatures as flwr.server.strategy, plus this package's names as
# aliases. ``min_fit_clients`` and ``min_available_clients`` default to ``None``: Flower's
# 2, raised to the replies the rule needs (logged). The rules are documented on the
# Message-API classes of the same names; see docs/flower-differences.md.


class FedAvg(RobustStrategy):
    """Flower's legacy ``FedAvg`` behind flwr-robust's validation, hooks and reports (see
    :class:`flwr_robust.strategy.FedAvg`). ``inplace`` is accepted and has no effect on
    the result."""

    rule = "fedavg"

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int | None = None,
        min_evaluate_clients: int = 2,
        min_available_clients: int | None = None,
        evaluate_fn: EvaluateFn | None = None,
        on_fit_config_fn: ConfigFn | None = None,
        on_evaluate_config_fn: ConfigFn | None = None,
        accept_failures: bool = True,
        initial_parameters: Parameters | None = None,
        fit_metrics_aggregation_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggregation_fn: MetricsAggregation | None = None,
        inplace: bool = True,
        **kwargs: Unpack[RobustArguments],
    ) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class FedMedian(RobustStrategy):
    """Flower's legacy ``FedMedian`` (see :class:`flwr_robust.strategy.FedMedian`)."""

    rule = "median"

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int | None = None,
        min_evaluate_clients: int = 2,
        min_available_clients: int | None = None,
        evaluate_fn: EvaluateFn | None = None,
        on_fit_config_fn: ConfigFn | None = None,
        on_evaluate_config_fn: ConfigFn | None = None,
        accept_failures: bool = True,
        initial_parameters: Parameters | None = None,
        fit_metrics_aggregation_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggregation_fn: MetricsAggregation | None = None,
        inplace: bool = True,
        num_malicious: int | None = None,
        **kwargs: Unpack[RobustArguments],
    ) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class FedTrimmedAvg(RobustStrategy):
    """Flower's legacy ``FedTrimmedAvg``: ``beta`` is ``trim_ratio`` (default Flower's 0.2),
    or ``num_malicious=f`` cuts ``f`` per side (see
    :class:`flwr_robust.strategy.FedTrimmedAvg`)."""

    rule = "trimmed_mean"

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int | None = None,
        min_evaluate_clients: int = 2,
        min_available_clients: int | None = None,
        evaluate_fn: EvaluateFn | None = None,
        on_fit_config_fn: ConfigFn | None = None,
        on_evaluate_config_fn: ConfigFn | None = None,
        accept_failures: bool = True,
        initial_parameters: Parameters | None = None,
        fit_metrics_aggregation_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggregation_fn: MetricsAggregation | None = None,
        beta: float | None = None,
        num_malicious: int | None = None,
        trim_ratio: float | None = None,
        **kwargs: Unpack[RobustArguments],
    ) -> None:
        args = constructor_arguments(locals(), {"beta": "trim_ratio"})
        if "trim_ratio" not in args and args.get("num_malicious") is None:
            args["trim_ratio"] = 0.2  # Flower's default beta
        super().__init__(self.rule, **args)
        self.beta = self.aggregator.params().get("trim_ratio")


class Krum(RobustStrategy):
    """Flower's legacy ``Krum``: ``num_malicious_clients`` is ``num_malicious`` (``f``), and
    ``num_clients_to_keep=k > 0`` makes it Multi-Krum over ``k`` updates, as in Flower (the
    selected updates averaged without weights, as in the paper). See
    :class:`flwr_robust.strategy.Krum` and :class:`flwr_robust.strategy.MultiKrum`."""

    rule = "krum"

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int | None = None,
        min_evaluate_clients: int = 2,
        min_available_clients: int | None = None,
        num_malicious_clients: int | None = None,
        num_clients_to_keep: int = 0,
        evaluate_fn: EvaluateFn | None = None,
        on_fit_config_fn: ConfigFn | None = None,
        on_evaluate_config_fn: ConfigFn | None = None,
        accept_failures: bool = True,
        initial_parameters: Parameters | None = None,
        fit_metrics_aggregation_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggregation_fn: MetricsAggregation | None = None,
        num_malicious: int | None = None,
        **kwargs: Unpack[RobustArguments],
    ) -> None:
        args = constructor_arguments(locals(), {"num_malicious_clients": "num_malicious"})
        keep = args.pop("num_clients_to_keep")
        rule = "krum"
        if keep:
            rule, args["num_selected"] = "multi_krum", keep
        super().__init__(rule, **args)
        self.num_malicious_clients = self.aggregator.params()["num_malicious"]
        self.num_clients_to_keep = keep


class MultiKrum(RobustStrategy):
    """Multi-Krum on the legacy API (Flower's is ``Krum(num_clients_to_keep=m)``):
    ``num_clients_to_keep`` / ``num_selected`` is ``m``, default 1 as in the Message API's
    :class:`flwr_robust.strategy.MultiKrum`."""

    rule = "multi_krum"

    def __init__(
        self,
        *,
        num_malicious_clients: int | None = None,
        num_clients_to_keep: int | None = None,
        num_malicious: int | None = None,
        num_selected: int | None = None,
        **kwargs: Unpack[LegacyArguments],
    ) -> None:
        args = constructor_arguments(
            locals(),
            {"num_malicious_clients": "num_malicious", "num_clients_to_keep": "num_selected"},
        )
        args.setdefault("num_selected", 1)
        super().__init__(self.rule, **args)
        params = self.aggregator.params()
        self.num_malicious_clients = params["num_malicious"]
        self.num_clients_to_keep = params["num_selected"]


class Bulyan(RobustStrategy):
    """Flower's legacy ``Bulyan`` (see :class:`flwr_robust.strategy.Bulyan`):
    ``num_malicious_clients`` is ``num_malicious``. The first rule is the paper's recursive
    Krum: Flower's default ``first_aggregation_rule=aggregate_krum`` with ``to_keep=0``;
    other first rules are not supported."""

    rule = "bulyan"

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int | None = None,
        min_evaluate_clients: int = 2,
        min_available_clients: int | None = None,
        num_malicious_clients: int | None = None,
        evaluate_fn: EvaluateFn | None = None,
        on_fit_config_fn: ConfigFn | None = None,
        on_evaluate_config_fn: ConfigFn | None = None,
        accept_failures: bool = True,
        initial_parameters: Parameters | None = None,
        fit_metrics_aggregation_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggregation_fn: MetricsAggregation | None = None,
        first_aggregation_rule: Callable[..., Any] = aggregate_krum,
        to_keep: int = 0,
        num_malicious: int | None = None,
        **kwargs: Unpack[RobustArguments],
    ) -> None:
        if first_aggregation_rule is not aggregate_krum or to_keep != 0:
            raise ValueError(
                "Bulyan's first rule is the paper's recursive Krum (Flower's default "
                "first_aggregation_rule=aggregate_krum, to_keep=0); other first rules are "
                "not supported"
            )
        args = constructor_arguments(locals(), {"num_malicious_clients": "num_malicious"})
        del args["first_aggregation_rule"], args["to_keep"]
        super().__init__(self.rule, **args)
        self.num_malicious_clients = self.aggregator.params()["num_malicious"]
        self.first_aggregation_rule = aggregate_krum
        self.aggregation_rule_kwargs = {"to_keep": 0}


#: This package's names of Flower's strategies.
Median = FedMedian
TrimmedMean = FedTrimmedAvg


# ------------------------------------------------------------- this package's rules
# The rule's parameters come from ._rules; each class's docstring is its rule's.


class GeometricMedian(GeometricMedianRule, RobustStrategy):
    pass


class NormClipping(NormClippingRule, RobustStrategy):
    pass


class CenteredClipping(CenteredClippingRule, RobustStrategy):
    pass


class RFOut1d(RFOut1dRule, RobustStrategy):
    pass


class MeaMed(MeaMedRule, RobustStrategy):
    pass


class Flame(FlameRule, RobustStrategy):
    pass


class FoolsGold(FoolsGoldRule, RobustStrategy):
    pass


class ClusterFilter(ClusterFilterRule, RobustStrategy):
    pass


class Reputation(ReputationRule, RobustStrategy):
    pass


class DnC(DnCRule, RobustStrategy):
    pass


class SignGuard(SignGuardRule, RobustStrategy):
    pass


class RobustLR(RobustLRRule, RobustStrategy):
    pass


class FLDetector(FLDetectorRule, RobustStrategy):
    pass


class FLTrust(FLTrustRule, RobustStrategy):
    pass
