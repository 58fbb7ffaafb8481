"""Anomaly detection on client updates, as a hook usable with any flwr-robust strategy.

:class:`AnomalyDetectionHook` looks at every valid training reply's update (delta = reply
arrays - global arrays sent this round) before the aggregation rule and flags it when

- ``anomaly-norm``: its L2 norm exceeds an absolute bound (optional);
- ``anomaly-zscore``: its norm lies more than ``zscore_threshold`` robust deviations above the
  round's median norm (one-sided: only large updates are flagged; the deviation is
  ``max(1.4826 * MAD, min_spread * median)``);
- ``anomaly-direction``: its cosine similarity to the recent aggregate direction (an
  exponential moving average of the global model's past changes) is below ``min_cosine``.

In mode ``"flag"`` it only logs and counts; in mode ``"exclude"`` it also rejects the flagged
replies (reason ``"<code>: <detail>"``), but never more than ``max_excluded_fraction`` of the
round's valid replies (the most anomalous first): the robust rule stays the second line of
defence, and a miscalibrated detector cannot stall training by excluding everyone (which
would also freeze its own direction reference).

Measured on ``digits`` (10 clients, 12 rounds, 2 local epochs, Median; one sign-flipping and
one x10-boosting client), with the defaults: the boosted update was flagged in every round.
Without a floor, honest norms in IID rounds reached 6.9 MAD-deviations above the median
(tightly clustered norms make MAD tiny); with the ``min_spread`` floor (10 % of the median)
honest z-scores stayed below 1.6 but once (3.53: 1 flag in 96 honest updates). The
sign-flipped update had cosine -0.54 to -0.73 (IID), flagged from round 3 on; honest cosines
stayed above +0.44. Under Dirichlet(0.3) label skew the flipped update's cosine was only
-0.04 to -0.13 (flagged from round 6 on) and one honest update dipped to -0.02: the
direction test separates poorly on strongly non-IID data, one reason why ``"flag"`` is the
default mode.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..strategy.hooks import StrategyHook
from ..validation import reason_code

if TYPE_CHECKING:
    from ..strategy.engine import ClientReply, RoundReport

logger = logging.getLogger("flwr.robust")

#: Rejection / flag codes of this detector, in the order the tests run.
ANOMALY_CODES = ("anomaly-norm", "anomaly-zscore", "anomaly-direction")
MODES = ("flag", "exclude")

#: Elements per chunk when measuring updates (bounds the float64 scratch buffer to 2 MiB).
CHUNK_SIZE = 1 << 18

_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this estimates its sigma


@dataclass(frozen=True)
class UpdateStats:
    """What the detector measured of one reply's update.

    ``zscore`` is ``None`` when the round had too few replies (< 3) or no spread; ``cosine``
    is ``None`` before the direction reference exists or for a zero update.
    """

    norm: float
    zscore: float | None
    cosine: float | None


class AnomalyDetectionHook(StrategyHook):
    """Flag (and optionally exclude) anomalous client updates before aggregation.

    Place it after signature verification hooks, so that it only spends time on
    authenticated replies and its counts are not inflated by forgeries.

    Parameters
    ----------
    mode : {"flag", "exclude"}
        ``"flag"`` logs and counts flagged updates and rejects none; ``"exclude"`` rejects them.
    norm_bound : float, optional
        Absolute bound on an update's L2 norm (``None``: no bound).
    zscore_threshold : float, optional
        Flag norms this many robust deviations above the round's median (``None``: off).
        Needs at least 3 replies in the round.
    min_spread : float
        Floor of the robust deviation, as a fraction of the median norm (>= 0).
    min_cosine : float, optional
        Flag updates whose cosine similarity to the recent aggregate direction is below this
        value, in [-1, 1] (``None``: off).
    direction_momentum : float
        Weight of the past in the moving average of aggregate updates, in [0, 1).
    direction_warmup : int
        Aggregated rounds to observe before the direction test starts (>= 1).
    max_excluded_fraction : float
        In ``"exclude"`` mode, at most ``floor(fraction * n)`` of a round's ``n`` valid
        replies are excluded, in [0, 1]; flagged replies beyond that stay flagged only.

    Attributes
    ----------
    last_round : int or None
        The round of :attr:`flags`, :attr:`excluded` and :attr:`stats`.
    flags : dict[int, tuple[str, ...]]
        Node id -> every flag reason of the last round (excluded or not).
    excluded : dict[int, str]
        The rejections returned for the last round.
    stats : dict[int, UpdateStats]
        The measurements of the last round.
    counts : collections.Counter
        Flags per code over all rounds.
    """

    def __init__(
        self,
        mode: str = "flag",
        *,
        norm_bound: float | None = None,
        zscore_threshold: float | None = 3.5,
        min_spread: float = 0.1,
        min_cosine: float | None = 0.0,
        direction_momentum: float = 0.5,
        direction_warmup: int = 2,
        max_excluded_fraction: float = 0.5,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        _check("norm_bound", norm_bound, low=0.0, low_open=True, optional=True)
        _check("zscore_threshold", zscore_threshold, low=0.0, low_open=True, optional=True)
        _check("min_spread", min_spread, low=0.0)
        _check("min_cosine", min_cosine, low=-1.0, high=1.0, optional=True)
        _check("direction_momentum", direction_momentum, low=0.0, high=1.0, high_open=True)
        _check("max_excluded_fraction", max_excluded_fraction, low=0.0, high=1.0)
        if isinstance(direction_warmup, bool) or not isinstance(direction_warmup, int) or (
            direction_warmup < 1
        ):
            raise ValueError(f"direction_warmup must be an int >= 1, got {direction_warmup!r}")
        self.mode = mode
        self.norm_bound = norm_bound
        self.zscore_threshold = zscore_threshold
        self.min_spread = float(min_spread)
        self.min_cosine = min_cosine
        self.direction_momentum = float(direction_momentum)
        self.direction_warmup = direction_warmup
        self.max_excluded_fraction = float(max_excluded_fraction)
        self.last_round: int | None = None
        self.flags: dict[int, tuple[str, ...]] = {}
        self.excluded: dict[int, str] = {}
        self.stats: dict[int, UpdateStats] = {}
        self.counts: Counter[str] = Counter()
        self._direction: dict[str, np.ndarray] | None = None
        self._direction_norm = 0.0
        self._history = 0
        self._base: tuple[int, dict[str, np.ndarray]] | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mode={self.mode!r}, norm_bound={self.norm_bound}, "
            f"zscore_threshold={self.zscore_threshold}, min_cosine={self.min_cosine})"
        )

    @property
    def direction_ready(self) -> bool:
        """Whether the direction test is active (enough aggregated rounds observed)."""
        return (
            self.min_cosine is not None
            and self._history >= self.direction_warmup
            and self._direction_norm > 0.0
        )

    def flags_for(self, server_round: int) -> dict[int, tuple[str, ...]]:
        """The flags of ``server_round`` if it is the last round seen, else ``{}``."""
        return dict(self.flags) if server_round == self.last_round else {}

    # ------------------------------------------------------------------ hook methods
    def on_replies(
        self,
        server_round: int,
        global_arrays: dict[str, np.ndarray],
        replies: Sequence[ClientReply],
    ) -> dict[int, str]:
        """Measure every reply's update, flag anomalies, return the exclusions."""
        self._base = (server_round, global_arrays)
        self.last_round = server_round
        self.flags, self.excluded, self.stats = {}, {}, {}
        if not replies:
            return {}
        use_direction = self.direction_ready
        norms, dots = self._measure(global_arrays, replies, use_direction)
        zscores, median, spread = self._zscores(norms)
        for index, reply in enumerate(replies):
            norm = float(norms[index])
            cosine = None
            if use_direction and norm > 0.0:
                cosine = float(np.clip(dots[index] / (norm * self._direction_norm), -1.0, 1.0))
            zscore = None if zscores is None else float(zscores[index])
            stats = UpdateStats(norm, zscore, cosine)
            self.stats[reply.node_id] = stats
            reasons = self._reasons(stats, median, spread)
            if reasons:
                self.flags[reply.node_id] = reasons
                self.counts.update(reason_code(text) for text in reasons)
        if self.mode == "exclude":
            self.excluded = self._exclusions(server_round, len(replies))
        self._log(server_round, len(replies))
        return dict(self.excluded)

    def on_round_end(self, report: RoundReport, new_arrays: dict[str, np.ndarray] | None) -> None:
        """Fold the round's aggregate update (new - old global model) into the direction."""
        base, self._base = self._base, None
        if new_arrays is None or base is None or base[0] != report.server_round:
            return
        keep = self.direction_momentum
        direction = self._direction if self._direction is not None else {}
        first = not direction
        total = 0.0
        for name, base_layer in base[1].items():
            update = np.subtract(new_arrays[name], base_layer, dtype=np.float32)
            if first:
                direction[name] = update
            else:
                layer = direction[name]
                layer *= keep
                update *= 1.0 - keep
                layer += update
            total += _sq_norm(direction[name])
        self._direction = direction
        self._direction_norm = math.sqrt(total)
        self._history += 1

    # ------------------------------------------------------------------ steps
    def _measure(
        self,
        global_arrays: dict[str, np.ndarray],
        replies: Sequence[ClientReply],
        use_direction: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Update norms and dot products with the direction, chunk by chunk in float64."""
        squares = np.zeros(len(replies))
        dots = np.zeros(len(replies))
        largest = max((a.size for a in global_arrays.values()), default=0)
        scratch = np.empty(max(1, min(CHUNK_SIZE, largest)))
        reference = self._direction if use_direction else None
        for name, base_layer in global_arrays.items():
            base_flat = base_layer.reshape(-1)
            flats = [reply.arrays[name].reshape(-1) for reply in replies]  # type: ignore[index]
            direction = None if reference is None else reference[name].reshape(-1)
            for start in range(0, base_flat.size, CHUNK_SIZE):
                stop = min(start + CHUNK_SIZE, base_flat.size)
                buffer = scratch[: stop - start]
                towards = None if direction is None else direction[start:stop].astype(np.float64)
                for index, flat in enumerate(flats):
                    np.subtract(flat[start:stop], base_flat[start:stop], out=buffer,
                                dtype=np.float64)
                    squares[index] += buffer @ buffer
                    if towards is not None:
                        dots[index] += buffer @ towards
        return np.sqrt(squares), dots

    def _zscores(self, norms: np.ndarray) -> tuple[np.ndarray | None, float, float]:
        """Robust z-scores of the norms (or ``None``), with the median and deviation used."""
        median = float(np.median(norms))
        if self.zscore_threshold is None or norms.size < 3:
            return None, median, 0.0
        mad = float(np.median(np.abs(norms - median)))
        spread = max(_MAD_TO_SIGMA * mad, self.min_spread * median)
        if spread <= 0.0:
            return None, median, 0.0
        return (norms - median) / spread, median, spread

    def _reasons(self, stats: UpdateStats, median: float, spread: float) -> tuple[str, ...]:
        reasons = []
        if self.norm_bound is not None and stats.norm > self.norm_bound:
            reasons.append(
                f"anomaly-norm: update norm {stats.norm:.4g} exceeds the bound {self.norm_bound:g}"
            )
        threshold = self.zscore_threshold
        if threshold is not None and stats.zscore is not None and stats.zscore > threshold:
            reasons.append(
                f"anomaly-zscore: update norm {stats.norm:.4g} is {stats.zscore:.1f} robust "
                f"deviations ({spread:.3g}) above the round's median {median:.4g} "
                f"(threshold {threshold:g})"
            )
        floor = self.min_cosine
        if floor is not None and stats.cosine is not None and stats.cosine < floor:
            reasons.append(
                f"anomaly-direction: cosine {stats.cosine:+.3f} to the recent aggregate "
                f"direction is below {floor:+g}"
            )
        return tuple(reasons)

    def _exclusions(self, server_round: int, num_replies: int) -> dict[int, str]:
        """The flagged replies to reject, most anomalous first, within the cap."""
        cap = math.floor(self.max_excluded_fraction * num_replies)

        def severity(node_id: int) -> tuple[float, ...]:
            stats = self.stats[node_id]
            cosine = 1.0 if stats.cosine is None else stats.cosine
            return (-len(self.flags[node_id]), -(stats.zscore or 0.0), -stats.norm, cosine,
                    node_id)

        ranked = sorted(self.flags, key=severity)
        if len(ranked) > cap:
            logger.warning(
                "round %d: %d of %d replies look anomalous; excluding only the %d most "
                "anomalous (max_excluded_fraction=%g), the rule sees the others",
                server_round, len(ranked), num_replies, cap, self.max_excluded_fraction,
            )
        return {node_id: "; ".join(self.flags[node_id]) for node_id in ranked[:cap]}

    def _log(self, server_round: int, num_replies: int) -> None:
        if not self.flags:
            return
        logger.info(
            "round %d: anomaly detector (%s) flagged %d of %d replies, excluded %d",
            server_round, self.mode, len(self.flags), num_replies, len(self.excluded),
        )
        for node_id, reasons in sorted(self.flags.items()):
            if node_id not in self.excluded:
                logger.info(
                    "round %d: flagged node %d (not excluded): %s",
                    server_round, node_id, "; ".join(reasons),
                )


def _sq_norm(array: np.ndarray) -> float:
    """Squared L2 norm accumulated in float64, one chunk at a time."""
    flat = array.reshape(-1)
    total = 0.0
    for start in range(0, flat.size, CHUNK_SIZE):
        chunk = flat[start : start + CHUNK_SIZE].astype(np.float64)
        total += float(chunk @ chunk)
    return total


def _check(
    name: str,
    value: float | None,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a number in the range."""
    if value is None and optional:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        assert value is not None
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        allowed = f"a number in {left}{low:g}, {high:g}{right}" + (" or None" if optional else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
