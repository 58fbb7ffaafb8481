"""Adaptive colluding attacks: Min-Max / Min-Sum (agnostic and tailored), Fang's Krum and
trimmed-mean attacks and Mimic, checked against hand computations, the constraints they
promise and the rules they target, on both the client path and the omniscient hook."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flwr_robust.aggregation import get_aggregator
from flwr_robust.attacks import (
    AttackContext,
    FangKrum,
    FangTrim,
    Mimic,
    MinMax,
    MinSum,
    OmniscientAttackHook,
    attack_params_from_config,
    get_attack,
)
from flwr_robust.attacks.adaptive import knows_all_honest, search_gamma, simulated_byzantine
from flwr_robust.strategy.engine import ClientReply

NEW = ("min_max", "min_sum", "fang_krum", "fang_trim", "mimic")
SHAPES = [(6, 4), (4,)]


def readonly(array: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    out = np.array(array, dtype=dtype)
    out.setflags(write=False)
    return out


def scalars(*values: float) -> list[list[np.ndarray]]:
    """One-coordinate deltas (hand-computed examples)."""
    return [[readonly([v])] for v in values]


def cloud(k: int, seed: int = 0, loc: float = 0.1, dtype: type = np.float32) -> list:
    rng = np.random.default_rng(seed)
    return [[readonly(rng.normal(loc, 1.0, s), dtype) for s in SHAPES] for _ in range(k)]


def flat(layers) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in layers])


def deviation(update, reference: np.ndarray) -> float:
    return float(np.linalg.norm(flat(update) - reference))


def context(colluders, n: int, f: int, index: int = 0, shared_seed: int | None = 7):
    return AttackContext(
        server_round=2,
        num_clients=n,
        num_byzantine=f,
        rng=np.random.default_rng(100 + index),
        global_weights=[np.zeros(s, np.float32) for s in SHAPES],
        colluder_deltas=lambda: colluders,
        colluder_index=index,
        colluder_rng=None if shared_seed is None else np.random.default_rng(shared_seed),
    )


# ------------------------------------------------------------------------- gamma search
def test_search_gamma_follows_algorithm_1() -> None:
    tried: list[float] = []

    def below_one(gamma: float) -> bool:
        tried.append(gamma)
        return gamma <= 1.0

    assert search_gamma(below_one, 4.0, 1e-5) == 1.0
    assert tried[:6] == [4.0, 2.0, 1.0, 1.5, 1.25, 1.125]  # steps 2, 1, 0.5, 0.25, ...
    assert search_gamma(lambda g: False, 10.0, 1e-5) == 0.0
    always = search_gamma(lambda g: True, 10.0, 1e-5)
    assert 20.0 - 2e-5 <= always < 20.0  # the search covers (0, 2 * gamma_init)


def test_hand_computed_gamma_min_max_and_min_sum() -> None:
    # Benign 0, 0, 3: mean 1, p = -sign(1) = -1, malicious 1 - gamma.
    # Min-Max: max((1 - g)^2, (2 + g)^2) <= max pairwise 9          -> gamma = 1.
    # Min-Sum: 2 (1 - g)^2 + (2 + g)^2 = 6 + 3 g^2 <= max(9, 9, 18)  -> gamma = 2.
    honest = scalars(0.0, 0.0, 3.0)
    min_max = MinMax(min_max_perturbation="sign", min_max_gamma_init=4.0)
    min_sum = MinSum(min_sum_perturbation="sign", min_sum_gamma_init=4.0)
    assert min_max.gamma(honest, 5, 2) == 1.0
    assert min_sum.gamma(honest, 5, 2) == 2.0
    assert min_max.craft(honest, 5, 2)[0].tolist() == [0.0]
    assert min_sum.craft(honest, 5, 2)[0].tolist() == [-1.0]
    # Benign 0, 1, 2: Min-Max (1 + g)^2 <= 4 and Min-Sum 2 + 3 g^2 <= 5 both give gamma = 1.
    assert MinSum(min_sum_perturbation="sign", min_sum_gamma_init=4.0).gamma(
        scalars(0.0, 1.0, 2.0), 5, 2
    ) == 1.0


def expected_perturbation(honest, kind: str) -> np.ndarray:
    stack = np.stack([flat(h) for h in honest])
    mean = stack.mean(axis=0)
    if kind == "unit_vec":
        return -mean / np.linalg.norm(mean)
    if kind == "std":
        return -stack.std(axis=0)
    return -np.sign(mean)


@pytest.mark.parametrize("kind", ["unit_vec", "std", "sign"])
@pytest.mark.parametrize("cls", [MinMax, MinSum])
def test_constraint_holds_and_is_tight(cls, kind: str) -> None:
    honest = cloud(12, seed=3)
    prefix = "min_max" if cls is MinMax else "min_sum"
    attack = cls(**{f"{prefix}_perturbation": kind})
    gamma = attack.gamma(honest, 16, 4)
    crafted = attack.craft(honest, 16, 4)
    stack = np.stack([flat(h) for h in honest])
    mean, p = stack.mean(axis=0), expected_perturbation(honest, kind)
    np.testing.assert_allclose(flat(crafted), mean + gamma * p, rtol=1e-5, atol=1e-6)
    assert gamma > 0.1

    def satisfied(g: float) -> bool:
        to_benign = np.sum((mean + g * p - stack) ** 2, axis=1)
        pairwise = np.sum((stack[:, None, :] - stack[None, :, :]) ** 2, axis=2)
        if cls is MinMax:
            return bool(to_benign.max() <= pairwise.max())
        return bool(to_benign.sum() <= pairwise.sum(axis=1).max())

    assert satisfied(gamma)
    assert not satisfied(gamma * 1.0001 + 1e-4)
    for c, ref in zip(crafted, honest[0], strict=True):
        assert c.dtype == ref.dtype and c.shape == ref.shape


# ---------------------------------------------------------------------------- tailored
@pytest.mark.parametrize("rule", ["trimmed_mean", "krum"])
def test_tailored_beats_agnostic_on_its_rule(rule: str) -> None:
    n, f = 20, 4
    honest = cloud(n - f, seed=0)
    mean = np.mean([flat(h) for h in honest], axis=0)
    target = get_aggregator(rule, num_malicious=f)

    def damage(attack) -> float:
        crafted = attack.craft_colluders(honest, n, f, np.random.default_rng(0))
        return deviation(target([*honest, *crafted]).update, mean)

    agnostic = damage(get_attack("min_max"))
    tailored_attack = get_attack("min-max", min_max_target_rule=rule.replace("_", "-"))
    assert tailored_attack.min_max_target_rule == rule
    tailored = damage(tailored_attack)
    assert tailored > 1.1 * agnostic
    # With a target rule both names are the paper's AGR-tailored attack.
    same = get_attack("min_sum", min_sum_target_rule=rule)
    np.testing.assert_array_equal(
        flat(same.craft(honest, n, f)), flat(tailored_attack.craft(honest, n, f))
    )
    if rule == "krum":  # the tailored gamma keeps the crafted update selected
        crafted = tailored_attack.craft(honest, n, f)
        assert target([*honest, *([crafted] * f)]).kept[0] >= n - f


def test_tailored_simulation_population() -> None:
    assert knows_all_honest(16, 20, 4) and not knows_all_honest(4, 20, 4)
    assert simulated_byzantine(16, 20, 4) == 4
    assert simulated_byzantine(4, 20, 4) == 1  # max(1, floor(4 * 4 / 20))
    assert simulated_byzantine(10, 20, 10) == 10
    # Partial knowledge (4 colluders of 20): Krum is simulated on 4 + 1 updates and works.
    honest = cloud(4, seed=5)
    out = MinMax(min_max_target_rule="krum").poison_update(honest[0], context(honest, 20, 4))
    assert np.isfinite(flat(out)).all()
    with pytest.raises(ValueError, match="cannot simulate 'krum' on 2 updates"):
        MinMax(min_max_target_rule="krum").craft(cloud(1), 20, 4)


# --------------------------------------------------------------------------- Fang Krum
def test_fang_krum_lambda_bound_by_hand() -> None:
    # n = 5, f = 1: 4 honest at the corners of a square of side 2 (d = 2). Each has two
    # nearest neighbours at distance 2 (m - c - 2 = 2): min sum 4; denominator m - 2c - 1 = 2;
    # max distance to the global model |(2, 2)| = 2 sqrt(2):
    # lambda = 4 / (2 sqrt 2) + 2 sqrt(2) / sqrt(2) = sqrt(2) + 2.
    honest = [[readonly(p)] for p in ([0, 0], [2, 0], [0, 2], [2, 2])]
    assert FangKrum().lambda_bound(honest, 5, 1) == pytest.approx(math.sqrt(2) + 2, rel=1e-12)


def test_fang_krum_makes_krum_select_a_crafted_update() -> None:
    n, f = 20, 4
    honest = cloud(n - f, seed=0)
    attack = FangKrum()
    crafted = attack.craft_colluders(honest, n, f, np.random.default_rng(0))
    sign = np.sign(np.mean([flat(h) for h in honest], axis=0))
    lam = -flat(crafted[0])[0] / sign[0]
    np.testing.assert_allclose(flat(crafted[0]), -lam * sign, rtol=1e-6)
    halvings = math.log2(attack.lambda_bound(honest, n, f) / lam)
    assert halvings == pytest.approx(round(halvings), abs=1e-5) and lam >= 1e-5
    assert all(np.array_equal(flat(c), flat(crafted[0])) for c in crafted)  # paper: copies
    assert get_aggregator("krum", num_malicious=f)([*honest, *crafted]).kept[0] >= n - f
    # Supporters drawn in the epsilon ball around delta_1; Krum still picks a crafted one.
    spread = FangKrum(fang_krum_epsilon=0.05).craft_colluders(
        honest, n, f, np.random.default_rng(1)
    )
    gaps = [np.linalg.norm(flat(c) - flat(spread[0])) for c in spread[1:]]
    assert all(0 < g <= 0.05 + 1e-6 for g in gaps) and len(set(gaps)) == f - 1
    assert get_aggregator("krum", num_malicious=f)([*honest, *spread]).kept[0] >= n - f


# --------------------------------------------------------------------------- Fang trim
def test_fang_trim_full_knowledge_intervals_and_effect() -> None:
    n, f = 20, 4
    honest = cloud(n - f, seed=1)
    stack = np.stack([flat(h) for h in honest])
    mean, top, bottom = stack.mean(axis=0), stack.max(axis=0), stack.min(axis=0)
    s = np.sign(mean)
    crafted = FangTrim().craft_colluders(honest, n, f, np.random.default_rng(2))
    values = np.stack([flat(c) for c in crafted])
    low = np.where(s < 0, top, np.where(bottom > 0, bottom / 2, 2 * bottom))
    high = np.where(s < 0, np.where(top > 0, 2 * top, top / 2), bottom)
    tol = 1e-6 * (1 + np.abs(values))
    assert np.all(values >= low - tol) and np.all(values <= high + tol)
    assert len({v.tobytes() for v in values}) == f  # each colluder its own draw
    for rule in ("trimmed_mean", "median"):
        before = flat(get_aggregator(rule, num_malicious=f)(honest).update)  # honest only
        after = flat(get_aggregator(rule, num_malicious=f)([*honest, *crafted]).update)
        assert np.all((after - before) * s <= 1e-6)  # never along s
        assert np.mean((after - before) * s) < -0.05  # against s on average


def test_fang_trim_partial_knowledge_uses_three_to_four_sigma() -> None:
    colluders = cloud(4, seed=2)
    stack = np.stack([flat(h) for h in colluders])
    mean, sigma = stack.mean(axis=0), stack.std(axis=0)
    s = np.sign(mean)
    crafted = FangTrim().craft_colluders(colluders, 20, 4, np.random.default_rng(0))
    values = np.stack([flat(c) for c in crafted])
    distance = (values - mean) * -s  # beyond the mean against s, in units of sigma
    assert np.all(distance >= 3 * sigma - 1e-5) and np.all(distance <= 4 * sigma + 1e-5)


def test_colluders_send_their_member_of_one_joint_set() -> None:
    colluders = cloud(4, seed=2)
    for name in NEW:
        attack = get_attack(name)
        joint = attack.craft_colluders(colluders, 20, 4, np.random.default_rng(7))
        sent = [
            get_attack(name).poison_update(colluders[i], context(colluders, 20, 4, index=i))
            for i in range(4)
        ]
        for member, out in zip(joint, sent, strict=True):
            np.testing.assert_array_equal(flat(member), flat(out))
        if name != "fang_trim":  # identical copies where the paper sends them
            assert all(np.array_equal(flat(o), flat(sent[0])) for o in sent)


# ---------------------------------------------------------------------------------- Mimic
def test_mimic_copies_the_most_extreme_worker_and_keeps_it_after_warmup() -> None:
    rng = np.random.default_rng(0)

    def round_deltas(extreme: int) -> list:
        deltas = []
        for i in range(8):
            w = rng.normal(0.0, 0.1, (6, 4))
            w[0, 0] += {extreme: 5.0, (extreme + 1) % 8: -3.0}.get(i, 0.0)
            deltas.append([readonly(w), readonly(rng.normal(0.0, 0.1, 4))])
        return deltas

    attack = Mimic()
    first = round_deltas(extreme=3)
    out = attack.craft(first, 10, 2)
    matches = [i for i, h in enumerate(first) if all(np.array_equal(a, b) for a, b in zip(out, h))]
    assert matches == [3] and attack.target == 3
    assert abs(attack.direction[0]) > 0.99  # top principal direction ~ e_1, oriented to 3
    assert not np.shares_memory(out[0], first[3][0])
    second = round_deltas(extreme=5)
    assert np.array_equal(attack.craft(second, 10, 2)[0], second[3][0])  # fixed after warm-up
    longer = Mimic(mimic_warmup=2)
    longer.craft(first, 10, 2)
    assert np.array_equal(longer.craft(second, 10, 2)[0], second[5][0])  # still warming up
    attack.craft(cloud(8, seed=1, loc=0.0)[:6], 8, 2)  # fewer honest: chosen again
    assert attack.target is not None and attack.target < 6
    attack.craft([[readonly(np.ones(3))]] * 3, 5, 2)  # another model: state reset
    assert attack.rounds == 1 and attack.direction.size == 3


# ------------------------------------------------------------------------ common contract
@pytest.mark.parametrize("name", NEW)
def test_inputs_untouched_dtypes_kept_outputs_finite(name: str) -> None:
    honest = [
        [readonly(np.random.default_rng(i).normal(0, 1, (6, 4))),
         readonly(np.random.default_rng(50 + i).normal(0, 1, 4), np.float64)]
        for i in range(10)
    ]
    copies = [[a.copy() for a in h] for h in honest]
    crafted = get_attack(name).craft_colluders(honest, 13, 3, np.random.default_rng(0))
    assert len(crafted) == 3
    for member in crafted:
        assert [a.dtype for a in member] == [np.float32, np.float64]
        assert [a.shape for a in member] == [(6, 4), (4,)]
    for h, c in zip(honest, copies, strict=True):
        for a, b in zip(h, c, strict=True):
            np.testing.assert_array_equal(a, b)
    huge = [[readonly(np.full(s, 3e38 * (-1) ** i)) for s in SHAPES] for i in range(10)]
    for member in get_attack(name).craft_colluders(huge, 13, 3, np.random.default_rng(0)):
        assert all(np.isfinite(a).all() for a in member)


@pytest.mark.parametrize("name", NEW)
def test_the_omniscient_hook_runs_every_new_attack(name: str) -> None:
    rng = np.random.default_rng(1)
    glob = {"w": readonly(rng.normal(3.0, 1.0, (6, 4))), "b": readonly(rng.normal(3.0, 1.0, 4))}
    honest_ids, byzantine_ids = [11, 12, 13, 14, 15, 16, 17, 18], [105, 101]
    replies = [
        ClientReply(
            node_id=i,
            arrays={k: readonly(v + rng.normal(0.1, 0.05, v.shape)) for k, v in glob.items()},
            num_examples=10,
        )
        for i in [14, 101, 11, 12, 13, 105, 15, 16, 17, 18]
    ]
    honest_arrays = {r.node_id: r.arrays for r in replies if r.node_id in honest_ids}
    deltas = [
        [honest_arrays[i][k] - glob[k] for k in glob] for i in sorted(honest_arrays)
    ]
    expected = get_attack(name).craft_colluders(deltas, 10, 2, np.random.default_rng([3, 4]))
    OmniscientAttackHook(name, byzantine_ids, seed=3).on_replies(4, glob, replies)
    by_id = {r.node_id: r.arrays for r in replies}
    for i in honest_ids:
        assert by_id[i] is honest_arrays[i]
    for member, node in zip(expected, sorted(byzantine_ids), strict=True):
        for k, delta in zip(glob, member, strict=True):
            assert by_id[node][k].dtype == np.float32 and not by_id[node][k].flags.writeable
            np.testing.assert_allclose(by_id[node][k], glob[k] + delta, rtol=1e-6, atol=1e-6)


def test_registry_config_and_errors() -> None:
    config = {
        "min-max-perturbation": "sign",
        "min-max-target-rule": "",
        "min-sum-gamma-init": 5,
        "min-sum-target-rule": "median",
        "fang-krum-epsilon": 0.01,
        "fang-trim-b": 3,
        "mimic-warmup": 2,
    }
    expected = {
        "min_max": {"min_max_perturbation": "sign", "min_max_target_rule": None},
        "min_sum": {"min_sum_gamma_init": 5.0, "min_sum_target_rule": "median"},
        "fang_krum": {"fang_krum_epsilon": 0.01},
        "fang_trim": {"fang_trim_b": 3.0},
        "mimic": {"mimic_warmup": 2},
    }
    for name in NEW:
        params = attack_params_from_config(name, config)
        assert params == expected[name]
        attack = get_attack(name, **params)
        assert attack.colluding and attack.paper and attack.params() == {
            **get_attack(name).params(), **params
        }
    bad = [
        ("min_max", {"min_max_perturbation": "gauss"}, "min_max_perturbation"),
        ("min_max", {"min_max_gamma_init": 0.0}, "min_max_gamma_init"),
        ("min_sum", {"min_sum_tau": -1.0}, "min_sum_tau"),
        ("min_sum", {"min_sum_target_rule": "nope"}, "unknown aggregator"),
        ("fang_krum", {"fang_krum_threshold": 0.0}, "fang_krum_threshold"),
        ("fang_krum", {"fang_krum_epsilon": -0.1}, "fang_krum_epsilon"),
        ("fang_trim", {"fang_trim_b": 1.0}, "fang_trim_b"),
        ("mimic", {"mimic_warmup": 0}, "mimic_warmup"),
    ]
    for name, params, message in bad:
        with pytest.raises(ValueError, match=message):
            get_attack(name, **params)
    with pytest.raises(ValueError, match="colluder_deltas"):
        get_attack("fang_trim").poison_update(cloud(1)[0], AttackContext(
            1, 10, 2, np.random.default_rng(0), [np.zeros(s) for s in SHAPES]))


@pytest.mark.parametrize("name", ["fang_trim", "mimic"])
def test_client_path_colluders_send_their_members(name: str) -> None:
    """Through the ClientApp's trainer: each colluder of partitions (1, 4, 7) sends member
    ``colluder_index`` of the set crafted from the colluders' own honest deltas with the
    round's shared randomness."""
    from flwr_robust.apps.client import Role, trainer_for
    from flwr_robust.apps.settings import RunSettings
    from flwr_robust.task.models import get_named_weights

    settings = RunSettings.from_run_config(
        {"local-epochs": 1, "byzantine-ids": "1,4,7", "seed": 3, "attack": name}
    )
    nodes = [trainer_for(settings, p, 10) for p in (1, 4, 7)]
    start = get_named_weights(nodes[0].model)
    sent = [
        node.update(start, {}, 1, Role(True, get_attack(name), (1, 4, 7)))[0] for node in nodes
    ]
    honest = [node.cached_honest_delta(start, {}, 1) for node in nodes]
    joint = get_attack(name).craft_colluders(honest, 10, 3, np.random.default_rng([3, 1]))
    for weights, member in zip(sent, joint, strict=True):
        delta = [weights[k].astype(np.float64) - start[k] for k in start]
        np.testing.assert_allclose(flat(delta), flat(member), rtol=1e-5, atol=1e-7)


def test_client_path_population_index_and_single_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """With client sampling the attack assumes the sampled round (n = fraction-train * N, f the
    expected colluders among them); a node Byzantine by node config alone comes after the
    listed colluders; a colluding attacker trains its partition once per round."""
    from flwr_robust.apps import client
    from flwr_robust.apps.client import Role, trainer_for
    from flwr_robust.apps.settings import RunSettings
    from flwr_robust.task.models import get_named_weights

    settings = RunSettings.from_run_config(
        {"local-epochs": 1, "byzantine-ids": "2,5", "seed": 4, "attack": "ipm",
         "fraction-train": 0.5}
    )
    node = trainer_for(settings, 5, 10)
    role = Role(True, get_attack("ipm"), (2, 5))
    assert node.round_population(role) == (5, 1)
    full = RunSettings.from_run_config({"byzantine-ids": "2,5", "attack": "ipm"})
    assert trainer_for(full, 5, 10).round_population(role) == (10, 2)
    assert node.colluder_index(role) == 1
    assert trainer_for(settings, 3, 10).colluder_index(role) == 2  # not 1 (node 5's)

    calls: list[int] = []
    original = client.train

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(client, "train", counting)
    start = get_named_weights(node.model)
    node.update(start, {}, 7, role)
    assert len(calls) == 2  # each colluder's clean partition once, no poisoned re-training
