"""Each rule on hand-computed cases, against the slow references, and its preconditions."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from flwr_robust.aggregation import (
    AggregationResult,
    aggregator_parameters,
    available_aggregators,
    get_aggregator,
)
from tests import reference_rules as ref


def clients(*values: list[float]) -> list[list[np.ndarray]]:
    """One single-layer client per argument."""
    return [[np.asarray(v, dtype=np.float32)] for v in values]


def random_updates(n: int, seed: int, shapes=((4, 3), (5,), (2, 2, 2))) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(n)]


def flat_update(result: AggregationResult) -> np.ndarray:
    return np.concatenate([layer.ravel() for layer in result.update])


#: Parameters a rule cannot run without (FLTrust's server update: a fixed direction).
REQUIRED_PARAMS = {"fltrust": {"server_update_fn": lambda w: [np.ones_like(x) for x in w]}}


# ----------------------------------------------------------------------------- registry
def test_registry_lists_the_issue_rules() -> None:
    expected = {
        "fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
        "geometric_median", "norm_clip", "centered_clip", "rfout_1d",
    }
    assert expected <= set(available_aggregators())


def test_registry_accepts_kebab_case_and_rejects_unknowns() -> None:
    assert get_aggregator("multi-krum", num_malicious=1).name == "multi_krum"
    with pytest.raises(ValueError, match="unknown aggregator 'nope'.*krum"):
        get_aggregator("nope")
    with pytest.raises(ValueError, match="krum does not take beta; its parameters are"):
        get_aggregator("krum", beta=0.1)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("krum", {"num_malicious": -1}, "num_malicious must be >= 0"),
        ("krum", {"num_malicious": 1.5}, "num_malicious must be an integer"),
        ("krum", {"num_malicious": True}, "num_malicious must be an integer"),
        ("trimmed_mean", {"trim_ratio": 0.5}, "trim_ratio must be < 0.5"),
        ("trimmed_mean", {"trim_ratio": 0.1, "num_malicious": 1}, "either"),
        ("geometric_median", {"nu": 0}, "nu must be > 0"),
        ("norm_clip", {"max_norm": float("nan")}, "finite"),
        ("rfout_1d", {"variant": "fancy"}, "variant must be one of"),
        ("rfout_1d", {"noise_multiplier": 1.0}, "needs clip_norm"),
        ("multi_krum", {"num_selected": 0}, "num_selected must be >= 1"),
    ],
)
def test_invalid_parameters_name_the_parameter(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_aggregator(name, **params)


# --------------------------------------------------------------------------- hand cases
def test_fedavg_weights_by_claimed_counts() -> None:
    result = get_aggregator("fedavg")(clients([1.0, 0.0], [3.0, 4.0]), num_examples=[1, 3])
    np.testing.assert_allclose(result.update[0], [2.5, 3.0])
    np.testing.assert_allclose(result.weights, [0.25, 0.75])
    unweighted = get_aggregator("fedavg")(clients([1.0, 0.0], [3.0, 4.0]))
    np.testing.assert_allclose(unweighted.update[0], [2.0, 2.0])


def test_median_odd_and_even_counts() -> None:
    odd = get_aggregator("median")(clients([1.0, -5.0], [5.0, 0.0], [2.0, 7.0]))
    np.testing.assert_array_equal(odd.update[0], [2.0, 0.0])
    even = get_aggregator("median")(clients([1.0], [2.0], [10.0], [4.0]))
    np.testing.assert_array_equal(even.update[0], [3.0])  # mean of the two middle values


def test_trimmed_mean_by_count_and_by_ratio() -> None:
    data = clients([1.0], [2.0], [3.0], [100.0])
    by_count = get_aggregator("trimmed_mean", num_malicious=1)(data)
    np.testing.assert_allclose(by_count.update[0], [2.5])
    by_ratio = get_aggregator("trimmed_mean", trim_ratio=0.25)(data)
    np.testing.assert_allclose(by_ratio.update[0], [2.5])
    assert get_aggregator("trimmed_mean").trimmed_per_side(10) == 1  # default ratio 0.1


def test_krum_hand_case() -> None:
    # Points 0, 1, 2.5, 10 with f=0: scores use the n-f-2=2 nearest others.
    # 0: 1 + 6.25; 1: 1 + 2.25; 2.5: 2.25 + 6.25; 10: 56.25 + 81.
    result = get_aggregator("krum")(clients([0.0], [1.0], [2.5], [10.0]))
    np.testing.assert_allclose(result.scores, [7.25, 3.25, 8.5, 137.25])
    assert result.kept == [1]
    np.testing.assert_array_equal(result.update[0], [1.0])
    assert set(result.rejected) == {0, 2, 3}
    assert "score 137.25 above the selection cut-off 3.25" in result.rejected[3]


def test_multi_krum_hand_case() -> None:
    result = get_aggregator("multi_krum", num_selected=2)(clients([0.0], [1.0], [2.5], [10.0]))
    assert result.kept == [0, 1]
    np.testing.assert_allclose(result.update[0], [0.5])
    default = get_aggregator("multi_krum", num_malicious=1)(
        clients([0.0], [1.0], [2.5], [10.0], [1.5])
    )
    assert default.kept == [0, 1, 2, 4]  # n - f = 4 lowest scores


def test_bulyan_hand_case() -> None:
    # f=1, n=7 -> theta=5, beta=3. The far point 100 and then the farthest of the rest
    # (-20) are left out by recursive Krum; per coordinate the 3 of {0, 1, 2, 3, 4} closest
    # to their median 2 are {1, 2, 3} -> 2.
    data = clients([0.0], [1.0], [2.0], [3.0], [4.0], [100.0], [-20.0])
    result = get_aggregator("bulyan", num_malicious=1)(data)
    assert result.kept == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(result.update[0], [2.0])
    assert result.info == {"theta": 5, "beta": 3}


def test_geometric_median_hand_cases() -> None:
    # In 1-D the geometric median is the median.
    line = get_aggregator("geometric_median", tol=1e-10)(clients([0.0], [1.0], [100.0]))
    np.testing.assert_allclose(line.update[0], [1.0], atol=1e-4)
    # For an equilateral triangle it is the centroid.
    s = np.sqrt(3.0)
    tri = get_aggregator("geometric_median", tol=1e-12)(clients([0, 0], [2, 0], [1, s]))
    np.testing.assert_allclose(tri.update[0], [1.0, s / 3], atol=1e-5)
    assert tri.info["converged"] == 1


def test_geometric_median_matches_reference_on_random_data() -> None:
    updates = random_updates(9, seed=3)
    result = get_aggregator("geometric_median", tol=1e-12, max_iter=1000)(updates)
    expected = ref.geometric_median(ref.flat(updates))
    np.testing.assert_allclose(flat_update(result), expected, atol=1e-4)


def test_norm_clip_hand_case() -> None:
    result = get_aggregator("norm_clip", max_norm=1.0)(clients([3.0, 4.0], [0.0, 1.0]))
    np.testing.assert_allclose(result.update[0], [0.3, 0.9], rtol=1e-6)
    np.testing.assert_allclose(result.scores, [5.0, 1.0])
    adaptive = get_aggregator("norm_clip")(clients([3.0, 4.0], [0.0, 1.0], [0.0, 2.0]))
    assert adaptive.info["bound"] == pytest.approx(2.0)  # median norm
    np.testing.assert_allclose(adaptive.update[0], [0.4, (1.6 + 1 + 2) / 3], rtol=1e-6)


def test_centered_clip_hand_case_and_history() -> None:
    rule = get_aggregator("centered_clip", radius=1.0, iterations=1)
    first = rule(clients([0.0], [0.0], [10.0]))
    np.testing.assert_allclose(first.update[0], [1.0 / 3.0], rtol=1e-6)  # v=0 + (0+0+1)/3
    # The next round starts from the previous aggregate 1/3.
    second = rule(clients([1.0 / 3.0], [1.0 / 3.0], [10.0]))
    np.testing.assert_allclose(second.update[0], [1.0 / 3.0 + 1.0 / 3.0], rtol=1e-5)
    rule.reset()
    again = rule(clients([0.0], [0.0], [10.0]))
    np.testing.assert_allclose(again.update[0], [1.0 / 3.0], rtol=1e-6)


def test_rfout_faithful_hand_case() -> None:
    # 10 zeros and one 100: mean 100/11, population std 28.75..., |100 - mean| = 90.9 > 86.2,
    # so 100 becomes the mean and the result is (100/11)/11.
    data = clients(*([[0.0]] * 10 + [[100.0]]))
    result = get_aggregator("rfout_1d")(data)
    np.testing.assert_allclose(result.update[0], [100.0 / 121.0], rtol=1e-6)
    assert result.info["replaced"] == 1
    np.testing.assert_allclose(result.scores, [0.0] * 10 + [1.0])


def test_rfout_faithful_cannot_fire_with_ten_clients(caplog: pytest.LogCaptureFixture) -> None:
    data = clients(*([[0.0]] * 9 + [[1e6]]))
    with caplog.at_level(logging.WARNING):
        result = get_aggregator("rfout_1d")(data)
    assert result.info["replaced"] == 0
    np.testing.assert_allclose(result.update[0], [1e5])  # the plain mean: nothing replaced
    assert "cannot replace anything with n=10" in caplog.text
    robust = get_aggregator("rfout_1d", variant="robust")(data)
    np.testing.assert_allclose(robust.update[0], [0.0])


def test_rfout_faithful_masking_by_colluders() -> None:
    # Samuelson: k identical colluders are caught only when k < n/10.
    honest = [[float(v)] for v in np.linspace(-1, 1, 18)]
    one = get_aggregator("rfout_1d")(clients(*(honest + [[50.0]])))
    assert one.info["replaced"] >= 1 and one.scores[-1] == 1.0
    two = get_aggregator("rfout_1d")(clients(*(honest + [[50.0], [50.0]])))
    assert two.scores[-1] == 0.0 and two.scores[-2] == 0.0  # masked: 2/20 is not < 1/10
    robust = get_aggregator("rfout_1d", variant="robust")(clients(*(honest + [[50.0], [50.0]])))
    assert robust.scores[-1] == 1.0 and robust.scores[-2] == 1.0


def test_rfout_clip_and_noise() -> None:
    data = clients([3.0, 4.0], [0.0, 1.0], [0.0, 1.0])
    clipped = get_aggregator("rfout_1d", clip_norm=1.0)(data)
    np.testing.assert_allclose(clipped.update[0], [0.6 / 3, (0.8 + 2) / 3], rtol=1e-6)
    noisy_a = get_aggregator("rfout_1d", clip_norm=1.0, noise_multiplier=1.0, seed=7)(data)
    noisy_b = get_aggregator("rfout_1d", clip_norm=1.0, noise_multiplier=1.0, seed=7)(data)
    np.testing.assert_array_equal(noisy_a.update[0], noisy_b.update[0])
    assert not np.allclose(noisy_a.update[0], clipped.update[0])


# ----------------------------------------------------------------- against the references
@pytest.mark.parametrize("seed", range(5))
def test_distance_rules_match_reference(seed: int) -> None:
    updates = random_updates(11, seed)
    x = ref.flat(updates)
    krum = get_aggregator("krum", num_malicious=2)(updates)
    winner, expected = ref.krum(x, 2)
    assert krum.kept == [winner]
    np.testing.assert_allclose(flat_update(krum), expected, rtol=1e-6)
    multi = get_aggregator("multi_krum", num_malicious=2, num_selected=5)(updates)
    chosen, expected = ref.multi_krum(x, 2, 5)
    assert multi.kept == chosen
    np.testing.assert_allclose(flat_update(multi), expected, rtol=1e-5, atol=1e-6)
    bulyan = get_aggregator("bulyan", num_malicious=2)(updates)
    chosen, expected = ref.bulyan(x, 2)
    assert bulyan.kept == chosen
    np.testing.assert_allclose(flat_update(bulyan), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_coordinate_rules_match_numpy(seed: int) -> None:
    updates = random_updates(12, seed)
    x = ref.flat(updates)
    median = get_aggregator("median")(updates)
    np.testing.assert_allclose(flat_update(median), np.median(x, axis=0), rtol=1e-6)
    trimmed = get_aggregator("trimmed_mean", num_malicious=3)(updates)
    np.testing.assert_allclose(flat_update(trimmed), ref.trimmed_mean(x, 3), atol=1e-6)
    robust = get_aggregator("rfout_1d", variant="robust")(updates)
    np.testing.assert_allclose(
        flat_update(robust), ref.rfout(x, robust=True).mean(axis=0), atol=1e-6
    )


# ------------------------------------------------------------------------ preconditions
@pytest.mark.parametrize(
    ("name", "params", "too_few", "enough", "message"),
    [
        ("krum", {"num_malicious": 2}, 6, 7, "n > 2 \\* num_malicious \\+ 2"),
        ("multi_krum", {"num_malicious": 1}, 4, 5, "needs at least 5 clients, got 4"),
        ("multi_krum", {"num_selected": 6}, 5, 6, "n >= num_selected"),
        ("bulyan", {"num_malicious": 2}, 10, 11, "n >= 4 \\* num_malicious \\+ 3"),
        ("median", {"num_malicious": 2}, 4, 5, "needs at least 5 clients"),
        ("trimmed_mean", {"num_malicious": 2}, 4, 5, "needs at least 5 clients"),
        ("geometric_median", {"num_malicious": 1}, 2, 3, "needs at least 3 clients"),
    ],
)
def test_preconditions_fail_loudly(
    name: str, params: dict, too_few: int, enough: int, message: str
) -> None:
    rule = get_aggregator(name, **params)
    with pytest.raises(ValueError, match=message):
        rule(random_updates(too_few, 0))
    assert rule.min_clients() == enough
    rule(random_updates(enough, 0))


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ([], "no updates"),
        ([np.zeros(3)], "list of clients"),
        ([[np.zeros(3)], [np.zeros(4)]], "client 1 layer 0 has shape"),
        ([[np.zeros(3)], [np.zeros(3), np.zeros(1)]], "client 1 has 2 layers"),
        ([[np.array(["a"])]], "only numeric arrays"),
    ],
)
def test_malformed_updates_raise(updates: list, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        get_aggregator("median")(updates)


def test_bad_num_examples_and_client_ids_raise() -> None:
    rule = get_aggregator("fedavg")
    with pytest.raises(ValueError, match="finite and positive"):
        rule(random_updates(2, 0), num_examples=[1, 0])
    with pytest.raises(ValueError, match="shape"):
        rule(random_updates(2, 0), num_examples=[1, 2, 3])
    with pytest.raises(ValueError, match="unique"):
        rule(random_updates(2, 0), client_ids=["a", "a"])


# ------------------------------------------------------------------------- general rules
@pytest.mark.parametrize("name", sorted(available_aggregators()))
def test_inputs_untouched_output_float32_same_shapes(name: str) -> None:
    updates = random_updates(11, 1)
    updates[0][0] = updates[0][0].astype(np.float64)  # mixed dtypes are read as float32
    base = [np.full(layer.shape, 0.5, dtype=np.float32) for layer in updates[1]]
    snapshot = [[layer.copy() for layer in u] for u in updates]
    base_snapshot = [layer.copy() for layer in base]
    rule = get_aggregator(name, **REQUIRED_PARAMS.get(name, {}))
    for kwargs in ({}, {"base": base}):
        result = rule(
            updates, num_examples=list(range(1, 12)), client_ids=list("abcdefghijk"), **kwargs
        )
        assert [layer.shape for layer in result.update] == [layer.shape for layer in updates[0]]
        assert all(layer.dtype == np.float32 for layer in result.update)
        assert sorted(result.kept + list(result.rejected)) == list(range(11))
    for before, after in zip(snapshot, updates, strict=True):
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(base_snapshot, base, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(available_aggregators()))
def test_base_is_subtracted_lazily(name: str) -> None:
    updates = random_updates(11, 2)
    rng = np.random.default_rng(9)
    base = [rng.standard_normal(layer.shape).astype(np.float32) for layer in updates[0]]
    weights = [[layer + b for layer, b in zip(u, base, strict=True)] for u in updates]
    deltas = [[w - b for w, b in zip(u, base, strict=True)] for u in weights]
    ids = [f"c{i}" for i in range(len(updates))]
    seeded = {"seed": 0} if "seed" in aggregator_parameters(name) else {}  # same noise draws
    seeded.update(REQUIRED_PARAMS.get(name, {}))
    direct = get_aggregator(name, **seeded)(deltas, client_ids=ids)
    lazy = get_aggregator(name, **seeded)(weights, base=base, client_ids=ids)
    np.testing.assert_allclose(flat_update(lazy), flat_update(direct), rtol=1e-5, atol=1e-6)
    assert lazy.kept == direct.kept


def test_blocks_spanning_layers_are_exact() -> None:
    # Tiny blocks force every layer boundary to fall inside a block.
    from flwr_robust.aggregation import UpdateMatrix

    updates = random_updates(5, 4, shapes=((3, 7), (1,), (300,), (2, 5)))
    x = ref.flat(updates)
    matrix = UpdateMatrix(updates, max_block_bytes=5 * 4 * 256)
    assert len(matrix.block_ranges(5)) > 1
    pieces = [block.copy() for _, _, block in matrix.blocks()]
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), x.astype(np.float32))
    np.testing.assert_allclose(matrix.gram(centered=False), x @ x.T, rtol=1e-5)
    np.testing.assert_allclose(matrix.squared_norms(), (x**2).sum(axis=1), rtol=1e-6)
