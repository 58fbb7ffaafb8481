"""Property-based fuzzing of every rule (Hypothesis): random shapes, honest clusters of any
scale and centre, outliers of any finite float32 magnitude at any position, any client order.

Asserted for every rule: a finite output, inputs never modified, exactly the same output for
every client order. For the robust rules, with
no more outliers than they are configured to tolerate: the output stays with the honest
clients (inside their per-coordinate range for coordinate-wise rules and for selection rules,
within a few honest radii for the others), whatever the outliers' magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from flwr_robust.aggregation import get_aggregator

FLOAT32_MAX = float(np.finfo(np.float32).max)

#: label -> (registry name, parameters given f, output guarantee with <= f outliers)
#: "box": inside the honest per-coordinate range; "ball": within BALL honest radii (the
#: geometric median's bound 2(1 - a)/(1 - 2a) for an outlier fraction a < 1/3 is below 4);
#: None: no robustness guarantee (finite output and order independence only).
BALL = 4.5
RULES = {
    "fedavg": ("fedavg", lambda f: {}, None),
    "median": ("median", lambda f: {"num_malicious": f}, "box"),
    "trimmed_mean": ("trimmed_mean", lambda f: {"num_malicious": f}, "box"),
    "meamed": ("meamed", lambda f: {"num_malicious": f}, "box"),
    "krum": ("krum", lambda f: {"num_malicious": f}, "box"),
    "multi_krum": ("multi_krum", lambda f: {"num_malicious": f}, "box"),
    "bulyan": ("bulyan", lambda f: {"num_malicious": f}, "box"),
    "geometric_median": ("geometric_median", lambda f: {"num_malicious": f}, "ball"),
    # clipping bounds each client's influence; it does not keep the output with the honest
    # clients when they lie far from the origin (the clipping centre)
    "centered_clip": ("centered_clip", lambda f: {"num_malicious": f}, None),
    "norm_clip": ("norm_clip", lambda f: {}, None),
    "rfout_faithful": ("rfout_1d", lambda f: {}, None),
    "rfout_robust": ("rfout_1d", lambda f: {"variant": "robust"}, "box"),
    "flame": ("flame", lambda f: {"noise_lambda": 0.0}, None),
    "cluster_hdbscan": ("cluster", lambda f: {"method": "hdbscan"}, None),
    "cluster_kmeans": ("cluster", lambda f: {}, None),
    "foolsgold": ("foolsgold", lambda f: {}, None),
    "cluster_kmeans3": ("cluster", lambda f: {"n_clusters": 3}, None),
    # one spectral direction per iteration: scattered outliers can survive (no guarantee)
    "dnc": ("dnc", lambda f: {"num_malicious": f}, None),
    # an outlier of the honest norm and signs passes both filters
    "signguard": ("signguard", lambda f: {}, None),
    "robust_lr": ("robust_lr", lambda f: {"rlr_threshold": 1}, None),
    # a single round: its base rule (the median) on every client
    "fldetector": ("fldetector", lambda f: {"num_malicious": f}, "box"),
    # server update: a fixed direction (its norm bound is tested in test_fltrust)
    "fltrust": ("fltrust", lambda f: {"server_update_fn": lambda w: [np.ones_like(x) for x in w]},
                None),
    "reputation": ("reputation", lambda f: {"num_malicious": f}, "box"),
    "krum_nnm": ("krum", lambda f: {"num_malicious": f, "pre": "nnm"}, "ball"),
    "median_nnm": ("median", lambda f: {"num_malicious": f, "pre": "nnm"}, "ball"),
    "multi_krum_arc": ("multi_krum", lambda f: {"num_malicious": f, "pre": "arc"}, "ball"),
}


@dataclass
class Case:
    """Honest rows, outlier rows and the layer split of one generated round."""

    honest: np.ndarray  # (h, d) float32
    outliers: np.ndarray  # (f, d) float32
    sizes: list[int]
    order: list[int]  # a permutation of all rows

    @property
    def rows(self) -> np.ndarray:
        return np.vstack([self.honest, self.outliers])

    def clients(self, permuted: bool) -> list[list[np.ndarray]]:
        rows = self.rows[self.order] if permuted else self.rows
        cuts = np.cumsum(self.sizes)[:-1]
        return [[part.copy() for part in np.split(row, cuts)] for row in rows]

    @property
    def scale(self) -> float:
        """The honest radius (largest distance of an honest row to the honest mean)."""
        centre = self.honest.astype(np.float64).mean(0)
        return float(np.max(np.linalg.norm(self.honest - centre, axis=1)))

    @property
    def rounding(self) -> float:
        """A few float32 ulps of the honest values."""
        return 1e-6 * float(np.max(np.abs(self.honest))) + 1e-30


@st.composite
def cases(draw: st.DrawFn, max_outliers: int = 3) -> Case:
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    d = sum(sizes)
    f = draw(st.integers(0, max_outliers))
    h = draw(st.integers(2 * f + 3, 2 * f + 7))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    spread = 10.0 ** draw(st.floats(-3, 3))
    centre = draw(st.floats(-1e3, 1e3)) * rng.random(d)
    honest = (centre + spread * rng.standard_normal((h, d))).astype(np.float32)
    outliers = np.empty((f, d), dtype=np.float32)
    for row in range(f):  # from 30 honest spreads away (clearly outliers) to float32 max
        exponent = draw(st.floats(1.5, 38.53))
        sign = rng.choice([-1.0, 1.0], size=d) if draw(st.booleans()) else 1.0
        magnitude = min(10.0**exponent * spread, FLOAT32_MAX)
        outliers[row] = np.clip(centre + sign * magnitude, -FLOAT32_MAX, FLOAT32_MAX)
    order = list(rng.permutation(h + f))
    return Case(honest, outliers, sizes, order)


def aggregate(label: str, case: Case, permuted: bool) -> np.ndarray:
    name, params, _ = RULES[label]
    f = len(case.outliers)
    clients = case.clients(permuted)
    before = [[layer.copy() for layer in client] for client in clients]
    ids = [f"c{i}" for i in (case.order if permuted else range(len(clients)))]
    rule = get_aggregator(name, **params(f))
    result = rule(clients, client_ids=ids)
    for client, copy in zip(clients, before, strict=True):  # inputs never modified
        for layer, original in zip(client, copy, strict=True):
            np.testing.assert_array_equal(layer, original)
    return np.concatenate([layer.reshape(-1) for layer in result.update]).astype(np.float64)


def check_rule(label: str, case: Case) -> None:
    plain = aggregate(label, case, permuted=False)
    assert np.all(np.isfinite(plain)), f"{label}: non-finite output"
    permuted = aggregate(label, case, permuted=True)
    # Rules see the clients in a canonical order of their values: exactly the same result.
    assert np.array_equal(plain, permuted), f"{label}: depends on the order"
    guarantee = RULES[label][2]
    honest = case.honest.astype(np.float64)
    margin = 1e-4 * case.scale + case.rounding
    if guarantee == "box":
        low, high = honest.min(0) - margin, honest.max(0) + margin
        assert np.all((plain >= low) & (plain <= high)), f"{label}: left the honest range"
    elif guarantee == "ball":
        distance = np.linalg.norm(plain - honest.mean(0))
        assert distance <= BALL * case.scale, f"{label}: {distance} from the honest mean"


@given(case=cases())
def test_coordinate_rules(case: Case) -> None:
    for label in ("median", "trimmed_mean", "meamed", "rfout_faithful", "rfout_robust"):
        check_rule(label, case)


@given(case=cases())
def test_selection_rules(case: Case) -> None:
    for label in ("krum", "multi_krum", "reputation"):
        check_rule(label, case)


@given(case=cases(max_outliers=2))
def test_bulyan(case: Case) -> None:
    if len(case.rows) >= 4 * len(case.outliers) + 3:
        check_rule("bulyan", case)


@given(case=cases())
def test_iterative_and_clipping_rules(case: Case) -> None:
    for label in ("geometric_median", "centered_clip", "norm_clip", "fedavg", "fltrust"):
        check_rule(label, case)


@given(case=cases())
def test_pre_aggregation(case: Case) -> None:
    for label in ("krum_nnm", "median_nnm", "multi_krum_arc"):
        check_rule(label, case)


@given(case=cases())
def test_clustering_and_history_rules(case: Case) -> None:
    for label in ("flame", "cluster_hdbscan", "cluster_kmeans", "cluster_kmeans3", "foolsgold"):
        check_rule(label, case)


@given(case=cases())
def test_issue13_rules(case: Case) -> None:
    for label in ("dnc", "signguard", "robust_lr", "fldetector"):
        check_rule(label, case)
