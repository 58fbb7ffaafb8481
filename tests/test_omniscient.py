"""The omniscient ALIE/IPM threat-model simulation hook: what it replaces, what it leaves alone."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from flwr_robust.aggregation import get_aggregator
from flwr_robust.attacks import OmniscientAttackHook, alie_z_max
from flwr_robust.strategy.engine import ClientReply, RobustAggregation

LAYERS = {"w": (6, 4), "b": (4,)}
HONEST = [11, 12, 13, 14, 15, 16, 17, 18]
BYZANTINE = [101, 105]


def readonly(array: np.ndarray) -> np.ndarray:
    array = np.array(array, dtype=np.float32)
    array.setflags(write=False)
    return array


def global_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: readonly(rng.standard_normal(s) + 3.0) for k, s in LAYERS.items()}


def make_replies(glob: dict[str, np.ndarray]) -> list[ClientReply]:
    rng = np.random.default_rng(1)
    replies = []
    for node_id in HONEST + BYZANTINE:
        arrays = {k: readonly(v + rng.normal(0.1, 0.05, v.shape)) for k, v in glob.items()}
        replies.append(ClientReply(node_id=node_id, arrays=arrays, num_examples=10))
    return replies


def honest_deltas(replies: list[ClientReply], glob: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per layer, the (8, *shape) float64 stack of honest deltas."""
    honest = [r for r in replies if r.node_id in HONEST]
    return {k: np.stack([(r.arrays[k] - glob[k]).astype(np.float64) for r in honest]) for k in glob}


def snapshot(replies: list[ClientReply]) -> dict[int, tuple[dict, dict]]:
    """Per node: the arrays dict object itself and copies of its arrays."""
    return {r.node_id: (r.arrays, {k: v.copy() for k, v in r.arrays.items()}) for r in replies}


@pytest.mark.parametrize(
    ("attack", "params"), [("alie", {}), ("alie", {"alie_z": 1.5}), ("ipm", {"ipm_epsilon": 0.5})]
)
def test_replaces_exactly_the_byzantine_replies(attack: str, params: dict) -> None:
    glob = global_arrays()
    glob_copy = {k: v.copy() for k, v in glob.items()}
    replies = make_replies(glob)
    before = snapshot(replies)
    stacks = honest_deltas(replies, glob)
    hook = OmniscientAttackHook(attack, BYZANTINE, params)

    assert hook.on_replies(4, glob, replies) == {}

    z = params.get("alie_z", alie_z_max(10, 2))  # n = 10 replies, f = 2
    for reply in replies:
        old_dict, old_values = before[reply.node_id]
        for k, v in old_values.items():  # no array was modified, replaced or not
            np.testing.assert_array_equal(old_dict[k], v)
        if reply.node_id in HONEST:
            assert reply.arrays is old_dict
            continue
        assert reply.arrays is not old_dict
        for k, stack in stacks.items():
            new = reply.arrays[k]
            assert new.dtype == np.float32 and new.shape == LAYERS[k]
            assert not new.flags.writeable
            if attack == "alie":
                expected_delta = stack.mean(axis=0) - z * stack.std(axis=0)
            else:
                expected_delta = -params["ipm_epsilon"] * stack.mean(axis=0)
            np.testing.assert_allclose(new, glob[k] + expected_delta, rtol=1e-6, atol=1e-6)
    for k, v in glob_copy.items():
        np.testing.assert_array_equal(glob[k], v)
    byz = [r.arrays for r in replies if r.node_id in BYZANTINE]
    for k in glob:  # both Byzantine clients send the same crafted update
        np.testing.assert_array_equal(byz[0][k], byz[1][k])


def test_alie_lands_inside_the_honest_band() -> None:
    glob = global_arrays()
    replies = make_replies(glob)
    stacks = honest_deltas(replies, glob)
    OmniscientAttackHook("alie", BYZANTINE).on_replies(1, glob, replies)
    z = alie_z_max(10, 2)
    crafted = next(r for r in replies if r.node_id == BYZANTINE[0]).arrays
    for k, stack in stacks.items():
        delta = crafted[k].astype(np.float64) - glob[k]
        mean, std = stack.mean(axis=0), stack.std(axis=0)
        assert (delta >= mean - z * std - 1e-5).all() and (delta <= mean + z * std + 1e-5).all()
        assert (delta < mean).all()


def test_rounds_without_byzantine_or_honest_replies_are_left_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    glob = global_arrays()
    replies = make_replies(glob)
    honest_only = [r for r in replies if r.node_id in HONEST]
    byzantine_only = [r for r in replies if r.node_id in BYZANTINE]
    before = snapshot(replies)
    hook = OmniscientAttackHook("ipm", BYZANTINE)
    assert hook.on_replies(1, glob, honest_only) == {}
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        assert hook.on_replies(2, glob, byzantine_only) == {}
    assert "no honest reply" in caplog.text
    for reply in replies:
        assert reply.arrays is before[reply.node_id][0]


def test_construction_warns_and_validates(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        OmniscientAttackHook("ALIE", {3, 5})
    assert "THREAT-MODEL SIMULATION" in caplog.text
    with pytest.raises(
        ValueError, match="not colluding; the omniscient simulation takes alie, .*ipm, .*min_max"
    ):
        OmniscientAttackHook("scale", [1])
    with pytest.raises(ValueError, match="at least one node"):
        OmniscientAttackHook("alie", [])
    with pytest.raises(ValueError, match="ipm_epsilon"):
        OmniscientAttackHook("ipm", [1], {"ipm_epsilon": -1.0})


def test_inside_the_engine_fedavg_averages_the_crafted_updates() -> None:
    glob = global_arrays()
    replies = make_replies(glob)
    stacks = honest_deltas(replies, glob)
    hook = OmniscientAttackHook("ipm", BYZANTINE, {"ipm_epsilon": 100.0})
    engine = RobustAggregation(get_aggregator("fedavg"), hooks=[hook])
    new_arrays, report = engine.aggregate(1, glob, replies)
    assert report.aggregated and not report.rejected
    assert report.kept == sorted(HONEST + BYZANTINE)
    for k, stack in stacks.items():
        mean = stack.mean(axis=0)
        # (8 * mean + 2 * (-100 * mean)) / 10 = -19.2 * mean: the large-epsilon IPM regime.
        np.testing.assert_allclose(new_arrays[k] - glob[k], -19.2 * mean, rtol=1e-4, atol=1e-5)
        assert float(np.sum((new_arrays[k] - glob[k]) * mean)) < 0
