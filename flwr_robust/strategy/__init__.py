"""Flower strategies with robust aggregation, for the Message API (this package's
top-level names) and the legacy API (:mod:`flwr_robust.legacy`).

Flower's strategy names (``FedAvg``, ``FedMedian``, ``FedTrimmedAvg``, ``Krum``,
``MultiKrum``, ``Bulyan``) take Flower's constructor arguments, positional order included;
this package's rules have their own classes (``GeometricMedian``, ``Flame``, ...), and
:func:`make_strategy` builds any registered rule by name.
"""

from __future__ import annotations

from typing import Any

from ..aggregation import aggregator_class
from . import legacy as _legacy
from . import message as _message
from .engine import ClientReply, RobustAggregation, RoundReport
from .hooks import StrategyHook
from .message import (
    Bulyan,
    CenteredClipping,
    ClusterFilter,
    DnC,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Flame,
    FLDetector,
    FLTrust,
    FoolsGold,
    GeometricMedian,
    Krum,
    MeaMed,
    Median,
    MultiKrum,
    NormClipping,
    Reputation,
    RFOut1d,
    RobustLR,
    RobustStrategy,
    SignGuard,
    TrimmedMean,
)
from .wrappers import HookedLegacyStrategy, HookedStrategy, with_hooks

APIS = ("message", "legacy")


def make_strategy(name: str, api: str = "message", **kwargs: Any) -> Any:
    """A strategy for registry rule ``name`` (``fedavg`` included) on the chosen Flower API.

    Parameters
    ----------
    name : str
        A name from :func:`flwr_robust.aggregation.available_aggregators` (kebab-case ok).
    api : {"message", "legacy"}
        ``flwr.serverapp.strategy`` (``aggregate_train``) or ``flwr.server.strategy``
        (``aggregate_fit``).
    **kwargs
        Rule parameters (the registry's names and defaults, e.g. Multi-Krum's
        ``num_selected = n - f``, not the Flower-named classes' Flower defaults), ``pre`` (a pre-aggregation stage: ``nnm``, ``bucketing``, ``arc``)
        and its parameters, FedAvg parameters of that API, ``hooks`` and ``max_num_examples``.
    """
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    module = _message if api == "message" else _legacy
    return module.RobustStrategy(aggregator=aggregator_class(name).name, **kwargs)


__all__ = [
    "APIS",
    "Bulyan",
    "CenteredClipping",
    "ClientReply",
    "ClusterFilter",
    "DnC",
    "FLDetector",
    "FLTrust",
    "FedAvg",
    "FedMedian",
    "FedTrimmedAvg",
    "Flame",
    "FoolsGold",
    "GeometricMedian",
    "HookedLegacyStrategy",
    "HookedStrategy",
    "Krum",
    "MeaMed",
    "Median",
    "MultiKrum",
    "NormClipping",
    "RFOut1d",
    "Reputation",
    "RobustAggregation",
    "RobustLR",
    "RobustStrategy",
    "RoundReport",
    "SignGuard",
    "StrategyHook",
    "TrimmedMean",
    "make_strategy",
    "with_hooks",
]
