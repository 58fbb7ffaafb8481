"""Backdoor and data attacks of issue 13: label-flip modes and poison ratio, the shared trigger
machinery, DBA's distributed trigger, Neurotoxin's gradient mask, constrain-and-scale's anomaly
term and scaling, the attack window, and each attack end to end through ``LocalTrainer``."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from flwr_robust.apps.client import LocalTrainer, Role
from flwr_robust.apps.server import CentralEvaluation
from flwr_robust.apps.settings import RunSettings
from flwr_robust.attacks import (
    DBA,
    AttackContext,
    ConstrainAndScale,
    Neurotoxin,
    Trigger,
    apply_trigger,
    attack_params_from_config,
    attack_success_rate,
    get_attack,
    poisoned_training,
)
from flwr_robust.attacks.backdoor import clip_to_norm, dba_triggers, neurotoxin_mask
from flwr_robust.experiments.grid import parse_config
from flwr_robust.task.data import Dataset, load_dataset
from flwr_robust.task.models import build_model, get_named_weights
from flwr_robust.task.training import train


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def dataset(n: int = 40, side: int = 8, num_classes: int = 10) -> Dataset:
    x = np.full((n, 1, side, side), 0.25, dtype=np.float32)
    x[:, 0, -1, 0] = np.arange(n) / n  # sample id, in a pixel no trigger here touches
    return Dataset(x, np.arange(n) % num_classes, num_classes, "stub")


def context(*, index: int | None = None, previous=None, current=None, n=10, f=2):
    current = current if current is not None else [np.zeros(2, dtype=np.float32)]
    return AttackContext(
        server_round=2, num_clients=n, num_byzantine=f, rng=np.random.default_rng(0),
        global_weights=current, colluder_index=index, previous_global_weights=previous,
    )


def stamped_pixels(before: np.ndarray, after: np.ndarray) -> set[tuple[int, int]]:
    rows, cols = np.nonzero((before != after).any(axis=0))
    return set(zip(rows.tolist(), cols.tolist(), strict=True))


# ------------------------------------------------------------------------------ label flip
def test_label_flip_shift_maps_y_to_y_plus_one_mod_c() -> None:
    data = dataset(n=30)
    out = get_attack("label_flip", flip_mode="shift").poison_data(data, np.random.default_rng(0))
    np.testing.assert_array_equal(out.y, (np.arange(30) + 1) % 10)
    np.testing.assert_array_equal(out.x, data.x)


@pytest.mark.parametrize(("mode", "fraction", "expected"), [
    ("shift", 0.25, 10), ("reverse", 0.3, 12), ("shift", 0.01, 1), ("reverse", 1.0, 40),
])
def test_label_flip_fraction_flips_exactly_that_share(mode: str, fraction: float,
                                                      expected: int) -> None:
    data = dataset(n=40)  # labels 0..9 four times: every flip of either map changes the label
    attack = get_attack("label_flip", flip_mode=mode, flip_fraction=fraction)
    out = attack.poison_data(data, np.random.default_rng(3))
    changed = np.flatnonzero(out.y != data.y)
    assert len(changed) == expected
    mapped = (data.y + 1) % 10 if mode == "shift" else 9 - data.y
    np.testing.assert_array_equal(out.y[changed], mapped[changed])
    again = attack.poison_data(data, np.random.default_rng(3))
    np.testing.assert_array_equal(again.y, out.y)
    other = attack.poison_data(data, np.random.default_rng(4))
    assert expected == 40 or not np.array_equal(other.y, out.y)


def test_label_flip_fraction_of_the_source_class() -> None:
    data = dataset(n=40)  # class 3: 4 samples
    out = get_attack("label_flip", flip_source=3, flip_target=8, flip_fraction=0.5).poison_data(
        data, np.random.default_rng(0)
    )
    changed = np.flatnonzero(out.y != data.y)
    assert len(changed) == 2 and (data.y[changed] == 3).all() and (out.y[changed] == 8).all()


def test_label_flip_parameter_errors() -> None:
    with pytest.raises(ValueError, match="flip_mode must be one of"):
        get_attack("label_flip", flip_mode="random")
    with pytest.raises(ValueError, match="leave it at 'reverse'"):
        get_attack("label_flip", flip_source=1, flip_target=2, flip_mode="shift")
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="flip_fraction"):
            get_attack("label_flip", flip_fraction=bad)


# ------------------------------------------------------------------------------ triggers
def test_square_trigger_is_apply_trigger_and_pixels_are_normalised() -> None:
    x = dataset(n=3, side=28).x
    square = Trigger.square(3, 1.0)
    np.testing.assert_array_equal(square.stamp(x), apply_trigger(x, 3, 1.0))
    assert square.pixels(28, 28) == {(r, c) for r in (25, 26, 27) for c in (25, 26, 27)}
    assert not square.fits(2, 28)
    with pytest.raises(ValueError, match="does not fit"):
        square.stamp(x[..., :2, :])
    with pytest.raises(ValueError, match="one value"):
        Trigger.union([square, Trigger((0,), (0,), 0.5)])
    test = dataset(n=10)
    for bad in ({}, {"trigger": square, "trigger_size": 3}, {"trigger_size": 3}):
        with pytest.raises(ValueError, match="give either trigger"):
            attack_success_rate(lambda x: np.zeros(len(x)), test, target=0, **bad)


def test_huge_updates_stay_finite() -> None:
    huge = [np.full(4, 3e38, dtype=np.float32), np.array([-3e38, 1.0], dtype=np.float32)]
    bounded = ConstrainAndScale(constrain_norm_bound=2.0).poison_update(huge, context())
    assert all(np.isfinite(a).all() for a in bounded)
    assert np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in bounded)) <= 2.0001
    clipped = Neurotoxin(neurotoxin_norm_bound=1.0).poison_update(huge, context())
    assert all(np.isfinite(a).all() for a in clipped)
    mask = neurotoxin_mask(huge, 0.5)
    np.testing.assert_array_equal(np.concatenate(mask), [0, 0, 0, 1, 1, 1])  # k=3, ties: first


def test_dba_local_triggers_by_hand_and_their_union_is_the_global_trigger() -> None:
    paper = dba_triggers(4, 4, 2, 1.0)  # the paper's MNIST trigger
    expected = [
        {(0, c) for c in range(4)}, {(0, c) for c in range(6, 10)},
        {(3, c) for c in range(4)}, {(3, c) for c in range(6, 10)},
    ]
    assert [t.pixels(28, 28) for t in paper] == expected
    attack = DBA()  # defaults: 1x3 strips, gap 1, fit 8x8 digits
    parts = [t.pixels(8, 8) for t in attack.local_triggers()]
    assert parts == [{(0, 0), (0, 1), (0, 2)}, {(0, 4), (0, 5), (0, 6)},
                     {(2, 0), (2, 1), (2, 2)}, {(2, 4), (2, 5), (2, 6)}]
    assert set().union(*parts) == attack.trigger().pixels(8, 8)
    assert sum(len(p) for p in parts) == len(attack.trigger().pixels(8, 8))  # disjoint


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4, 6])
def test_dba_colluder_k_stamps_local_pattern_k_mod_parts(index: int) -> None:
    data = dataset(n=20)
    attack = DBA(dba_target=5, dba_poison_fraction=0.25)
    out = attack.poison_data(data, np.random.default_rng(0), context(index=index))
    assert len(out) == 25 and (out.y[20:] == 5).all()
    np.testing.assert_array_equal(out.x[:20], data.x)
    part = attack.local_triggers()[index % 4].pixels(8, 8)
    for copy in out.x[20:]:
        source = data.x[round(float(copy[0, -1, 0]) * 20)]
        assert stamped_pixels(source, copy) == part
    for copy in attack.poison_data(data, np.random.default_rng(0)).x[20:]:  # no context: part 0
        source = data.x[round(float(copy[0, -1, 0]) * 20)]
        assert stamped_pixels(source, copy) == attack.local_triggers()[0].pixels(8, 8)


def test_dba_success_rate_uses_the_global_trigger() -> None:
    attack = DBA(dba_target=2)
    test = dataset(n=20)
    parts = [t.pixels(8, 8) for t in attack.local_triggers()]

    def all_parts(images: np.ndarray) -> np.ndarray:
        hit = np.ones(len(images), dtype=bool)
        for part in parts:
            for r, c in part:
                hit &= images[:, 0, r, c] == 1.0
        return np.where(hit, 2, 0)

    def first_part(images: np.ndarray) -> np.ndarray:
        hit = np.all([images[:, 0, r, c] == 1.0 for r, c in parts[0]], axis=0)
        return np.where(hit, 2, 0)

    assert attack.success_rate(all_parts, test) == 1.0  # 18 non-target samples, all hit
    assert attack.local_success_rates(all_parts, test) == [0.0] * 4  # one part is not enough
    assert attack.success_rate(first_part, test) == 1.0
    assert attack.local_success_rates(first_part, test) == [1.0, 0.0, 0.0, 0.0]


def test_dba_rejects_a_trigger_that_does_not_fit() -> None:
    attack = DBA(dba_strip_length=4, dba_gap=2)  # 4x10 pixels
    with pytest.raises(ValueError, match="does not fit"):
        attack.poison_data(dataset(), np.random.default_rng(0), context(index=0))
    out = attack.poison_data(dataset(side=28), np.random.default_rng(0), context(index=1))
    assert stamped_pixels(out.x[0], out.x[-1]) <= {(0, c) for c in range(6, 10)} | {(27, 0)}


# ------------------------------------------------------------------------------ neurotoxin
def test_neurotoxin_mask_zeroes_exactly_the_top_k_coordinates() -> None:
    direction = [np.array([0.1, -5.0, 0.2]), np.array([[3.0, 0.05], [-0.01, 4.0]])]
    mask = neurotoxin_mask(direction, 0.3)  # k = round(0.3 * 7) = 2: -5 and 4
    np.testing.assert_array_equal(mask[0], [1, 0, 1])
    np.testing.assert_array_equal(mask[1], [[1, 1], [1, 0]])
    assert mask[0].dtype == np.float32 and mask[1].shape == (2, 2)
    mask = neurotoxin_mask(direction, 0.5)  # k = 4: adds 3 and 0.2
    np.testing.assert_array_equal(np.concatenate([m.ravel() for m in mask]), [1, 0, 0, 0, 1, 1, 0])
    ties = neurotoxin_mask([np.ones(4)], 0.5)  # ties: the earlier coordinates
    np.testing.assert_array_equal(ties[0], [0, 0, 1, 1])
    assert neurotoxin_mask([np.arange(10.0)], 0.01)[0].sum() == 9  # at least one


def test_neurotoxin_mask_comes_from_the_last_global_update() -> None:
    attack = Neurotoxin(neurotoxin_ratio=0.25)
    previous = [np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32)]
    current = [np.array([1.5, -9.0, 1.0, 1.2], dtype=np.float32)]  # update 0.5, -10, 0, 0.2
    options = attack.training_options(context(previous=previous, current=current))
    np.testing.assert_array_equal(options.gradient_mask[0], [1, 0, 1, 1])
    first = attack.training_options(context(previous=None, current=current))
    assert first.gradient_mask is None  # first participation: no mask
    np.testing.assert_allclose(clip_to_norm([np.array([3.0, 4.0])], 1.0)[0], [0.6, 0.8])
    out = Neurotoxin(neurotoxin_norm_bound=1.0).poison_update([np.array([3.0, 4.0])], context())
    np.testing.assert_allclose(out[0], [0.6, 0.8])
    with pytest.raises(ValueError, match="neurotoxin_ratio"):
        Neurotoxin(neurotoxin_ratio=1.0)


def fresh_model(data: Dataset, seed: int = 0) -> torch.nn.Module:
    return build_model("mlp", input_shape=data.input_shape, num_classes=10, seed=seed)


def test_training_with_the_mask_never_changes_masked_coordinates() -> None:
    data, _ = load_dataset("digits")
    data = data.subset(np.arange(100))
    model = fresh_model(data)
    before = get_named_weights(model)
    rng = np.random.default_rng(0)
    direction = [rng.standard_normal(a.shape) for a in before.values()]
    mask = dict(zip(before, neurotoxin_mask(direction, 0.3), strict=True))
    train(model, data, epochs=2, learning_rate=0.1, momentum=0.9, gradient_mask=mask)
    after = get_named_weights(model)
    free = fresh_model(data)  # the same training without the mask
    train(free, data, epochs=2, learning_rate=0.1, momentum=0.9)
    unmasked = get_named_weights(free)
    moved = moved_free = 0
    for name, m in mask.items():
        frozen = m == 0
        np.testing.assert_array_equal(after[name][frozen], before[name][frozen])
        assert (unmasked[name][frozen] != before[name][frozen]).any()  # the mask mattered
        moved += int((after[name][~frozen] != before[name][~frozen]).sum())
        moved_free += int((unmasked[name][~frozen] != before[name][~frozen]).sum())
    assert moved > 0.95 * moved_free > 0  # (zero digit pixels leave some weights unmoved)


def test_train_option_errors() -> None:
    data, _ = load_dataset("synthetic")
    model = fresh_model(data)
    weights = get_named_weights(model)
    with pytest.raises(ValueError, match="unknown"):
        train(model, data, epochs=1, learning_rate=0.1, gradient_mask={"nope": np.ones(1)})
    name = next(iter(weights))
    with pytest.raises(ValueError, match="shape"):
        train(model, data, epochs=1, learning_rate=0.1, gradient_mask={name: np.ones(3)})
    with pytest.raises(ValueError, match="needs proximal_anchor"):
        train(model, data, epochs=1, learning_rate=0.1, anomaly_weight=0.5)
    with pytest.raises(ValueError, match=r"anomaly_weight must be a float in \[0, 1\)"):
        train(model, data, epochs=1, learning_rate=0.1, proximal_anchor=weights,
              anomaly_weight=1.0)
    with pytest.raises(ValueError, match="missing"):
        train(model, data, epochs=1, learning_rate=0.1, proximal_anchor={name: weights[name]},
              anomaly_weight=0.5)


# ------------------------------------------------------------------------------ constrain-and-scale
def update_norm(alpha: float) -> float:
    data, _ = load_dataset("digits")
    data = data.subset(np.arange(300))
    model = fresh_model(data, seed=1)
    anchor = get_named_weights(model)
    options = ConstrainAndScale(constrain_alpha=alpha).training_options(
        context(current=list(anchor.values()))
    )
    keywords = {}
    if options.proximal_anchor is not None:
        keywords = {"proximal_anchor": dict(zip(anchor, options.proximal_anchor, strict=True)),
                    "anomaly_weight": options.anomaly_weight}
    train(model, data, epochs=2, learning_rate=0.1, seed=5, **keywords)
    trained = get_named_weights(model)
    return float(np.sqrt(sum(np.sum((trained[k] - anchor[k]) ** 2.0) for k in anchor)))


def test_anomaly_term_pulls_the_model_towards_the_anchor() -> None:
    assert ConstrainAndScale(constrain_alpha=1.0).training_options(context()).anomaly_weight == 0
    free, constrained, strong = update_norm(1.0), update_norm(0.7), update_norm(0.3)
    assert np.isfinite([free, constrained, strong]).all()
    assert strong < constrained < free


def test_constrain_and_scale_gamma_and_norm_bound() -> None:
    delta = [np.array([3.0, 4.0], dtype=np.float32)]  # norm 5
    ctx = context(n=10, f=2)
    np.testing.assert_allclose(ConstrainAndScale().poison_update(delta, ctx)[0], [15.0, 20.0])
    bounded = ConstrainAndScale(constrain_norm_bound=10.0)
    np.testing.assert_allclose(bounded.poison_update(delta, ctx)[0], [6.0, 8.0])
    explicit = ConstrainAndScale(constrain_gamma=3.0, constrain_norm_bound=100.0)
    np.testing.assert_allclose(explicit.poison_update(delta, ctx)[0], [9.0, 12.0])
    assert explicit.poison_update(delta, ctx)[0].dtype == np.float32
    zero = [np.zeros(2, dtype=np.float32)]
    assert not bounded.poison_update(zero, ctx)[0].any()
    for bad in ({"constrain_alpha": 0.0}, {"constrain_gamma": -1.0},
                {"constrain_norm_bound": 0.0}):
        with pytest.raises(ValueError, match="constrain_"):
            ConstrainAndScale(**bad)


def test_trigger_attacks_train_on_the_shared_backdoor_copies() -> None:
    data = dataset(n=20)
    for attack in (Neurotoxin(neurotoxin_target=4), ConstrainAndScale(constrain_target=4)):
        out, _ = poisoned_training(attack, data, context())
        assert len(out) == 30 and (out.y[20:] == 4).all()
        np.testing.assert_array_equal(out.x[20:], apply_trigger(out.x[20:], 3, 1.0))
    flip = get_attack("label_flip", flip_mode="shift")
    out, options = poisoned_training(flip, data, context())
    np.testing.assert_array_equal(out.y, (data.y + 1) % 10)
    assert options.gradient_mask is None and options.anomaly_weight == 0


# ------------------------------------------------------------------------------ window, config
def test_attack_window() -> None:
    settings = RunSettings(attack_start_round=3, attack_stop_round=5)
    assert [settings.attack_active(r) for r in range(1, 8)] == [False, False, True, True, True,
                                                                False, False]
    assert settings.attack_active(0)  # no round number: attacked
    assert all(RunSettings().attack_active(r) for r in (1, 50))
    for bad in ({"attack-start-round": 0}, {"attack-stop-round": -1},
                {"attack-start-round": 4, "attack-stop-round": 2}):
        with pytest.raises(ValueError, match="attack-st"):
            RunSettings.from_run_config(bad)
    with pytest.raises(ValueError, match="attack-omniscient"):
        RunSettings.from_run_config({"attack": "alie", "attack-omniscient": True,
                                     "attack-stop-round": 3, "byzantine-ids": "0"})


def test_new_attacks_read_their_run_config_and_pass_grid_validation() -> None:
    config = {"dba-strip-length": 2, "dba-parts": 2, "neurotoxin-ratio": 0.1,
              "constrain-gamma": "", "constrain-alpha": 1, "flip-mode": "shift"}
    assert attack_params_from_config("dba", config) == {"dba_strip_length": 2, "dba_parts": 2}
    assert attack_params_from_config("constrain_and_scale", config) == {
        "constrain_gamma": None, "constrain_alpha": 1.0}
    assert attack_params_from_config("label_flip", config) == {"flip_mode": "shift"}
    raw = {
        "experiment": {"name": "unit", "output": "out", "clients": 10, "rounds": 4,
                       "seeds": [0], "fractions": [0.2], "partitionings": ["iid"]},
        "run-config": {"local-epochs": 1},
        "defences": {"fedavg": {"strategy": "fedavg"}},
        "attacks": {
            "dba": {"attack": "dba", "dba-scale": 2.0, "attack-stop-round": 2},
            "neurotoxin": {"attack": "neurotoxin", "neurotoxin-ratio": 0.1},
            "cs": {"attack": "constrain_and_scale", "constrain-norm-bound": 3.0},
            "flip": {"attack": "label_flip", "flip-mode": "shift", "flip-fraction": 0.5},
        },
    }
    cells = parse_config(raw).cells()
    assert {c.attack for c in cells} == {"dba", "neurotoxin", "cs", "flip"}
    raw["attacks"]["dba"]["neurotoxin-ratio"] = 0.1
    with pytest.raises(ValueError, match="not a parameter of attack 'dba'"):
        parse_config(raw)


# ------------------------------------------------------------------------------ end to end
SETTINGS = {"local-epochs": 1, "batch-size": 32, "byzantine-ids": "1,4,7", "seed": 3}


def trainer(**overrides: object) -> LocalTrainer:
    settings = RunSettings.from_run_config({**SETTINGS, "attack": "scale", **overrides})
    return LocalTrainer(settings, 4, 10)


def flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays.values()])


def test_after_the_stop_round_the_client_is_honest() -> None:
    node = trainer(**{"attack-stop-round": 2})
    start = get_named_weights(node.model)
    role = Role(True, get_attack("scale", scale_factor=10.0), (1, 4, 7))
    honest = Role(False, None)
    for server_round, attacked in ((2, True), (3, False)):
        sent, count, _ = node.update(start, {}, server_round, role)
        reference, _, _ = node.update(start, {}, server_round, honest)
        delta, honest_delta = flat(sent) - flat(start), flat(reference) - flat(start)
        expected = 10.0 * honest_delta if attacked else honest_delta
        np.testing.assert_allclose(delta, expected, rtol=1e-4, atol=1e-6)
        assert count == len(node.train_data)


@pytest.mark.parametrize("name", ["dba", "neurotoxin", "constrain_and_scale", "label_flip"])
def test_each_new_attack_sends_a_finite_update_through_the_local_trainer(name: str) -> None:
    params = {"label_flip": {"flip_mode": "shift", "flip_fraction": 0.5}}.get(name, {})
    node = trainer(attack=name)
    role = Role(True, get_attack(name, **params), (1, 4, 7))
    first = get_named_weights(node.model)
    sent, count, metrics = node.update(first, {}, 1, role)
    second = {k: 0.5 * (first[k] + sent[k]) for k in first}  # a stand-in next global model
    for weights, server_round in ((first, 1), (second, 2)):
        sent, count, metrics = node.update(weights, {}, server_round, role)
        assert list(sent) == list(weights) and count == len(node.train_data)
        assert np.isfinite(flat(sent)).all() and np.isfinite(metrics["loss"])
        honest, _, _ = node.update(weights, {}, server_round, Role(False, None))
        assert not np.allclose(flat(sent), flat(honest))  # the attack changed the update
    assert node.colluder_index(role) == 1  # partition 4 of the Byzantine (1, 4, 7)
    if name == "neurotoxin":  # round 2 moves only outside the top 5% of the last global update
        mask = neurotoxin_mask([second[k] - first[k] for k in first], 0.05)
        frozen = np.concatenate([m.ravel() for m in mask]) == 0
        delta = flat(sent) - flat(second)
        assert frozen.sum() == round(0.05 * frozen.size)
        assert not delta[frozen].any() and delta[~frozen].any()


def test_central_evaluation_reports_global_and_local_dba_rates(tmp_path) -> None:
    settings = RunSettings.from_run_config({"results-file": str(tmp_path / "r.jsonl")})
    _, test = load_dataset("digits")
    model = fresh_model(test)
    evaluation = CentralEvaluation(settings, model, test, engine=None, backdoor=DBA())  # type: ignore[arg-type]
    evaluation(0, list(get_named_weights(model).values()))
    record = evaluation.history[0]
    assert 0.0 <= record["attack_success_rate"] <= 1.0
    assert len(record["attack_success_rate_local"]) == 4
    assert all(0.0 <= r <= 1.0 for r in record["attack_success_rate_local"])
