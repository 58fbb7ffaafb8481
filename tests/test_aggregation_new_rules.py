"""Issue 13 rules on constructed cases: DnC, SignGuard, robust learning rate, FLDetector,
and the cluster filter's number of clusters."""

from __future__ import annotations

import inspect
import logging

import numpy as np
import pytest

from flwr_robust.aggregation import (
    DnC,
    FLDetector,
    RobustLR,
    SignGuard,
    aggregator_factories,
    available_aggregators,
    get_aggregator,
)
from flwr_robust.aggregation.clustering import farthest_point_seeds
from flwr_robust.aggregation.fldetector import (
    gap_statistic_clusters,
    kmeans_1d_costs,
    lbfgs_hvp_coefficients,
    upper_cluster,
)
from flwr_robust.aggregation.matrix import squared_distances
from flwr_robust.aggregation.signguard import scaled_by_maximum, sign_features
from tests.aggregation_helpers import clients, flat, rows

NEW = ("dnc", "signguard", "robust_lr", "fldetector")


def test_rules_are_registered_with_their_classes() -> None:
    assert set(NEW) <= set(available_aggregators())
    for name, cls in zip(NEW, (DnC, SignGuard, RobustLR, FLDetector), strict=True):
        assert type(get_aggregator(name)) is cls
        assert cls.__doc__ and "20" in cls.__doc__  # cites its paper (venue, year)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("dnc", {"dnc_subsample_dim": 0}, "dnc_subsample_dim must be >= 1"),
        ("dnc", {"dnc_iterations": 1.5}, "dnc_iterations must be an integer"),
        ("dnc", {"dnc_filter_fraction": -0.5}, "dnc_filter_fraction must be >= 0"),
        ("dnc", {"num_malicious": -1}, "num_malicious must be >= 0"),
        ("dnc", {"seed": None}, "seed must be an integer"),
        ("signguard", {"signguard_lower": -1}, "signguard_lower must be >= 0"),
        ("signguard", {"signguard_upper": 0.5}, "signguard_upper must be >= 1"),
        ("signguard", {"signguard_lower": 2.0, "signguard_upper": 1.5}, "signguard_upper"),
        ("signguard", {"signguard_coordinate_fraction": 0}, "must be > 0"),
        ("signguard", {"signguard_coordinate_fraction": 1.5}, "must be <= 1"),
        ("robust_lr", {"rlr_threshold": 0}, "rlr_threshold must be >= 1"),
        ("robust_lr", {"rlr_server_lr": 0.0}, "rlr_server_lr must be > 0"),
        ("robust_lr", {"rlr_weighted": "yes"}, "rlr_weighted must be a bool"),
        ("fldetector", {"fldetector_window": 0}, "fldetector_window must be >= 1"),
        ("fldetector", {"fldetector_base_rule": "reputation"}, "cannot wrap 'reputation'"),
        ("fldetector", {"fldetector_base_rule": "fldetector"}, "cannot wrap 'fldetector'"),
        ("fldetector", {"fldetector_base_rule": "nope"}, "unknown aggregator"),
        ("fldetector", {"kappa": 1.0}, "does not take kappa"),  # median takes no kappa
        ("cluster", {"n_clusters": 1}, "n_clusters must be >= 2"),
    ],
)
def test_invalid_parameters_are_refused(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_aggregator(name, **params)


def test_preconditions_name_the_rule() -> None:
    with pytest.raises(ValueError, match="dnc .* needs at least 3 clients"):
        get_aggregator("dnc", num_malicious=2)(clients([1.0], [2.0]))
    with pytest.raises(ValueError, match="robust_lr .* needs at least 6 clients"):
        get_aggregator("robust_lr")(clients([1.0], [2.0], [3.0], [4.0], [5.0]))
    with pytest.raises(ValueError, match="client_ids"):
        get_aggregator("fldetector")(clients([1.0], [2.0], [3.0]))


# ------------------------------------------------------------------------------------ DnC
DNC_CASE = [[1, 0], [-1, 0], [0, 1], [0, -1], [10, 0]]


def test_dnc_hand_case_scores_and_drops_the_outlier_direction() -> None:
    """mean (2, 0); centred rows (-1,0), (-3,0), (-2,1), (-2,-1), (8,0); X_c^T X_c =
    diag(82, 2): v = e_1 and the scores are the squared first coordinates 1, 9, 4, 4, 64."""
    result = get_aggregator("dnc", num_malicious=1)(clients(*DNC_CASE))
    np.testing.assert_allclose(result.scores, [1, 9, 4, 4, 64], rtol=1e-9)
    assert result.kept == [0, 1, 2, 3]
    assert "DnC outlier score" in result.rejected[4]
    np.testing.assert_allclose(flat(result), [0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(result.weights, [0.25, 0.25, 0.25, 0.25, 0.0])


def test_dnc_filter_fraction_sets_how_many_are_removed() -> None:
    # c * f = 0.5 * 2 -> 1 removed; c = 0 -> nothing removed (the plain mean)
    half = get_aggregator("dnc", num_malicious=2, dnc_filter_fraction=0.5)(clients(*DNC_CASE))
    assert half.kept == [0, 1, 2, 3]
    none = get_aggregator("dnc", num_malicious=2, dnc_filter_fraction=0.0)(clients(*DNC_CASE))
    np.testing.assert_allclose(flat(none), [2.0, 0.0], rtol=1e-6)
    both = get_aggregator("dnc", num_malicious=2)(clients(*DNC_CASE))
    assert both.kept == [0, 2, 3]  # then the next highest score, 9 (client 1)


def test_dnc_subsamples_reproducibly_and_continues_draws_until_reset() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 60)).astype(np.float32)
    x[4] += 30.0 * rng.standard_normal(60).astype(np.float32)
    rule = get_aggregator("dnc", num_malicious=1, dnc_subsample_dim=8, dnc_iterations=3)
    first = rule(rows(x))
    assert first.info["coordinates"] == 8 and 4 not in first.kept
    second = rule(rows(x))
    assert not np.array_equal(first.scores, second.scores)  # new coordinates
    rule.reset()
    np.testing.assert_array_equal(rule(rows(x)).scores, first.scores)
    other_seed = get_aggregator("dnc", num_malicious=1, dnc_subsample_dim=8, seed=7)(rows(x))
    assert not np.array_equal(other_seed.scores, first.scores)


def test_dnc_empty_intersection_keeps_the_clients_kept_most_often() -> None:
    # Each iteration sees one coordinate: client 0 is extreme on coordinate 0 only and
    # client 1 on coordinate 1 only; with the two iterations removing different clients
    # the intersection still holds the other three.
    x = np.array([[9, 0], [0, 9], [1, 1], [1, -1], [-1, 1]], np.float32)
    rule = get_aggregator("dnc", num_malicious=1, dnc_subsample_dim=1, dnc_iterations=40)
    result = rule(clients(*x))
    assert result.kept == [2, 3, 4]
    np.testing.assert_allclose(flat(result), x[2:].mean(0), rtol=1e-6)


# ------------------------------------------------------------------------------ SignGuard
def honest_and_bad(rng: np.random.Generator) -> np.ndarray:
    base = 1.0 + 0.1 * rng.standard_normal(30)
    honest = base + 0.3 * rng.standard_normal((7, 30))
    flipped = -honest[:1]  # same norm as an honest update, every sign reversed
    huge = 100.0 * honest[1:2]  # same signs, 100 times the norm
    return np.concatenate([honest, flipped, huge]).astype(np.float32)


def test_signguard_rejects_a_sign_flipped_and_a_huge_update() -> None:
    x = honest_and_bad(np.random.default_rng(0))
    rule = get_aggregator("signguard", signguard_coordinate_fraction=1.0)
    result = rule(rows(x))
    assert result.kept == list(range(7))
    assert "sign statistics" in result.rejected[7] and "norm ratio" not in result.rejected[7]
    assert "norm ratio" in result.rejected[8]
    # expected: the honest updates clipped to the median norm of all nine, averaged
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    bound = np.median(norms)
    expected = (x[:7] * np.minimum(1.0, bound / norms[:7])[:, None]).mean(0)
    np.testing.assert_allclose(flat(result), expected, rtol=1e-5)
    np.testing.assert_allclose(result.scores, norms / bound, rtol=1e-6)
    assert result.info["clip_bound"] == pytest.approx(bound)


def test_signguard_norm_filter_bounds_are_the_papers() -> None:
    # median norm 1: ratios 0.05 (< L = 0.1) and 3.5 (> R = 3) are out, 0.1 and 3.0 in
    x = np.array([[1.0], [1.0], [1.0], [1.0], [0.05], [0.1], [3.0], [3.5], [1.0]], np.float32)
    result = get_aggregator("signguard")(clients(*x))
    assert sorted(result.rejected) == [4, 7]
    assert all("norm ratio" in text for text in result.rejected.values())


def test_sign_features_are_fractions_of_positive_zero_negative() -> None:
    features = sign_features(np.array([[1.0, 0.0, -2.0, 3.0], [0.0, 0.0, 0.0, -1.0]]))
    np.testing.assert_allclose(features, [[0.5, 0.25, 0.25], [0.0, 0.75, 0.25]])


def test_signguard_with_no_survivor_returns_zero(caplog: pytest.LogCaptureFixture) -> None:
    # median norm 1: the three positive updates (norm ratios 0.014, 0.022, 99.5) fail the norm
    # filter, the two negative ones the sign filter (the positive cluster is larger)
    x = np.array([[0.01, 0.01], [0.01, 0.02], [100, 1], [-1, -0.1], [-0.1, -1]], np.float32)
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        result = get_aggregator("signguard", signguard_coordinate_fraction=1.0)(clients(*x))
    assert result.kept == [] and not np.any(flat(result))
    assert "no update passed both filters" in caplog.text


# ------------------------------------------------------------------------------ robust LR
def test_robust_lr_flips_split_coordinates_and_keeps_agreeing_ones() -> None:
    """theta = 3. Coordinate 0: 5 positive signs (kept, +eta). Coordinate 1: 3 positive,
    2 negative, |sum| = 1 (flipped, -eta). Coordinate 2: 4 positive, one zero, |sum| = 4
    (kept). Weighted mean with counts 1, 1, 2, 2, 4 (sum 10), eta = 0.5."""
    x = np.array(
        [[1, 2, 1], [2, -1, 0], [1, 1, 2], [3, -2, 1], [1, 1, 1]], np.float32
    )
    counts = [1, 1, 2, 2, 4]
    mean = (np.array(counts)[:, None] * x).sum(0) / 10.0  # (1.5, 0.3, 1.1)
    rule = get_aggregator("robust_lr", rlr_threshold=3, rlr_server_lr=0.5)
    result = rule(clients(*x), num_examples=counts)
    np.testing.assert_allclose(flat(result), [0.75, -0.15, 0.55], rtol=1e-6)
    np.testing.assert_allclose(flat(result), 0.5 * mean * np.array([1, -1, 1]), rtol=1e-6)
    assert result.kept == [0, 1, 2, 3, 4] and result.info["flipped"] == 1
    unweighted = get_aggregator("robust_lr", rlr_threshold=3, rlr_weighted=False)(
        clients(*x), num_examples=counts
    )
    np.testing.assert_allclose(flat(unweighted), x.mean(0) * [1, -1, 1], rtol=1e-6)


def test_robust_lr_reverses_a_minority_backdoor_direction() -> None:
    # 8 honest updates agree on coordinates 0..2; 2 attackers push coordinate 3, where the
    # honest signs are split evenly: the step on coordinate 3 is reversed
    rng = np.random.default_rng(1)
    honest = np.abs(rng.standard_normal((8, 4))) + 0.1
    honest[:, 3] = [0.1, -0.1] * 4
    bad = np.array([[0.2, 0.2, 0.2, 5.0]] * 2)
    x = np.concatenate([honest, bad]).astype(np.float32)
    out = flat(get_aggregator("robust_lr", rlr_threshold=4)(clients(*x)))
    assert out[3] < 0 < out[:3].min()


def test_robust_lr_saturates_instead_of_overflowing(caplog: pytest.LogCaptureFixture) -> None:
    big = np.finfo(np.float32).max
    x = np.full((6, 2), big, np.float32)
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        result = get_aggregator("robust_lr", rlr_server_lr=4.0)(clients(*x))
    assert np.all(np.isfinite(flat(result))) and result.info["saturated"] == 2
    assert "saturated" in caplog.text


# ----------------------------------------------------------------------------- FLDetector
def test_kmeans_1d_costs_hand_case() -> None:
    # [0, 1, 10, 11]: k=1 around 5.5 -> 2 * (5.5^2 + 4.5^2) = 101; k=2 -> 0.5 + 0.5; k=3
    # -> 0.5; k=4 -> 0
    np.testing.assert_allclose(kmeans_1d_costs(np.array([11.0, 0, 10, 1]), 4), [101, 1, 0.5, 0])


def test_gap_statistic_and_upper_cluster() -> None:
    rng = np.random.default_rng(0)
    two = np.concatenate([0.1 + 0.01 * rng.random(12), [0.9, 0.92]])
    assert gap_statistic_clusters(two) >= 2
    assert upper_cluster(two).tolist() == [False] * 12 + [True, True]
    assert gap_statistic_clusters(rng.random(14)) == 1
    assert gap_statistic_clusters(np.full(5, 0.2)) == 1
    assert upper_cluster(np.array([0.1, 0.5, 0.1, 0.5])).tolist() == [False, True, False, True]


def test_lbfgs_hvp_with_one_pair_is_the_bfgs_update() -> None:
    """One pair: B = sigma (I - s s^T / s.s) + y y^T / y.s with sigma = y.s / s.s, where
    s = a_0, y = a_0 - a_1 and v = a_1 (see lbfgs_hvp_coefficients)."""
    a = np.array([[1.0, 2.0, 0.5], [0.6, 0.9, 0.4]])
    c = lbfgs_hvp_coefficients(a @ a.T)
    assert c is not None
    s, y, v = a[0], a[0] - a[1], a[1]
    sigma = (y @ s) / (s @ s)
    b = sigma * (np.eye(3) - np.outer(s, s) / (s @ s)) + np.outer(y, y) / (y @ s)
    np.testing.assert_allclose(c @ a, b @ v, rtol=1e-10)
    # no positive curvature (the update grew along s): no estimate
    grown = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    assert lbfgs_hvp_coefficients(grown @ grown.T) is None
    assert lbfgs_hvp_coefficients(np.ones((1, 1))) is None


class Quadratic:
    """Clients minimising ``0.5 (w - c_i)^T A (w - c_i)``: one gradient step each, as a
    model update ``-lr * gradient``; the clients in ``bad`` send random updates of the same
    norm instead (consistently inconsistent)."""

    def __init__(self, seed: int, n: int = 10, d: int = 20, bad: tuple[int, ...] = (0,)):
        self.rng = np.random.default_rng(seed)
        q = self.rng.standard_normal((d, d))
        self.a = q @ q.T / d + np.eye(d)
        self.centres = 0.3 * self.rng.standard_normal((n, d))
        self.w = 5.0 * self.rng.standard_normal(d)
        self.bad = bad

    def updates(self) -> list[np.ndarray]:
        out = []
        for i, centre in enumerate(self.centres):
            grad = self.a @ (self.w - centre) + 0.01 * self.rng.standard_normal(self.w.size)
            update = -0.1 * grad
            if i in self.bad:
                update = self.rng.standard_normal(self.w.size) * np.linalg.norm(update)
            out.append(update.astype(np.float32))
        return out


def run_fldetector(rule, model: Quadratic, rounds: int, permute: bool = False):
    ids = np.array([f"node-{i}" for i in range(len(model.centres))])
    positions = np.random.default_rng(99)  # apart from the model's draws
    history = []
    for _ in range(rounds):
        x = np.array(model.updates())
        order = positions.permutation(len(x)) if permute else np.arange(len(x))
        result = rule(rows(x[order]), client_ids=ids[order].tolist())
        history.append((sorted(ids[order][result.kept].tolist()), result))
        model.w = model.w + flat(result).astype(np.float64)
    return history


def test_fldetector_flags_the_inconsistent_client_after_its_window() -> None:
    window = 3
    rule = get_aggregator("fldetector", fldetector_window=window)
    history = run_fldetector(rule, Quadratic(0), rounds=9)
    everyone = [f"node-{i}" for i in range(10)]
    honest = everyone[1:]
    # rounds 0, 1: no prediction (no pair of outputs yet); scored from round 2 on; the
    # detection runs once `window` rounds are scored (round 4)
    assert [h[1].info["scored"] for h in history] == [0, 0] + [10] * 7
    for kept, result in history[: window + 1]:
        assert kept == everyone and result.info["flagged"] == 0
    for kept, result in history[window + 1 :]:
        assert kept == honest
        assert "FLDetector: suspicious score" in next(iter(result.rejected.values()))
    last = history[-1][1]
    assert last.scores.max() > 10 * np.median(last.scores)


def test_fldetector_keeps_every_honest_client() -> None:
    for seed in range(3):
        rule = get_aggregator("fldetector", fldetector_window=3)
        history = run_fldetector(rule, Quadratic(seed, bad=()), rounds=8)
        assert all(len(kept) == 10 for kept, _ in history), seed


def test_fldetector_state_follows_identity_not_position_and_reset_forgets() -> None:
    rule = get_aggregator("fldetector", fldetector_window=3)
    shuffled = run_fldetector(rule, Quadratic(0), rounds=7, permute=True)
    assert shuffled[-1][0] == [f"node-{i}" for i in range(1, 10)]
    ordered = run_fldetector(
        get_aggregator("fldetector", fldetector_window=3), Quadratic(0), rounds=7
    )
    # same clients, same values: the same aggregates whatever the positions
    for (_, a), (_, b) in zip(shuffled, ordered, strict=True):
        np.testing.assert_array_equal(flat(a), flat(b))
    assert rule.suspicious_score("node-0") > rule.suspicious_score("node-5")
    rule.reset()
    assert rule.suspicious_score("node-0") is None
    fresh = run_fldetector(rule, Quadratic(0), rounds=3)
    assert [h[1].info["scored"] for h in fresh] == [0, 0, 10]


def test_fldetector_renamed_client_is_not_scored_and_model_change_needs_reset() -> None:
    rule = get_aggregator("fldetector", fldetector_window=2)
    model = Quadratic(1)
    ids = [f"n{i}" for i in range(10)]
    for _ in range(3):
        rule(rows(np.array(model.updates())), client_ids=ids)
    renamed = ["new"] + ids[1:]
    result = rule(rows(np.array(model.updates())), client_ids=renamed)
    assert result.info["scored"] == 9 and result.scores[0] == 0.0
    with pytest.raises(ValueError, match="call reset"):
        rule(clients(*np.ones((10, 3))), client_ids=ids)


def test_fldetector_base_rule_gets_its_parameters_and_stage() -> None:
    rule = get_aggregator("fldetector", fldetector_base_rule="trimmed_mean", num_malicious=1)
    assert rule.base.name == "trimmed_mean" and rule.base.num_malicious == 1
    assert rule.params() == {
        "fldetector_window": 10, "fldetector_base_rule": "trimmed_mean", "num_malicious": 1
    }
    staged = get_aggregator("fldetector", num_malicious=1, pre="nnm")
    assert staged.base.name == "median" and type(staged.base).__name__ == "PreAggregated"
    factories = aggregator_factories("fldetector", params={"fldetector_base_rule": "krum"})
    assert len(factories) == 2 and "krum" in factories[1].__qualname__.lower()
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    ids = list("abcde")
    np.testing.assert_array_equal(
        flat(get_aggregator("fldetector")(rows(x), client_ids=ids)),
        flat(get_aggregator("median")(rows(x))),
    )


# ------------------------------------------------------------------ cluster n_clusters
def test_cluster_filter_number_of_clusters() -> None:
    """Groups of 7 (at 0), 1 (at (3, 5)) and 4 (at (10, 0)): with k = 2 the lone update
    joins the group of 7 (8 of 12 kept); with k = 3 it is split off and the 7 are kept."""
    rng = np.random.default_rng(0)
    centres = [[0, 0]] * 7 + [[3, 5]] + [[10, 0]] * 4
    x = (np.array(centres) + 0.1 * rng.standard_normal((12, 2))).astype(np.float32)
    two = get_aggregator("cluster")(clients(*x))
    assert two.kept == list(range(8))
    three = get_aggregator("cluster", n_clusters=3)(clients(*x))
    assert three.kept == list(range(7))
    np.testing.assert_allclose(flat(three), x[:7].mean(0), rtol=1e-5)
    assert "in a cluster of 1" in three.rejected[7]
    assert "in a cluster of 4" in three.rejected[8]


def test_cluster_filter_skips_the_round_without_a_majority_cluster(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Groups of 5, 4 and 3 with k = 3 (this case used to keep the group of 5): no cluster
    holds more than half of the 12 updates, so the round is skipped."""
    rng = np.random.default_rng(0)
    centres = [[0, 0]] * 5 + [[10, 0]] * 4 + [[10, 3]] * 3
    x = (np.array(centres) + 0.1 * rng.standard_normal((12, 2))).astype(np.float32)
    assert get_aggregator("cluster")(clients(*x)).kept == list(range(5, 12))
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        three = get_aggregator("cluster", n_clusters=3)(clients(*x))
    assert three.kept == [] and three.info["no_majority"] == 1
    assert not flat(three).any()
    assert set(three.rejected) == set(range(12))
    assert all("no cluster holds a majority (largest 5 of 12)" in t for t in three.rejected.values())
    assert "not a majority" in caplog.text


def test_cluster_filter_identical_colluders_never_win_a_tie_or_a_small_cluster() -> None:
    """Review p5: 3 identical colluders (spread 0) next to 7 honest updates were kept alone
    with k >= 3 (the "largest" of several small clusters, ties to the tightest); and 5
    identical updates beside 5 honest ones won the equal-size tie."""
    rng = np.random.default_rng(5)
    d = 200
    for _ in range(5):
        mu = rng.standard_normal(d)
        honest = mu + 0.1 * rng.standard_normal((7, d))
        x = np.vstack([honest, np.tile(mu + 0.5 * rng.standard_normal(d), (3, 1))])
        assert get_aggregator("cluster")(clients(*x)).kept == list(range(7))
        for k in (3, 4, 5):
            kept = get_aggregator("cluster", n_clusters=k)(clients(*x)).kept
            assert kept == [] or set(kept) <= set(range(7)), (k, kept)
        tie = np.vstack([honest[:5], np.tile(mu + 0.5 * rng.standard_normal(d), (5, 1))])
        result = get_aggregator("cluster")(clients(*tie))
        assert result.kept == [] and result.info["no_majority"] == 1


def test_cluster_filter_needs_at_least_n_clusters_clients() -> None:
    rule = get_aggregator("cluster", n_clusters=5)
    assert rule.min_clients() == 5
    assert get_aggregator("cluster", method="hdbscan", n_clusters=5).min_clients() == 2
    with pytest.raises(ValueError, match="needs at least 5 clients, got 4"):
        rule(clients(*np.eye(4)))


def test_farthest_point_seeds_stop_at_the_distinct_points() -> None:
    x = np.array([[0.0, 0.0], [0.0, 0.0], [4.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    distances = np.sqrt(squared_distances(x @ x.T))
    assert farthest_point_seeds(distances, 2) == [2, 3] or farthest_point_seeds(
        distances, 2
    ) == [3, 2]
    assert sorted(farthest_point_seeds(distances, 3)) == [0, 2, 3]
    assert len(farthest_point_seeds(distances, 5)) == 3  # only 3 distinct points


# ---------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("api", ["message", "legacy"])
def test_strategies_on_both_apis(api: str) -> None:
    from flwr_robust import legacy
    from flwr_robust import strategy as message

    module = message if api == "message" else legacy
    built = {
        "DnC": module.DnC(num_malicious=1, dnc_subsample_dim=50),
        "SignGuard": module.SignGuard(signguard_upper=2.5),
        "RobustLR": module.RobustLR(rlr_threshold=3),
        "FLDetector": module.FLDetector(fldetector_window=5, num_malicious=1),
        "ClusterFilter": module.ClusterFilter(n_clusters=3),
    }
    assert built["DnC"].aggregator.params()["dnc_subsample_dim"] == 50
    assert built["SignGuard"].aggregator.signguard_upper == 2.5
    assert built["RobustLR"].aggregator.rlr_threshold == 3
    assert built["FLDetector"].aggregator.params()["num_malicious"] == 1
    assert built["ClusterFilter"].aggregator.n_clusters == 3
    for name, strategy in built.items():
        rule = type(strategy.aggregator)
        shown = {
            p.name for p in inspect.signature(type(strategy)).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        assert set(inspect.signature(rule.__init__).parameters) - {"self", "base_params"} <= shown
        assert name in module.__all__


# ------------------------------------------------------- FLDetector review regressions
def test_lbfgs_hvp_is_linear_in_the_directions() -> None:
    a = np.random.default_rng(4).standard_normal((4, 6)) * [[1.0], [0.8], [0.7], [0.5]]
    gram = a @ a.T
    default = lbfgs_hvp_coefficients(gram)
    many = lbfgs_hvp_coefficients(gram, np.array([[0, 0, 0, 1.0], [0, 0, 1.0, 0], [0, 0, 1, 1.0]]))
    assert default is not None and many is not None and many.shape == (3, 4)
    np.testing.assert_allclose(many[0], default, rtol=1e-10)
    np.testing.assert_allclose(many[2], many[0] + many[1], rtol=1e-9, atol=1e-12)


def test_fldetector_constant_client_does_not_get_the_honest_majority_rejected() -> None:
    """Review p10: a client sending the same update every round fits the prediction best,
    so the 9 noisy honest clients form the higher-score cluster; they are a majority and
    must not be flagged (the paper assumes a malicious minority)."""
    rng = np.random.default_rng(10)
    rule = FLDetector(fldetector_window=3)
    ids = [f"h{i}" for i in range(9)] + ["A"]
    skipped = 0
    for _ in range(12):
        x = (0.05 * rng.standard_normal((10, 50)) + 0.01).astype(np.float32)
        x[9] = 2.0
        result = rule(clients(*x), client_ids=ids)
        assert result.rejected == {} and result.info["flagged"] == 0
        assert abs(float(np.median(flat(result))) - 0.01) < 0.05
        skipped += result.info["majority_not_flagged"]
    assert skipped > 0  # the detection did fire on the honest majority and was overruled


def test_fldetector_scores_a_client_across_the_rounds_it_skips() -> None:
    """Review p9: a client present every other round used to be never scored. Its
    prediction now spans the gap (w_t - w_s = the last two outputs) and, being
    inconsistent, it is flagged; the honest clients present every round are kept."""
    model = Quadratic(0)
    rule = FLDetector(fldetector_window=3)
    everyone = [f"node-{i}" for i in range(10)]
    flagged_rounds = 0
    for t in range(12):
        x = np.array(model.updates())
        present = list(range(10)) if t % 2 == 0 else list(range(1, 10))
        result = rule(rows(x[present]), client_ids=[everyone[i] for i in present])
        if t % 2 == 0 and t >= 2:
            assert result.info["scored"] == 10 and result.scores[0] > 0
        if t % 2 == 0:
            assert set(result.rejected) <= {0}
            flagged_rounds += 0 in result.rejected
        else:
            assert result.rejected == {}
        model.w = model.w + flat(result).astype(np.float64)
    assert flagged_rounds >= 2


def test_fldetector_forgets_clients_unseen_for_more_than_the_window() -> None:
    rng = np.random.default_rng(3)
    rule = FLDetector(fldetector_window=3)
    for t in range(40):
        ids = [f"s{i}" for i in range(5)] + [f"p{t // 2}_{i}" for i in range(5)]
        rule(clients(*rng.standard_normal((10, 8))), client_ids=ids)
    # the stable 5 plus the churning ids of the last window + 1 rounds (two per pair of rounds)
    assert len(rule._seen) == len(rule._previous) <= 5 + 10
    assert len(rule._distances) <= 5 + 10
    assert "p0_0" not in rule._seen and rule.suspicious_score("p0_0") is None


def test_robust_lr_one_dissenter_at_min_clients_flips_nothing() -> None:
    """Review p11: at n = theta = 4 one client against three gave |sum| = 2 < 4 and
    reversed every coordinate (-0.5 everywhere). min_clients = theta + 2: at n = 6 one
    dissenter leaves |sum| = 4 = theta (kept); at n = 5 the rule refuses to run."""
    rule = get_aggregator("robust_lr")
    assert rule.min_clients() == 6
    x = np.ones((6, 10), np.float32)
    x[0] = -1
    result = rule(clients(*x))
    assert result.info["flipped"] == 0
    np.testing.assert_allclose(flat(result), np.full(10, 4 / 6), rtol=1e-6)
    with pytest.raises(ValueError, match="a single dissenting client would flip"):
        rule(clients(*x[:5]))
    assert get_aggregator("robust_lr", rlr_threshold=1).min_clients() == 3


# ------------------------------------------------------ SignGuard review regressions
def test_sign_features_are_scaled_by_their_maxima() -> None:
    features = np.array([[0.5, 0.0, 0.5], [0.25, 0.0, 0.75], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(
        scaled_by_maximum(features), [[0.5, 0.0, 0.5 / 0.75], [0.25, 0.0, 1.0], [1.0, 0.0, 0.0]]
    )


def test_signguard_reads_one_contiguous_window_of_coordinates() -> None:
    """Review p11: the authors' code takes 10% of the coordinates in one window at a random
    offset. Client 8 is negative on the first half, positive on the second, the others
    positive everywhere: a window inside the second half cannot tell it apart (kept),
    one inside the first half can (rejected). Scattered coordinates would mix both halves
    every round (kept with probability about 2**-10)."""
    x = np.ones((9, 100), np.float32) + 0.01 * np.random.default_rng(0).random((9, 100))
    x[8, :50] *= -1
    rule = get_aggregator("signguard", seed=1)
    kept = []
    for _ in range(8):
        result = rule(clients(*x))
        assert result.info["coordinates"] == 10 and set(range(8)) <= set(result.kept)
        kept.append(8 in result.kept)
    assert any(kept) and not all(kept)


def test_signguard_on_honest_gaussian_clients() -> None:
    """20 honest Gaussian clients: the norm filter passes all of them; the reference's
    MeanShift (quantile-0.5 bandwidth, cluster_all=False) splits the honest cloud and
    rejects a part of it (measured 6-11 of 20, see the class docstring), but keeps the
    largest group and the output stays near the honest mean."""
    for seed in range(3):
        x = (np.random.default_rng(seed).standard_normal((20, 2000)) + 0.05).astype(np.float32)
        result = get_aggregator("signguard", seed=seed)(clients(*x))
        assert result.info["norm_rejected"] == 0 and len(result.kept) >= 8
        assert all("largest MeanShift cluster" in t for t in result.rejected.values())
        centre = x.astype(np.float64).mean(0)
        assert np.linalg.norm(flat(result) - centre) < np.linalg.norm(x[0] - centre)
