"""The constructors of this package's own rule strategies, shared by both Flower APIs.

``message.GeometricMedian`` is ``class GeometricMedian(GeometricMedianRule, RobustStrategy)``:
the rule's parameters (keyword-only) come from here, the Flower API from the adapter. The
remaining keywords are Flower's FedAvg parameters of that API and the robust ones
(``hooks``, ``max_num_examples``, ``pre``, ...).
"""

from __future__ import annotations

from typing import Any

from ..aggregation.fltrust import ServerUpdateFn
from ._common import RobustStrategyMixin, constructor_arguments


class GeometricMedianRule(RobustStrategyMixin):
    rule = "geometric_median"

    def __init__(
        self,
        *,
        num_malicious: int | None = None,
        nu: float = 1e-6,
        tol: float = 1e-6,
        max_iter: int = 100,
        use_num_examples: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class NormClippingRule(RobustStrategyMixin):
    rule = "norm_clip"

    def __init__(self, *, max_norm: float | None = None, **kwargs: Any) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class CenteredClippingRule(RobustStrategyMixin):
    rule = "centered_clip"

    def __init__(
        self,
        *,
        num_malicious: int | None = None,
        radius: float | None = None,
        iterations: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class RFOut1dRule(RobustStrategyMixin):
    rule = "rfout_1d"

    def __init__(
        self,
        *,
        variant: str = "faithful",
        threshold: float = 3.0,
        clip_norm: float | None = None,
        noise_multiplier: float = 0.0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class MeaMedRule(RobustStrategyMixin):
    rule = "meamed"

    def __init__(self, *, num_malicious: int = 0, **kwargs: Any) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class FlameRule(RobustStrategyMixin):
    rule = "flame"

    def __init__(
        self,
        *,
        noise_lambda: float = 0.001,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class FoolsGoldRule(RobustStrategyMixin):
    rule = "foolsgold"

    def __init__(self, *, kappa: float = 1.0, **kwargs: Any) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class ClusterFilterRule(RobustStrategyMixin):
    rule = "cluster"

    def __init__(
        self,
        *,
        method: str = "kmeans",
        metric: str = "euclidean",
        min_cluster_size: int = 2,
        n_clusters: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class FLTrustRule(RobustStrategyMixin):
    rule = "fltrust"

    def __init__(self, *, server_update_fn: ServerUpdateFn | None = None, **kwargs: Any) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class DnCRule(RobustStrategyMixin):
    rule = "dnc"

    def __init__(
        self,
        *,
        num_malicious: int = 0,
        dnc_iterations: int = 1,
        dnc_subsample_dim: int = 10_000,
        dnc_filter_fraction: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class SignGuardRule(RobustStrategyMixin):
    rule = "signguard"

    def __init__(
        self,
        *,
        signguard_lower: float = 0.1,
        signguard_upper: float = 3.0,
        signguard_coordinate_fraction: float = 0.1,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class RobustLRRule(RobustStrategyMixin):
    rule = "robust_lr"

    def __init__(
        self,
        *,
        rlr_threshold: int = 4,
        rlr_server_lr: float = 1.0,
        rlr_weighted: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class FLDetectorRule(RobustStrategyMixin):
    rule = "fldetector"

    def __init__(
        self, *, fldetector_window: int = 10, fldetector_base_rule: str = "median", **kwargs: Any
    ) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


class ReputationRule(RobustStrategyMixin):
    rule = "reputation"

    def __init__(
        self,
        *,
        base_rule: str = "multi_krum",
        reputation_decay: float = 0.8,
        reputation_threshold: float = 0.5,
        reputation_initial: float = 1.0,
        reputation_score: str = "kept",
        **kwargs: Any,
    ) -> None:
        super().__init__(self.rule, **constructor_arguments(locals()))


__all__ = [
    "CenteredClippingRule",
    "ClusterFilterRule",
    "DnCRule",
    "FLDetectorRule",
    "FLTrustRule",
    "FlameRule",
    "FoolsGoldRule",
    "GeometricMedianRule",
    "MeaMedRule",
    "NormClippingRule",
    "RFOut1dRule",
    "ReputationRule",
    "RobustLRRule",
    "SignGuardRule",
]
