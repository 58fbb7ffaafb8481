"""flwr-robust's hooks around any Flower strategy, e.g. Flower's own ``FedAvg``.

The robust strategies run hooks themselves. :func:`with_hooks` adds the same hooks (signed
models, signature checks, anomaly detection, telemetry, audit, checkpoints) and the same reply
validation to a strategy you already use, in the wrapper style of Flower's differential-privacy
strategies: the wrapped strategy samples and aggregates as before; the wrapper signs what it
sends and removes, before the wrapped strategy sees them, the replies that fail validation or a
hook, with the reason logged and counted in the round's metrics.

Works with any ``flwr.serverapp.strategy.Strategy`` (Message API) whose instructions carry one
ConfigRecord and whose training replies carry one ArrayRecord and one MetricRecord (all of
Flower's built-ins), and with any ``flwr.server.strategy.Strategy`` (legacy API).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import (
    EvaluateIns,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..records import arrayrecord_views, tensor_views
from ..validation import DEFAULT_MAX_NUM_EXAMPLES, reason
from .engine import ClientReply, HookPipeline, NamedArrays, RoundReport, majority_layout
from .hooks import StrategyHook
from .metrics import conforming_messages, conforming_results
from .rounds import LegacyRounds, MessageRounds


def with_hooks(
    strategy: Any,
    hooks: Sequence[StrategyHook],
    max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
) -> Any:
    """``strategy`` (either Flower API) with ``hooks`` and reply validation around it."""
    if isinstance(strategy, Strategy):
        return HookedStrategy(strategy, hooks, max_num_examples)
    if isinstance(strategy, LegacyStrategy):
        return HookedLegacyStrategy(strategy, hooks, max_num_examples)
    raise TypeError(f"not a Flower strategy: {type(strategy).__name__}")


class _Forwarding:
    """Attribute reads the wrapper does not define go to the wrapped strategy."""

    strategy: Any

    def __getattr__(self, name: str) -> Any:
        if name == "strategy":  # not yet set (during construction or unpickling)
            raise AttributeError(name)
        return getattr(self.strategy, name)


class HookedStrategy(_Forwarding, Strategy):
    """A Message-API strategy with flwr-robust hooks around it (see :func:`with_hooks`).

    The wrapped strategy receives the replies that passed validation and the hooks (never
    another reply that shares a node id) and whose metrics conform to the round's majority
    layout, as copies restricted to it (see :mod:`.metrics`). Its own ``weighted_by_key`` is the
    example count that replies are validated on. Attributes the wrapper does not define
    (``fraction_train``, ...) are read from the wrapped strategy.
    """

    def __init__(
        self,
        strategy: Strategy,
        hooks: Sequence[StrategyHook],
        max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
    ) -> None:
        self.strategy = strategy
        self.pipeline = HookPipeline(hooks, max_num_examples)
        self.rounds = MessageRounds(self.pipeline)

    @property
    def reports(self) -> list[RoundReport]:
        """One report per training round (replies rejected before the wrapped strategy)."""
        return self.pipeline.reports

    @property
    def _count_key(self) -> str:
        return str(getattr(self.strategy, "weighted_by_key", "num-examples"))

    def summary(self) -> None:
        """The wrapped strategy's summary."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.rounds.configure(
            server_round, "train", arrays,
            lambda sent: self.strategy.configure_train(server_round, sent, config, grid),
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        started = time.perf_counter()
        global_arrays, messages, client_replies, sampled = self.rounds.take(
            server_round, replies, self._count_key
        )
        report = RoundReport(server_round, type(self.strategy).__name__, len(messages))
        passed = self.pipeline.screen(
            _reference(global_arrays, client_replies), client_replies, report, sampled
        )
        passed, forwarded = _conforming_messages(messages, passed, report)
        arrays, metrics = self.strategy.aggregate_train(server_round, forwarded)
        report.kept = sorted(r.node_id for r in passed)
        report.aggregated = arrays is not None
        new = None if arrays is None else arrayrecord_views(arrays)
        self.rounds.produced(new)
        self.pipeline.finish(report, new, started)
        if not messages:  # an empty round: exactly what the wrapped strategy returns
            return arrays, metrics
        metrics = MetricRecord() if metrics is None else metrics
        metrics.update(report.metrics())
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.rounds.configure(
            server_round, "evaluate", arrays,
            lambda sent: self.strategy.configure_evaluate(server_round, sent, config, grid),
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        global_arrays, messages, client_replies, sampled = self.rounds.take_evaluation(
            server_round, replies, self._count_key
        )
        valid, report = self.pipeline.screen_evaluation(
            server_round, global_arrays, client_replies, sampled,
            rule=type(self.strategy).__name__,
        )
        _, forwarded = _conforming_messages(messages, valid, report)
        return self.strategy.aggregate_evaluate(server_round, forwarded)


class HookedLegacyStrategy(_Forwarding, LegacyStrategy):
    """A legacy-API strategy with flwr-robust hooks around it (see :func:`with_hooks`)."""

    def __init__(
        self,
        strategy: LegacyStrategy,
        hooks: Sequence[StrategyHook],
        max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
    ) -> None:
        self.strategy = strategy
        self.pipeline = HookPipeline(hooks, max_num_examples)
        self.rounds = LegacyRounds(self.pipeline)

    @property
    def reports(self) -> list[RoundReport]:
        """One report per training round (results rejected before the wrapped strategy)."""
        return self.pipeline.reports

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return self.rounds.configure(
            server_round, "train", parameters,
            lambda sent: self.strategy.configure_fit(server_round, sent, client_manager),
            FitIns,
        )

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        started = time.perf_counter()
        global_arrays, replies, _, sampled = self.rounds.take(server_round, results, failures)
        report = RoundReport(server_round, type(self.strategy).__name__, len(replies))
        reference = _reference(global_arrays, replies)
        passed = self.pipeline.screen(reference, replies, report, sampled)
        passed, forwarded = _conforming_results(results, passed, report)
        parameters, metrics = self.strategy.aggregate_fit(server_round, forwarded, failures)
        report.kept = sorted(r.node_id for r in passed)
        report.aggregated = parameters is not None
        new = None
        if parameters is not None:
            new = dict(zip(reference, tensor_views(parameters.tensors).values(), strict=True))
        self.rounds.produced(new)
        self.pipeline.finish(report, new, started)
        if not results and not failures:
            return parameters, metrics
        return parameters, {**metrics, **report.metrics()}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.rounds.configure(
            server_round, "evaluate", parameters,
            lambda sent: self.strategy.configure_evaluate(server_round, sent, client_manager),
            EvaluateIns,
        )

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> Any:
        global_arrays, replies, sampled = self.rounds.take_evaluation(server_round, results)
        valid, report = self.pipeline.screen_evaluation(
            server_round, global_arrays, replies, sampled, rule=type(self.strategy).__name__
        )
        _, forwarded = _conforming_results(results, valid, report)
        return self.strategy.aggregate_evaluate(server_round, forwarded, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> Any:
        return self.strategy.evaluate(server_round, parameters)


def _reference(global_arrays: NamedArrays | None, replies: Sequence[ClientReply]) -> NamedArrays:
    """What replies are checked against: the model sent, or for a round this wrapper did
    not configure and with no model known, zeros in the layout most replies share (the
    wrapped strategy aggregates the weights itself; hooks that bind replies to the model,
    such as signature checks, then reject them: fail closed)."""
    return global_arrays if global_arrays is not None else majority_layout(replies)


def _in_order(passed: Sequence[ClientReply]) -> list[tuple[int, ClientReply]]:
    """The replies with their positions in the round's input, in input order."""
    return sorted(
        ((r.source, r) for r in passed if r.source is not None), key=lambda pair: pair[0]
    )


def _drop_nonconforming(
    passed: list[ClientReply], positions: list[int], report: RoundReport
) -> list[ClientReply]:
    """The replies at ``positions``; the others are rejected as ``inconsistent-reply``."""
    keep = set(positions)
    for position, reply in enumerate(passed):
        if position not in keep:
            report.rejected[reply.node_id] = reason(
                "inconsistent-reply",
                "its metrics lack a metric, or hold one in another form, that most replies "
                "carry (Flower's strategies refuse rounds of mixed replies)",
            )
    return [passed[i] for i in positions]


def _conforming_messages(
    messages: Sequence[Message], passed: Sequence[ClientReply], report: RoundReport
) -> tuple[list[ClientReply], list[Message]]:
    """The passed replies whose metrics conform (see :mod:`.metrics`) and the copies of
    their messages to forward, in the original order."""
    ordered = _in_order(passed)
    positions, copies = conforming_messages([messages[source] for source, _ in ordered])
    return _drop_nonconforming([r for _, r in ordered], positions, report), copies


def _conforming_results(
    results: Sequence[Any], passed: Sequence[ClientReply], report: RoundReport
) -> tuple[list[ClientReply], list[Any]]:
    """Like :func:`_conforming_messages` for legacy results."""
    ordered = _in_order(passed)
    positions, copies = conforming_results([results[source] for source, _ in ordered])
    return _drop_nonconforming([r for _, r in ordered], positions, report), copies
