"""Message API strategies: drop-in replacements for ``flwr.serverapp.strategy.FedAvg``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Unpack

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

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
from .metrics import conforming_contents
from .rounds import MessageRounds

logger = logging.getLogger("flwr.robust")


class RobustStrategy(RobustStrategyMixin, FlowerFedAvg):
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

    _flower_base = FlowerFedAvg
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
        if self._raised_minimums:
            self._log_why_waiting(len(list(grid.get_node_ids())))
        return self.rounds.configure(
            server_round, "train", arrays,
            lambda sent: super(RobustStrategy, self).configure_train(
                server_round, sent, config, grid
            ),
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, filter and robustly aggregate the replies of ``server_round``.

        Works without a prior :meth:`configure_train` too, as Flower's strategies do: the
        replies then build on the latest model this strategy sent or produced, or, with
        none, a translation-equivariant rule aggregates the weights directly (see
        :meth:`RobustAggregation.aggregate`). No replies: ``(None, None)``, as in Flower.
        """
        global_arrays, messages, client_replies, sampled = self.rounds.take(
            server_round, replies, self.weighted_by_key
        )
        new_arrays, report = self.engine.aggregate(
            server_round, global_arrays, client_replies, sampled
        )
        self.rounds.produced(new_arrays)
        if not client_replies:
            return None, None
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


MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


# ------------------------------------------------------------- Flower's strategy names
# Same constructor signatures as flwr.serverapp.strategy (positional order included),
# plus this package's names as keyword-only aliases. ``min_train_nodes`` and
# ``min_available_nodes`` default to ``None``: Flower's 2, raised to the replies the rule
# needs (logged). See docs/flower-differences.md for every intended difference.


class FedAvg(RobustStrategy):
    """Flower's ``FedAvg`` (weighted mean of the updates) behind flwr-robust's validation,
    hooks and reports: :class:`RobustStrategy` with the ``fedavg`` rule (McMahan et al.,
    AISTATS 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
    Data"). Not robust to a single Byzantine client; use it to add validation or signing
    to a plain federation."""

    rule = "fedavg"

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int | None = None,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int | None = None,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
        **kwargs: Unpack[RobustArguments],
    ) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class FedMedian(RobustStrategy):
    """Flower's ``FedMedian``: the coordinate-wise median of the updates (Yin et al., ICML
    2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"); see
    :class:`flwr_robust.aggregation.Median`. ``num_malicious`` (keyword) only sets the
    minimum of ``2 * num_malicious + 1`` replies. Example counts are ignored, as in Flower."""

    rule = "median"

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int | None = None,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int | None = None,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
        *,
        num_malicious: int | None = None,
        **kwargs: Unpack[RobustArguments],
    ) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class FedTrimmedAvg(RobustStrategy):
    """Flower's ``FedTrimmedAvg``: the coordinate-wise trimmed mean (Yin et al., ICML 2018);
    see :class:`flwr_robust.aggregation.TrimmedMean`.

    ``beta`` is Flower's name of ``trim_ratio``: ``floor(beta * n)`` values are cut from
    each end of every coordinate, and the default is Flower's 0.2. ``num_malicious=f``
    (keyword) cuts exactly ``f`` instead. Unweighted, as in Flower.
    """

    rule = "trimmed_mean"

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int | None = None,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int | None = None,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
        beta: float | None = None,
        *,
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
    """Flower's ``Krum``: the update with the smallest sum of squared distances to its
    ``n - f - 2`` nearest neighbours (Blanchard et al., NeurIPS 2017, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent"); see
    :class:`flwr_robust.aggregation.Krum`.

    ``num_malicious_nodes`` is Flower's name of ``num_malicious`` (``f``). The rule needs
    ``n > 2f + 2`` replies, the paper's condition; Flower computes with fewer.
    """

    rule = "krum"

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int | None = None,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int | None = None,
        num_malicious_nodes: int | None = None,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
        *,
        num_malicious: int | None = None,
        **kwargs: Unpack[RobustArguments],
    ) -> None:
        args = constructor_arguments(locals(), {"num_malicious_nodes": "num_malicious"})
        super().__init__(self.rule, **args)
        self.num_malicious_nodes = self.aggregator.params()["num_malicious"]
        self.num_nodes_to_select = 1  # as Flower's Krum, a Multi-Krum selecting one


class MultiKrum(RobustStrategy):
    """Flower's ``MultiKrum``: the mean of the ``m`` updates with the best Krum scores
    (El Mhamdi et al., ICML 2018, "The Hidden Vulnerability of Distributed Learning in
    Byzantium"); see :class:`flwr_robust.aggregation.MultiKrum`.

    ``num_malicious_nodes`` and ``num_nodes_to_select`` are Flower's names of
    ``num_malicious`` (``f``) and ``num_selected`` (``m``); ``m`` defaults to Flower's 1
    (which is Krum; the paper's ``m = n - f`` is the registry rule's default). The selected
    updates are averaged without weights, as in the paper (Flower weights them by their
    example counts, which are client claims). Needs ``n > 2f + 2`` replies.
    """

    rule = "multi_krum"

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int | None = None,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int | None = None,
        num_malicious_nodes: int | None = None,
        num_nodes_to_select: int | None = None,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
        *,
        num_malicious: int | None = None,
        num_selected: int | None = None,
        **kwargs: Unpack[RobustArguments],
    ) -> None:
        args = constructor_arguments(
            locals(),
            {"num_malicious_nodes": "num_malicious", "num_nodes_to_select": "num_selected"},
        )
        args.setdefault("num_selected", 1)  # Flower's default num_nodes_to_select
        super().__init__(self.rule, **args)
        params = self.aggregator.params()
        self.num_malicious_nodes = params["num_malicious"]
        self.num_nodes_to_select = params["num_selected"]


class Bulyan(RobustStrategy):
    """Flower's ``Bulyan`` (El Mhamdi et al., ICML 2018): Krum applied recursively to select
    ``n - 2f`` updates, then the coordinate-wise mean of the ``n - 4f`` values closest to
    the median; see :class:`flwr_robust.aggregation.Bulyan`.

    ``num_malicious_nodes`` is Flower's name of ``num_malicious`` (``f``). Needs
    ``n >= 4f + 3`` replies. Flower's ``selection_rule`` hook is not supported: the
    selection is the paper's recursive Krum, the same as Flower's default (``None``).
    """

    rule = "bulyan"

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int | None = None,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int | None = None,
        num_malicious_nodes: int | None = None,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
        selection_rule: None = None,
        *,
        num_malicious: int | None = None,
        **kwargs: Unpack[RobustArguments],
    ) -> None:
        if selection_rule is not None:
            raise ValueError(
                "Bulyan's selection_rule is not supported: flwr-robust selects with the "
                "paper's recursive Krum, which is Flower's default (selection_rule=None)"
            )
        args = constructor_arguments(locals(), {"num_malicious_nodes": "num_malicious"})
        del args["selection_rule"]
        super().__init__(self.rule, **args)
        self.num_malicious_nodes = self.aggregator.params()["num_malicious"]
        self.selection_rule = None


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
