"""Canonical array digest: known answer, invariances, sensitivity, Flower ArrayRecord path."""

import hashlib
import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from flwr_robust.security.digest import (
    ArraysHasher,
    canonical_array,
    digest_arrays,
    digest_ndarrays,
)
from flwr_robust.security.errors import DigestError
from flwr_robust.security.flower import arrayrecord_digest


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def _u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def test_core_does_not_import_flower():
    """Only flwr_robust.security.flower may import flwr."""
    code = "import sys, flwr_robust.security, flwr_robust.cli; assert 'flwr' not in sys.modules"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)


def test_known_answer():
    """Bytes laid out by hand from the specification in digest.py."""
    arrays = {
        "w": np.array([1.0, 2.0], dtype="<f4"),
        "b": np.array([[7]], dtype=np.uint8),
    }
    message = (
        b"flwr-robust/arrays-digest/v2\x00"
        + _u64(2)
        # in the mapping's order: name, dtype, ndim + dims, byte length, payload
        + _u32(1) + b"w" + _u32(3) + b"<f4" + _u32(1) + _u64(2) + _u64(8)
        + b"\x00\x00\x80\x3f" + b"\x00\x00\x00\x40"
        + _u32(1) + b"b" + _u32(3) + b"|u1" + _u32(2) + _u64(1) + _u64(1) + _u64(1) + b"\x07"
    )  # fmt: skip
    expected = hashlib.sha256(message).digest()
    assert digest_arrays(arrays) == expected
    assert expected.hex() == "ba878808f84e93d585fc7635efadb84cf387b43b1ae520482061a7436330cdfc"


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "fc.weight": rng.standard_normal((10, 4)).astype(np.float32),
        "steps": np.array(17, dtype=np.int64),
    }


def test_digest_is_deterministic_and_binds_the_order():
    """Finding 5 of the hardening issue: the order carries meaning (legacy layer lists)."""
    model = _model()
    reversed_model = dict(reversed(list(model.items())))
    assert list(reversed_model) != list(model)
    assert digest_arrays(model) == digest_arrays(_model())
    assert digest_arrays(model) != digest_arrays(reversed_model)
    assert len(digest_arrays(model)) == 32


def _flip_bit(array: np.ndarray, byte: int, bit: int) -> np.ndarray:
    out = array.copy()
    out.reshape(-1).view(np.uint8)[byte] ^= 1 << bit
    return out


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda m: m.update({"fc.weight": _flip_bit(m["fc.weight"], 37, 0)}), id="bit"),
        pytest.param(
            lambda m: m.update({"fc.weight": _flip_bit(m["fc.weight"], 159, 7)}), id="last-bit"
        ),
        pytest.param(lambda m: m.update({"fc.weight": m["fc.weight"].view(np.int32)}), id="dtype"),
        pytest.param(lambda m: m.update({"fc.weight": m["fc.weight"].reshape(4, 10)}), id="shape"),
        pytest.param(lambda m: m.update({"fc.weight": m["fc.weight"].reshape(40)}), id="ndim"),
        pytest.param(lambda m: m.update({"fc.weightx": m.pop("fc.weight")}), id="name"),
        pytest.param(lambda m: m.update({"extra": np.zeros(0, np.float32)}), id="extra-array"),
        pytest.param(lambda m: m.pop("steps"), id="missing-array"),
        pytest.param(
            lambda m: m.update({"conv.bias": m["fc.weight"], "fc.weight": m["conv.bias"]}),
            id="swapped-layers",
        ),
    ],
)
def test_digest_detects_changes(change):
    model = _model()
    changed = _model()
    change(changed)
    assert digest_arrays(changed) != digest_arrays(model)


def test_same_bytes_different_layout_differ():
    """Same concatenated bytes split differently between names must not collide."""
    data = np.arange(6, dtype=np.float32)
    assert digest_arrays({"a": data[:2], "b": data[2:]}) != digest_arrays(
        {"a": data[:3], "b": data[3:]}
    )
    assert digest_arrays({"ab": data}) != digest_arrays({"a": data[:0], "b": data})


def test_byte_order_and_layout_are_canonical():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert digest_arrays({"x": a}) == digest_arrays({"x": a.astype(">f4")})
    assert digest_arrays({"x": a.T}) == digest_arrays({"x": np.ascontiguousarray(a.T)})
    assert digest_arrays({"x": a[:, ::2]}) == digest_arrays({"x": a[:, ::2].copy()})
    assert digest_arrays({"x": np.asfortranarray(a)}) == digest_arrays({"x": a})


def test_contiguous_little_endian_arrays_are_not_copied():
    a = np.ones((5, 5), dtype=np.float32)
    assert canonical_array(a) is a
    assert canonical_array(a.astype(">f4")).dtype.str == "<f4"


def test_digest_ndarrays_names_layers_like_arrayrecord():
    layers = list(_model().values())
    named = {str(i): layer for i, layer in enumerate(layers)}
    assert digest_ndarrays(layers) == digest_arrays(named)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.array([object()])}, "object"),
        ({"x": np.zeros(2, dtype=[("a", "<f4")])}, "structured"),
        ({1: np.zeros(2)}, "must be str"),
        ({"x": [1.0, 2.0]}, "not a numpy array"),
        ({"\ud800": np.zeros(1)}, "not valid Unicode"),
    ],
)
def test_undigestable_input(arrays, message):
    with pytest.raises(DigestError, match=message):
        digest_arrays(arrays)


def test_hasher_enforces_its_contract():
    hasher = ArraysHasher(2)
    hasher.add_array("b", np.zeros(1))
    with pytest.raises(DigestError, match="added twice"):
        hasher.add_array("b", np.zeros(1))
    with pytest.raises(DigestError, match="not added"):
        hasher.digest()
    with pytest.raises(DigestError, match="payload bytes"):
        hasher.add_raw("c", np.dtype("<f4"), (3,), memoryview(b"\x00" * 8))
    with pytest.raises(DigestError, match="little-endian"):
        hasher.add_raw("c", np.dtype(">f4"), (2,), memoryview(b"\x00" * 8))
    hasher.add_array("c", np.zeros(1))
    with pytest.raises(DigestError, match="more arrays"):
        hasher.add_array("d", np.zeros(1))


# --- Flower ArrayRecord path -------------------------------------------------------------


def _mixed_layers() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        rng.standard_normal((3, 4)).astype(np.float32),
        np.arange(5, dtype=">i8"),  # big-endian
        np.asfortranarray(rng.standard_normal((4, 3))),  # stored with fortran_order=True
        np.array(2.5),  # 0-d
        np.zeros((0, 3), dtype=np.float32),  # empty
        np.array([True, False, True]),
        rng.integers(0, 255, size=(2, 2, 2), dtype=np.uint8),
        rng.standard_normal(7).astype(np.float16),
    ]


def test_arrayrecord_digest_equals_numpy_digest():
    layers = _mixed_layers()
    assert arrayrecord_digest(ArrayRecord(layers)) == digest_ndarrays(layers)


def test_named_arrayrecord_and_insertion_order():
    model = _model()
    record = ArrayRecord({name: Array(a) for name, a in model.items()})
    reordered = ArrayRecord({name: Array(a) for name, a in reversed(list(model.items()))})
    assert arrayrecord_digest(record) == digest_arrays(model)
    assert arrayrecord_digest(reordered) != arrayrecord_digest(record)
    assert arrayrecord_digest(ArrayRecord()) == digest_arrays({})


def test_arrayrecord_npy_version_2_header():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, a, version=(2, 0))
    array = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=buffer.getvalue())
    assert arrayrecord_digest(ArrayRecord({"a": array})) == digest_arrays({"a": a})


def _npy(header: str, payload: bytes) -> bytes:
    text = header.encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + payload


def test_arrayrecord_nonstandard_header_is_parsed_by_numpy():
    """A header np.save would not write (other key order) still digests like np.load reads."""
    payload = np.arange(3, dtype="<f4").tobytes()
    data = _npy("{'shape': (3,), 'fortran_order': False, 'descr': '<f4'}\n", payload)
    array = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=data)
    assert np.array_equal(array.numpy(), np.arange(3, dtype="<f4"))
    assert arrayrecord_digest(ArrayRecord({"a": array})) == digest_arrays(
        {"a": np.arange(3, dtype="<f4")}
    )


def test_arrayrecord_oversized_header_is_refused_like_np_load():
    payload = np.arange(3, dtype="<f4").tobytes()
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }" + " " * 10_000 + "\n"
    array = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=_npy(header, payload))
    with pytest.raises(ValueError):
        array.numpy()
    with pytest.raises(DigestError, match="invalid .npy header"):
        arrayrecord_digest(ArrayRecord({"a": array}))


def test_arrayrecord_flipped_payload_bit_changes_digest():
    record = ArrayRecord(list(_model().values()))
    before = arrayrecord_digest(record)
    data = bytearray(record["2"].data)
    data[-1] ^= 0x01
    record["2"].data = bytes(data)
    assert arrayrecord_digest(record) != before
    assert arrayrecord_digest(record) == digest_ndarrays(record.to_numpy_ndarrays())


def _record_with(**changes: object) -> ArrayRecord:
    array = Array(np.arange(4, dtype=np.float32))
    for field, value in changes.items():
        setattr(array, field, value)
    return ArrayRecord({"a": array})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"stype": "torch.Tensor"}, "serialization type"),
        ({"shape": (2, 2)}, "metadata"),
        ({"dtype": "int32"}, "metadata"),
        ({"dtype": "no-such-dtype"}, "invalid metadata"),
        ({"data": b"not npy data"}, ".npy format"),
        ({"data": Array(np.arange(4, dtype=np.float32)).data[:-1]}, "payload bytes"),
        ({"data": Array(np.arange(4, dtype=np.float32)).data + b"\x00"}, "payload bytes"),
        ({"data": b"\x93NUMPY\x09\x00" + b"\x00" * 8}, "version"),
        ({"data": b"\x93NUMPY\x01\x00\xff\x00{"}, "truncated"),
        ({"data": b"\x93NUMPY\x01\x00\x04\x00junk"}, "invalid .npy header"),
    ],
)
def test_arrayrecord_malformed_arrays(changes, message):
    with pytest.raises(DigestError, match=message):
        arrayrecord_digest(_record_with(**changes))


def test_arrayrecord_fortran_payload_length_is_checked():
    array = Array(np.asfortranarray(np.ones((2, 3))))
    array.data = array.data + b"\x00"
    with pytest.raises(DigestError, match="payload bytes"):
        arrayrecord_digest(ArrayRecord({"a": array}))
