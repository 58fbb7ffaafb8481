"""Zero-copy, validating views of Flower's serialized arrays.

Flower ships every array as ``.npy`` bytes (``np.save`` output): in ``Array.data`` for the
Message API and in ``Parameters.tensors`` for the legacy API (where the compat layer leaves
``Array.dtype`` empty and ``Array.shape`` as ``()``). :func:`npy_view` parses the header and
returns a read-only ndarray over the payload bytes, so validating and aggregating n replies
never copies them, and nothing downstream can modify a reply. Malformed bytes raise
:class:`MalformedArray` with a reason instead of crashing the round.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

_MAGIC = b"\x93NUMPY"
_NUMPY_STYPE = "numpy.ndarray"
_MAX_HEADER = 10_000  # numpy's own limit in np.load
#: Most dimensions an array may declare (numpy's own limit is 64).
MAX_DIMENSIONS = 32
_MAX_EXTENT = 2**63 - 1  # numpy refuses shapes whose non-zero extent exceeds its intp
_NUMERIC_KINDS = "biufc"
_HEADER_KEYS = frozenset({"descr", "fortran_order", "shape"})  # bool, signed and unsigned integers, floats, complex
_STANDARD_HEADER = re.compile(
    rb"\{'descr': '([<>|=][a-zA-Z][0-9]*)', 'fortran_order': (True|False), "
    rb"'shape': \(([0-9, ]*)\), \} *\n"
)


class MalformedArray(ValueError):
    """Serialized array bytes that are not a valid, plain ``.npy`` array."""


def npy_view(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Read-only ndarray over the payload of ``.npy`` bytes (no copy for C-order arrays).

    Exactly what ``np.load`` accepts is accepted (version x.0, a header of exactly the keys
    ``descr``, ``fortran_order`` and ``shape``, the shape a tuple), so everything downstream,
    Flower's own ``Array.numpy()`` included, reads what was validated. Every quantity the
    header declares is checked against the bytes actually present before anything is
    allocated or reshaped: at most :data:`MAX_DIMENSIONS` dimensions, each no
    larger than the payload, and an element count (exact Python integers, no wrap-around)
    whose size equals the payload's length.

    Raises
    ------
    MalformedArray
        Bad magic or version, unparsable header, a dtype that is not a plain number type,
        too many or negative dimensions, or a payload whose length does not match the
        header's shape and dtype. Nothing else escapes for any input bytes.
    """
    try:
        buffer = memoryview(data).cast("B")
    except (TypeError, ValueError) as exc:
        raise MalformedArray(f"data is not a byte buffer: {exc}") from exc
    if len(buffer) < 10 or bytes(buffer[:6]) != _MAGIC:
        raise MalformedArray("data is not in .npy format (bad magic)")
    major, minor = buffer[6], buffer[7]
    if minor != 0:  # np.load (which Flower's Array.numpy() calls) accepts only x.0
        raise MalformedArray(f"unsupported .npy version {major}.{minor}")
    if major == 1:
        header_length = int.from_bytes(buffer[8:10], "little")
        start = 10
    elif major in (2, 3):
        if len(buffer) < 12:
            raise MalformedArray("truncated .npy header")
        header_length = int.from_bytes(buffer[8:12], "little")
        start = 12
    else:
        raise MalformedArray(f"unsupported .npy version {major}")
    end = start + header_length
    if header_length > _MAX_HEADER:
        raise MalformedArray(
            f"invalid .npy header: {header_length} bytes exceed the limit {_MAX_HEADER}"
        )
    if end > len(buffer):
        raise MalformedArray("truncated .npy header")
    dtype, shape, fortran = _parse_header(bytes(buffer[start:end]), major)
    payload = len(buffer) - end
    count = math.prod(shape)  # exact: Python integers never wrap around
    if count * dtype.itemsize != payload:
        raise MalformedArray(
            f"{payload} payload bytes, the header says {count * dtype.itemsize}"
        )
    flat = np.frombuffer(buffer, dtype=dtype, count=count, offset=end)
    view = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
    view.flags.writeable = False
    return view


def _parse_header(text: bytes, major: int) -> tuple[np.dtype, tuple[int, ...], bool]:
    """``(dtype, shape, fortran_order)`` of a ``.npy`` header, each checked."""
    standard = _STANDARD_HEADER.fullmatch(text)
    try:
        if standard is not None:  # what np.save writes: skip the slow literal parser
            descr, fortran_text, shape_text = (g.decode("latin1") for g in standard.groups())
            shape_items: Any = [int(v) for v in shape_text.split(",") if v.strip()]
            fortran: Any = fortran_text == "True"
        else:
            header = ast.literal_eval(text.decode("latin1" if major < 3 else "utf8"))
            if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
                raise MalformedArray(
                    "invalid .npy header: not a dictionary of exactly "
                    f"{', '.join(sorted(_HEADER_KEYS))}"
                )
            descr, shape_items, fortran = (
                header["descr"], header["shape"], header["fortran_order"]
            )
            if not isinstance(shape_items, tuple):
                raise MalformedArray(
                    f"invalid .npy header: shape {shape_items!r:.80} is not a tuple"
                )
        dtype = np.dtype(descr)
    except MalformedArray:
        raise
    except Exception as exc:  # literal_eval and np.dtype raise many types on hostile text
        raise MalformedArray(f"invalid .npy header: {type(exc).__name__}: {exc}") from exc
    if not isinstance(fortran, bool):
        raise MalformedArray(f"invalid .npy header: fortran_order {fortran!r} is not a bool")
    if not isinstance(shape_items, tuple | list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in shape_items
    ):
        raise MalformedArray(f"invalid .npy header: shape {shape_items!r:.80} is not integers")
    shape = tuple(shape_items)
    if len(shape) > MAX_DIMENSIONS:
        raise MalformedArray(f"{len(shape)} dimensions exceed the limit {MAX_DIMENSIONS}")
    if any(v < 0 for v in shape):
        raise MalformedArray(f"negative dimension in shape {shape}")
    extent = math.prod(v for v in shape if v) * dtype.itemsize  # numpy's own size limit,
    if extent > _MAX_EXTENT:  # which also binds zero-size arrays
        raise MalformedArray(f"shape {shape} is larger than any array can be")
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise MalformedArray(f"unsupported dtype {dtype} (only plain numeric arrays)")
    return dtype, shape, fortran


def arrayrecord_views(record: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Named read-only views of every array in a Flower ``ArrayRecord``, in record order.

    Raises
    ------
    MalformedArray
        For an array that is not numpy-serialized or whose bytes are malformed, or whose
        declared dtype/shape (when present) disagrees with its bytes. Nothing else escapes.
    """
    views = {}
    try:
        items = list(record.items())
    except Exception as exc:  # a hostile mapping
        raise MalformedArray(f"unreadable array record: {type(exc).__name__}: {exc}") from exc
    for name, array in items:
        if not isinstance(name, str):
            raise MalformedArray(f"array name {name!r:.80} is not a string")
        views[name] = _array_view(name, array)
    return views


def _array_view(name: str, array: object) -> np.ndarray:
    """The checked view of one Flower ``Array``."""
    stype = getattr(array, "stype", None)
    if stype != _NUMPY_STYPE:
        raise MalformedArray(f"array {name!r} has serialization type {stype!r:.80}")
    try:
        view = npy_view(array.data)  # type: ignore[attr-defined]
    except MalformedArray as exc:
        raise MalformedArray(f"array {name!r}: {exc}") from exc
    except Exception as exc:  # no or odd .data
        raise MalformedArray(f"array {name!r}: unreadable data: {exc}") from exc
    declared_dtype = getattr(array, "dtype", "")
    if declared_dtype:  # the legacy compat layer leaves dtype and shape empty
        try:
            dtype = np.dtype(declared_dtype)
            shape = tuple(int(v) for v in getattr(array, "shape", ()))
        except Exception as exc:
            raise MalformedArray(
                f"array {name!r}: invalid metadata (dtype {declared_dtype!r:.40}): {exc}"
            ) from exc
        if dtype != view.dtype or shape != view.shape:
            raise MalformedArray(
                f"array {name!r}: metadata (dtype {declared_dtype}, shape {shape}) does "
                f"not match its data (dtype {view.dtype.str}, shape {view.shape})"
            )
    return view


def tensor_views(tensors: list[bytes]) -> dict[str, np.ndarray]:
    """Views of legacy ``Parameters.tensors``, named ``"0"``, ``"1"``, ... like Flower's
    compat layer names them on the wire (raises only :class:`MalformedArray`)."""
    try:
        items = list(enumerate(tensors))
    except Exception as exc:
        raise MalformedArray(f"unreadable tensor list: {type(exc).__name__}: {exc}") from exc
    views = {}
    for index, tensor in items:
        try:
            views[str(index)] = npy_view(tensor)
        except MalformedArray as exc:
            raise MalformedArray(f"tensor {index}: {exc}") from exc
    return views
