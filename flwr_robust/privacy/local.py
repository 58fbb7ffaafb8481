"""Client-level local differential privacy: the mechanism and its accounting.

Mechanism (one round). The client's update ``u = w_trained - w_global`` (every floating
array of the model, flattened together) is clipped to L2 norm ``C`` and released with
Gaussian noise: ``clip(u) + N(0, (sigma*C)^2 I)``. This is the Gaussian mechanism of Dwork &
Roth (Foundations and Trends in TCS, 2014, "The Algorithmic Foundations of Differential
Privacy", App. A) with noise multiplier ``sigma``, as in DP-FedAvg (McMahan, Ramage, Talwar,
Zhang, ICLR 2018, "Learning Differentially Private Recurrent Language Models"), here applied
by the client itself to its own update.

Neighbouring relation: add/remove of the client's *whole* local dataset (client-level DP).
A client without data sends the global model back unchanged, i.e. the zero update, so the
released update's L2 sensitivity is ``||clip(u) - 0|| <= C`` and one round is exactly a
Gaussian mechanism with noise multiplier ``sigma``. (Under replace-the-whole-dataset the
sensitivity is ``2C``: the same noise then gives the guarantee of multiplier ``sigma/2``.)

Composition: each round the client actually trains is one such mechanism; the ledger keeps
the multipliers of those rounds and :func:`epsilon_spent` composes them with the RDP
accountant of ``dp-accounting`` (Mironov, CSF 2017, "Renyi Differential Privacy"). No
amplification by sampling is claimed: the client cannot tell whether the server sampled it
at random (a server may pick it on purpose every round), so only its actual participations
count. That is conservative when the server does sample uniformly.

Post-processing: everything the server does with the released update (any robust rule,
clipping, a median, Krum, ...) is a function of it, so the guarantee holds whatever the
aggregation rule (Dwork & Roth, Prop. 2.1). This is why local noise composes with robust
aggregation where central noise calibrated to a mean (``sigma*C/n``) does not.

Not covered: values released outside the update. The client mod withholds every other
data-dependent metric (e.g. the training loss) and reports only the example count, which is
treated as public (the guarantee assumes it is known, as for fixed partitions), and the
privacy figures themselves (data-independent). Noise comes from numpy's PCG64 seeded by the
OS: adequate for research, not a cryptographically secure sampler (floating-point attacks
on naive samplers: Mironov, CCS 2012).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import dp_accounting
import numpy as np
from dp_accounting.rdp import RdpAccountant
from flwr.app import ConfigRecord, RecordDict

from ..aggregation.base import InvalidParameterError, check_float

#: The node's privacy record in ``context.state`` (Flower keeps it across a run's rounds).
STATE_RECORD = "frs-privacy"
DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class LocalDP:
    """Local DP settings of one node (``clip`` <= 0 or ``noise_multiplier`` <= 0: off).

    Parameters
    ----------
    clip : float
        L2 bound ``C`` of the whole update (all layers together).
    noise_multiplier : float
        ``sigma``: the noise standard deviation is ``sigma * C`` per coordinate.
    delta : float
        The ``delta`` the reported epsilon is for, in (0, 1).
    max_epsilon : float or None
        The node's budget: it declines to train when one more round would exceed it.
    """

    clip: float
    noise_multiplier: float
    delta: float = DEFAULT_DELTA
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        check_float("clip", self.clip, minimum=0.0, exclusive_minimum=True)
        check_float("noise_multiplier", self.noise_multiplier, minimum=0.0,
                    exclusive_minimum=True)
        check_float("delta", self.delta, minimum=0.0, maximum=1.0, exclusive_minimum=True,
                    exclusive_maximum=True)
        check_float("max_epsilon", self.max_epsilon, minimum=0.0, exclusive_minimum=True,
                    allow_none=True)

    @classmethod
    def from_config(cls, *configs: Mapping[str, Any]) -> LocalDP | None:
        """Settings from ``dp-clip``, ``dp-noise-multiplier``, ``dp-delta`` and
        ``dp-max-epsilon``, the first config holding a key winning (pass the node config
        before the run config: a node's own choice overrides the server's); ``None``
        when ``dp-clip`` or ``dp-noise-multiplier`` is unset, ``""`` or 0."""

        def value(key: str) -> float | None:
            for config in configs:
                if key in config and config[key] not in ("", None):
                    try:
                        number = float(config[key])
                    except (TypeError, ValueError) as exc:
                        raise InvalidParameterError(
                            f"config {key!r} must be a number, got {config[key]!r}"
                        ) from exc
                    return number or None
            return None

        clip, sigma = value("dp-clip"), value("dp-noise-multiplier")
        if clip is None or sigma is None:
            return None
        return cls(clip, sigma, value("dp-delta") or DEFAULT_DELTA, value("dp-max-epsilon"))


def clip_and_noise(
    update: Sequence[np.ndarray],
    clip: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], float]:
    """``clip(update) + N(0, (noise_multiplier*clip)^2)`` over all arrays together, in
    float64; returns the noised arrays (float64, same shapes) and the update's norm before
    clipping. A non-finite update raises ``ValueError`` (it has no meaningful clip)."""
    flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in update])
    if not np.all(np.isfinite(flat)):
        raise ValueError("the update is not finite")
    scale = float(np.max(np.abs(flat))) if flat.size else 0.0
    norm = scale * float(np.linalg.norm(flat / scale)) if scale > 0 else 0.0  # no overflow
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    noised = flat * factor + rng.normal(0.0, noise_multiplier * clip, size=flat.shape)
    out, start = [], 0
    for array in update:
        size = int(np.size(array))
        out.append(noised[start:start + size].reshape(np.shape(array)))
        start += size
    return out, norm


def epsilon_spent(noise_multipliers: Sequence[float], delta: float) -> float:
    """Epsilon at ``delta`` of the composition of one Gaussian mechanism per entry of
    ``noise_multipliers`` (RDP accountant of ``dp-accounting``); 0 for no rounds."""
    if not noise_multipliers:
        return 0.0
    counts: dict[float, int] = {}
    for sigma in noise_multipliers:
        counts[float(sigma)] = counts.get(float(sigma), 0) + 1
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), count)
        for sigma, count in sorted(counts.items())
    ])
    accountant = RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


@dataclass
class PrivacyLedger:
    """The noise multipliers of the rounds a node released an update in, kept in the node's
    ``context.state`` (record :data:`STATE_RECORD`)."""

    noise_multipliers: list[float]

    @classmethod
    def load(cls, state: RecordDict) -> PrivacyLedger:
        record = state.config_records.get(STATE_RECORD)
        values = [] if record is None else record.get("noise-multipliers", [])
        return cls([float(v) for v in cast(list[float], values)])

    def save(self, state: RecordDict) -> None:
        state.config_records[STATE_RECORD] = ConfigRecord(
            {"noise-multipliers": list(self.noise_multipliers), "rounds": len(self)}
        )

    def __len__(self) -> int:
        return len(self.noise_multipliers)

    def epsilon(self, delta: float, extra: Sequence[float] = ()) -> float:
        """Epsilon spent so far (plus the rounds ``extra``) at ``delta``."""
        return epsilon_spent([*self.noise_multipliers, *extra], delta)
