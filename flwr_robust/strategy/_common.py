"""What the Message-API and legacy adapters share: constructor splitting, Flower's argument
names, node minimums, summaries, and documentation of the per-rule subclasses."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypedDict

from ..aggregation import Aggregator, aggregator_class, aggregator_parameters, get_aggregator
from ..validation import DEFAULT_MAX_NUM_EXAMPLES
from .engine import RobustAggregation
from .hooks import StrategyHook

logger = logging.getLogger("flwr.robust")


class RobustStrategyMixin:
    """Builds the :class:`RobustAggregation` engine and hands the rest to Flower's FedAvg.

    Subclasses set ``rule`` (a registry name) to become a rule-specific strategy, and the
    API adapters set the names of their node-count parameters.
    """

    rule: ClassVar[str | None] = None
    _flower_base: ClassVar[type]
    _rounds_class: ClassVar[type]
    _min_nodes_param: ClassVar[str]
    _min_available_param: ClassVar[str]
    engine: RobustAggregation

    def __init__(
        self,
        aggregator: Aggregator | str | None = None,
        *,
        hooks: Sequence[StrategyHook] = (),
        max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
        **kwargs: Any,
    ) -> None:
        base_init = self._flower_base.__init__  # type: ignore[misc]  # a class's own
        self._setup_robust(base_init, aggregator, hooks, max_num_examples, kwargs)
        self.rounds = self._rounds_class(self.engine)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Rule-specific subclasses (``rule = "krum"``) get a docstring from their rule."""
        super().__init_subclass__(**kwargs)
        if cls.rule is not None and cls.__dict__.get("__doc__") is None:
            parent = next(c for c in cls.__mro__[1:] if c.__dict__.get("rule") is None)
            rule_doc = inspect.getdoc(aggregator_class(cls.rule))
            cls.__doc__ = (
                f"{parent.__name__} aggregating with the ``{cls.rule}`` rule: takes the rule's "
                f"parameters ({', '.join(aggregator_parameters(cls.rule)) or 'none'}) and "
                f"those of :class:`{parent.__name__}` as keyword arguments.\n\n{rule_doc}"
            )

    def _setup_robust(
        self,
        base_init: Callable[..., None],
        aggregator: Aggregator | str | None,
        hooks: Sequence[StrategyHook],
        max_num_examples: int,
        kwargs: dict[str, Any],
    ) -> None:
        """Split ``kwargs`` into rule and FedAvg parameters, build the engine, call
        ``base_init`` (FedAvg's ``__init__``) with the FedAvg ones and settle the node
        minimums (see :meth:`_node_minimums`)."""
        base_params = inspect.signature(base_init).parameters
        if aggregator is None:
            aggregator = self.rule or "fedavg"
        if isinstance(aggregator, str):
            pre = kwargs.pop("pre", None)
            rule_params = set(aggregator_parameters(aggregator, pre=pre, params=kwargs))
            rule_kwargs = {k: v for k, v in kwargs.items() if k in rule_params}
            aggregator = get_aggregator(aggregator, pre=pre, **rule_kwargs)
        else:
            rule_kwargs = {}
        base_kwargs = {k: v for k, v in kwargs.items() if k not in rule_kwargs}
        unknown = sorted(set(base_kwargs) - set(base_params) - {"self"})
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword argument(s) {', '.join(unknown)}; "
                f"rule parameters of {aggregator.name}: "
                f"{', '.join(aggregator_parameters(aggregator.name)) or 'none'}"
            )
        self.engine = RobustAggregation(aggregator, hooks, max_num_examples)
        minimums = self._node_minimums(aggregator, base_params, base_kwargs)
        base_init(self, **{**base_kwargs, **minimums})

    def _node_minimums(
        self,
        aggregator: Aggregator,
        base_params: Mapping[str, inspect.Parameter],
        base_kwargs: dict[str, Any],
    ) -> dict[str, int]:
        """The training and availability minimums: Flower's default raised to the number of
        replies the rule needs (logged), or the user's value, which is never refused (a
        WARNING says how many replies the rule needs; a round with fewer valid replies keeps
        the global model and its report says why)."""
        needed = aggregator.min_clients()
        minimums: dict[str, int] = {}
        self._raised_minimums: dict[str, int] = {}
        for param in (self._min_nodes_param, self._min_available_param):
            given = base_kwargs.pop(param, None)
            default = base_params[param].default
            minimums[param] = max(default, needed) if given is None else given
            if given is None and needed > default:
                self._raised_minimums[param] = default
        if self._raised_minimums:
            logger.info(
                "%r needs at least %d replies per round: %s raised from Flower's default to "
                "%d", aggregator, needed, " and ".join(self._raised_minimums), needed,
            )
        low = [f"{p}={v}" for p, v in minimums.items() if v < needed]
        if low:
            logger.warning(
                "%s below the %d replies %r needs for its guarantee: rounds with fewer "
                "valid replies keep the global model", " and ".join(low), needed, aggregator,
            )
        return minimums

    def _log_why_waiting(self, available: int) -> None:
        """Say why the run waits when a raised minimum exceeds the connected nodes (Flower
        itself only logs the number it waits for)."""
        required = getattr(self, self._min_available_param)
        if available < required and self._min_available_param in self._raised_minimums:
            logger.warning(
                "%d nodes connected, waiting for %s=%d: %r needs %d replies per round "
                "(Flower's default is %d; pass %s to change it)",
                available, self._min_available_param, required, self.engine.aggregator,
                self.engine.aggregator.min_clients(),
                self._raised_minimums[self._min_available_param], self._min_available_param,
            )

    @property
    def aggregator(self) -> Aggregator:
        """The aggregation rule."""
        return self.engine.aggregator

    @property
    def reports(self) -> list:
        """One :class:`~flwr_robust.strategy.engine.RoundReport` per training round."""
        return self.engine.reports

    def _log_robust_summary(self) -> None:
        logger.info("\t├──> Robust aggregation: %r", self.engine.aggregator)
        logger.info("\t│\t├── Hooks: %s", [type(h).__name__ for h in self.engine.hooks] or "none")
        logger.info("\t│\t└── Max claimed examples: %d", self.engine.max_num_examples)


def constructor_arguments(
    local_vars: dict[str, Any], aliases: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A strategy constructor's arguments from its ``locals()``, ``**kwargs`` merged in.

    ``aliases`` maps a Flower argument name to this package's name of the same parameter
    (e.g. ``num_malicious_nodes`` -> ``num_malicious``). Both default to ``None``; the one
    given wins, both given must agree, and neither given leaves the rule's default.
    """
    args = {k: v for k, v in local_vars.items() if k not in ("self", "kwargs", "__class__")}
    args.update(local_vars.get("kwargs", {}))
    for flower_name, name in (aliases or {}).items():
        theirs, ours = args.pop(flower_name, None), args.pop(name, None)
        if theirs is not None and ours is not None and theirs != ours:
            raise TypeError(
                f"{flower_name}={theirs!r} and {name}={ours!r} name the same parameter and "
                "disagree; give one"
            )
        value = theirs if theirs is not None else ours
        if value is not None:
            args[name] = value
    return args


class RobustArguments(TypedDict, total=False):
    """Keyword arguments every robust strategy takes besides Flower's and its rule's."""

    #: Hooks applied around every round (signing, signature checks, telemetry, ...).
    hooks: Sequence[StrategyHook]
    #: Claimed example counts above this are rejected.
    max_num_examples: int
    #: A pre-aggregation stage before the rule: ``"nnm"``, ``"bucketing"`` or ``"arc"``.
    pre: str | None
    #: Bucketing's bucket size (with ``pre="bucketing"``).
    bucket_size: int


__all__ = ["RobustArguments", "RobustStrategyMixin", "constructor_arguments"]
