"""Data-poisoning attacks: the client trains honestly on data it has tampered with.

Also the backdoor machinery shared by every trigger attack (:class:`Trigger`, :func:`apply_trigger`,
:func:`poison_copies`, :class:`TriggerAttack`) and the attack success rate
(:func:`attack_success_rate`) that the central evaluation reports for them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..aggregation.base import InvalidParameterError, check_float, check_int
from ..task.data import Dataset
from .base import Attack, AttackContext, Layers, register, scaled

__all__ = [
    "FLIP_MODES",
    "Backdoor",
    "LabelFlip",
    "TrainingOptions",
    "Trigger",
    "TriggerAttack",
    "apply_trigger",
    "attack_success_rate",
    "num_poisoned",
    "poison_copies",
    "poisoned_training",
]

#: Label maps of the all-class flip: ``reverse`` y -> C - 1 - y, ``shift`` y -> (y + 1) mod C.
FLIP_MODES = ("reverse", "shift")


def num_poisoned(fraction: float, num_samples: int) -> int:
    """``round(fraction * num_samples)`` samples, at least one (none of none)."""
    return max(1, round(fraction * num_samples)) if num_samples else 0


@register
class LabelFlip(Attack):
    """Label flipping (Tolpegin, Truex, Gursoy, Liu, ESORICS 2020, "Data Poisoning Attacks
    Against Federated Learning Systems").

    With ``flip_source`` and ``flip_target`` set, labels ``flip_source`` become ``flip_target``
    (the paper's targeted source -> target flip). With neither set (default), every label is
    flipped by ``flip_mode``: ``"reverse"`` maps ``y`` to ``num_classes - 1 - y`` (for an odd
    class count the middle class keeps its label), ``"shift"`` to ``(y + 1) mod num_classes``
    (every label changes); both are untargeted all-class variants common in the literature
    (deviation from the paper). ``flip_fraction`` is the poison ratio: that share (rounded, at
    least one) of the eligible samples (all of them, or those of class ``flip_source``),
    chosen with the attack's rng, is flipped. Images are unchanged.

    Parameters
    ----------
    flip_source : int or None, default=None
        Class whose labels are flipped; set together with ``flip_target``.
    flip_target : int or None, default=None
        Label they receive; must differ from ``flip_source``.
    flip_mode : {"reverse", "shift"}, default="reverse"
        Label map of the all-class flip (leave the default with ``flip_source``).
    flip_fraction : float, default=1.0
        Share of the eligible samples flipped, in (0, 1].
    """

    name = "label_flip"
    paper = "Tolpegin, Truex, Gursoy, Liu, ESORICS 2020 (Data Poisoning Attacks Against FL)"

    def __init__(
        self,
        flip_source: int | None = None,
        flip_target: int | None = None,
        flip_mode: str = "reverse",
        flip_fraction: float = 1.0,
    ) -> None:
        self.flip_source = check_int("flip_source", flip_source, minimum=0, allow_none=True)
        self.flip_target = check_int("flip_target", flip_target, minimum=0, allow_none=True)
        if (self.flip_source is None) != (self.flip_target is None):
            raise ValueError("flip_source and flip_target must be given together (or neither)")
        if self.flip_source is not None and self.flip_source == self.flip_target:
            raise ValueError(f"flip_target must differ from flip_source, both are {flip_source}")
        if flip_mode not in FLIP_MODES:
            raise InvalidParameterError(f"flip_mode must be one of {FLIP_MODES}, got {flip_mode!r}")
        if self.flip_source is not None and flip_mode != "reverse":
            raise ValueError("flip_mode is the all-class flip's map; leave it at 'reverse' "
                             "when flip_source and flip_target are set")
        self.flip_mode = flip_mode
        self.flip_fraction = check_float(
            "flip_fraction", flip_fraction, minimum=0.0, maximum=1.0, exclusive_minimum=True
        )

    def poison_data(self, data: Dataset, rng: np.random.Generator) -> Dataset:
        if self.flip_source is None:
            eligible = np.arange(len(data))
            if self.flip_mode == "shift":
                flipped = (data.y + 1) % data.num_classes
            else:
                flipped = data.num_classes - 1 - data.y
        else:
            for param, value in (("flip_source", self.flip_source),
                                 ("flip_target", self.flip_target)):
                if value >= data.num_classes:
                    raise ValueError(f"{param}={value} is not a class of {data.name!r} "
                                     f"({data.num_classes} classes)")
            eligible = np.flatnonzero(data.y == self.flip_source)
            flipped = np.full_like(data.y, self.flip_target)
        k = num_poisoned(self.flip_fraction, len(eligible))
        if k < len(eligible):
            eligible = np.sort(rng.choice(eligible, size=k, replace=False))
        y = data.y.copy()
        y[eligible] = flipped[eligible]
        return dataclasses.replace(data, y=y)


# ------------------------------------------------------------------------------ triggers
@dataclass(frozen=True)
class Trigger:
    """A backdoor trigger: the pixels at ``(rows[i], cols[i])`` of every channel set to ``value``.

    Positions index the last two image axes as numpy does: negative ones count from the
    bottom / right edge, so one trigger fits images of any size that holds it.
    """

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    value: float

    def __post_init__(self) -> None:
        rows = tuple(check_int("trigger row", r) for r in self.rows)
        cols = tuple(check_int("trigger column", c) for c in self.cols)
        if not rows or len(rows) != len(cols):
            raise ValueError(f"a trigger needs one column per row and at least one pixel, got "
                             f"{len(rows)} rows and {len(cols)} columns")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "cols", cols)
        object.__setattr__(self, "value", check_float("trigger_value", self.value))

    @classmethod
    def square(cls, size: int, value: float) -> Trigger:
        """A ``size`` x ``size`` square in the bottom-right corner (BadNets' pattern position)."""
        size = check_int("trigger_size", size, minimum=1)
        offsets = range(-size, 0)
        return cls(tuple(r for r in offsets for _ in offsets), tuple(offsets) * size, value)

    @classmethod
    def union(cls, triggers: Iterable[Trigger]) -> Trigger:
        """The trigger stamping every pixel of ``triggers`` (which share one value)."""
        parts = list(triggers)
        values = {t.value for t in parts}
        if len(values) != 1:
            raise ValueError(f"the union needs triggers of one value, got {sorted(values)}")
        pixels = dict.fromkeys(p for t in parts for p in zip(t.rows, t.cols, strict=True))
        return cls(tuple(r for r, _ in pixels), tuple(c for _, c in pixels), values.pop())

    def fits(self, height: int, width: int) -> bool:
        """Whether every position lies in a ``height`` x ``width`` image."""
        return (all(-height <= r < height for r in self.rows)
                and all(-width <= c < width for c in self.cols))

    def pixels(self, height: int, width: int) -> frozenset[tuple[int, int]]:
        """The stamped (row, column) pairs of a ``height`` x ``width`` image, non-negative."""
        if not self.fits(height, width):
            raise ValueError(f"the trigger does not fit images of size ({height}, {width})")
        return frozenset((r % height, c % width) for r, c in zip(self.rows, self.cols, strict=True))

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """A copy of images ``x`` (shape (..., H, W)) with the trigger stamped on."""
        x = np.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"x must have shape (..., H, W), got shape {x.shape}")
        if not self.fits(*x.shape[-2:]):
            raise ValueError(f"the trigger does not fit images of size {x.shape[-2:]}")
        out = x.copy()
        out[..., np.asarray(self.rows), np.asarray(self.cols)] = self.value
        return out


def apply_trigger(x: np.ndarray, trigger_size: int, trigger_value: float) -> np.ndarray:
    """Return a copy of images ``x`` with the square backdoor trigger stamped on.

    The trigger (:meth:`Trigger.square`) is a ``trigger_size`` x ``trigger_size`` square of
    ``trigger_value`` in the bottom-right corner of every channel (the pattern position of
    BadNets, Gu et al. 2017), e.g. 3x3 white pixels where digits (8x8) and Fashion-MNIST (28x28)
    images are background.

    Parameters
    ----------
    x : np.ndarray
        Images of shape (..., H, W), e.g. (N, C, H, W); not modified.
    trigger_size : int
        Side of the square, in [1, min(H, W)].
    trigger_value : float
        Pixel value of the square (1.0 is the maximum intensity of the bundled datasets).

    Returns
    -------
    np.ndarray
        A new array of the same shape and dtype.
    """
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., H, W), got shape {x.shape}")
    size = check_int("trigger_size", trigger_size, minimum=1)
    if size > min(x.shape[-2:]):
        raise ValueError(f"trigger_size={size} does not fit images of size {x.shape[-2:]}")
    return Trigger.square(size, trigger_value).stamp(x)


def attack_success_rate(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    test: Dataset,
    *,
    target: int,
    trigger_size: int | None = None,
    trigger_value: float | None = None,
    trigger: Trigger | None = None,
) -> float:
    """Share of triggered test inputs of non-target classes that are classified as ``target``.

    Parameters
    ----------
    predict_fn : callable
        Maps images (N, C, H, W) to predicted labels (N,), e.g.
        ``lambda x: flwr_robust.task.training.predict(model, x)``.
    test : Dataset
        Clean test data; samples whose true class is ``target`` are left out.
    target : int
        The backdoor's target class.
    trigger_size, trigger_value
        A square trigger, as in :func:`apply_trigger`; or give ``trigger`` instead.
    trigger : Trigger, optional
        Any trigger (e.g. DBA's global trigger).

    Returns
    -------
    float
        The attack success rate in [0, 1].
    """
    target = check_int("target", target, minimum=0)
    if trigger is None:
        if trigger_size is None or trigger_value is None:
            raise ValueError("give either trigger or both trigger_size and trigger_value")
        trigger = Trigger.square(trigger_size, trigger_value)
    elif trigger_size is not None or trigger_value is not None:
        raise ValueError("give either trigger or both trigger_size and trigger_value")
    keep = test.y != target
    if not keep.any():
        raise ValueError(f"test data holds no sample outside the target class {target}")
    triggered = trigger.stamp(test.x[keep])
    predicted = np.asarray(predict_fn(triggered))
    if predicted.shape != (len(triggered),):
        raise ValueError(
            f"predict_fn must return one label per input, shape ({len(triggered)},), "
            f"got {predicted.shape}"
        )
    return float(np.mean(predicted == target))


def poison_copies(
    data: Dataset, rng: np.random.Generator, trigger: Trigger, target: int, fraction: float
) -> Dataset:
    """``data`` plus stamped copies, labelled ``target``, of ``num_poisoned(fraction, N)`` of
    its ``N`` samples chosen with ``rng`` (BadNets' choice: the clean samples stay, so the
    main task, and hence the update, stays plausible). ``data`` is not modified."""
    if target >= data.num_classes:
        raise ValueError(f"backdoor target {target} is not a class of {data.name!r} "
                         f"({data.num_classes} classes)")
    if not trigger.fits(*data.x.shape[-2:]):
        raise ValueError(f"the trigger does not fit the images of {data.name!r} "
                         f"(size {data.x.shape[-2:]}); choose a smaller trigger")
    k = num_poisoned(fraction, len(data))
    chosen = np.sort(rng.choice(len(data), size=k, replace=False))
    return dataclasses.replace(
        data,
        x=np.concatenate([data.x, trigger.stamp(data.x[chosen])]),
        y=np.concatenate([data.y, np.full(k, target, dtype=np.int64)]),
    )


@dataclass(frozen=True)
class TrainingOptions:
    """How an attack changes local training itself (the keywords of
    :func:`~flwr_robust.task.training.train`), layers in the global model's order.

    Attributes
    ----------
    gradient_mask : list[np.ndarray] or None
        Per-coordinate gradient multipliers (Neurotoxin's projection).
    proximal_anchor : list[np.ndarray] or None
        Weights whose L2 distance is added to the loss with ``anomaly_weight``.
    anomaly_weight : float
        Weight of that distance, in [0, 1) (constrain-and-scale's ``1 - alpha``).
    """

    gradient_mask: Layers | None = None
    proximal_anchor: Layers | None = None
    anomaly_weight: float = 0.0


class TriggerAttack(Attack):
    """Base of the backdoor attacks that stamp a trigger on added training copies.

    Subclasses define :attr:`target`, :attr:`fraction` and :meth:`trigger`; DBA-like attacks
    also :meth:`local_triggers` and :meth:`stamped_trigger`, and attacks that change training
    :meth:`training_options`. The central evaluation reports the attack success rate of
    :meth:`trigger` (and of each local trigger when there are several).
    """

    #: Pixel value of the triggers whose attacks do not make it a parameter (the maximum
    #: intensity of the bundled datasets).
    TRIGGER_VALUE: ClassVar[float] = 1.0

    @property
    def target(self) -> int:
        """The label given to triggered inputs."""
        raise NotImplementedError

    @property
    def fraction(self) -> float:
        """Share of the local samples stamped and added as poisoned copies."""
        raise NotImplementedError

    def trigger(self) -> Trigger:
        """The trigger the attack implants (evaluated by the server)."""
        raise NotImplementedError

    def local_triggers(self) -> list[Trigger]:
        """The triggers individual attackers stamp (one unless the trigger is distributed)."""
        return [self.trigger()]

    def stamped_trigger(self, context: AttackContext | None) -> Trigger:
        """The trigger this client stamps on its training copies."""
        return self.trigger()

    def num_poisoned(self, num_samples: int) -> int:
        """Number of poisoned copies added to ``num_samples`` clean samples."""
        return num_poisoned(self.fraction, num_samples)

    def poison_data(
        self, data: Dataset, rng: np.random.Generator, context: AttackContext | None = None
    ) -> Dataset:
        return poison_copies(data, rng, self.stamped_trigger(context), self.target, self.fraction)

    def training_options(self, context: AttackContext) -> TrainingOptions:
        """How local training changes (honest training by default)."""
        return TrainingOptions()

    def success_rate(self, predict_fn: Callable[[np.ndarray], np.ndarray], test: Dataset) -> float:
        """:func:`attack_success_rate` of :meth:`trigger` with this attack's target."""
        return attack_success_rate(predict_fn, test, target=self.target, trigger=self.trigger())

    def local_success_rates(
        self, predict_fn: Callable[[np.ndarray], np.ndarray], test: Dataset
    ) -> list[float]:
        """:func:`attack_success_rate` of each local trigger."""
        return [attack_success_rate(predict_fn, test, target=self.target, trigger=t)
                for t in self.local_triggers()]


def poisoned_training(
    attack: Attack, data: Dataset, context: AttackContext
) -> tuple[Dataset, TrainingOptions]:
    """The data an attacking client trains on and how it trains (any attack)."""
    if isinstance(attack, TriggerAttack):
        return attack.poison_data(data, context.rng, context), attack.training_options(context)
    return attack.poison_data(data, context.rng), TrainingOptions()


@register
class Backdoor(TriggerAttack):
    """Pixel-pattern backdoor with optional model-replacement boost.

    Bagdasaryan, Veit, Hua, Estrin, Shmatikov (AISTATS 2020, "How To Backdoor Federated
    Learning") with the pixel-pattern trigger of Gu, Dolan-Gavitt, Garg (arXiv 2017, "BadNets").
    ``poison_data`` picks ``round(poison_fraction * N)`` (at least one) of the ``N`` local
    samples, stamps the trigger (:func:`apply_trigger`) on copies of them labelled
    ``backdoor_target`` and adds the copies to the clean data (BadNets' choice): the clean
    samples keep the main-task accuracy, and hence the update, plausible, as Bagdasaryan et al.
    require. The training set thus holds ``N + k`` samples, a share ``k / (N + k)`` poisoned.

    ``poison_update`` multiplies the delta by ``boost_factor``: the paper's model replacement
    scales by ``gamma = n / eta`` (``n`` clients, global learning rate ``eta``) so that the
    average becomes the backdoored model; for example-weighted FedAvg the equivalent factor is
    total examples / own examples. 1 = no boost (a naive backdoor). The paper's anomaly-evasion
    loss and bounded scaling are the ``constrain_and_scale`` attack.

    Report the client's own partition size as the true count to :meth:`claimed_examples`
    (not ``N + k``) so that the reply looks normal.

    Parameters
    ----------
    backdoor_target : int, default=0
        Label given to triggered inputs.
    poison_fraction : float, default=0.5
        Share of the local samples stamped and added as poisoned copies, in (0, 1].
    trigger_size : int, default=3
        Side of the square trigger, >= 1 and at most the image side.
    trigger_value : float, default=1.0
        Pixel value of the trigger.
    boost_factor : float, default=1.0
        Model-replacement factor applied to the delta, > 0.
    """

    name = "backdoor"
    paper = (
        "Bagdasaryan, Veit, Hua, Estrin, Shmatikov, AISTATS 2020 (How To Backdoor FL); "
        "Gu, Dolan-Gavitt, Garg, arXiv 2017 (BadNets)"
    )

    def __init__(
        self,
        backdoor_target: int = 0,
        poison_fraction: float = 0.5,
        trigger_size: int = 3,
        trigger_value: float = 1.0,
        boost_factor: float = 1.0,
    ) -> None:
        self.backdoor_target = check_int("backdoor_target", backdoor_target, minimum=0)
        self.poison_fraction = check_float(
            "poison_fraction", poison_fraction, minimum=0.0, maximum=1.0, exclusive_minimum=True
        )
        self.trigger_size = check_int("trigger_size", trigger_size, minimum=1)
        self.trigger_value = check_float("trigger_value", trigger_value)
        self.boost_factor = check_float(
            "boost_factor", boost_factor, minimum=0.0, exclusive_minimum=True
        )

    @property
    def target(self) -> int:
        return int(self.backdoor_target)

    @property
    def fraction(self) -> float:
        return float(self.poison_fraction)

    def trigger(self) -> Trigger:
        return Trigger.square(self.trigger_size, self.trigger_value)

    def poison_data(
        self, data: Dataset, rng: np.random.Generator, context: AttackContext | None = None
    ) -> Dataset:
        if self.backdoor_target >= data.num_classes:
            raise ValueError(
                f"backdoor_target={self.backdoor_target} is not a class of {data.name!r} "
                f"({data.num_classes} classes)"
            )
        return super().poison_data(data, rng, context)

    def poison_update(self, delta: Layers, context: AttackContext) -> Layers:
        return scaled(delta, self.boost_factor)
