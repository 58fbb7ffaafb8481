"""What the Message-API and legacy adapters share: constructor splitting, node minimums,
summaries, and documentation of the per-rule subclasses."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

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
        self._setup_robust(
            self._flower_base.__init__, aggregator, hooks, max_num_examples, kwargs
        )
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
        ``base_init`` (FedAvg's ``__init__``) with the FedAvg ones."""
        base_params = set(inspect.signature(base_init).parameters) - {"self"}
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
        unknown = sorted(set(base_kwargs) - base_params)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword argument(s) {', '.join(unknown)}; "
                f"rule parameters of {aggregator.name}: "
                f"{', '.join(aggregator_parameters(aggregator.name)) or 'none'}"
            )
        needed = aggregator.min_clients()
        for param in (self._min_nodes_param, self._min_available_param):
            given = base_kwargs.get(param)
            if given is not None and given < needed:
                raise ValueError(
                    f"{param}={given} is below the {needed} clients {aggregator!r} needs"
                )
            default = inspect.signature(base_init).parameters[param].default
            if given is None and default < needed:
                base_kwargs[param] = needed
                logger.info(
                    "%s needs at least %d clients per round: %s set to %d",
                    aggregator, needed, param, needed,
                )
        self.engine = RobustAggregation(aggregator, hooks, max_num_examples)
        base_init(self, **base_kwargs)

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


#: Strategy class name -> registry name of the rule-specific classes both APIs define.
RULE_STRATEGIES: dict[str, str] = {
    "Median": "median",
    "TrimmedMean": "trimmed_mean",
    "Krum": "krum",
    "MultiKrum": "multi_krum",
    "Bulyan": "bulyan",
    "GeometricMedian": "geometric_median",
    "NormClipping": "norm_clip",
    "CenteredClipping": "centered_clip",
    "RFOut1d": "rfout_1d",
    "MeaMed": "meamed",
    "Flame": "flame",
    "FoolsGold": "foolsgold",
    "ClusterFilter": "cluster",
    "Reputation": "reputation",
}


def rule_strategies(base: type, module: str) -> tuple[type, ...]:
    """The subclasses of ``base`` for :data:`RULE_STRATEGIES`, in its order, as if defined
    in ``module`` (each is ``class Krum(base): rule = "krum"`` with the rule's docstring)."""
    return tuple(
        type(name, (base,), {"rule": rule, "__module__": module, "__qualname__": name})
        for name, rule in RULE_STRATEGIES.items()
    )


__all__ = ["RULE_STRATEGIES", "RobustStrategyMixin", "rule_strategies"]
