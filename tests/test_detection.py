"""The anomaly-detection hook: norm bound, robust z-score, direction, modes, exclusion cap."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from flwr_robust.aggregation import get_aggregator
from flwr_robust.ops import AnomalyDetectionHook, anomaly
from flwr_robust.strategy.engine import ClientReply, RobustAggregation, RoundReport

LAYERS = {"w": (6, 5), "b": (5,)}


def model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in LAYERS.items()}


def direction(seed: int = 1) -> dict[str, np.ndarray]:
    """A unit-norm update direction shared by the honest clients."""
    d = model(seed)
    scale = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()))
    return {k: (v / scale).astype(np.float32) for k, v in d.items()}


def honest_deltas(n: int, seed: int, towards: dict[str, np.ndarray]) -> list[dict]:
    """Updates of norm ~1 along ``towards`` plus small noise."""
    rng = np.random.default_rng(seed)
    return [
        {k: (v * rng.uniform(0.9, 1.1) + rng.normal(0, 0.02, v.shape)).astype(np.float32)
         for k, v in towards.items()}
        for _ in range(n)
    ]


def replies_for(base: dict, deltas: list[dict]) -> list[ClientReply]:
    return [
        ClientReply(node_id, arrays={k: base[k] + d[k] for k in base}, num_examples=10)
        for node_id, d in enumerate(deltas, start=1)
    ]


def end_round(hook: AnomalyDetectionHook, rnd: int, new: dict | None) -> None:
    hook.on_round_end(RoundReport(rnd, "mean", 0, aggregated=new is not None), new)


def test_boosted_update_is_excluded_by_zscore_and_norm_bound() -> None:
    base, towards = model(), direction()
    deltas = honest_deltas(6, seed=2, towards=towards)
    deltas.append({k: v * 10 for k, v in deltas[0].items()})  # boosted copy, node 7
    hook = AnomalyDetectionHook("exclude", norm_bound=3.0)
    rejected = hook.on_replies(1, base, replies_for(base, deltas))
    assert set(rejected) == {7}
    assert rejected[7].startswith("anomaly-norm: update norm")
    assert "anomaly-zscore:" in rejected[7]
    assert [r.split(":")[0] for r in hook.flags[7]] == ["anomaly-norm", "anomaly-zscore"]
    assert hook.stats[7].norm == pytest.approx(10 * hook.stats[1].norm, rel=1e-4)
    assert all(hook.stats[i].zscore < 3.5 for i in range(1, 7))
    assert hook.counts == {"anomaly-norm": 1, "anomaly-zscore": 1}


def test_zscore_alone_catches_the_boosted_update() -> None:
    base = model()
    deltas = honest_deltas(5, seed=3, towards=direction())
    deltas.append({k: v * 5 for k, v in deltas[1].items()})
    rejected = AnomalyDetectionHook("exclude").on_replies(1, base, replies_for(base, deltas))
    assert list(rejected) == [6] and rejected[6].startswith("anomaly-zscore:")


def test_min_spread_keeps_tightly_clustered_honest_norms() -> None:
    """With near-identical norms MAD is tiny; a 20 % larger honest norm must not be flagged
    thanks to the spread floor (10 % of the median), but is without it."""
    base, towards = model(), direction()
    deltas = [{k: v * s for k, v in towards.items()} for s in (1.0, 1.001, 0.999, 1.002, 1.2)]
    replies = replies_for(base, deltas)
    assert AnomalyDetectionHook("exclude").on_replies(1, base, replies) == {}
    strict = AnomalyDetectionHook("exclude", min_spread=0.0)
    assert list(strict.on_replies(1, base, replies)) == [5]


def test_flipped_update_is_caught_by_direction_after_warmup() -> None:
    towards = direction()
    hook = AnomalyDetectionHook("exclude", direction_warmup=2)
    base = model()
    # Two rounds of honest history: the global model moves by the mean update.
    for rnd in (1, 2):
        deltas = honest_deltas(5, seed=10 + rnd, towards=towards)
        replies = replies_for(base, deltas)
        assert hook.on_replies(rnd, base, replies) == {}
        assert all(s.cosine is None for s in hook.stats.values())  # not active yet
        new = {k: base[k] + np.mean([d[k] for d in deltas], axis=0) for k in base}
        end_round(hook, rnd, new)
        base = new
    assert hook.direction_ready
    deltas = honest_deltas(5, seed=20, towards=towards)
    deltas.append({k: -v for k, v in deltas[2].items()})  # flipped, same norm: node 6
    rejected = hook.on_replies(3, base, replies_for(base, deltas))
    assert list(rejected) == [6]
    assert rejected[6].startswith("anomaly-direction: cosine -0.9")
    assert all(hook.stats[i].cosine > 0.9 for i in range(1, 6))


def test_direction_reference_follows_the_aggregate_and_skips_kept_rounds() -> None:
    base, towards = model(), direction()
    hook = AnomalyDetectionHook(direction_warmup=1)
    hook.on_replies(1, base, replies_for(base, honest_deltas(3, 1, towards)))
    end_round(hook, 1, None)  # kept global: no history
    assert not hook.direction_ready
    hook.on_replies(2, base, replies_for(base, honest_deltas(3, 2, towards)))
    end_round(hook, 2, {k: base[k] + towards[k] for k in base})
    assert hook.direction_ready and hook._direction_norm == pytest.approx(1.0, rel=1e-5)


def test_flag_mode_rejects_nothing_but_records_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    base = model()
    deltas = honest_deltas(5, seed=4, towards=direction())
    deltas.append({k: v * 20 for k, v in deltas[0].items()})
    hook = AnomalyDetectionHook("flag", norm_bound=5.0)
    with caplog.at_level(logging.INFO, logger="flwr.robust"):
        assert hook.on_replies(4, base, replies_for(base, deltas)) == {}
    assert set(hook.flags_for(4)) == {6} and hook.flags_for(3) == {}
    assert hook.excluded == {}
    assert hook.counts["anomaly-norm"] == 1 and hook.counts["anomaly-zscore"] == 1
    assert "flagged node 6 (not excluded): anomaly-norm" in caplog.text


def test_exclusions_are_capped_most_anomalous_first(caplog: pytest.LogCaptureFixture) -> None:
    base, towards = model(), direction()
    deltas = [{k: v * s for k, v in towards.items()} for s in (1.0, 4.0, 6.0, 8.0)]
    hook = AnomalyDetectionHook("exclude", norm_bound=2.0, zscore_threshold=None)
    with caplog.at_level(logging.WARNING, logger="flwr.robust"):
        rejected = hook.on_replies(1, base, replies_for(base, deltas))
    assert set(hook.flags) == {2, 3, 4}
    assert set(rejected) == {3, 4}  # floor(0.5 * 4) = 2, the largest norms
    assert "3 of 4 replies look anomalous; excluding only the 2 most" in caplog.text
    none = AnomalyDetectionHook("exclude", norm_bound=2.0, max_excluded_fraction=0.0)
    assert none.on_replies(1, base, replies_for(base, deltas)) == {}
    assert len(none.flags) == 3


def test_norms_are_exact_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(anomaly, "CHUNK_SIZE", 7)  # layers of 30 and 5 values: many chunks
    base = model()
    deltas = honest_deltas(4, seed=5, towards=direction())
    hook = AnomalyDetectionHook()
    replies = replies_for(base, deltas)
    hook.on_replies(1, base, replies)
    for reply in replies:
        flat = np.concatenate(
            [(reply.arrays[k].astype(np.float64) - base[k]).ravel() for k in base]
        )
        assert hook.stats[reply.node_id].norm == pytest.approx(np.linalg.norm(flat), rel=1e-12)


def test_hook_in_the_engine_excludes_before_the_rule_and_learns_the_direction() -> None:
    base, towards = model(), direction()
    hook = AnomalyDetectionHook("exclude")
    engine = RobustAggregation(get_aggregator("median"), hooks=[hook])
    deltas = honest_deltas(4, seed=6, towards=towards)
    deltas.append({k: v * 50 for k, v in deltas[0].items()})
    new, report = engine.aggregate(1, base, replies_for(base, deltas))
    assert new is not None and report.kept == [1, 2, 3, 4]
    assert report.rejected[5].startswith("anomaly-zscore:")
    assert report.rejection_counts() == {"anomaly-zscore": 1}
    assert hook._history == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "drop"}, "mode must be one of"),
        ({"norm_bound": 0.0}, r"norm_bound must be a number in \(0, inf\] or None"),
        ({"min_cosine": 1.5}, r"min_cosine must be a number in \[-1, 1\]"),
        ({"direction_momentum": 1.0}, r"direction_momentum must be a number in \[0, 1\)"),
        ({"max_excluded_fraction": -0.1}, "max_excluded_fraction"),
        ({"direction_warmup": 0}, "direction_warmup must be an int >= 1"),
        ({"zscore_threshold": float("nan")}, "zscore_threshold"),
    ],
)
def test_invalid_parameters_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AnomalyDetectionHook(**kwargs)
