"""Backdoor attacks beyond the plain pixel pattern: a trigger distributed over colluders (DBA),
a durable backdoor in rarely updated coordinates (Neurotoxin) and an anomaly-evading, scaled
model replacement (constrain-and-scale).

All three add stamped, relabelled copies to the local data (:func:`~.data.poison_copies`, shared
with :class:`~.data.Backdoor`); Neurotoxin and constrain-and-scale also change local training
(:meth:`~.data.TriggerAttack.training_options`).
"""

from __future__ import annotations

import math

import numpy as np

from ..aggregation.base import check_float, check_int
from ..task.data import Dataset
from .base import AttackContext, Layers, register, scaled
from .data import TrainingOptions, Trigger, TriggerAttack

__all__ = [
    "DBA",
    "ConstrainAndScale",
    "Neurotoxin",
    "clip_to_norm",
    "dba_triggers",
    "l2_norm",
    "neurotoxin_mask",
]


def l2_norm(layers: Layers) -> float:
    """The L2 norm of all coordinates of ``layers``, computed in float64."""
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(a, dtype=np.float64))))
                         for a in layers))


def clip_to_norm(delta: Layers, bound: float | None) -> Layers:
    """``delta`` scaled down to L2 norm ``bound`` when longer (a copy either way)."""
    norm = l2_norm(delta)
    factor = 1.0 if bound is None or norm <= bound else bound / norm
    return scaled(delta, factor)


def dba_triggers(parts: int, strip_length: int, gap: int, value: float) -> list[Trigger]:
    """DBA's local triggers: ``parts`` horizontal strips of ``strip_length`` pixels, two per
    row band from the top-left corner, ``gap`` pixels apart horizontally and vertically.

    With 4 parts of length 4 and gap 2 (the paper's MNIST trigger) part 0 is row 0, columns 0-3;
    part 1 row 0, columns 6-9; part 2 row 3, columns 0-3; part 3 row 3, columns 6-9.
    """
    parts = check_int("dba_parts", parts, minimum=1)
    length = check_int("dba_strip_length", strip_length, minimum=1)
    gap = check_int("dba_gap", gap, minimum=0)
    triggers = []
    for k in range(parts):
        row, col = (k // 2) * (gap + 1), (k % 2) * (length + gap)
        triggers.append(Trigger((row,) * length, tuple(range(col, col + length)), value))
    return triggers


@register
class DBA(TriggerAttack):
    """Distributed backdoor attack (Xie, Huang, Chen, Li, ICLR 2020, "DBA: Distributed Backdoor
    Attacks against Federated Learning").

    The global trigger (the union of :func:`dba_triggers`) is split into ``dba_parts`` local
    triggers; colluder ``k`` (its 0-based position among the sorted Byzantine partition ids,
    ``AttackContext.colluder_index``) stamps local trigger ``k mod dba_parts`` on added copies
    of its samples labelled ``dba_target`` (:func:`~.data.poison_copies`). Attacked in several
    rounds the parts combine in the global model, and the server's central evaluation reports
    the success rate of the global trigger, as the paper does (and of each local trigger). With
    fewer colluders than parts some parts are never trained. Without a colluder index (direct
    library use) the client stamps part 0.

    Defaults: the paper's 4 parts and MNIST target label 2; every update is sent unscaled
    (``dba_scale = 1``), the paper's multiple-shot attack (its single-shot attack boosts by 100).
    Deviations: the paper's MNIST strips (1x4 pixels, gap 2: a 4x10 block) do not fit the
    bundled 8x8 digits, so the default strips are 1x3 with gap 1 (a 3x7 block; set
    ``dba_strip_length = 4``, ``dba_gap = 2`` for the paper's geometry on 28x28 images);
    poisoned samples are added copies (BadNets' choice, as in :class:`~.data.Backdoor`) rather
    than the paper's 20 of 64 replaced per batch: ``dba_poison_fraction = 0.5`` makes a third
    of the training set poisoned (the paper: 31%). Trigger pixels are set to 1.0.

    Parameters
    ----------
    dba_target : int, default=2
        Label given to triggered inputs.
    dba_poison_fraction : float, default=0.5
        Share of the local samples stamped and added as poisoned copies, in (0, 1].
    dba_parts : int, default=4
        Number of local triggers, >= 1.
    dba_strip_length : int, default=3
        Length of each strip in pixels, >= 1.
    dba_gap : int, default=1
        Pixels between neighbouring strips, >= 0.
    dba_scale : float, default=1.0
        Factor applied to the update, > 0.
    """

    name = "dba"
    paper = "Xie, Huang, Chen, Li, ICLR 2020 (DBA: Distributed Backdoor Attacks against FL)"

    def __init__(
        self,
        dba_target: int = 2,
        dba_poison_fraction: float = 0.5,
        dba_parts: int = 4,
        dba_strip_length: int = 3,
        dba_gap: int = 1,
        dba_scale: float = 1.0,
    ) -> None:
        self.dba_target = check_int("dba_target", dba_target, minimum=0)
        self.dba_poison_fraction = check_float(
            "dba_poison_fraction", dba_poison_fraction, minimum=0.0, maximum=1.0,
            exclusive_minimum=True,
        )
        self.dba_parts = check_int("dba_parts", dba_parts, minimum=1)
        self.dba_strip_length = check_int("dba_strip_length", dba_strip_length, minimum=1)
        self.dba_gap = check_int("dba_gap", dba_gap, minimum=0)
        self.dba_scale = check_float("dba_scale", dba_scale, minimum=0.0, exclusive_minimum=True)

    @property
    def target(self) -> int:
        return int(self.dba_target)

    @property
    def fraction(self) -> float:
        return float(self.dba_poison_fraction)

    def local_triggers(self) -> list[Trigger]:
        return dba_triggers(self.dba_parts, self.dba_strip_length, self.dba_gap,
                            self.TRIGGER_VALUE)

    def trigger(self) -> Trigger:
        return Trigger.union(self.local_triggers())

    def stamped_trigger(self, context: AttackContext | None) -> Trigger:
        index = 0 if context is None or context.colluder_index is None else context.colluder_index
        return self.local_triggers()[index % self.dba_parts]

    def poison_data(
        self, data: Dataset, rng: np.random.Generator, context: AttackContext | None = None
    ) -> Dataset:
        height, width = data.x.shape[-2:]
        if not self.trigger().fits(height, width):
            raise ValueError(
                f"DBA's global trigger ({self.dba_parts} strips of {self.dba_strip_length} "
                f"pixels, gap {self.dba_gap}) does not fit the {height}x{width} images of "
                f"{data.name!r}; lower dba-strip-length / dba-gap / dba-parts"
            )
        return super().poison_data(data, rng, context)

    def poison_update(self, delta: Layers, context: AttackContext) -> Layers:
        return scaled(delta, self.dba_scale)


def neurotoxin_mask(direction: Layers, ratio: float) -> Layers:
    """0 at the ``max(1, round(ratio * d))`` coordinates of largest ``|direction|`` over all
    ``d`` coordinates of all layers (ties: the earlier coordinate), 1 elsewhere; float32 arrays
    shaped like ``direction``."""
    ratio = check_float("neurotoxin_ratio", ratio, minimum=0.0, maximum=1.0,
                        exclusive_minimum=True, exclusive_maximum=True)
    flat = np.concatenate([np.abs(np.asarray(a, dtype=np.float64)).ravel() for a in direction])
    k = max(1, round(ratio * flat.size))
    mask = np.ones(flat.size, dtype=np.float32)
    mask[np.argsort(-flat, kind="stable")[:k]] = 0.0
    out, start = [], 0
    for layer in direction:
        size = int(np.size(layer))
        out.append(mask[start:start + size].reshape(np.shape(layer)))
        start += size
    return out


@register
class Neurotoxin(TriggerAttack):
    """Durable backdoor in rarely updated coordinates (Zhang, Panda, Song, Yang, Mahoney,
    Gonzalez, Ramchandran, Mittal, ICML 2022, "Neurotoxin: Durable Backdoors in Federated
    Learning").

    The benign clients' update direction is estimated by the last global update the attacker
    saw, ``global_weights - previous_global_weights``; its top-``neurotoxin_ratio`` coordinates
    by magnitude (over all layers) are masked out of every gradient step of the backdoor
    training (:func:`neurotoxin_mask`, the ``gradient_mask`` of
    :func:`~flwr_robust.task.training.train`), so the backdoor lives in coordinates that
    benign training rarely overwrites. The poisoned data is the BadNets copy set of
    :class:`~.data.Backdoor` (3x3 square of 1.0, labelled ``neurotoxin_target``).

    The client keeps the last global model it received (also in rounds outside the attack
    window, see run config ``attack-start-round``); on its first participation there is no
    earlier model and it trains without a mask (a plain backdoor). A process that does not
    hold the node's earlier model (a simulation process that never trained this partition)
    behaves the same way.

    Defaults and deviations: the mask ratio 0.05 is the authors' setting for their image tasks
    (their released scripts keep the bottom 95% of coordinates); the paper's norm constraint
    (projected gradient descent onto the server's clipping bound) is applied once to the final
    update (``neurotoxin_norm_bound``, off by default) rather than at every step; the paper's
    edge-case triggers are replaced by the pixel pattern.

    Parameters
    ----------
    neurotoxin_target : int, default=0
        Label given to triggered inputs.
    neurotoxin_poison_fraction : float, default=0.5
        Share of the local samples stamped and added as poisoned copies, in (0, 1].
    neurotoxin_ratio : float, default=0.05
        Share of the coordinates masked (the top-k% of the benign direction), in (0, 1).
    neurotoxin_norm_bound : float or None, default=None
        L2 bound the final update is clipped to, > 0.
    """

    name = "neurotoxin"
    paper = (
        "Zhang, Panda, Song, Yang, Mahoney, Gonzalez, Ramchandran, Mittal, ICML 2022 "
        "(Neurotoxin: Durable Backdoors in FL)"
    )

    #: Side of the BadNets square trigger (the default of :class:`~.data.Backdoor`).
    TRIGGER_SIZE = 3

    def __init__(
        self,
        neurotoxin_target: int = 0,
        neurotoxin_poison_fraction: float = 0.5,
        neurotoxin_ratio: float = 0.05,
        neurotoxin_norm_bound: float | None = None,
    ) -> None:
        self.neurotoxin_target = check_int("neurotoxin_target", neurotoxin_target, minimum=0)
        self.neurotoxin_poison_fraction = check_float(
            "neurotoxin_poison_fraction", neurotoxin_poison_fraction, minimum=0.0, maximum=1.0,
            exclusive_minimum=True,
        )
        self.neurotoxin_ratio = check_float(
            "neurotoxin_ratio", neurotoxin_ratio, minimum=0.0, maximum=1.0,
            exclusive_minimum=True, exclusive_maximum=True,
        )
        self.neurotoxin_norm_bound = check_float(
            "neurotoxin_norm_bound", neurotoxin_norm_bound, minimum=0.0, exclusive_minimum=True,
            allow_none=True,
        )

    @property
    def target(self) -> int:
        return int(self.neurotoxin_target)

    @property
    def fraction(self) -> float:
        return float(self.neurotoxin_poison_fraction)

    def trigger(self) -> Trigger:
        return Trigger.square(self.TRIGGER_SIZE, self.TRIGGER_VALUE)

    def training_options(self, context: AttackContext) -> TrainingOptions:
        previous = context.previous_global_weights
        if previous is None:
            return TrainingOptions()
        direction = [np.asarray(g, dtype=np.float64) - np.asarray(p, dtype=np.float64)
                     for g, p in zip(context.global_weights, previous, strict=True)]
        return TrainingOptions(gradient_mask=neurotoxin_mask(direction, self.neurotoxin_ratio))

    def poison_update(self, delta: Layers, context: AttackContext) -> Layers:
        return clip_to_norm(delta, self.neurotoxin_norm_bound)


@register
class ConstrainAndScale(TriggerAttack):
    """Constrain-and-scale (Bagdasaryan, Veit, Hua, Estrin, Shmatikov, AISTATS 2020, "How To
    Backdoor Federated Learning").

    The attacker trains on the BadNets copy set of :class:`~.data.Backdoor` (3x3 square of
    1.0, labelled ``constrain_target``) with the loss
    ``alpha * L_class + (1 - alpha) * L_ano``, ``L_ano = ||theta - G||_2`` the distance of the
    local model to the global model ``G`` (the paper's L2 choice; the ``proximal_anchor`` /
    ``anomaly_weight`` of :func:`~flwr_robust.task.training.train`), then scales its update
    ``X - G`` by ``gamma`` (model replacement). The paper's ``gamma = n / eta`` is used when
    ``constrain_gamma`` is unset, with ``eta = 1`` (the server averages) and the factor split
    over the ``f`` colluders as the authors' code does: ``gamma = n / f``. With
    ``constrain_norm_bound`` ``S`` (the bound the attacker expects the server to enforce) the
    paper's advice caps the factor at ``S / ||X - G||``, so the sent update has norm <= S.

    Defaults and deviations: ``alpha = 0.7``, our reading of the paper's experiments (not
    checked against its text here; the authors' released configuration uses 1.0, no anomaly
    term); the paper also trains the attacker with a smaller, decayed learning rate and more
    epochs, here the run's local training settings are used.

    Parameters
    ----------
    constrain_target : int, default=0
        Label given to triggered inputs.
    constrain_poison_fraction : float, default=0.5
        Share of the local samples stamped and added as poisoned copies, in (0, 1].
    constrain_alpha : float, default=0.7
        Weight of the classification loss, in (0, 1]; 1 = no anomaly term.
    constrain_gamma : float or None, default=None
        Scale factor, > 0; ``None``: ``n / f``.
    constrain_norm_bound : float or None, default=None
        L2 bound of the scaled update, > 0.
    """

    name = "constrain_and_scale"
    paper = "Bagdasaryan, Veit, Hua, Estrin, Shmatikov, AISTATS 2020 (How To Backdoor FL)"

    TRIGGER_SIZE = Neurotoxin.TRIGGER_SIZE

    def __init__(
        self,
        constrain_target: int = 0,
        constrain_poison_fraction: float = 0.5,
        constrain_alpha: float = 0.7,
        constrain_gamma: float | None = None,
        constrain_norm_bound: float | None = None,
    ) -> None:
        self.constrain_target = check_int("constrain_target", constrain_target, minimum=0)
        self.constrain_poison_fraction = check_float(
            "constrain_poison_fraction", constrain_poison_fraction, minimum=0.0, maximum=1.0,
            exclusive_minimum=True,
        )
        self.constrain_alpha = check_float(
            "constrain_alpha", constrain_alpha, minimum=0.0, maximum=1.0, exclusive_minimum=True
        )
        self.constrain_gamma = check_float(
            "constrain_gamma", constrain_gamma, minimum=0.0, exclusive_minimum=True,
            allow_none=True,
        )
        self.constrain_norm_bound = check_float(
            "constrain_norm_bound", constrain_norm_bound, minimum=0.0, exclusive_minimum=True,
            allow_none=True,
        )

    @property
    def target(self) -> int:
        return int(self.constrain_target)

    @property
    def fraction(self) -> float:
        return float(self.constrain_poison_fraction)

    def trigger(self) -> Trigger:
        return Trigger.square(self.TRIGGER_SIZE, self.TRIGGER_VALUE)

    def training_options(self, context: AttackContext) -> TrainingOptions:
        if self.constrain_alpha == 1.0:
            return TrainingOptions()
        return TrainingOptions(proximal_anchor=list(context.global_weights),
                               anomaly_weight=1.0 - self.constrain_alpha)

    def gamma(self, delta: Layers, context: AttackContext) -> float:
        """The scale factor for ``delta``: ``constrain_gamma`` or ``n / f``, capped at
        ``constrain_norm_bound / ||delta||``."""
        gamma = self.constrain_gamma
        if gamma is None:
            gamma = context.num_clients / max(1, context.num_byzantine)
        norm = l2_norm(delta)
        if self.constrain_norm_bound is not None and norm > 0:
            gamma = min(gamma, self.constrain_norm_bound / norm)
        return float(gamma)

    def poison_update(self, delta: Layers, context: AttackContext) -> Layers:
        return scaled(delta, self.gamma(delta, context))
