"""Strategy hooks: behaviour a user can stack on any flwr-robust strategy of either API.

A hook may replace the global model before a training round (e.g. a rollback), sees every
outgoing train/evaluate instruction (and may add entries to its config, or seal the final
config, e.g. with a signature), every round's training and evaluation replies (and may
reject some with a
reason, or set a reply's stable identity), and every round's outcome (telemetry, audit).
Hooks never see Flower objects: the strategies hand them plain arrays and
:class:`~flwr_robust.strategy.engine.ClientReply` objects, so one hook serves both APIs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .engine import ClientReply, RoundReport


class StrategyHook:
    """Base class; every method is a no-op, override what you need."""

    def global_model_override(self, server_round: int) -> dict[str, np.ndarray] | None:
        """A model to send for training in ``server_round`` instead of the current global
        model (e.g. a checkpoint restored after a poisoned round), or ``None``."""
        return None

    def on_instruction(
        self,
        server_round: int,
        purpose: str,
        global_arrays: dict[str, np.ndarray],
        config: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Entries to add to the ``config`` of the instruction sent for ``purpose``
        (``"train"`` or ``"evaluate"``) carrying ``global_arrays``. ``config`` holds the
        strategy's config and the entries of the hooks before this one."""
        return {}

    def seal_instruction(
        self,
        server_round: int,
        purpose: str,
        global_arrays: dict[str, np.ndarray],
        config: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Entries computed on the *final* config of an instruction, after every hook's
        :meth:`on_instruction` (e.g. a signature over it). ``config`` is exactly what the
        clients will receive, apart from the sealing entries."""
        return {}

    def on_replies(
        self,
        server_round: int,
        global_arrays: dict[str, np.ndarray],
        replies: Sequence[ClientReply],
    ) -> dict[int, str]:
        """Rejections ``{node_id: "<code>: <detail>"}`` among the valid training replies."""
        return {}

    def on_evaluation_replies(
        self,
        server_round: int,
        global_arrays: dict[str, np.ndarray],
        replies: Sequence[ClientReply],
    ) -> dict[int, str]:
        """Rejections among the valid evaluation replies to the model ``global_arrays``
        sent for evaluation in ``server_round`` (e.g. unsigned or forged metrics)."""
        return {}

    def on_round_end(
        self, report: RoundReport, new_arrays: dict[str, np.ndarray] | None
    ) -> None:
        """Called after each training round with its report and the new global model
        (``None`` when the global model was kept)."""
