"""Zero-copy, validating views of Flower's serialized arrays."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from flwr_robust.records import MalformedArray, arrayrecord_views, npy_view, tensor_views


def npy_bytes(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(5, dtype=np.int64),
        np.array(3.5, dtype=np.float64),
        np.zeros((0, 3), dtype=np.float32),
        np.arange(6, dtype=">f4").reshape(2, 3),
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        np.array([True, False]),
    ],
)
def test_view_round_trips(array: np.ndarray) -> None:
    view = npy_view(npy_bytes(array))
    np.testing.assert_array_equal(view, array)
    assert view.dtype == array.dtype and view.shape == array.shape
    assert not view.flags.writeable


def test_view_shares_the_payload_bytes() -> None:
    data = npy_bytes(np.arange(1000, dtype=np.float32))
    view = npy_view(data)
    assert np.shares_memory(view, np.frombuffer(data, dtype=np.uint8))


def test_version_2_header() -> None:
    array = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(npy_view(npy_bytes(array, (2, 0))), array)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"junk", "not in .npy format"),
        (b"\x93NUMPY\x09\x00" + b"\x00" * 8, "unsupported .npy version"),
        (b"\x93NUMPY\x01\x00\xff\x00{", "truncated"),
        (b"\x93NUMPY\x01\x00\x04\x00junk", "invalid .npy header"),
        (npy_bytes(np.arange(4, dtype=np.float32))[:-1], "payload bytes"),
        (npy_bytes(np.array(["a"], dtype=object).astype("U1")), "only plain numeric"),
        (npy_bytes(np.array([1], dtype="M8[s]")), "only plain numeric"),
    ],
)
def test_malformed_bytes_raise(data: bytes, message: str) -> None:
    with pytest.raises(MalformedArray, match=message):
        npy_view(data)


def test_object_arrays_are_refused() -> None:
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }".ljust(117) + "\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 8
    with pytest.raises(MalformedArray, match="only plain numeric"):
        npy_view(data)


def test_arrayrecord_views_check_declared_metadata() -> None:
    record = ArrayRecord({"a": Array(np.arange(4, dtype=np.float32))})
    assert list(arrayrecord_views(record)) == ["a"]
    record["a"].shape = (2, 2)
    with pytest.raises(MalformedArray, match="metadata"):
        arrayrecord_views(record)
    record["a"].stype = "torch.Tensor"
    with pytest.raises(MalformedArray, match="serialization type"):
        arrayrecord_views(record)


def test_legacy_compat_arrays_without_metadata() -> None:
    tensors = [npy_bytes(np.ones(3, np.float32)), npy_bytes(np.zeros((2, 2), np.float32))]
    record = ArrayRecord(
        {str(i): Array(data=t, dtype="", stype="numpy.ndarray", shape=()) for i, t in
         enumerate(tensors)}
    )
    views = arrayrecord_views(record)
    assert list(views) == ["0", "1"] == list(tensor_views(tensors))
    assert views["1"].shape == (2, 2)
