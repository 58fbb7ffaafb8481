"""Local DP as a Flower client mod: clip and noise the update before it is signed.

Place :func:`local_dp_mod` *after* :func:`~flwr_robust.security.mod.integrity_mod` in
``ClientApp(mods=[...])``. Flower wraps the app in the mods outermost-first, so a mod listed
later sees the instruction after the integrity mod verified it and the reply before the
integrity mod signs it: the signature then covers the noised update and the privacy metrics
(``epsilon-spent``, ``dp-delta``), which the server's
:class:`~flwr_robust.privacy.hooks.PrivacyPolicyHook` can trust.

Settings: :meth:`~.local.NodeDP.resolve` (a node config that sets any ``dp-*`` key owns
every DP setting; otherwise the run config's; never the instruction or its experiment
cell). With local DP on, on a training instruction the mod

1. refuses an instruction whose records fit no known layout, before any training;
2. declines (an error reply ``privacy-budget-exhausted: ...`` with the node id, before any
   training) when one more round would take the node's epsilon above ``dp-max-epsilon``;
3. lets the app train, then checks the reply holds exactly the expected records (Message
   API: one ArrayRecord, one MetricRecord, no ConfigRecord) and replaces its floating arrays
   by ``global + clip(update) + noise`` (see :mod:`.local`; layers paired by name;
   non-floating arrays are reset to the received ones, as they cannot carry noise);
4. records the round in the node's ledger (``context.state``, or ``dp-ledger-file`` across
   runs) *before* the reply is released and puts ``epsilon-spent`` and ``dp-delta`` in the
   reply's metrics, withholding every other metric but the example count.

A legacy reply with a failure status is stripped to its status. Evaluation instructions are
refused (``privacy-evaluation-refused``) while DP is on, unless node config
``dp-allow-evaluation`` is true: their metrics come from the node's validation split, which
the guarantee does not cover. With node config ``dp-required`` true, training is refused
(``privacy-required``) whenever DP resolves to off.

Fail closed: anything the mod cannot privatise becomes an error reply with a fixed reason
(``privacy-unprivatisable: ...``, ``privacy-bad-settings: ...``); no exception escapes it and
no unnoised update gets out. The mod runs on every node of the bundled app, Byzantine ones
included; a real attacker controls its node and may skip it (and lie about its epsilon).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from ..records import arrayrecord_views
from ..security.mod import CallNext, Layout, Refused, layout_of, refuse
from .local import BudgetExhausted, LedgerStore, LocalDP, NodeDP, clip_and_noise

logger = logging.getLogger("flwr.robust")

#: Error-reply reason code of a node whose budget is spent.
BUDGET_EXHAUSTED = "privacy-budget-exhausted"
UNPRIVATISABLE = "privacy-unprivatisable"
BAD_SETTINGS = "privacy-bad-settings"
DP_REQUIRED = "privacy-required"
EVALUATION_REFUSED = "privacy-evaluation-refused"
#: The metrics a privatised reply keeps besides the privacy figures.
KEPT_METRICS = ("num-examples",)


class _Unprivatisable(Exception):
    """A fixed, data-independent reason the reply cannot be released."""


def node_identity(context: Context) -> str:
    """The key of the node's entry in a ledger file: its partition id, else its node id."""
    partition = context.node_config.get("partition-id")
    if partition not in (None, ""):
        return f"partition-{int(cast(int, partition))}"
    return f"node-{int(context.node_id)}"


def local_dp_mod(message: Message, context: Context, call_next: CallNext) -> Message:
    """Privatise training replies (see the module docstring); anything else passes."""
    kind = str(message.metadata.message_type).split(".")[0]
    if kind not in (MessageType.TRAIN, MessageType.EVALUATE):
        return call_next(message, context)
    try:
        settings = NodeDP.resolve(context.node_config, context.run_config)
    except Exception as exc:  # noqa: BLE001 - bad settings must not let an update out
        return refuse(message, context, f"{BAD_SETTINGS}: {exc}")
    if settings.dp is None:
        if settings.required and kind == MessageType.TRAIN:
            return refuse(message, context, f"{DP_REQUIRED}: node config 'dp-required' is set "
                          "but local DP is off ('dp-clip' / 'dp-noise-multiplier' unset)")
        return call_next(message, context)
    if kind == MessageType.EVALUATE:
        if settings.allow_evaluation:
            return call_next(message, context)
        return refuse(message, context, f"{EVALUATION_REFUSED}: local DP is on and evaluation "
                      "metrics are not privatised (node config 'dp-allow-evaluation')")
    try:
        return _train(message, context, call_next, settings.dp, settings.ledger_file)
    except _Unprivatisable as exc:
        return refuse(message, context, f"{UNPRIVATISABLE}: {exc}")
    except Exception:  # never release an unnoised update
        logger.exception("node %d: local DP failed", context.node_id)
        return refuse(message, context, f"{UNPRIVATISABLE}: internal error")


def _train(
    message: Message, context: Context, call_next: CallNext, dp: LocalDP, ledger_file: str | None
) -> Message:
    try:
        layout = layout_of(message)
    except Refused as exc:
        raise _Unprivatisable("the instruction's records fit no known layout") from exc
    if layout is None or layout.kind != MessageType.TRAIN:
        raise _Unprivatisable("not a training instruction")
    store = LedgerStore(context.state, ledger_file, node_identity(context))
    try:
        ledger = store.load()
    except Exception as exc:
        raise _Unprivatisable("the privacy ledger is unreadable") from exc
    try:
        store.upcoming(dp, ledger)
    except BudgetExhausted as spent:
        logger.warning("node %d: privacy budget spent (%d rounds)", context.node_id,
                       spent.rounds)
        return refuse(
            message, context,
            f"{BUDGET_EXHAUSTED}: one more round would spend epsilon {spent.upcoming:.4g} > "
            f"dp-max-epsilon {dp.max_epsilon:g} at delta {dp.delta:g} "
            f"({spent.rounds} rounds trained)",
        )
    except Exception as exc:
        raise _Unprivatisable("the privacy accounting failed") from exc
    try:
        received = {name: np.array(a) for name, a in
                    arrayrecord_views(layout.instruction_arrays(message)).items()}
    except Exception as exc:
        raise _Unprivatisable("unreadable global model") from exc
    reply = call_next(message, context)
    if reply.has_error():
        return reply
    if layout.legacy:
        status = reply.content.config_records.get("fitres.status")
        if status is None:
            raise _Unprivatisable("the reply holds no status")
        if int(cast(int, status.get("code", -1))):
            return _status_only(message, status)
    _check_records(reply, layout)
    released = _noised(reply, layout, received, dp)
    try:
        epsilon = store.commit(dp)
    except BudgetExhausted as exc:
        raise _Unprivatisable("the privacy budget was spent meanwhile") from exc
    except Exception as exc:
        raise _Unprivatisable("the privacy ledger could not be saved") from exc
    _rewrite(reply, layout, released, {"epsilon-spent": epsilon, "dp-delta": dp.delta})
    logger.debug("node %d: update released with epsilon %.4g", context.node_id, epsilon)
    return reply


def _status_only(message: Message, status: ConfigRecord) -> Message:
    """A legacy failure reply stripped to its status (no arrays, count or metrics)."""
    content = RecordDict({
        "fitres.parameters": ArrayRecord(),
        "fitres.num_examples": MetricRecord({"num_examples": 0}),
        "fitres.metrics": ConfigRecord(),
        "fitres.status": ConfigRecord(dict(status)),
    })
    return Message(content, reply_to=message)


def _check_records(reply: Message, layout: Layout) -> None:
    """Exactly the records a privatised reply may hold."""
    content = reply.content
    names = (set(content.array_records), set(content.metric_records),
             set(content.config_records))
    if layout.legacy:
        ok = names == ({"fitres.parameters"}, {"fitres.num_examples"},
                       {"fitres.metrics", "fitres.status"})
    else:
        ok = len(names[0]) == 1 and len(names[1]) == 1 and not names[2]
    if not ok:
        raise _Unprivatisable("the reply does not hold exactly one ArrayRecord and one "
                              "MetricRecord (and no ConfigRecord)")


def _noised(
    reply: Message, layout: Layout, received: dict[str, np.ndarray], dp: LocalDP
) -> dict[str, Array]:
    """The released arrays by name (received order): ``global + clip(update) + noise``."""
    record = layout.reply_arrays(reply)
    if record is None:
        raise _Unprivatisable("the reply holds no single array record")
    try:
        trained = arrayrecord_views(record)
    except Exception as exc:
        raise _Unprivatisable("unreadable reply arrays") from exc
    if set(trained) != set(received) or any(
        trained[name].shape != g.shape for name, g in received.items()
    ):
        raise _Unprivatisable("the reply's arrays do not match the received model's")
    floating = [name for name, g in received.items() if np.issubdtype(g.dtype, np.floating)]
    update = [np.asarray(trained[name], dtype=np.float64) - received[name] for name in floating]
    if not all(np.all(np.isfinite(u)) for u in update):
        raise _Unprivatisable("the update is not finite")
    noised, _ = clip_and_noise(update, dp.clip, dp.noise_multiplier, np.random.default_rng())
    released = dict(received)
    with np.errstate(over="ignore"):
        for name, noise in zip(floating, noised, strict=True):
            released[name] = np.asarray(received[name] + noise).astype(received[name].dtype)
    if not all(np.all(np.isfinite(released[name])) for name in floating):
        raise _Unprivatisable("the noised model overflows its dtype")
    # np.array keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
    return {name: Array(np.array(a, order="C")) for name, a in released.items()}


def _rewrite(
    reply: Message, layout: Layout, released: dict[str, Array], figures: dict[str, Any]
) -> None:
    """Put the released arrays and the privacy figures (only) into the reply."""
    record = layout.reply_arrays(reply)
    if record is None:
        raise _Unprivatisable("the reply holds no single array record")
    for name in list(record.keys()):
        del record[name]
    for name, array in released.items():
        record[name] = array
    content = reply.content
    if layout.legacy:
        content.config_records[f"{layout.result}.metrics"] = ConfigRecord(dict(figures))
    else:
        name, metrics = next(iter(content.metric_records.items()))
        kept = {k: metrics[k] for k in KEPT_METRICS if k in metrics}
        content.metric_records[name] = MetricRecord({**kept, **figures})
