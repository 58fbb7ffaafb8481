"""Sanity checks on client replies before they reach an aggregation rule.

Each check returns ``None`` for a valid input or a rejection reason ``"<code>: <detail>"``;
the code (see :data:`REASON_CODES`) is stable and counted, the detail is for people. Checks
only read their inputs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

#: Stable rejection codes of reply validation (hooks add their own, e.g. signature checks).
REASON_CODES = (
    "error-reply",
    "malformed-reply",
    "malformed-array",
    "missing-arrays",
    "extra-arrays",
    "shape-mismatch",
    "dtype-mismatch",
    "non-finite",
    "out-of-range",
    "missing-num-examples",
    "invalid-num-examples",
    "absurd-num-examples",
    "invalid-metrics",
    "inconsistent-reply",
    "duplicate-reply",
    "unsampled-node",
    "hook-failed",
)

#: Round-level outcome when the rule raised or produced a non-finite model (the global
#: model is kept).
AGGREGATION_FAILED = "aggregation-failed"

#: Largest magnitude the aggregation core (float32) can represent.
FLOAT32_MAX = float(np.finfo(np.float32).max)

#: Default ceiling on a claimed example count; larger claims are rejected as absurd.
DEFAULT_MAX_NUM_EXAMPLES = 10_000_000


def reason(code: str, detail: str) -> str:
    """Format a rejection reason."""
    return f"{code}: {detail}"


def reason_code(text: str) -> str:
    """The code part of a rejection reason."""
    return text.split(":", 1)[0].strip()


def check_arrays(
    arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> str | None:
    """Same names, shapes and dtypes as the global model ``reference``, and all finite."""
    missing = [name for name in reference if name not in arrays]
    if missing:
        return reason("missing-arrays", f"no {', '.join(map(repr, missing[:5]))}")
    extra = [name for name in arrays if name not in reference]
    if extra:
        return reason("extra-arrays", f"unexpected {', '.join(map(repr, extra[:5]))}")
    for name, expected in reference.items():
        array = arrays[name]
        if array.shape != expected.shape:
            return reason(
                "shape-mismatch", f"{name!r} has shape {array.shape}, expected {expected.shape}"
            )
        if array.dtype != expected.dtype:
            return reason(
                "dtype-mismatch", f"{name!r} has dtype {array.dtype}, expected {expected.dtype}"
            )
    for name, array in arrays.items():
        problem = _value_problem(name, array)
        if problem is not None:
            return problem
    return None


def _value_problem(name: str, array: np.ndarray) -> str | None:
    """NaN/Inf in a float layer, or values the float32 aggregation core cannot hold."""
    if array.dtype.kind == "c":
        return reason("dtype-mismatch", f"{name!r} is complex; only real arrays aggregate")
    if array.dtype.kind != "f":
        return None
    # One float64 sum per layer: NaN/Inf propagate; only a float64 overflow of finite
    # values can give a false alarm, which the exact count below clears.
    if not np.isfinite(np.sum(array, dtype=np.float64)):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            return reason("non-finite", f"{name!r} has {bad} NaN/Inf values")
    if array.dtype.itemsize > 4 and array.size:
        largest = float(np.max(np.abs(array)))
        if largest > FLOAT32_MAX:
            return reason(
                "out-of-range", f"{name!r} holds {largest:.3g}, beyond float32's {FLOAT32_MAX:.3g}"
            )
    return None


def check_num_examples(value: Any, maximum: int = DEFAULT_MAX_NUM_EXAMPLES) -> str | None:
    """A claimed example count must be a positive integer no larger than ``maximum``.

    Any value is accepted as input (huge integers, numpy scalars, lists, strings, ...): the
    answer is ``None`` or a reason, never an exception.
    """
    if value is None:
        return reason("missing-num-examples", "reply has no example count")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return reason("invalid-num-examples", f"{value!r:.80} is not a number")
    try:
        exact = _exact_integer(value)
    except (ArithmeticError, ValueError, TypeError):
        exact = None
    if exact is None or exact <= 0:
        return reason("invalid-num-examples", f"{value!r:.80} is not a positive integer")
    if exact > maximum:
        shown = str(exact) if exact < 10**12 else f"a {len(str(exact))}-digit number"
        return reason("absurd-num-examples", f"{shown} exceeds the limit {maximum}")
    return None


def _exact_integer(value: numbers.Real) -> int | None:
    """``value`` as an exact Python int, ``None`` if it is not integral (or not finite)."""
    if isinstance(value, numbers.Integral):
        return int(value)
    as_float = float(value)
    if not math.isfinite(as_float) or not as_float.is_integer():
        return None
    return int(as_float)


def check_metrics(metrics: Any) -> str | None:
    """A reply's metrics: a mapping of string keys to scalars or lists of scalars, every
    number finite (NaN/Inf in an evaluation metric would poison its average)."""
    if not isinstance(metrics, Mapping):
        return reason("invalid-metrics", f"metrics are a {type(metrics).__name__}, not a mapping")
    for key, value in metrics.items():
        if not isinstance(key, str):
            return reason("invalid-metrics", f"metric key {key!r:.40} is not a string")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                return reason("non-finite", f"metric {key!r:.40} is {item!r}")
            if not isinstance(item, bool | int | float | str | bytes):
                return reason(
                    "invalid-metrics", f"metric {key!r:.40} holds a {type(item).__name__}"
                )
    return None
