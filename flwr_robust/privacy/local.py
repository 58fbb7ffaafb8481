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
privacy figures themselves (data-independent). Evaluation replies are not privatised: the
client mod refuses them while DP is on unless the node config allows them. Noise comes from numpy's PCG64 seeded by the
OS: adequate for research, not a cryptographically secure sampler (floating-point attacks
on naive samplers: Mironov, CCS 2012).

Settings and their precedence (:meth:`NodeDP.resolve`). When the node config sets any
``dp-*`` key, *every* DP setting comes from the node config or the code defaults, never from
the run config (which the server controls), and a node config giving any of ``dp-clip``,
``dp-noise-multiplier``, ``dp-delta``, ``dp-max-epsilon``, ``dp-ledger-file`` must give the
first two (0 or ``""`` turns DP off explicitly); otherwise the run config's ``dp-clip``,
``dp-noise-multiplier``, ``dp-delta`` and ``dp-max-epsilon`` apply. An instruction (and its
experiment cell) never changes them. ``dp-required``, ``dp-allow-evaluation`` and
``dp-ledger-file`` are read from the node config only. Values outside sane finite ranges
(:data:`LIMITS`) are refused.

Budget scope. Without ``dp-ledger-file`` the ledger lives in ``context.state``, which Flower
keeps for one run only: the budget is *per run*, and a new run (or a restarted SuperNode)
starts again from epsilon 0. With ``dp-ledger-file`` (a JSON file the node owns) the ledger is
keyed by the node's identity (node config ``partition-id``, else its node id), read at each
instruction and replaced atomically before the reply is released, so the budget spans runs.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import dp_accounting
import numpy as np
from dp_accounting.rdp import RdpAccountant
from flwr.app import ConfigRecord, RecordDict

from ..aggregation.base import InvalidParameterError

#: The node's privacy record in ``context.state`` (Flower keeps it across a run's rounds).
STATE_RECORD = "frs-privacy"
DEFAULT_DELTA = 1e-5
#: The settings the run config may give (when the node config sets no ``dp-*`` key).
SHARED_KEYS = ("dp-clip", "dp-noise-multiplier", "dp-delta", "dp-max-epsilon")
#: Closed ranges of the settings: outside them the accounting or the noise is meaningless
#: (a delta above 1e-2 guarantees little; a huge sigma overflows the accountant).
LIMITS = {
    "dp-clip": (1e-12, 1e6),
    "dp-noise-multiplier": (1e-2, 1e4),
    "dp-delta": (1e-100, 1e-2),
    "dp-max-epsilon": (1e-6, 1e6),
}
LEDGER_FORMAT = "flwr-robust-privacy-ledger/1"


@dataclass(frozen=True)
class LocalDP:
    """Local DP mechanism settings of one node (see :data:`LIMITS` for the ranges).

    Parameters
    ----------
    clip : float
        L2 bound ``C`` of the whole update (all layers together).
    noise_multiplier : float
        ``sigma``: the noise standard deviation is ``sigma * C`` per coordinate.
    delta : float
        The ``delta`` the reported epsilon is for.
    max_epsilon : float or None
        The node's budget: it declines to train when one more round would exceed it.
    """

    clip: float
    noise_multiplier: float
    delta: float = DEFAULT_DELTA
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        for key, value in (("dp-clip", self.clip), ("dp-noise-multiplier", self.noise_multiplier),
                           ("dp-delta", self.delta), ("dp-max-epsilon", self.max_epsilon)):
            if value is None and key == "dp-max-epsilon":
                continue
            low, high = LIMITS[key]
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not low <= value <= high):  # NaN fails too
                raise InvalidParameterError(f"{key} must be a number in [{low:g}, {high:g}], "
                                            f"got {value!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LocalDP | None:
        """Settings from one config's ``dp-clip``, ``dp-noise-multiplier``, ``dp-delta`` and
        ``dp-max-epsilon``; ``None`` (off) when ``dp-clip`` or ``dp-noise-multiplier`` is
        unset, ``""`` or 0."""
        clip, sigma = _number(config, "dp-clip"), _number(config, "dp-noise-multiplier")
        if clip is None or sigma is None:
            return None
        return cls(clip, sigma, _number(config, "dp-delta") or DEFAULT_DELTA,
                   _number(config, "dp-max-epsilon"))


def _number(config: Mapping[str, Any], key: str) -> float | None:
    value = config.get(key)
    if value in ("", None):
        return None
    if isinstance(value, bool):
        raise InvalidParameterError(f"config {key!r} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidParameterError(f"config {key!r} must be a number, got {value!r}") from exc
    if not math.isfinite(number):
        raise InvalidParameterError(f"config {key!r} must be finite, got {value!r}")
    return number or None


def _flag(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise InvalidParameterError(f"node config {key!r} must be true or false, got {value!r}")


@dataclass(frozen=True)
class NodeDP:
    """A node's resolved DP settings (the precedence is in the module docstring).

    ``dp`` is ``None`` when DP is off; ``required`` (node config ``dp-required``) then
    refuses training; ``allow_evaluation`` (``dp-allow-evaluation``) lets evaluation replies
    out while DP is on; ``ledger_file`` (``dp-ledger-file``) keeps the ledger across runs.
    """

    dp: LocalDP | None
    required: bool = False
    allow_evaluation: bool = False
    ledger_file: str | None = None

    @classmethod
    def resolve(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> NodeDP:
        """Node config when it sets any ``dp-*`` key, else the run config's
        :data:`SHARED_KEYS`; node-only keys from the node config. Raises
        :class:`InvalidParameterError` on a bad value."""
        node_owns = any(str(key).startswith("dp-") for key in node_config)
        if any(k in node_config for k in (*SHARED_KEYS, "dp-ledger-file")) and not all(
            k in node_config for k in ("dp-clip", "dp-noise-multiplier")
        ):  # e.g. only dp-clip: the node meant DP on, the server must not pick sigma
            raise InvalidParameterError(
                "node config sets some DP keys but not both 'dp-clip' and "
                "'dp-noise-multiplier' (give both; 0 or '' turns DP off)")
        source = node_config if node_owns else {k: run_config[k] for k in SHARED_KEYS
                                                if k in run_config}
        ledger_file = str(node_config.get("dp-ledger-file", "") or "") or None
        if ledger_file is not None and not Path(ledger_file).is_absolute():
            raise InvalidParameterError(
                f"node config 'dp-ledger-file' must be an absolute path, got {ledger_file!r}")
        return cls(LocalDP.from_config(source), _flag(node_config, "dp-required"),
                   _flag(node_config, "dp-allow-evaluation"), ledger_file)


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


class BudgetExhausted(Exception):
    """One more round would exceed the node's ``dp-max-epsilon``; ``upcoming`` is its epsilon."""

    def __init__(self, upcoming: float, rounds: int) -> None:
        super().__init__(upcoming, rounds)
        self.upcoming, self.rounds = upcoming, rounds


@dataclass
class PrivacyLedger:
    """The noise multipliers of the rounds a node released an update in: in the node's
    ``context.state`` (record :data:`STATE_RECORD`, per run) or, with ``dp-ledger-file``, in
    a JSON file keyed by the node's identity (across runs)."""

    noise_multipliers: list[float]

    @classmethod
    def load(cls, state: RecordDict) -> PrivacyLedger:
        record = state.config_records.get(STATE_RECORD)
        values = [] if record is None else record.get("noise-multipliers", [])
        return cls(_sigmas(cast(list[Any], values)))

    def save(self, state: RecordDict) -> None:
        state.config_records[STATE_RECORD] = ConfigRecord(
            {"noise-multipliers": list(self.noise_multipliers), "rounds": len(self)}
        )

    @classmethod
    def load_file(cls, path: str | Path, identity: str) -> PrivacyLedger:
        """The ledger of ``identity`` in the file (empty when the file or entry is missing);
        ``ValueError``/``TypeError`` when the file is not a ledger."""
        nodes = _read_ledger_file(Path(path))
        entry = nodes.get(identity, {})
        if not isinstance(entry, dict):
            raise TypeError("the ledger file is malformed")
        return cls(_sigmas(entry.get("noise-multipliers", [])))

    def save_file(self, path: str | Path, identity: str) -> None:
        """Replace ``identity``'s entry, atomically (temporary file + ``os.replace``)."""
        path = Path(path)
        nodes = _read_ledger_file(path)
        nodes[identity] = {"noise-multipliers": list(self.noise_multipliers), "rounds": len(self)}
        text = json.dumps({"format": LEDGER_FORMAT, "nodes": nodes}, indent=1, sort_keys=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __len__(self) -> int:
        return len(self.noise_multipliers)

    def epsilon(self, delta: float, extra: Sequence[float] = ()) -> float:
        """Epsilon spent so far (plus the rounds ``extra``) at ``delta``."""
        return epsilon_spent([*self.noise_multipliers, *extra], delta)


def _sigmas(values: Any) -> list[float]:
    if not isinstance(values, list):
        raise TypeError("the ledger is malformed")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0
        ):
            raise ValueError("the ledger holds a noise multiplier that is not a positive number")
        out.append(float(value))
    return out


def _read_ledger_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT or not isinstance(
        data.get("nodes"), dict
    ):
        raise ValueError("the ledger file is not a flwr-robust privacy ledger")
    return cast(dict[str, Any], data["nodes"])


@dataclass(frozen=True)
class LedgerStore:
    """Where one node's ledger lives: ``context.state`` or (``path``) a ledger file."""

    state: RecordDict
    path: str | None
    identity: str

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        with open(f"{self.path}.lock", "a", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def load(self) -> PrivacyLedger:
        if self.path is None:
            return PrivacyLedger.load(self.state)
        with self._locked():
            return PrivacyLedger.load_file(self.path, self.identity)

    def upcoming(self, dp: LocalDP, ledger: PrivacyLedger) -> float:
        """Epsilon after one more round; :class:`BudgetExhausted` above the budget and
        ``ValueError`` when it is not finite."""
        epsilon = ledger.epsilon(dp.delta, extra=[dp.noise_multiplier])
        if dp.max_epsilon is not None and not epsilon <= dp.max_epsilon:
            raise BudgetExhausted(epsilon, len(ledger))
        if not math.isfinite(epsilon):
            raise ValueError("the epsilon is not finite")
        return epsilon

    def commit(self, dp: LocalDP) -> float:
        """Record one round (re-read under the file lock, budget checked again, the epsilon
        computed *before* anything is saved); the epsilon now spent."""
        with self._locked():
            if self.path is None:
                ledger = PrivacyLedger.load(self.state)
            else:
                ledger = PrivacyLedger.load_file(self.path, self.identity)
            epsilon = self.upcoming(dp, ledger)
            ledger.noise_multipliers.append(dp.noise_multiplier)
            if self.path is None:
                ledger.save(self.state)
            else:
                ledger.save_file(self.path, self.identity)
        return epsilon
