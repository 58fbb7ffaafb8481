"""Legacy-API strategies (``flwr.server.strategy.FedAvg`` subclasses, ``aggregate_fit``).

Flower's legacy names (``FedAvg``, ``FedMedian``, ``FedTrimmedAvg``, ``Krum``, ``Bulyan``)
with Flower's legacy constructor arguments, and the same rule classes as
:mod:`flwr_robust.strategy`, for ``ServerApp(server_fn=...)`` / ``start_grid`` applications.
"""

from .strategy.legacy import (
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

__all__ = [
    "Bulyan",
    "CenteredClipping",
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
    "Krum",
    "MeaMed",
    "Median",
    "MultiKrum",
    "NormClipping",
    "RFOut1d",
    "Reputation",
    "RobustLR",
    "RobustStrategy",
    "SignGuard",
    "TrimmedMean",
]
