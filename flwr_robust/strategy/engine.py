"""The round logic both Flower adapters share: validate, filter, aggregate deltas, report.

Adapters convert Flower replies into :class:`ClientReply` objects (read-only array views)
and call :meth:`RobustAggregation.aggregate` with the global model they sent; everything
between the wire and the new global model happens here, once, for both APIs.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..aggregation import Aggregator
from ..validation import (
    AGGREGATION_FAILED,
    DEFAULT_MAX_NUM_EXAMPLES,
    check_arrays,
    check_metrics,
    check_num_examples,
    reason,
    reason_code,
)
from .hooks import StrategyHook

logger = logging.getLogger("flwr.robust")

NamedArrays = dict[str, np.ndarray]


@dataclass
class ClientReply:
    """One client's reply, independent of the Flower API it came through.

    Attributes
    ----------
    node_id : int
        The Flower node id the reply came from.
    arrays : dict[str, np.ndarray] or None
        Named read-only arrays (``None`` when the reply carried none or they were unreadable).
    num_examples : Any
        The claimed example count, unvalidated.
    metrics : Mapping[str, Any]
        The reply's metrics (legacy replies: ``num-examples`` holds ``FitRes.num_examples``).
    signature : Mapping[str, Any] or None
        The signature fields (``frs-*``) the reply carried where its wire format puts them.
    signed : Mapping[str, Any] or None
        The content map a signature of this reply covers, when it differs from ``metrics``
        (legacy replies: see :func:`flwr_robust.security.signing.legacy_reply_content`).
    error : str or None
        A rejection reason already known when the reply was read (error reply, malformed
        bytes or records).
    identity : str
        Stable identity used by stateful rules; the node id unless a hook (e.g. signature
        verification) sets a better one such as the signer's key id.
    source : int or None
        Position of the Flower reply it was read from: wrappers forward exactly the replies
        that passed, never others that share a node id.
    """

    node_id: int
    arrays: NamedArrays | None = None
    num_examples: Any = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    signature: Mapping[str, Any] | None = None
    signed: Mapping[str, Any] | None = None
    error: str | None = None
    identity: str = ""
    source: int | None = None

    def __post_init__(self) -> None:
        if not self.identity:
            self.identity = f"node-{self.node_id}"

    @property
    def signed_content(self) -> Mapping[str, Any]:
        """The map a signature of this reply covers."""
        return self.metrics if self.signed is None else self.signed


@dataclass
class RoundReport:
    """What happened to every reply of one training round."""

    server_round: int
    rule: str
    num_replies: int
    kept: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)
    identities: dict[int, str] = field(default_factory=dict)
    aggregated: bool = False
    note: str = ""
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    #: ``"aggregation-failed: ..."`` when the rule raised or its model was not finite.
    failure: str = ""

    def rejection_counts(self) -> dict[str, int]:
        """Number of rejected replies per reason code."""
        return dict(Counter(reason_code(text) for text in self.rejected.values()))

    def metrics(self) -> dict[str, int | float]:
        """Counters for the round's MetricRecord / metrics dict (numbers only)."""
        counts = {f"robust-rejected-{code}": n for code, n in self.rejection_counts().items()}
        return {
            "robust-replies": self.num_replies,
            "robust-kept": len(self.kept),
            "robust-rejected": len(self.rejected),
            "robust-aggregated": int(self.aggregated),
            "robust-aggregation-failed": int(bool(self.failure)),
            **counts,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (node ids as strings in mappings)."""
        return {
            "round": self.server_round,
            "rule": self.rule,
            "num_replies": self.num_replies,
            "aggregated": self.aggregated,
            "note": self.note,
            "failure": self.failure,
            "kept": self.kept,
            "rejected": {str(k): v for k, v in self.rejected.items()},
            "rejection_counts": self.rejection_counts(),
            "scores": {str(k): v for k, v in self.scores.items()},
            "identities": {str(k): v for k, v in self.identities.items()},
            "seconds": round(self.seconds, 6),
            "info": self.info,
        }


class HookPipeline:
    """Reply validation and strategy hooks around any aggregation: what both the robust
    strategies and :mod:`~flwr_robust.strategy.wrappers` (hooks around another strategy)
    share.

    Guarantees, for any reply content: no exception escapes :meth:`screen`,
    :meth:`screen_evaluation` or :meth:`RobustAggregation.aggregate` (a hook that raises
    rejects every reply still in the pipeline, ``hook-failed``); every node id that replied
    more than once has all its replies rejected (``duplicate-reply``: no copy can displace
    the genuine one); replies from nodes the round did not sample are rejected
    (``unsampled-node``).

    Parameters
    ----------
    hooks : sequence of StrategyHook
        Called in order around every round (e.g. signing, signature checks, anomaly
        filters, telemetry).
    max_num_examples : int
        Claimed example counts above this are rejected as absurd.
    """

    def __init__(
        self, hooks: Sequence[StrategyHook] = (), max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES
    ) -> None:
        self.hooks = list(hooks)
        self.max_num_examples = int(max_num_examples)
        self.reports: list[RoundReport] = []
        #: One report per evaluation round that received replies.
        self.evaluation_reports: list[RoundReport] = []
        #: Added to Flower's round numbers in logs (a resumed run continues the count).
        self.round_offset = 0

    def model_override(self, server_round: int) -> NamedArrays | None:
        """The replacement global model the first hook offering one provides, if any."""
        for hook in self.hooks:
            override = hook.global_model_override(server_round)
            if override is not None:
                logger.warning(
                    "round %d: %s replaced the global model before training",
                    server_round, type(hook).__name__,
                )
                return override
        return None

    def instruction_config(
        self,
        server_round: int,
        purpose: str,
        global_arrays: NamedArrays,
        config: Mapping[str, Any],
        normalise: Callable[[dict[str, Any]], dict[str, Any]] = dict,
    ) -> dict[str, Any]:
        """The final config of an outgoing train/evaluate instruction.

        Every hook's :meth:`~StrategyHook.on_instruction` entries are added in hook order
        (each hook sees the entries of the hooks before it); ``normalise`` then gives the
        config exactly as the clients will read it (e.g. through a Flower ConfigRecord);
        last, every hook's :meth:`~StrategyHook.seal_instruction` (e.g. the server's
        signature) sees that final config and adds its entries. So a signature always
        covers the config that is sent, whatever the hooks' order.
        """
        final = dict(config)
        for hook in self.hooks:
            final.update(hook.on_instruction(server_round, purpose, global_arrays, dict(final)))
        final = normalise(final)
        for hook in self.hooks:
            final.update(
                hook.seal_instruction(server_round, purpose, global_arrays, dict(final))
            )
        return final

    def report_for(self, server_round: int) -> RoundReport | None:
        """The report of ``server_round`` (the latest one if the round ran twice)."""
        for report in reversed(self.reports):
            if report.server_round == server_round:
                return report
        return None

    def screen(
        self,
        global_arrays: NamedArrays,
        replies: Sequence[ClientReply],
        report: RoundReport,
        sampled: Collection[int] | None = None,
    ) -> list[ClientReply]:
        """The training replies that pass validation and every hook; the others go to
        ``report.rejected`` with their reasons. ``sampled`` (when known) is the set of node
        ids the round's instructions went to."""
        valid = [
            reply for reply in self._common_checks(replies, report, sampled)
            if not self._reject(report, reply, self._training_problem(global_arrays, reply))
        ]
        valid = self._run_hooks(
            "on_replies", report, valid,
            lambda hook, current: hook.on_replies(report.server_round, global_arrays, current),
        )
        report.identities = {r.node_id: r.identity for r in replies}
        return valid

    def screen_evaluation(
        self,
        server_round: int,
        global_arrays: NamedArrays | None,
        replies: Sequence[ClientReply],
        sampled: Collection[int] | None = None,
        rule: str = "evaluation",
    ) -> tuple[list[ClientReply], RoundReport]:
        """The evaluation replies that pass validation and every hook's
        :meth:`~StrategyHook.on_evaluation_replies`, and the round's evaluation report
        (rejections logged and recorded in :attr:`evaluation_reports`)."""
        report = RoundReport(server_round, rule, num_replies=len(replies))
        valid = [
            reply for reply in self._common_checks(replies, report, sampled)
            if not self._reject(report, reply, self._evaluation_problem(reply))
        ]
        if global_arrays is not None:
            valid = self._run_hooks(
                "on_evaluation_replies", report, valid,
                lambda hook, current: hook.on_evaluation_replies(
                    server_round, global_arrays, current
                ),
            )
        report.kept = sorted(r.node_id for r in valid)
        report.identities = {r.node_id: r.identity for r in replies}
        if replies:
            self.evaluation_reports.append(report)
        rnd = server_round + self.round_offset
        if report.rejected:
            logger.info("round %d: ignored %d of %d evaluation replies", rnd,
                        len(report.rejected), len(replies))
        for node_id, text in sorted(report.rejected.items()):
            logger.debug("round %d: ignored evaluation reply of node %d: %s", rnd, node_id, text)
        return valid, report

    def finish(self, report: RoundReport, new_arrays: NamedArrays | None, started: float) -> None:
        """Record, log and hand the round's outcome to the hooks (a hook that raises is
        logged; the round is complete either way)."""
        report.seconds = time.perf_counter() - started
        self.reports.append(report)
        self._log(report)
        for hook in self.hooks:
            try:
                hook.on_round_end(report, new_arrays)
            except Exception:
                logger.exception(
                    "round %d: %s.on_round_end failed", report.server_round, type(hook).__name__
                )

    # ------------------------------------------------------------------ checks
    def _common_checks(
        self,
        replies: Sequence[ClientReply],
        report: RoundReport,
        sampled: Collection[int] | None,
    ) -> list[ClientReply]:
        """Replies that are single copies from sampled nodes; the others are rejected."""
        copies = Counter(reply.node_id for reply in replies)
        passed = []
        for reply in replies:
            if copies[reply.node_id] > 1:
                report.rejected[reply.node_id] = reason(
                    "duplicate-reply",
                    f"{copies[reply.node_id]} replies from this node this round: every copy "
                    "is rejected",
                )
            elif sampled is not None and reply.node_id not in sampled:
                report.rejected[reply.node_id] = reason(
                    "unsampled-node", "this round's instructions did not go to this node"
                )
            else:
                passed.append(reply)
        return passed

    @staticmethod
    def _reject(report: RoundReport, reply: ClientReply, problem: str | None) -> bool:
        if problem is not None:
            report.rejected[reply.node_id] = problem
        return problem is not None

    def _training_problem(self, global_arrays: NamedArrays, reply: ClientReply) -> str | None:
        if reply.error is not None:
            return reply.error
        if reply.arrays is None:
            return reason("missing-arrays", "reply carries no model arrays")
        return (
            check_arrays(reply.arrays, global_arrays)
            or check_num_examples(reply.num_examples, self.max_num_examples)
            or check_metrics(reply.metrics)
        )

    def _evaluation_problem(self, reply: ClientReply) -> str | None:
        if reply.error is not None:
            return reply.error
        return check_metrics(reply.metrics) or check_num_examples(
            reply.num_examples, self.max_num_examples
        )

    def _run_hooks(
        self,
        method: str,
        report: RoundReport,
        valid: list[ClientReply],
        call: Callable[[StrategyHook, list[ClientReply]], Mapping[int, str]],
    ) -> list[ClientReply]:
        """Apply each hook's rejections in order; a hook that raises rejects every reply
        still in the pipeline (fail closed)."""
        for hook in self.hooks:
            if not valid:
                break
            try:
                rejected = dict(call(hook, valid))
            except Exception as exc:
                logger.exception(
                    "round %d: %s.%s failed; rejecting the round's remaining replies",
                    report.server_round, type(hook).__name__, method,
                )
                problem = reason(
                    "hook-failed", f"{type(hook).__name__} raised {type(exc).__name__}: {exc}"
                )
                rejected = {reply.node_id: problem for reply in valid}
            known = {reply.node_id for reply in valid}
            report.rejected.update({k: str(v) for k, v in rejected.items() if k in known})
            valid = [r for r in valid if r.node_id not in rejected]
        return valid

    def _log(self, report: RoundReport) -> None:
        """One INFO (or WARNING) line per round; each rejection's reason at DEBUG."""
        rnd = report.server_round + self.round_offset
        counts = ", ".join(f"{code} {n}" for code, n in sorted(report.rejection_counts().items()))
        rejected = f"; rejected {len(report.rejected)} ({counts})" if report.rejected else ""
        if report.aggregated:
            logger.info("round %d: %s kept %d of %d replies%s", rnd, report.rule,
                        len(report.kept), report.num_replies, rejected)
        else:
            logger.warning("round %d: %s%s", rnd, report.failure or report.note, rejected)
        for node_id, text in sorted(report.rejected.items()):
            logger.debug("round %d: rejected node %d: %s", rnd, node_id, text)


class RobustAggregation(HookPipeline):
    """Validation, hooks and a robust rule applied to one round's replies.

    Belt and braces: when the rule raises, or the model it gives is not finite, the round
    keeps the global model and its report says why (``failure``, code
    ``aggregation-failed``).

    Parameters
    ----------
    aggregator : Aggregator
        The rule aggregating client deltas (client weights minus the global model sent).
    hooks, max_num_examples
        See :class:`HookPipeline`.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        hooks: Sequence[StrategyHook] = (),
        max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
    ) -> None:
        super().__init__(hooks, max_num_examples)
        self.aggregator = aggregator

    def aggregate(
        self,
        server_round: int,
        global_arrays: NamedArrays | None,
        replies: Sequence[ClientReply],
        sampled: Collection[int] | None = None,
    ) -> tuple[NamedArrays | None, RoundReport]:
        """New global model (or ``None`` to keep the current one) and the round's report.

        ``global_arrays`` is the model the replies build on. When it is unknown (``None``:
        the strategy neither sent nor was given one), a translation-equivariant rule
        aggregates the client weights directly (against zeros in the layout most replies
        share), which gives the same model; any other rule keeps the model, with the reason.
        """
        started = time.perf_counter()
        report = RoundReport(server_round, self.aggregator.name, num_replies=len(replies))
        if global_arrays is None:
            if not self.aggregator.translation_equivariant():
                report.note = (
                    f"kept the global model: {self.aggregator!r} aggregates updates relative "
                    "to the global model, and this strategy has neither sent nor been given "
                    "one (configure the round first, or pass the initial model)"
                )
                self.finish(report, None, started)
                return None, report
            global_arrays = majority_layout(replies)
            report.info["reference"] = "zeros: no global model known"
        valid = self.screen(global_arrays, replies, report, sampled)
        new_arrays = None
        needed = self.aggregator.min_clients()
        if len(valid) < needed:
            report.note = (
                f"kept the global model: {len(valid)} valid replies, "
                f"{self.aggregator!r} needs at least {needed}"
            )
        else:
            try:
                new_arrays = self._apply_rule(global_arrays, valid, report)
            except Exception as exc:
                logger.debug("aggregation failed", exc_info=True)
                report.failure = reason(
                    AGGREGATION_FAILED,
                    f"{self.aggregator.name} raised {type(exc).__name__}: {exc}; kept the "
                    "global model",
                )
            if new_arrays is not None and not all_finite(new_arrays):
                report.failure = reason(
                    AGGREGATION_FAILED,
                    f"{self.aggregator.name} gave a non-finite model; kept the global model",
                )
                new_arrays = None
            if new_arrays is None:
                report.aggregated, report.kept, report.scores = False, [], {}
        self.finish(report, new_arrays, started)
        return new_arrays, report

    def _apply_rule(
        self, global_arrays: NamedArrays, valid: list[ClientReply], report: RoundReport
    ) -> NamedArrays:
        names = list(global_arrays)
        base = [global_arrays[name] for name in names]
        result = self.aggregator(
            [[reply.arrays[name] for name in names] for reply in valid],  # type: ignore[index]
            num_examples=[float(reply.num_examples) for reply in valid],
            client_ids=[reply.identity for reply in valid],
            base=base,
        )
        with np.errstate(over="ignore", invalid="ignore"):
            new_arrays = {
                name: apply_delta(base_layer, delta)
                for name, base_layer, delta in zip(names, base, result.update, strict=True)
            }
        report.aggregated = True
        report.kept = sorted(valid[i].node_id for i in result.kept)
        for index, text in result.rejected.items():
            report.rejected[valid[index].node_id] = reason(
                "excluded-by-rule", f"{self.aggregator.name}: {text}"
            )
        if result.scores is not None:
            report.scores = {valid[i].node_id: float(s) for i, s in enumerate(result.scores)}
        report.info = {**report.info, **result.info}
        return new_arrays


def majority_layout(replies: Sequence[ClientReply]) -> NamedArrays:
    """Zero arrays in the layout (names, shapes, dtypes) that most nodes' replies share.

    Each node votes once (a node with several replies does not vote); a tie goes to the
    smallest layout in a fixed order, so neither the replies' order nor a minority decides.
    """
    copies = Counter(reply.node_id for reply in replies)
    votes: Counter[tuple[tuple[str, tuple[int, ...], str], ...]] = Counter()
    for reply in replies:
        if reply.error is None and reply.arrays is not None and copies[reply.node_id] == 1:
            votes[tuple((name, a.shape, a.dtype.str) for name, a in reply.arrays.items())] += 1
    if not votes:
        return {}
    most = max(votes.values())
    layout = min(key for key, count in votes.items() if count == most)
    return {name: np.zeros(shape, dtype=np.dtype(dtype)) for name, shape, dtype in layout}


def apply_delta(base: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``base + delta`` in ``base``'s dtype: computed in float64 for other dtypes than
    float32 (integer layers rounded to the nearest integer, not truncated)."""
    if base.dtype == np.float32:
        return base + delta
    total = base.astype(np.float64) + delta
    if base.dtype.kind in "iub":
        total = np.rint(total)
    return total.astype(base.dtype)


def all_finite(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether every float value of ``arrays`` is finite."""
    for array in arrays.values():
        if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
            return False
    return True
