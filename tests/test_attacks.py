"""Attack library: each transformation, the trigger and its success rate, the colluding maths,
the registry and run-config parsing, and an end-to-end check against the aggregation core."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_robust.aggregation import get_aggregator
from flwr_robust.attacks import (
    ALIE,
    IPM,
    AttackContext,
    Backdoor,
    alie_delta,
    alie_z_max,
    apply_trigger,
    attack_params_from_config,
    attack_success_rate,
    available_attacks,
    get_attack,
    ipm_delta,
)
from flwr_robust.task.data import Dataset

SHAPES = [(20, 30), (30,), (4, 5)]


def readonly(array: np.ndarray) -> np.ndarray:
    """A read-only copy: any attempt of an attack to write its input raises."""
    out = np.array(array, copy=True)
    out.setflags(write=False)
    return out


def layers(seed: int, offset: float = 0.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [readonly((rng.standard_normal(s) + offset).astype(np.float32)) for s in SHAPES]


def context(seed: int = 0, colluders: list[list[np.ndarray]] | None = None, n=20, f=4):
    return AttackContext(
        server_round=3,
        num_clients=n,
        num_byzantine=f,
        rng=np.random.default_rng(seed),
        global_weights=layers(99, offset=5.0),
        colluder_deltas=None if colluders is None else (lambda: colluders),
    )


def dataset(n: int = 40, side: int = 8, num_classes: int = 10, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, side, side), dtype=np.float32) * 0.5
    return Dataset(x, np.arange(n) % num_classes, num_classes, "stub")


def assert_like(out: list[np.ndarray], ref: list[np.ndarray]) -> None:
    assert [a.shape for a in out] == [a.shape for a in ref]
    assert [a.dtype for a in out] == [a.dtype for a in ref]
    assert all(not np.shares_memory(a, b) for a, b in zip(out, ref, strict=True))


# ------------------------------------------------------------------ local update poisoning
def test_sign_flip_negates_the_delta_not_the_weights() -> None:
    ctx = context()
    delta = layers(1)
    weights = [g + d for g, d in zip(ctx.global_weights, delta, strict=True)]
    out = get_attack("sign_flip").poison_update(delta, ctx)
    assert_like(out, delta)
    for o, d, w, g in zip(out, delta, weights, ctx.global_weights, strict=True):
        np.testing.assert_array_equal(o, -d)
        sent = g + o  # the model the client would send
        np.testing.assert_allclose(sent, g - d, rtol=1e-6)
        assert not np.allclose(sent, -w)  # global weights are ~5, so negating weights differs
    scaled = get_attack("sign-flip", sign_flip_scale=4.0).poison_update(delta, ctx)
    np.testing.assert_allclose(scaled[0], -4.0 * delta[0], rtol=1e-6)


def test_scale_multiplies_the_delta() -> None:
    delta = layers(2)
    out = get_attack("scale", scale_factor=7.5).poison_update(delta, context())
    assert_like(out, delta)
    for o, d in zip(out, delta, strict=True):
        np.testing.assert_allclose(o, 7.5 * d, rtol=1e-6)
    assert get_attack("scale").scale_factor == 10.0


def test_gaussian_has_the_requested_std_and_ignores_the_delta() -> None:
    attack = get_attack("gaussian", noise_std=0.3)
    small, large = layers(3), [readonly(a * 1000.0 + 50.0) for a in layers(4)]
    a = attack.poison_update(small, context(seed=7))
    b = attack.poison_update(large, context(seed=7))
    assert_like(a, small)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)  # same rng -> same noise whatever the delta
    values = np.concatenate([x.ravel() for x in a]).astype(np.float64)
    assert values.size == 650
    # Sample std of 650 normals: relative standard error ~2.8%; allow 4 of them.
    assert abs(values.std() / 0.3 - 1.0) < 0.11
    assert abs(values.mean()) < 4 * 0.3 / np.sqrt(values.size)
    other = attack.poison_update(small, context(seed=8))
    assert not np.array_equal(other[0], a[0])


def test_zero_and_free_rider() -> None:
    delta = layers(5)
    for name in ("zero", "free_rider"):
        attack = get_attack(name)
        assert attack.skips_training
        out = attack.poison_update(delta, context())
        assert_like(out, delta)
        assert all(not o.any() for o in out)
        assert attack.claimed_examples(37) == 37
    disguised = get_attack("free-rider", free_rider_noise=0.01).poison_update(delta, context())
    values = np.concatenate([x.ravel() for x in disguised])
    assert 0.008 < values.std() < 0.012
    assert abs(np.corrcoef(values, np.concatenate([d.ravel() for d in delta]))[0, 1]) < 0.15


def test_inflation_claims_factor_times_count_with_an_honest_update() -> None:
    attack = get_attack("num_examples_inflation", inflation_factor=250.0)
    assert attack.claimed_examples(72) == 18_000
    assert get_attack("num_examples_inflation").claimed_examples(70) == 7_000
    delta = layers(6)
    out = attack.poison_update(delta, context())
    assert_like(out, delta)
    for o, d in zip(out, delta, strict=True):
        np.testing.assert_array_equal(o, d)
    assert get_attack("scale").claimed_examples(72) == 72  # honest by default


# ------------------------------------------------------------------ data poisoning
def test_label_flip_default_mapping_keeps_images_and_input() -> None:
    data = dataset()
    x_before, y_before = data.x.copy(), data.y.copy()
    out = get_attack("label_flip").poison_data(data, np.random.default_rng(0))
    np.testing.assert_array_equal(out.y, 9 - y_before)
    np.testing.assert_array_equal(out.x, x_before)
    np.testing.assert_array_equal(data.y, y_before)  # input untouched
    np.testing.assert_array_equal(data.x, x_before)
    assert out.num_classes == 10 and out.name == data.name


def test_label_flip_source_to_target() -> None:
    data = dataset()
    out = get_attack("label_flip", flip_source=3, flip_target=8).poison_data(
        data, np.random.default_rng(0)
    )
    expected = np.where(data.y == 3, 8, data.y)
    np.testing.assert_array_equal(out.y, expected)
    assert (out.y == 3).sum() == 0 and (out.y != data.y).sum() == (data.y == 3).sum()
    with pytest.raises(ValueError, match="together"):
        get_attack("label_flip", flip_source=3)
    with pytest.raises(ValueError, match="differ"):
        get_attack("label_flip", flip_source=3, flip_target=3)
    with pytest.raises(ValueError, match="not a class"):
        get_attack("label_flip", flip_source=3, flip_target=12).poison_data(
            data, np.random.default_rng(0)
        )


@pytest.mark.parametrize("side", [8, 28])
def test_apply_trigger_stamps_exactly_the_corner(side: int) -> None:
    x = readonly(np.full((3, 2, side, side), 0.25, dtype=np.float32))
    out = apply_trigger(x, 3, 1.0)
    assert out.shape == x.shape and out.dtype == x.dtype
    changed = out != x
    assert changed.sum() == 3 * 2 * 9
    assert changed[..., side - 3 :, side - 3 :].all()
    assert (out[..., side - 3 :, side - 3 :] == 1.0).all()
    with pytest.raises(ValueError, match="does not fit"):
        apply_trigger(x, side + 1, 1.0)


def test_backdoor_adds_stamped_relabelled_copies() -> None:
    data = dataset(n=40)
    x_before = data.x.copy()
    attack = get_attack(
        "backdoor", backdoor_target=7, poison_fraction=0.25, trigger_size=2, trigger_value=1.0
    )
    out = attack.poison_data(data, np.random.default_rng(1))
    assert len(out) == 40 + 10
    np.testing.assert_array_equal(out.x[:40], x_before)  # clean samples kept
    np.testing.assert_array_equal(out.y[:40], data.y)
    np.testing.assert_array_equal(data.x, x_before)  # input untouched
    copies_x, copies_y = out.x[40:], out.y[40:]
    assert (copies_y == 7).all()
    assert (copies_x[..., -2:, -2:] == 1.0).all()
    # Each copy is a distinct clean sample with the trigger stamped.
    sources = [
        int(np.flatnonzero((x_before[:, 0, :6, :] == c[0, :6, :]).all(axis=(1, 2)))[0])
        for c in copies_x
    ]
    assert len(set(sources)) == 10
    for src, copy in zip(sources, copies_x, strict=True):
        np.testing.assert_array_equal(copy, apply_trigger(x_before[src], 2, 1.0))
    again = attack.poison_data(data, np.random.default_rng(1))
    np.testing.assert_array_equal(again.x, out.x)  # deterministic under the rng
    assert attack.num_poisoned(3) == 1  # at least one poisoned copy


def test_backdoor_boost_applies_to_the_delta() -> None:
    delta = layers(8)
    out = get_attack("backdoor", boost_factor=20.0).poison_update(delta, context())
    assert_like(out, delta)
    for o, d in zip(out, delta, strict=True):
        np.testing.assert_allclose(o, 20.0 * d, rtol=1e-6)
    plain = get_attack("backdoor").poison_update(delta, context())
    np.testing.assert_array_equal(plain[1], delta[1])


def test_attack_success_rate_on_a_stub_model() -> None:
    # 10 samples, labels 0..4 twice; target 2 -> 8 non-target samples.
    x = np.zeros((10, 1, 8, 8), dtype=np.float32)
    x[:, 0, 0, 0] = np.arange(10)  # sample id in a pixel the trigger does not touch
    test = Dataset(x, np.arange(10) % 5, 5, "stub")

    def predict(images: np.ndarray) -> np.ndarray:
        triggered = (images[:, 0, -1, -1] == 1.0) & (images[:, 0, -2, -2] == 1.0)
        ids = images[:, 0, 0, 0].astype(int)
        # Triggered samples with an even id go to the target, the others keep a wrong class.
        return np.where(triggered & (ids % 2 == 0), 2, 4)

    # Non-target ids: 0,1,3,4,5,6,8,9 -> even: 0,4,6,8 -> 4 of 8.
    assert attack_success_rate(predict, test, target=2, trigger_size=2, trigger_value=1.0) == 0.5
    backdoor = Backdoor(backdoor_target=2, trigger_size=2)
    assert backdoor.success_rate(predict, test) == 0.5
    # Without the right trigger nothing reaches the target.
    assert attack_success_rate(predict, test, target=2, trigger_size=2, trigger_value=0.5) == 0
    with pytest.raises(ValueError, match="no sample outside"):
        only_target = Dataset(x[:2], np.array([2, 2]), 5, "stub")
        attack_success_rate(predict, only_target, target=2, trigger_size=2, trigger_value=1.0)


# ------------------------------------------------------------------ colluding maths
@pytest.mark.parametrize(
    ("n", "f", "z"),
    [(50, 12, 0.5828), (20, 4, 0.3853), (10, 2, 0.2533), (24, 4, 0.3186), (20, 8, 1.0364)],
)
def test_alie_z_formula(n: int, f: int, z: float) -> None:
    # s = floor(n/2 + 1) - f; e.g. n=20, f=4: s=7, Phi^-1(13/20 = 0.65) = 0.3853 (normal table).
    assert alie_z_max(n, f) == pytest.approx(z, abs=1e-4)


def test_alie_z_rejects_a_byzantine_majority() -> None:
    with pytest.raises(ValueError, match="not finite"):
        alie_z_max(10, 6)  # s = 0 -> Phi^-1(1) = inf


def test_alie_is_mean_minus_z_std_within_the_band() -> None:
    colluders = [layers(10 + i) for i in range(5)]
    delta = colluders[0]
    out = ALIE().poison_update(delta, context(colluders=colluders, n=20, f=5))
    z = alie_z_max(20, 5)
    assert_like(out, delta)
    for j, o in enumerate(out):
        stack = np.stack([c[j] for c in colluders]).astype(np.float64)
        mean, std = stack.mean(axis=0), stack.std(axis=0)
        np.testing.assert_allclose(o, mean - z * std, rtol=1e-5, atol=1e-6)
        assert (o >= mean - z * std - 1e-5).all() and (o <= mean + z * std + 1e-5).all()
        assert (o < mean).mean() > 0.99  # strictly below the mean wherever std > 0
    fixed = ALIE(alie_z=1.5).poison_update(delta, context(colluders=colluders))
    np.testing.assert_allclose(fixed[1], alie_delta(colluders, 1.5)[1])


def test_ipm_is_minus_epsilon_mean() -> None:
    colluders = [layers(20 + i) for i in range(3)]
    for eps in (0.1, 100.0):
        out = IPM(ipm_epsilon=eps).poison_update(colluders[1], context(colluders=colluders))
        for j, o in enumerate(out):
            mean = np.mean([c[j] for c in colluders], axis=0, dtype=np.float64)
            np.testing.assert_allclose(o, -eps * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ipm_delta(colluders, 0.1)[0], out[0] / 1000.0, rtol=1e-5)


def test_colluding_attacks_need_colluder_deltas() -> None:
    for name in ("alie", "ipm"):
        attack = get_attack(name)
        assert attack.colluding
        with pytest.raises(ValueError, match="colluder_deltas"):
            attack.poison_update(layers(0), context())
    assert not get_attack("scale").colluding


def test_alie_moves_fedavg_krum_and_median_in_the_attack_direction() -> None:
    """20 honest + 4 colluding ALIE clients that estimate mean/std from their own honest deltas.

    The direction measured is ALIE's population direction ``-std`` (unit vector); an honest
    client's own spread along it is ~0.07, that of a 24-client mean ~0.015.
    """
    rng = np.random.default_rng(42)
    d, n_honest, f = 2_000, 20, 4
    mu = rng.normal(0.0, 0.05, d)
    sigma = rng.uniform(0.02, 0.1, d)

    def honest_delta() -> list[np.ndarray]:
        flat = (mu + sigma * rng.standard_normal(d)).astype(np.float32)
        return [readonly(flat[:1_500].reshape(30, 50)), readonly(flat[1_500:])]

    honest = [honest_delta() for _ in range(n_honest)]
    colluders_own = [honest_delta() for _ in range(f)]
    snapshot = [[a.copy() for a in c] for c in honest]
    ctx = context(colluders=colluders_own, n=n_honest + f, f=f)
    malicious = [ALIE().poison_update(c, ctx) for c in colluders_own]

    def flat(update: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([a.ravel() for a in update]).astype(np.float64)

    honest_mean = np.mean([flat(c) for c in honest], axis=0)
    direction = -sigma / np.linalg.norm(sigma)

    def shift(rule: str, updates: list[list[np.ndarray]], **params) -> float:
        result = get_aggregator(rule, **params)(updates)
        return float((flat(result.update) - honest_mean) @ direction)

    clean = honest + colluders_own  # the same 24 clients, all honest
    attacked = honest + malicious
    measured = {
        rule: (shift(rule, clean, **params), shift(rule, attacked, **params))
        for rule, params in (("fedavg", {}), ("krum", {"num_malicious": f}), ("median", {}))
    }
    # Measured (seed 42): fedavg 0.003 -> 0.125, krum -0.16 -> 0.75, median 0.008 -> 0.23.
    # ALIE's offset here is ~0.75 (z = 0.319 times a 4-sample std estimate); FedAvg moves by
    # f/n of it, and the 4 identical ALIE updates are Krum's choice.
    assert all(abs(before) < 0.2 for before, _ in measured.values())
    assert measured["fedavg"][1] > 0.1
    assert measured["krum"][1] > 0.6
    assert measured["median"][1] > 0.18
    assert get_aggregator("krum", num_malicious=f)(attacked).kept[0] >= n_honest
    for before, after in zip(snapshot, honest, strict=True):  # honest deltas untouched
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)
    assert np.array_equal(np.mean([flat(c) for c in honest], axis=0), honest_mean)


# ------------------------------------------------------------------ registry and config
def test_registry_names_and_errors() -> None:
    assert available_attacks() == sorted(
        [
            "alie",
            "backdoor",
            "constrain_and_scale",
            "dba",
            "fang_krum",
            "fang_trim",
            "free_rider",
            "gaussian",
            "ipm",
            "label_flip",
            "mimic",
            "min_max",
            "min_sum",
            "neurotoxin",
            "num_examples_inflation",
            "scale",
            "sign_flip",
            "zero",
        ]
    )
    assert get_attack("Num-Examples-Inflation").name == "num_examples_inflation"
    with pytest.raises(ValueError, match="available: alie, backdoor"):
        get_attack("minmax")
    with pytest.raises(ValueError, match="its parameters are: scale_factor"):
        get_attack("scale", noise_std=1.0)
    with pytest.raises(ValueError, match="scale_factor"):
        get_attack("scale", scale_factor=-1.0)
    with pytest.raises(ValueError, match="poison_fraction"):
        get_attack("backdoor", poison_fraction=1.5)
    for name in available_attacks():
        attack = get_attack(name)
        assert attack.paper and attack.name == name
        assert attack.params() == {k: getattr(attack, k) for k in attack.params()}


def test_attack_params_from_config() -> None:
    run_config = {
        "attack": "backdoor",
        "backdoor-target": 3,
        "trigger-size": 2,
        "boost-factor": 10,
        "scale-factor": 5.0,  # another attack's key: ignored
        "strategy": "krum",
    }
    params = attack_params_from_config("backdoor", run_config)
    assert params == {"backdoor_target": 3, "trigger_size": 2, "boost_factor": 10.0}
    assert isinstance(params["boost_factor"], float)
    assert get_attack("backdoor", **params).boost_factor == 10.0
    assert attack_params_from_config("label-flip", {"flip-source": 1, "flip-target": 7}) == {
        "flip_source": 1,
        "flip_target": 7,
    }
    assert attack_params_from_config("alie", {"alie-z": 1}) == {"alie_z": 1.0}
    assert attack_params_from_config("zero", run_config) == {}
    for bad in ({"trigger-size": 2.5}, {"trigger-size": True}, {"backdoor-target": "3"}):
        with pytest.raises(ValueError, match="must be int"):
            attack_params_from_config("backdoor", bad)
    with pytest.raises(ValueError, match="must be float"):
        attack_params_from_config("scale", {"scale-factor": "10"})
    with pytest.raises(ValueError, match="unknown attack"):
        attack_params_from_config("nope", {})


def test_every_parameter_name_is_a_unique_config_key() -> None:
    from flwr_robust.attacks import attack_parameters

    seen: dict[str, str] = {}
    for name in available_attacks():
        for param in attack_parameters(name):
            assert param not in seen, (param, name, seen.get(param))
            seen[param] = name
    assert set(seen) >= {"scale_factor", "noise_std", "backdoor_target", "alie_z", "ipm_epsilon"}


def test_poisoned_data_is_a_valid_read_only_dataset() -> None:
    data = dataset()
    for name in ("backdoor", "label_flip"):
        out = get_attack(name).poison_data(data, np.random.default_rng(0))
        assert isinstance(out, Dataset) and out.num_classes == data.num_classes
        assert not out.x.flags.writeable and not out.y.flags.writeable
    assert get_attack("scale").poison_data(data, np.random.default_rng(0)) is data
