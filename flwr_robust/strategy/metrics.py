"""Client metrics made consistent before any aggregation function sees them.

Flower's metric aggregation (``aggregate_metricrecords``, its legacy counterparts, a user's
own function, and the consistency check every Message-API strategy runs first) fails for a
round whose replies disagree: a key missing from one reply, a number in one and a list in
another, lists of different lengths, differently named records. One client could void
everybody's round that way, or make a user's function raise.

The round's *metric layout* is therefore decided by majority: a metric is aggregated when a
strict majority of the replies carry it in the same form (:func:`value_kind`), and a reply
*conforms* when it carries every metric of the layout in that form. Aggregation functions see
the conforming replies only, restricted to the layout's metrics (a reply's extra keys are
dropped, never the reply for having them), under the record names most replies use; the
signature fields (``frs-*``) never reach them. A minority can therefore neither impose its
layout nor drop a metric that the majority sends. Where a reply's metrics travel with its
model (:func:`~.wrappers.with_hooks` forwards whole replies to Flower's strategies), a
reply that does not conform is left out of the round (``inconsistent-reply``).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from ..security.signing import PREFIX

logger = logging.getLogger("flwr.robust")


def value_kind(value: Any) -> tuple[Any, ...]:
    """What must agree across replies for a metric to be aggregated: its type family and,
    for lists, the length and the element families."""
    if isinstance(value, list):
        return ("list", len(value), tuple(sorted({value_kind(item)[0] for item in value})))
    if isinstance(value, bool):
        return ("bool",)
    if isinstance(value, int | float):
        return ("number",)
    return (type(value).__name__,)


def metric_layout(maps: Sequence[Mapping[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """Key -> kind for every metric that a strict majority of ``maps`` hold in one kind
    (no ``frs-*`` key)."""
    votes: Counter[tuple[str, tuple[Any, ...]]] = Counter(
        (key, value_kind(value))
        for metrics in maps for key, value in metrics.items()
        if not str(key).startswith(PREFIX)
    )
    return {key: kind for (key, kind), count in votes.items() if 2 * count > len(maps)}


def conforming(
    maps: Sequence[Mapping[str, Any]],
) -> tuple[list[int], list[dict[str, Any]]]:
    """Positions of the maps that hold the whole :func:`metric_layout`, and those maps
    restricted to it (in their own key order)."""
    layout = metric_layout(maps)
    positions, restricted = [], []
    for position, metrics in enumerate(maps):
        if all(key in metrics and value_kind(metrics[key]) == kind
               for key, kind in layout.items()):
            positions.append(position)
            restricted.append({k: v for k, v in metrics.items() if k in layout})
    if len(positions) < len(maps) or any(len(m) > len(layout) for m in maps):
        logger.debug("metric layout %s: %d of %d replies conform", sorted(layout),
                     len(positions), len(maps))
    return positions, restricted


def _majority(names: Sequence[str]) -> str:
    counts = Counter(names)
    return min(counts, key=lambda name: (-counts[name], name))


def conforming_contents(contents: Sequence[RecordDict]) -> tuple[list[int], list[RecordDict]]:
    """Positions of the reply contents (one MetricRecord each, at most one ArrayRecord)
    whose metrics conform, and new RecordDicts of those: the majority's record names, the
    layout's metrics, the arrays and config records shared."""
    if not contents:
        return [], []
    metric_items = [next(iter(c.metric_records.items())) for c in contents]
    metric_name = _majority([name for name, _ in metric_items])
    positions, maps = conforming([dict(record) for _, record in metric_items])
    array_names = [next(iter(c.array_records)) for c in contents if c.array_records]
    array_name = _majority(array_names) if array_names else None
    out = []
    for position, metrics in zip(positions, maps, strict=True):
        content = contents[position]
        records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
        if array_name is not None and content.array_records:
            records[array_name] = next(iter(content.array_records.values()))
        records[metric_name] = MetricRecord(metrics)
        records.update(content.config_records)
        out.append(RecordDict(records))
    return positions, out


def conforming_messages(messages: Sequence[Message]) -> tuple[list[int], list[Message]]:
    """Positions of the conforming reply messages, and copies of them whose contents are
    :func:`conforming_contents`."""
    positions, contents = conforming_contents([m.content for m in messages])
    copies = []
    for position, content in zip(positions, contents, strict=True):
        duplicate = copy.copy(messages[position])
        duplicate.content = content
        copies.append(duplicate)
    return positions, copies


def conforming_results(results: Sequence[tuple[Any, Any]]) -> tuple[list[int], list[Any]]:
    """Positions of the legacy ``(proxy, FitRes | EvaluateRes)`` pairs whose metrics
    conform, and the pairs with copies of the results restricted to the layout."""
    positions, maps = conforming([res.metrics for _, res in results])
    out = []
    for position, metrics in zip(positions, maps, strict=True):
        proxy, res = results[position]
        duplicate = copy.copy(res)
        duplicate.metrics = metrics
        out.append((proxy, duplicate))
    return positions, out
