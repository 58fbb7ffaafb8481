"""Local DP as a Flower client mod: clip and noise the update before it is signed.

Place :func:`local_dp_mod` *after* :func:`~flwr_robust.security.mod.integrity_mod` in
``ClientApp(mods=[...])``. Flower wraps the app in the mods outermost-first, so a mod listed
later sees the instruction after the integrity mod verified it and the reply before the
integrity mod signs it: the signature then covers the noised update and the privacy metrics
(``epsilon-spent``, ``dp-delta``), which the server's
:class:`~flwr_robust.privacy.hooks.PrivacyPolicyHook` can trust.

On a training instruction, with local DP configured (:meth:`LocalDP.from_config`: node
config first, then the run config with the instruction's experiment cell applied), the mod

1. declines (an error reply ``privacy-budget-exhausted: ...`` with the node id, before any
   training) when one more round would take the node's epsilon above ``dp-max-epsilon``;
2. lets the app train, then replaces the reply's floating arrays by
   ``global + clip(update) + noise`` (see :mod:`.local`; non-floating arrays are reset to
   the received ones, as they cannot carry noise);
3. records the round in the node's ledger (``context.state``) and puts ``epsilon-spent``
   and ``dp-delta`` in the reply's metrics, withholding every other metric but the example
   count (they are not privatised).

A reply it cannot privatise becomes an error reply (``privacy-unprivatisable: ...``): it
never lets an unnoised update out.

Scope: evaluation replies pass unchanged (their metrics come from the node's validation
split, which the guarantee does not cover: keep that split out of the private data, or turn
federated evaluation off). The mod runs on every node of the bundled app, Byzantine ones
included; a real attacker controls its node and may skip it (and lie about its epsilon).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import numpy as np
from flwr.app import Array, ConfigRecord, Context, Message, MessageType, MetricRecord

from ..records import arrayrecord_views
from ..security.mod import CallNext, Layout, Refused, layout_of, refuse
from .local import LocalDP, PrivacyLedger, clip_and_noise

logger = logging.getLogger("flwr.robust")

#: Error-reply reason code of a node whose budget is spent.
BUDGET_EXHAUSTED = "privacy-budget-exhausted"
UNPRIVATISABLE = "privacy-unprivatisable"
#: The metrics a privatised reply keeps besides the privacy figures.
KEPT_METRICS = ("num-examples",)


def settings_of(message: Message, layout: Layout, context: Context) -> LocalDP | None:
    """The node's local DP settings for this instruction (``None``: off)."""
    from ..apps.settings import cell_run_config  # here: apps -> ops.telemetry -> privacy

    cell = layout.instruction_config(message).get("experiment-cell")
    run_config = cell_run_config(context.run_config, None if cell is None else int(cell))
    return LocalDP.from_config(context.node_config, run_config)


def local_dp_mod(message: Message, context: Context, call_next: CallNext) -> Message:
    """Privatise training replies (see the module docstring); anything else passes."""
    try:
        layout = layout_of(message)
    except Refused:
        layout = None  # not a well-formed instruction: the app (or integrity mod) answers
    if layout is None or layout.kind != MessageType.TRAIN:
        return call_next(message, context)
    try:
        dp = settings_of(message, layout, context)
    except Exception as exc:  # noqa: BLE001 - bad settings must not let an update out
        return refuse(message, context, f"{UNPRIVATISABLE}: bad DP settings: {exc}")
    if dp is None:
        return call_next(message, context)
    ledger = PrivacyLedger.load(context.state)
    if dp.max_epsilon is not None:
        upcoming = ledger.epsilon(dp.delta, extra=[dp.noise_multiplier])
        if upcoming > dp.max_epsilon:
            logger.warning("node %d: privacy budget spent (%d rounds)", context.node_id,
                           len(ledger))
            return refuse(
                message, context,
                f"{BUDGET_EXHAUSTED}: one more round would spend epsilon {upcoming:.4g} > "
                f"dp-max-epsilon {dp.max_epsilon:g} at delta {dp.delta:g} "
                f"({len(ledger)} rounds trained)",
            )
    try:
        received = [np.array(a) for a in arrayrecord_views(layout.instruction_arrays(message)).values()]
    except Exception as exc:  # noqa: BLE001
        return refuse(message, context, f"{UNPRIVATISABLE}: unreadable global model: {exc}")
    reply = call_next(message, context)
    if reply.has_error():
        return reply
    try:
        if layout.legacy and int(cast(int, reply.content.config_records[
                "fitres.status"]["code"])):
            return reply  # a legacy failure status: no update released
        epsilon = _privatise(reply, layout, received, dp, ledger, context)
    except Exception as exc:  # noqa: BLE001 - never release an unnoised update
        return refuse(message, context, f"{UNPRIVATISABLE}: {type(exc).__name__}: {exc}")
    logger.debug("node %d: round %d released with epsilon %.4g", context.node_id,
                 len(ledger), epsilon)
    return reply


def _privatise(
    reply: Message,
    layout: Layout,
    received: list[np.ndarray],
    dp: LocalDP,
    ledger: PrivacyLedger,
    context: Context,
) -> float:
    """Noise the reply's update in place, record the round; the epsilon now spent."""
    record = layout.reply_arrays(reply)
    if record is None:
        raise ValueError("the reply holds no single array record")
    trained = arrayrecord_views(record)
    if len(trained) != len(received) or any(
        t.shape != g.shape for t, g in zip(trained.values(), received, strict=True)
    ):
        raise ValueError("the reply's arrays do not match the received model's")
    floating = [np.issubdtype(g.dtype, np.floating) for g in received]
    update = [
        np.asarray(t, dtype=np.float64) - g
        for t, g, f in zip(trained.values(), received, floating, strict=True) if f
    ]
    noised, _ = clip_and_noise(update, dp.clip, dp.noise_multiplier, np.random.default_rng())
    released: dict[str, Any] = {}
    pending = iter(noised)
    for (name, _), g, f in zip(trained.items(), received, floating, strict=True):
        released[name] = (g + next(pending)).astype(g.dtype) if f else g.copy()
    names = list(record.keys())
    for name in names:
        del record[name]
    for name in names:
        record[name] = Array(np.ascontiguousarray(released[name]))
    ledger.noise_multipliers.append(dp.noise_multiplier)
    ledger.save(context.state)
    epsilon = ledger.epsilon(dp.delta)
    figures = {"epsilon-spent": epsilon, "dp-delta": dp.delta}
    content = reply.content
    if layout.legacy:
        content.config_records[f"{layout.result}.metrics"] = ConfigRecord(dict(figures))
    else:
        name, metrics = next(iter(content.metric_records.items()))
        kept = {k: metrics[k] for k in KEPT_METRICS if k in metrics}
        content.metric_records[name] = MetricRecord({**kept, **figures})
    return epsilon
