"""Framework-free robust aggregation core (numpy + compiled kernels, no Flower imports).

>>> from flwr_robust.aggregation import get_aggregator
>>> agg = get_aggregator("krum", num_malicious=2)
>>> result = agg(updates)              # updates[i] = client i's list of layer arrays
>>> result.update, result.kept, result.scores, result.rejected
>>> get_aggregator("median", pre="nnm", num_malicious=2)   # nearest-neighbour mixing first
>>> get_aggregator("foolsgold")(updates, client_ids=ids)   # stateful rules need identities
"""

from . import (  # noqa: F401 (registers)
    clipping,
    clustering,
    coordinate,
    distance,
    dnc,
    fldetector,
    fltrust,
    foolsgold,
    geometric,
    mean,
    reputation,
    rfout,
    robust_lr,
    signguard,
)
from .base import AggregationResult, Aggregator
from .clipping import NormClipping
from .clustering import ClusterFilter, Flame
from .coordinate import MeaMed, Median, TrimmedMean
from .distance import Bulyan, Krum, MultiKrum
from .dnc import DnC
from .fldetector import FLDetector
from .fltrust import FLTrust
from .foolsgold import FoolsGold
from .geometric import CenteredClipping, GeometricMedian
from .matrix import AnchoredGram, MixedUpdateMatrix, UpdateMatrix
from .mean import FedAvg
from .preaggregation import (
    AdaptiveRobustClipping,
    Bucketing,
    NearestNeighborMixing,
    PreAggregated,
    PreAggregation,
    available_pre_aggregations,
    pre_aggregation_class,
)
from .registry import (
    aggregator_class,
    aggregator_factories,
    aggregator_parameters,
    available_aggregators,
    canonical_name,
    get_aggregator,
)
from .reputation import Reputation
from .rfout import RFOut1d
from .robust_lr import RobustLR
from .signguard import SignGuard

__all__ = [
    "AdaptiveRobustClipping",
    "AggregationResult",
    "Aggregator",
    "AnchoredGram",
    "Bucketing",
    "Bulyan",
    "CenteredClipping",
    "ClusterFilter",
    "DnC",
    "FLDetector",
    "FLTrust",
    "FedAvg",
    "Flame",
    "FoolsGold",
    "GeometricMedian",
    "Krum",
    "MeaMed",
    "Median",
    "MixedUpdateMatrix",
    "MultiKrum",
    "NearestNeighborMixing",
    "NormClipping",
    "PreAggregated",
    "PreAggregation",
    "RFOut1d",
    "Reputation",
    "RobustLR",
    "SignGuard",
    "TrimmedMean",
    "UpdateMatrix",
    "aggregator_class",
    "aggregator_factories",
    "aggregator_parameters",
    "available_aggregators",
    "available_pre_aggregations",
    "canonical_name",
    "get_aggregator",
    "pre_aggregation_class",
]
