"""Data-poisoning attacks: the client trains honestly on data it has tampered with.

Also the backdoor trigger (:func:`apply_trigger`) and the backdoor's attack success rate
(:func:`attack_success_rate`) used by the central evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from ..aggregation.base import check_float, check_int
from ..task.data import Dataset
from .base import Attack, AttackContext, Layers, register, scaled

__all__ = ["Backdoor", "LabelFlip", "apply_trigger", "attack_success_rate"]


@register
class LabelFlip(Attack):
    """Label flipping (Tolpegin, Truex, Gursoy, Liu, ESORICS 2020, "Data Poisoning Attacks
    Against Federated Learning Systems").

    With ``flip_source`` and ``flip_target`` set, every label ``flip_source`` becomes
    ``flip_target`` (the paper's targeted source -> target flip). With neither set (default),
    every label ``y`` becomes ``num_classes - 1 - y``, an untargeted all-class flip that is a
    common stronger variant (deviation from the paper). Images are unchanged.

    Parameters
    ----------
    flip_source : int or None, default=None
        Class whose labels are flipped; set together with ``flip_target``.
    flip_target : int or None, default=None
        Label they receive; must differ from ``flip_source``.
    """

    name = "label_flip"
    paper = "Tolpegin, Truex, Gursoy, Liu, ESORICS 2020 (Data Poisoning Attacks Against FL)"

    def __init__(self, flip_source: int | None = None, flip_target: int | None = None) -> None:
        self.flip_source = check_int("flip_source", flip_source, minimum=0, allow_none=True)
        self.flip_target = check_int("flip_target", flip_target, minimum=0, allow_none=True)
        if (self.flip_source is None) != (self.flip_target is None):
            raise ValueError("flip_source and flip_target must be given together (or neither)")
        if self.flip_source is not None and self.flip_source == self.flip_target:
            raise ValueError(f"flip_target must differ from flip_source, both are {flip_source}")

    def poison_data(self, data: Dataset, rng: np.random.Generator) -> Dataset:
        if self.flip_source is None:
            return dataclasses.replace(data, y=data.num_classes - 1 - data.y)
        for param, value in (("flip_source", self.flip_source), ("flip_target", self.flip_target)):
            if value >= data.num_classes:
                raise ValueError(
                    f"{param}={value} is not a class of {data.name!r} ({data.num_classes} classes)"
                )
        y = np.where(data.y == self.flip_source, self.flip_target, data.y)
        return dataclasses.replace(data, y=y)


def apply_trigger(x: np.ndarray, trigger_size: int, trigger_value: float) -> np.ndarray:
    """Return a copy of images ``x`` with the backdoor trigger stamped on.

    The trigger is a ``trigger_size`` x ``trigger_size`` square of ``trigger_value`` in the
    bottom-right corner of every channel (the pattern position of BadNets, Gu et al. 2017),
    e.g. 3x3 white pixels where digits (8x8) and Fashion-MNIST (28x28) images are background.

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
    value = check_float("trigger_value", trigger_value)
    out = x.copy()
    out[..., -size:, -size:] = value
    return out


def attack_success_rate(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    test: Dataset,
    *,
    target: int,
    trigger_size: int,
    trigger_value: float,
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
        The trigger, as in :func:`apply_trigger`.

    Returns
    -------
    float
        The attack success rate in [0, 1].
    """
    target = check_int("target", target, minimum=0)
    keep = test.y != target
    if not keep.any():
        raise ValueError(f"test data holds no sample outside the target class {target}")
    triggered = apply_trigger(test.x[keep], trigger_size, trigger_value)
    predicted = np.asarray(predict_fn(triggered))
    if predicted.shape != (len(triggered),):
        raise ValueError(
            f"predict_fn must return one label per input, shape ({len(triggered)},), "
            f"got {predicted.shape}"
        )
    return float(np.mean(predicted == target))


@register
class Backdoor(Attack):
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
    total examples / own examples. 1 = no boost (a naive backdoor). The paper also trains with
    a decayed learning rate and an anomaly-evasion loss term; neither is done here.

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

    def num_poisoned(self, num_samples: int) -> int:
        """Number of poisoned copies added to ``num_samples`` clean samples."""
        return max(1, round(self.poison_fraction * num_samples)) if num_samples else 0

    def poison_data(self, data: Dataset, rng: np.random.Generator) -> Dataset:
        if self.backdoor_target >= data.num_classes:
            raise ValueError(
                f"backdoor_target={self.backdoor_target} is not a class of {data.name!r} "
                f"({data.num_classes} classes)"
            )
        k = self.num_poisoned(len(data))
        chosen = np.sort(rng.choice(len(data), size=k, replace=False))
        stamped = apply_trigger(data.x[chosen], self.trigger_size, self.trigger_value)
        return dataclasses.replace(
            data,
            x=np.concatenate([data.x, stamped]),
            y=np.concatenate([data.y, np.full(k, self.backdoor_target, dtype=np.int64)]),
        )

    def poison_update(self, delta: Layers, context: AttackContext) -> Layers:
        return scaled(delta, self.boost_factor)

    def success_rate(self, predict_fn: Callable[[np.ndarray], np.ndarray], test: Dataset) -> float:
        """:func:`attack_success_rate` with this attack's target and trigger."""
        return attack_success_rate(
            predict_fn,
            test,
            target=self.backdoor_target,
            trigger_size=self.trigger_size,
            trigger_value=self.trigger_value,
        )
