"""Canonical SHA-256 digest of named arrays (framework-free).

Specification, version 2. All integers are unsigned big-endian; ``u32`` is 4 bytes, ``u64``
8 bytes. The digest is SHA-256 over::

    DOMAIN_TAG                       b"flwr-robust/arrays-digest/v2\\x00"
    u64 count                        number of arrays
    for each array, in the order of the mapping (names unique):
        u32 len(name) || name        UTF-8
        u32 len(dtype) || dtype      ASCII little-endian numpy dtype string, e.g. "<f4", "|u1"
        u32 ndim || u64 dim * ndim   the shape
        u64 nbytes || payload        the raw bytes in C order

Two inputs have the same digest only if they hold the same names *in the same order*, with
the same dtypes (up to byte order), shapes and bytes. The order is bound because Flower's
legacy API turns a record into a list of layers by its order: a record whose entries were
reordered under unchanged names would otherwise verify and be trained on with its layers
swapped (version 1 sorted the names and had exactly that hole). A big-endian array hashes
like its little-endian equal (same values), and a non-contiguous array like its
C-contiguous copy. Object and structured dtypes are refused.

Speed: C-contiguous little-endian arrays (the normal case) are fed to ``hashlib`` as a zero-copy
byte view; only big-endian or non-contiguous arrays are converted (one copy each).
"""

import hashlib
import math
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from flwr_robust.security.errors import DigestError

DOMAIN_TAG = b"flwr-robust/arrays-digest/v2\x00"
DIGEST_SIZE = 32
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def check_dtype(dtype: np.dtype) -> np.dtype:
    """Return ``dtype`` if it can be digested, else raise :class:`DigestError`."""
    if dtype.hasobject:
        raise DigestError(f"arrays of dtype {dtype} (Python objects) cannot be digested")
    if dtype.fields is not None:
        raise DigestError(f"structured dtype {dtype} is not supported")
    return dtype


def canonical_array(array: np.ndarray) -> np.ndarray:
    """Return ``array`` as C-contiguous little-endian, copying only when it is not already."""
    dtype = check_dtype(array.dtype)
    big_endian = dtype.str[0] == ">"
    if big_endian or not array.flags.c_contiguous:
        return array.astype(dtype.newbyteorder("<") if big_endian else dtype, order="C")
    return array


class ArraysHasher:
    """Incremental digest: announce the count, add the arrays in order, then :meth:`digest`.

    Both the numpy path (:func:`digest_arrays`) and the Flower path
    (:func:`flwr_robust.security.flower.arrayrecord_digest`) build on it, so they agree.
    """

    def __init__(self, count: int) -> None:
        self._hash = hashlib.sha256(DOMAIN_TAG + _U64.pack(count))
        self._remaining = count
        self._names: set[str] = set()

    def add_raw(
        self, name: str, dtype: np.dtype, shape: tuple[int, ...], payload: memoryview | np.ndarray
    ) -> None:
        """Add one array given as little-endian C-order ``payload`` bytes (not copied)."""
        if self._remaining == 0:
            raise DigestError("more arrays added than announced")
        if not isinstance(name, str):
            raise DigestError(f"array names must be str, got {type(name).__name__}")
        if name in self._names:
            raise DigestError(f"array {name!r} added twice")
        dtype_str = check_dtype(dtype).str
        if dtype_str[0] == ">":
            raise DigestError(f"array {name!r}: payload must be little-endian, got {dtype_str}")
        view = memoryview(payload)  # type: ignore[arg-type]  # arrays export buffers
        expected = dtype.itemsize * math.prod(shape)
        if view.nbytes != expected:
            raise DigestError(
                f"array {name!r}: {view.nbytes} payload bytes, expected {expected} for "
                f"dtype {dtype_str} and shape {tuple(shape)}"
            )
        try:
            name_bytes = name.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DigestError(f"array name {name!r} is not valid Unicode: {exc}") from exc
        dtype_bytes = dtype_str.encode("ascii")
        header = b"".join(
            (
                _U32.pack(len(name_bytes)),
                name_bytes,
                _U32.pack(len(dtype_bytes)),
                dtype_bytes,
                _U32.pack(len(shape)),
                *(_U64.pack(dim) for dim in shape),
                _U64.pack(expected),
            )
        )
        self._hash.update(header)
        self._hash.update(view)
        self._remaining -= 1
        self._names.add(name)

    def add_array(self, name: str, array: np.ndarray) -> None:
        """Add one numpy array (zero-copy when C-contiguous and little-endian)."""
        if not isinstance(array, np.ndarray):
            raise DigestError(f"array {name!r} is a {type(array).__name__}, not a numpy array")
        array = canonical_array(array)
        self.add_raw(name, array.dtype, array.shape, array.reshape(-1).view(np.uint8))

    def digest(self) -> bytes:
        """Return the 32-byte digest; every announced array must have been added."""
        if self._remaining:
            raise DigestError(f"{self._remaining} announced array(s) were not added")
        return self._hash.digest()


def digest_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Digest a mapping of name -> array, in the mapping's order."""
    hasher = ArraysHasher(len(arrays))
    for name, array in arrays.items():
        hasher.add_array(name, array)
    return hasher.digest()


def digest_ndarrays(arrays: Sequence[np.ndarray]) -> bytes:
    """Digest a list of arrays named ``"0"``, ``"1"``, ... like ``ArrayRecord(list)`` does."""
    return digest_arrays({str(index): array for index, array in enumerate(arrays)})


_recent: list[tuple[Mapping[str, np.ndarray], bytes]] = []


def cached_digest(arrays: Mapping[str, np.ndarray]) -> bytes:
    """:func:`digest_arrays` of a model that several hooks digest in one round.

    A strategy hands its hooks the very same read-only mapping for the global model it sent
    (signing, verification, audit, checkpoints) and for the new one, so each is hashed once
    per round. Identity-based: pass only mappings nobody modifies. The two most recent
    models are remembered (and kept alive), no more.
    """
    for known, digest in _recent:
        if known is arrays:
            return digest
    digest = digest_arrays(arrays)
    _recent.insert(0, (arrays, digest))
    del _recent[2:]
    return digest
