"""Issue 5 rules on constructed cases: meamed, FLAME, FoolsGold, the cluster filter,
reputation, and the pre-aggregation stages (NNM, bucketing, ARC) with their mixed matrix."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from flwr_robust.aggregation import (
    MixedUpdateMatrix,
    UpdateMatrix,
    aggregator_factories,
    aggregator_parameters,
    available_aggregators,
    available_pre_aggregations,
    clustering,
    get_aggregator,
)
from flwr_robust.aggregation.foolsgold import foolsgold_weights
from flwr_robust.aggregation.matrix import squared_distances
from flwr_robust.aggregation.preaggregation import (
    AdaptiveRobustClipping,
    Bucketing,
    NearestNeighborMixing,
    PreAggregated,
)
from flwr_robust.attacks import alie_delta, alie_z_max
from tests import reference_rules as ref
from tests.aggregation_helpers import clients, flat, rows


def two_directions(rng, honest: int, bad: int, d: int = 40, noise: float = 0.05):
    """``honest`` updates along one direction, ``bad`` colluders along another."""
    a = rng.standard_normal(d)
    b = -a + 0.5 * rng.standard_normal(d)  # a different (roughly opposite) direction
    good = a + noise * np.linalg.norm(a) / np.sqrt(d) * rng.standard_normal((honest, d))
    evil = b + noise * np.linalg.norm(b) / np.sqrt(d) * rng.standard_normal((bad, d))
    return np.concatenate([good, evil]).astype(np.float32)


# ------------------------------------------------------------------------------ registry
def test_new_rules_and_stages_are_registered() -> None:
    assert {"meamed", "flame", "foolsgold", "cluster", "reputation"} <= set(
        available_aggregators()
    )
    assert available_pre_aggregations() == ["arc", "bucketing", "nnm"]


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("meamed", {"num_malicious": -1}, "num_malicious must be >= 0"),
        ("flame", {"noise_lambda": -0.1}, "noise_lambda must be >= 0"),
        ("flame", {"seed": 1.5}, "seed must be an integer"),
        ("cluster", {"method": "dbscan"}, "method must be one of"),
        ("cluster", {"metric": "manhattan"}, "metric must be one of"),
        ("cluster", {"min_cluster_size": 1}, "min_cluster_size must be >= 2"),
        ("foolsgold", {"kappa": 0}, "kappa must be > 0"),
        ("reputation", {"reputation_decay": 1.0}, "reputation_decay must be < 1"),
        ("reputation", {"reputation_threshold": 1.5}, "reputation_threshold must be <= 1"),
        ("reputation", {"reputation_score": "votes"}, "reputation_score must be one of"),
        ("reputation", {"base_rule": "reputation"}, "wraps a rule itself"),
        ("reputation", {"base_rule": "nope"}, "unknown aggregator 'nope'"),
        ("reputation", {"base_rule": "krum", "trim_ratio": 0.1}, "does not take trim_ratio"),
        ("krum", {"pre": "nnm"}, "'nnm' needs num_malicious"),
        ("median", {"pre": "arc"}, "'arc' needs num_malicious"),
        ("median", {"pre": "bucketing", "bucket_size": 0}, "bucket_size must be >= 1"),
        ("median", {"pre": "mixing"}, "unknown pre-aggregation 'mixing'"),
        ("krum", {"pre": "nnm", "num_malicious": 1, "bucket_size": 2}, "does not take bucket_size"),
        ("foolsgold", {"pre": "nnm", "num_malicious": 1}, "cannot run after"),
    ],
)
def test_invalid_parameters_name_the_parameter(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_aggregator(name, **params)


def test_pre_stage_shares_parameters_with_the_rule() -> None:
    rule = get_aggregator("krum", pre="nnm", num_malicious=2)
    assert isinstance(rule, PreAggregated)
    assert isinstance(rule.stage, NearestNeighborMixing)
    assert rule.stage.num_malicious == rule.rule.num_malicious == 2
    assert rule.name == "krum" and rule.params()["pre"] == "nnm"
    assert "pre=nnm" in repr(rule)
    bucketed = get_aggregator("flame", pre="bucketing", bucket_size=3, seed=5)
    assert bucketed.stage.bucket_size == 3 and bucketed.stage.seed == bucketed.rule.seed == 5
    assert get_aggregator("median", pre="").name == "median"  # empty run-config value: no stage


def test_parameters_of_wrappers_and_stages_are_discoverable() -> None:
    params = aggregator_parameters("reputation", pre="bucketing", params={"base_rule": "flame"})
    assert {"base_rule", "reputation_decay", "noise_lambda", "bucket_size", "seed"} <= set(params)
    assert "num_selected" not in params
    assert "num_selected" in aggregator_parameters("reputation")  # default base: multi_krum
    factories = aggregator_factories("krum", pre="arc")
    assert [f.__qualname__ for f in factories] == [
        "Krum.__init__", "AdaptiveRobustClipping.__init__",
    ]
    rule = get_aggregator("reputation", base_rule="krum", pre="nnm", num_malicious=1)
    assert isinstance(rule.base, PreAggregated) and rule.base.rule.num_malicious == 1


@pytest.mark.parametrize("name", ["foolsgold", "reputation"])
def test_stateful_rules_require_client_ids(name: str) -> None:
    rule = get_aggregator(name)
    with pytest.raises(ValueError, match="pass client_ids"):
        rule(clients([1.0], [2.0], [3.0]))


# -------------------------------------------------------------------------------- meamed
def test_meamed_hand_case() -> None:
    # Column 0: median 3; the 3 values closest are 2, 3, 4 -> 3.
    # Column 1: 0, 0, 1, 50, 100; median 1; closest 3 are 0, 0, 1 -> 1/3.
    data = clients([1.0, 0.0], [2.0, 0.0], [3.0, 1.0], [4.0, 50.0], [100.0, 100.0])
    result = get_aggregator("meamed", num_malicious=2)(data)
    np.testing.assert_allclose(result.update[0], [3.0, 1.0 / 3.0], rtol=1e-6)
    assert result.kept == [0, 1, 2, 3, 4] and result.info == {"averaged_per_coordinate": 3}
    mean = get_aggregator("meamed")(data)  # f = 0: the plain mean
    np.testing.assert_allclose(mean.update[0], [22.0, 151.0 / 5.0], rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_meamed_matches_reference(seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((12, 30)).astype(np.float32)
    result = get_aggregator("meamed", num_malicious=4)(rows(x))
    np.testing.assert_allclose(flat(result), ref.mean_around_median(x.astype(float), 8), atol=1e-6)


def test_meamed_precondition() -> None:
    rule = get_aggregator("meamed", num_malicious=2)
    with pytest.raises(ValueError, match="n >= 2 \\* num_malicious \\+ 1"):
        rule(clients([0.0], [1.0], [2.0], [3.0]))


# --------------------------------------------------------------------------------- FLAME
def test_flame_admits_majority_and_rejects_colluding_minority() -> None:
    rng = np.random.default_rng(0)
    x = two_directions(rng, honest=7, bad=3)
    perm = rng.permutation(10)
    result = get_aggregator("flame", noise_lambda=0.0)(rows(x[perm]))
    # Only honest clients are admitted, a majority of the 10 (scikit-learn's single-cluster
    # labelling also turns honest points leaving the cluster before its core into noise).
    assert set(perm[result.kept].tolist()) <= set(range(7))
    assert len(result.kept) >= 10 // 2 + 1
    bad_positions = np.flatnonzero(perm >= 7)
    assert set(bad_positions.tolist()) <= set(result.rejected)
    assert all("HDBSCAN noise" in text for text in result.rejected.values())
    # Colluders are far in cosine distance from the admitted cluster, honest clients close.
    honest_positions = np.flatnonzero(perm < 7)
    assert result.scores[bad_positions].min() > 1.0
    assert result.scores[honest_positions].max() < 0.1
    assert result.info["clusters"] == 1 and result.info["admitted"] == len(result.kept)
    kept = x[perm][result.kept]
    norms = np.linalg.norm(kept.astype(float), axis=1)
    bound = np.median(np.linalg.norm(x.astype(float), axis=1))
    expected = (kept * np.minimum(1.0, bound / norms)[:, None]).mean(axis=0)
    np.testing.assert_allclose(flat(result), expected, rtol=1e-5, atol=1e-6)


def test_flame_clips_to_median_norm_of_all_updates() -> None:
    rng = np.random.default_rng(1)
    direction = rng.standard_normal(20)
    scales = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    honest = scales[:, None] * (direction + 0.01 * rng.standard_normal((7, 20)))
    bad = np.repeat(-10.0 * direction[None], 2, axis=0) + 0.01 * rng.standard_normal((2, 20))
    x = np.concatenate([honest, bad]).astype(np.float32)
    result = get_aggregator("flame", noise_lambda=0.0)(rows(x))
    norms = np.linalg.norm(x.astype(float), axis=1)
    bound = np.median(norms)  # over all 9 updates, the attackers included
    assert result.info["clip_bound"] == pytest.approx(bound)
    kept = np.array(result.kept)
    assert set(kept.tolist()) <= set(range(7)) and kept.size >= 5
    factors = np.minimum(1.0, bound / norms[kept])
    assert factors.min() < 0.8  # large honest updates really are clipped
    clipped = x[kept] * factors[:, None]
    np.testing.assert_allclose(flat(result), clipped.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.weights[kept], factors / kept.size, rtol=1e-6)
    assert result.info["clipped"] == int(np.sum(norms[kept] > bound))


def test_flame_noise_is_lambda_times_bound_and_seeded() -> None:
    rng = np.random.default_rng(2)
    x = two_directions(rng, honest=5, bad=0, d=40_000)
    plain = get_aggregator("flame", noise_lambda=0.0)(rows(x))
    noisy = get_aggregator("flame", noise_lambda=0.01, seed=3)(rows(x))
    again = get_aggregator("flame", noise_lambda=0.01, seed=3)(rows(x))
    other = get_aggregator("flame", noise_lambda=0.01, seed=4)(rows(x))
    np.testing.assert_array_equal(flat(noisy), flat(again))
    assert not np.array_equal(flat(noisy), flat(other))
    noise = flat(noisy) - flat(plain)
    expected = 0.01 * noisy.info["clip_bound"]
    assert noisy.info["noise_std"] == pytest.approx(expected)
    assert np.std(noise) == pytest.approx(expected, rel=0.03)
    assert abs(np.mean(noise)) < 0.03 * expected
    assert noisy.kept == plain.kept


@pytest.mark.parametrize(("rule", "params"), [("flame", {}), ("cluster", {"method": "hdbscan"})])
def test_no_cluster_skips_the_round_loudly(
    rule: str, params: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(
        clustering, "hdbscan_labels", lambda distances, **_: np.full(len(distances), -1)
    )
    x = two_directions(np.random.default_rng(3), honest=4, bad=2)
    with caplog.at_level(logging.WARNING):
        result = get_aggregator(rule, **params)(rows(x))
    assert result.kept == [] and sorted(result.rejected) == list(range(6))
    assert set(result.rejected.values()) == {clustering.NO_CLUSTER_REASON}
    assert result.info["no_cluster"] == 1
    np.testing.assert_array_equal(flat(result), np.zeros(x.shape[1]))
    assert "labelled all 6 updates as noise" in caplog.text


# ----------------------------------------------------------------------------- FoolsGold
def test_foolsgold_weights_hand_case() -> None:
    # v = (.5, .5, .2); client 2 is pardoned: cs_20 = .1 * .2 / .5, cs_21 = .2 * .2 / .5,
    # alpha = (.5, .5, .92) / .92; logit(.5 / .92) + .5 = ln(.5 / .42) + .5; alpha 1 -> 1.
    cs = np.array([[1.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 1.0]])
    expected = np.log(0.5 / 0.42) + 0.5
    np.testing.assert_allclose(foolsgold_weights(cs, 1.0), [expected, expected, 1.0])
    np.testing.assert_allclose(foolsgold_weights(cs, 0.5), [expected / 2, expected / 2, 1.0])
    identical = np.ones((3, 3))
    np.testing.assert_array_equal(foolsgold_weights(identical, 1.0), np.zeros(3))


def sybil_round(rng, target: np.ndarray, d: int = 300) -> np.ndarray:
    honest = rng.standard_normal((6, d))  # diverse honest objectives
    sybils = target + 0.05 * rng.standard_normal((3, d))  # three copies of one objective
    return np.concatenate([honest, sybils]).astype(np.float32)


def test_foolsgold_down_weights_sybils_and_keeps_honest() -> None:
    rng = np.random.default_rng(4)
    target = 3.0 * rng.standard_normal(300)
    ids = [f"h{i}" for i in range(6)] + ["s0", "s1", "s2"]
    rule = get_aggregator("foolsgold")
    for _ in range(3):
        x = sybil_round(rng, target)
        result = rule(rows(x), client_ids=ids)
    assert result.weights[6:].max() == 0.0
    assert result.weights[:6].min() > 0.1
    assert result.kept == list(range(6))
    assert all("sybil-like" in result.rejected[i] for i in (6, 7, 8))
    assert result.scores[6:].min() > 0.9
    assert result.scores[:6].max() < 0.3
    expected = (result.weights[:6, None] * x[:6]).sum(axis=0)
    np.testing.assert_allclose(flat(result), expected, rtol=1e-5, atol=1e-6)


def test_foolsgold_state_is_keyed_by_identity_not_position() -> None:
    rng = np.random.default_rng(5)
    target = 3.0 * rng.standard_normal(300)
    ids = np.array([f"h{i}" for i in range(6)] + ["s0", "s1", "s2"])
    ordered, shuffled = get_aggregator("foolsgold"), get_aggregator("foolsgold")
    for _ in range(3):
        x = sybil_round(rng, target)
        perm = rng.permutation(9)
        a = ordered(rows(x), client_ids=ids.tolist())
        b = shuffled(rows(x[perm]), client_ids=ids[perm].tolist())
        np.testing.assert_allclose(b.weights, a.weights[perm], atol=1e-9)
        np.testing.assert_allclose(flat(a), flat(b), rtol=1e-5, atol=1e-6)
    for client in ids:
        np.testing.assert_allclose(ordered.history(client), shuffled.history(client), atol=1e-5)


def test_foolsgold_absent_clients_keep_history_and_reset_forgets() -> None:
    rng = np.random.default_rng(6)
    rule = get_aggregator("foolsgold")
    first = rng.standard_normal((4, 10)).astype(np.float32)
    rule(rows(first), client_ids=["a", "b", "c", "d"])
    second = rng.standard_normal((3, 10)).astype(np.float32)
    rule(rows(second), client_ids=["d", "a", "b"])  # "c" is absent, order changed
    np.testing.assert_allclose(rule.history("c"), first[2], rtol=1e-6)
    np.testing.assert_allclose(rule.history("a"), first[0] + second[1], rtol=1e-6)
    np.testing.assert_allclose(rule.history("d"), first[3] + second[0], rtol=1e-6)
    rule.reset()
    assert rule.history("a") is None
    rule(rows(first), client_ids=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="the model changed; call reset"):
        rule([[np.zeros(3)]] * 4, client_ids=["a", "b", "c", "d"])


# ---------------------------------------------------------------------------- cluster
@pytest.mark.parametrize("method", ["kmeans", "hdbscan"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_cluster_keeps_the_larger_group(method: str, metric: str) -> None:
    rng = np.random.default_rng(7)
    x = two_directions(rng, honest=7, bad=3)
    perm = rng.permutation(10)
    result = get_aggregator("cluster", method=method, metric=metric)(rows(x[perm]))
    assert sorted(perm[result.kept].tolist()) == list(range(7))
    np.testing.assert_allclose(flat(result), x[:7].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert all("not the largest cluster (7 updates)" in t for t in result.rejected.values())
    bad = np.flatnonzero(perm >= 7)
    assert result.scores[bad].min() > result.scores[result.kept].max()


def test_cluster_kmeans_is_deterministic_and_handles_identical_updates() -> None:
    x = two_directions(np.random.default_rng(8), honest=5, bad=4)
    a = get_aggregator("cluster")(rows(x))
    b = get_aggregator("cluster")(rows(x))
    assert a.kept == b.kept == [0, 1, 2, 3, 4]
    same = get_aggregator("cluster")(clients(*([[1.0, 2.0]] * 4)))
    assert same.kept == [0, 1, 2, 3]


# -------------------------------------------------------------------------- reputation
def reputation_round(rng, bad_index: int, n: int = 7) -> np.ndarray:
    x = rng.standard_normal((n, 8))
    x[bad_index] += 50.0  # far away: multi-krum rejects it
    return x.astype(np.float32)


def test_reputation_state_survives_rounds_keyed_by_id_then_excludes() -> None:
    rng = np.random.default_rng(9)
    names = np.array([f"node-{i}" for i in range(7)])
    rule = get_aggregator("reputation", base_rule="multi_krum", num_malicious=1)
    excluded_rounds = []
    for round_number in range(6):
        perm = rng.permutation(7)  # the bad client sits at a different position each round
        position = int(np.flatnonzero(names[perm] == "node-3")[0])
        result = rule(rows(reputation_round(rng, position)), client_ids=names[perm].tolist())
        if result.rejected[position].startswith("low reputation"):
            excluded_rounds.append(round_number)
            assert result.info["excluded_low_reputation"] == 1
            assert len(result.kept) == 5  # multi-krum keeps n - f of the 6 it saw
        else:
            assert "above the selection cut-off" in result.rejected[position]
        # EMA of the "kept" score (0 every round), decay 0.8, from 1.0
        assert rule.reputation("node-3") == pytest.approx(0.8 ** (round_number + 1))
        assert result.scores[position] == pytest.approx(0.8 ** (round_number + 1))
    assert excluded_rounds == [4, 5]  # 0.8^4 = 0.41 < 0.5: excluded from round 4 on
    assert min(rule.reputation(f"node-{i}") for i in (0, 1, 2, 4, 5, 6)) > 0.5
    rule.reset()
    assert rule.reputation("node-3") == 1.0


def test_reputation_distance_score_lets_a_client_recover() -> None:
    rng = np.random.default_rng(10)
    names = [f"c{i}" for i in range(7)]
    rule = get_aggregator(
        "reputation", base_rule="median", reputation_score="distance", reputation_decay=0.5
    )
    for _ in range(3):
        rule(rows(reputation_round(rng, 0)), client_ids=names)
    low = rule.reputation("c0")
    assert low < 0.5
    result = rule(rows(reputation_round(rng, 1)), client_ids=names)  # c0 behaves now
    assert result.rejected[0].startswith("low reputation")
    assert rule.reputation("c0") > low


def test_reputation_fails_loudly_when_too_few_clients_remain() -> None:
    rng = np.random.default_rng(11)
    names = [f"c{i}" for i in range(5)]
    rule = get_aggregator("reputation", base_rule="krum", num_malicious=1)
    for _ in range(4):
        rule(rows(reputation_round(rng, 0, n=5)), client_ids=names)
    with pytest.raises(ValueError, match="the 4 left are fewer than"):
        rule(rows(reputation_round(rng, 0, n=5)), client_ids=names)


# ----------------------------------------------------------------- pre-aggregation stages
def test_nnm_mixing_matrix_hand_case() -> None:
    # 1-D points 0, 1, 3, 10 with f=1: each is replaced by the mean of its 3 nearest.
    matrix = UpdateMatrix(clients([0.0], [1.0], [3.0], [10.0]))
    mixing = NearestNeighborMixing(num_malicious=1).mixing(matrix)
    third = 1.0 / 3.0
    expected = [
        [third, third, third, 0], [third, third, third, 0],
        [third, third, third, 0], [0, third, third, third],
    ]
    np.testing.assert_allclose(mixing.weights, expected)
    np.testing.assert_array_equal(mixing.home, np.arange(4))
    assert mixing.gram is not None  # handed on to the rule


def test_bucketing_mixing_matrix_follows_the_seeded_permutation() -> None:
    matrix = UpdateMatrix(clients(*([[0.0]] * 5)))
    stage = Bucketing(bucket_size=2, seed=7)
    rng = np.random.default_rng(7)
    for _ in range(2):  # a fresh permutation every round, reproducible from the seed
        perm = rng.permutation(5)
        mixing = stage.mixing(matrix)
        expected = np.zeros((3, 5))
        for position, client in enumerate(perm):
            expected[position // 2, client] = 1.0 / (2 if position < 4 else 1)
        np.testing.assert_allclose(mixing.weights, expected)
        np.testing.assert_array_equal(mixing.home, np.argmax(expected, axis=0))


@pytest.mark.parametrize(
    ("f", "bound", "factors"), [(1, 4.0, [1, 1, 1, 1, 0.8]), (2, 3.0, [1, 1, 1, 0.75, 0.6])]
)
def test_arc_mixing_matrix_hand_case(f: int, bound: float, factors: list[float]) -> None:
    # Norms 1..5. f=1: k = floor(2 * 1/5 * 4) = 1 -> C = 4; f=2: k = floor(2.4) = 2 -> C = 3.
    matrix = UpdateMatrix(clients([1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, -4.0], [3.0, 4.0]))
    mixing = AdaptiveRobustClipping(num_malicious=f).mixing(matrix)
    np.testing.assert_allclose(mixing.weights, np.diag(factors))
    assert mixing.info["clip_bound"] == pytest.approx(bound)
    assert mixing.info["clipped"] == f


def test_mixed_matrix_equals_explicit_materialisation() -> None:
    rng = np.random.default_rng(12)
    shapes = ((3, 7), (1,), (300,), (2, 5))
    updates = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(6)]
    base = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    weights_in = [[u + b for u, b in zip(client, base, strict=True)] for client in updates]
    mixing = rng.random((4, 6))
    source = UpdateMatrix(weights_in, base=base, max_block_bytes=6 * 4 * 256)
    mixed = MixedUpdateMatrix(source, mixing)
    x = ref.flat(updates)
    y = (mixing @ x).astype(np.float32)
    explicit = UpdateMatrix([[row] for row in y])
    assert len(mixed.block_ranges(4)) > 1
    got = np.concatenate([block.copy() for _, _, block in mixed.blocks([3, 0])], axis=1)
    np.testing.assert_allclose(got, y[[3, 0]], rtol=1e-5, atol=1e-5)
    # Centred Gram matrices may use different anchors: compare what they are used for.
    np.testing.assert_allclose(
        squared_distances(mixed.gram()), squared_distances(explicit.gram()), rtol=1e-5, atol=1e-3
    )
    y64 = y.astype(float)
    np.testing.assert_allclose(mixed.gram(centered=False), y64 @ y64.T, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(mixed.squared_norms(), (y64**2).sum(1), rtol=1e-5)
    w = rng.standard_normal(2)
    np.testing.assert_allclose(mixed.combine(w, rows=[1, 3]), w @ y[[1, 3]], atol=1e-5)
    extra = rng.standard_normal(x.shape[1]).astype(np.float32)
    extended = mixed.with_extra_rows([extra])
    both = np.concatenate([y64, extra[None].astype(float)])
    np.testing.assert_allclose(extended.gram(centered=False), both @ both.T, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(extended.combine(np.ones(5)), both.sum(axis=0), atol=1e-4)
    # Mixing an already mixed matrix composes the maps.
    inner = rng.random((3, 4))
    nested = MixedUpdateMatrix(mixed, inner)
    z = inner @ y64
    np.testing.assert_allclose(nested.gram(centered=False), z @ z.T, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("rule", ["krum", "multi_krum", "geometric_median", "bulyan"])
def test_nnm_then_rule_computes_one_gram_matrix(
    rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    for method in ("gram", "anchored_gram"):
        original = getattr(UpdateMatrix, method)

        def spy(self, *args, _original=original, _method=method, **kwargs):
            calls.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(UpdateMatrix, method, spy)
    x = np.random.default_rng(13).standard_normal((11, 30))
    get_aggregator(rule, pre="nnm", num_malicious=2)(rows(x))
    assert calls == ["anchored_gram"]
    calls.clear()
    get_aggregator(rule, num_malicious=2)(rows(x))
    assert calls == ["gram"]  # the plain rule: also one


def test_nnm_krum_equals_krum_on_materialised_mixture_and_maps_back() -> None:
    x = np.random.default_rng(14).standard_normal((9, 12)).astype(np.float32)
    result = get_aggregator("krum", pre="nnm", num_malicious=2)(rows(x))
    mixing = NearestNeighborMixing(num_malicious=2).mixing(UpdateMatrix(rows(x)))
    y = (mixing.weights @ x.astype(float)).astype(np.float32)
    plain = get_aggregator("krum", num_malicious=2)(rows(y))
    np.testing.assert_allclose(flat(result), flat(plain), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.scores, plain.scores, rtol=1e-4)
    winner = plain.kept[0]
    assert result.kept == np.flatnonzero(mixing.weights[winner]).tolist()
    np.testing.assert_allclose(result.weights, mixing.weights[winner])
    assert sorted(result.kept + list(result.rejected)) == list(range(9))
    reasons = result.rejected.values()
    assert all(text.startswith("nnm: every input containing it") for text in reasons)
    assert result.info["pre_aggregation"] == "nnm" and result.info["pre_neighbours"] == 7


def test_bucketing_krum_maps_the_winning_bucket_to_its_clients() -> None:
    x = np.random.default_rng(15).standard_normal((12, 6)).astype(np.float32)
    result = get_aggregator("krum", pre="bucketing", num_malicious=1, seed=0)(rows(x))
    mixing = Bucketing(bucket_size=2, seed=0).mixing(UpdateMatrix(rows(x)))
    winner = int(mixing.home[result.kept[0]])
    assert result.kept == np.flatnonzero(mixing.home == winner).tolist()
    np.testing.assert_allclose(flat(result), x[result.kept].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(result.scores[result.kept], result.scores[result.kept][0])
    assert result.info["mixed_inputs"] == 6


def test_preconditions_count_the_stage_outputs() -> None:
    rule = get_aggregator("krum", pre="bucketing", num_malicious=1)  # krum needs 5 inputs
    assert rule.min_clients() == 9  # ceil(9 / 2) = 5
    with pytest.raises(ValueError, match="needs at least 9 clients, got 8.*bucketing"):
        rule(rows(np.zeros((8, 5))))
    rule(rows(np.random.default_rng(0).standard_normal((9, 5))))
    assert get_aggregator("median", pre="nnm", num_malicious=3).min_clients() == 7


ALIE_N, ALIE_F = 20, 4


def alie_bias(rule: str, pre: str | None, seed: int) -> float:
    """Component of (output - honest mean) along ALIE's direction, in units of the norm of
    the honest per-coordinate std; the crafted update itself scores z."""
    rng = np.random.default_rng(seed)
    honest = (1.0 + rng.standard_normal((ALIE_N - ALIE_F, 500))).astype(np.float32)
    crafted = alie_delta([[h] for h in honest], alie_z_max(ALIE_N, ALIE_F))[0]
    x = np.concatenate([honest, np.repeat(crafted[None], ALIE_F, axis=0)])
    params = {"num_malicious": ALIE_F, **({"pre": pre} if pre else {})}
    out = flat(get_aggregator(rule, **params)([[row] for row in x]))
    std = honest.astype(float).std(axis=0)
    return float((out - honest.astype(float).mean(axis=0)) @ (-std) / (std @ std))


def test_nnm_reduces_alie_bias_of_krum_and_median() -> None:
    """Measured on IID Gaussian updates, n=20, f=4 (z = 0.385): plain Krum selects the
    crafted update (bias = z); NNM mixes the f copies into every input, leaving about
    f / (n - f) = 1/4 of the shift. Median keeps about 2/3 of z, NNM + Median about 1/4."""
    z = alie_z_max(ALIE_N, ALIE_F)
    seeds = range(3)
    krum = np.mean([alie_bias("krum", None, s) for s in seeds])
    nnm_krum = np.mean([alie_bias("krum", "nnm", s) for s in seeds])
    median = np.mean([alie_bias("median", None, s) for s in seeds])
    nnm_median = np.mean([alie_bias("median", "nnm", s) for s in seeds])
    assert krum == pytest.approx(z, rel=1e-3)
    assert nnm_krum < 0.35 * z
    assert median > 0.55 * z
    assert nnm_median < 0.35 * z


# ------------------------------------------------------------------------ general checks
NEW_RULES = {
    "meamed": {"num_malicious": 2},
    "flame": {"seed": 1},
    "cluster": {},
    "foolsgold": {},
    "reputation": {"num_malicious": 2},
    "krum+nnm": {"num_malicious": 2, "pre": "nnm"},
    "median+bucketing": {"pre": "bucketing", "seed": 1},
    "centered_clip+arc": {"num_malicious": 2, "pre": "arc"},
}


@pytest.mark.parametrize("label", NEW_RULES)
def test_new_rules_leave_inputs_untouched_and_subtract_base_lazily(label: str) -> None:
    """What tests/test_aggregation_rules.py checks for every rule, with the identities and
    seeds these rules need."""
    rng = np.random.default_rng(16)
    shapes = ((4, 3), (5,), (2, 2, 2))
    deltas = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(11)]
    base = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    weights = [[layer + b for layer, b in zip(u, base, strict=True)] for u in deltas]
    snapshot = [[layer.copy() for layer in u] for u in weights]
    ids = [f"c{i}" for i in range(11)]
    name = label.split("+")[0]
    direct = get_aggregator(name, **NEW_RULES[label])(
        deltas, num_examples=list(range(1, 12)), client_ids=ids
    )
    lazy = get_aggregator(name, **NEW_RULES[label])(
        weights, num_examples=list(range(1, 12)), client_ids=ids, base=base
    )
    assert [layer.shape for layer in lazy.update] == [layer.shape for layer in deltas[0]]
    assert all(layer.dtype == np.float32 for layer in lazy.update)
    assert sorted(lazy.kept + list(lazy.rejected)) == list(range(11))
    assert lazy.kept == direct.kept
    np.testing.assert_allclose(flat(lazy), flat(direct), rtol=1e-4, atol=1e-5)
    for before, after in zip(snapshot, weights, strict=True):
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)
