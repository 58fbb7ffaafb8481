"""Tests for flwr_robust.task.data: loaders, the IDX reader and the partitioners."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from flwr_robust.task import data as data_module
from flwr_robust.task.data import (
    FASHION_MNIST_DIR,
    Dataset,
    load_dataset,
    load_partition,
    partition_indices,
    read_idx,
)

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> Path:
    """Write ``array`` as an IDX file (big-endian), gzip-compressed when asked."""
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[array.dtype.type], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_fashion_files(
    folder: Path, n_train: int = 30, n_test: int = 12, *, side: int = 28
) -> tuple[np.ndarray, np.ndarray]:
    """Write tiny Fashion-MNIST-style files: gzip train split, raw test split."""
    rng = np.random.default_rng(7)
    train_images = rng.integers(0, 256, (n_train, side, side), dtype=np.uint8)
    train_labels = (np.arange(n_train) % 10).astype(np.uint8)
    test_images = rng.integers(0, 256, (n_test, side, side), dtype=np.uint8)
    test_labels = (np.arange(n_test)[::-1] % 10).astype(np.uint8)
    write_idx(folder / "train-images-idx3-ubyte.gz", train_images, compress=True)
    write_idx(folder / "train-labels-idx1-ubyte.gz", train_labels, compress=True)
    write_idx(folder / "t10k-images-idx3-ubyte", test_images, compress=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", test_labels, compress=False)
    return train_images, test_labels


def label_skew(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each partition's label mix and the global one."""
    overall = np.bincount(labels, minlength=num_classes) / len(labels)
    distances = [
        0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - overall).sum()
        for p in parts
    ]
    return float(np.mean(distances))


# ------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------


def test_dataset_coerces_dtypes_and_is_read_only() -> None:
    x = np.zeros((4, 1, 2, 2), dtype=np.float64)
    y = np.array([0, 1, 2, 1], dtype=np.int32)
    data = Dataset(x, y, 3, "toy")
    assert data.x.dtype == np.float32 and data.y.dtype == np.int64
    assert len(data) == 4 and data.input_shape == (1, 2, 2)
    with pytest.raises(ValueError, match="read-only"):
        data.y[0] = 2
    # The caller's own array stays writable.
    y[0] = 2


def test_dataset_subset_takes_the_given_rows() -> None:
    x = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1)
    data = Dataset(x, np.array([0, 1, 0, 1, 0]), 2, "toy")
    part = data.subset([3, 0])
    np.testing.assert_array_equal(part.x.ravel(), [3.0, 0.0])
    np.testing.assert_array_equal(part.y, [1, 0])
    assert part.num_classes == 2 and part.name == "toy"


@pytest.mark.parametrize(
    ("x", "y", "num_classes", "match"),
    [
        (np.zeros((3, 4)), np.zeros(3), 2, "x must have shape"),
        (np.zeros((3, 1, 2, 2)), np.zeros(2), 2, "y must have shape"),
        (np.zeros((2, 1, 2, 2)), np.array([0, 2]), 2, r"labels must lie in \[0, 2\)"),
        (np.zeros((2, 1, 2, 2)), np.array([0, 0]), 0, "num_classes must be >= 1"),
    ],
)
def test_dataset_rejects_inconsistent_arrays(
    x: np.ndarray, y: np.ndarray, num_classes: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        Dataset(x, y, num_classes, "bad")


# ------------------------------------------------------------------------------------------
# digits and synthetic
# ------------------------------------------------------------------------------------------


def test_digits_shapes_ranges_and_stratified_split() -> None:
    train, test = load_dataset("digits", seed=0)
    assert (len(train), len(test)) == (1437, 360)
    assert train.x.shape == (1437, 1, 8, 8) and test.x.shape == (360, 1, 8, 8)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    assert train.num_classes == 10 and train.name == "digits"
    total = np.bincount(train.y, minlength=10) + np.bincount(test.y, minlength=10)
    assert np.all(np.abs(np.bincount(test.y, minlength=10) - 0.2 * total) <= 1)


def test_digits_is_deterministic_cached_and_seed_dependent() -> None:
    train_a, test_a = load_dataset("digits", seed=3)
    train_b, _ = load_dataset("digits", seed=3)
    assert train_b is train_a  # cached: many clients share one copy
    train_c, test_c = load_dataset("digits", seed=4)
    assert not np.array_equal(test_a.y, test_c.y) or not np.array_equal(test_a.x, test_c.x)
    # Different splits of the same pool of samples.
    assert np.isclose(train_a.x.sum() + test_a.x.sum(), train_c.x.sum() + test_c.x.sum())


def test_test_fraction_sets_the_split_size() -> None:
    train, test = load_dataset("digits", seed=0, test_fraction=0.5)
    assert abs(len(test) - 1797 / 2) <= 1 and len(train) + len(test) == 1797


def test_synthetic_defaults_and_options() -> None:
    train, test = load_dataset("synthetic", seed=1)
    assert train.x.shape == (480, 1, 8, 8) and test.x.shape == (120, 1, 8, 8)
    assert train.x.dtype == np.float32 and 0.0 <= train.x.min() and train.x.max() <= 1.0
    assert np.array_equal(np.bincount(train.y), np.full(10, 48))
    small_train, _ = load_dataset(
        "synthetic", seed=1, num_samples=100, num_classes=4, side=5, noise=0.0
    )
    assert small_train.x.shape == (80, 1, 5, 5) and small_train.num_classes == 4
    # Without noise every sample equals its class prototype.
    for c in range(4):
        rows = small_train.x[small_train.y == c].reshape(-1, 25)
        assert np.all(rows == rows[0])


def test_synthetic_is_deterministic_under_seed() -> None:
    a, _ = load_dataset("synthetic", seed=5, num_samples=200)
    data_module._load_cached.cache_clear()
    b, _ = load_dataset("synthetic", seed=5, num_samples=200)
    assert b is not a
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    c, _ = load_dataset("synthetic", seed=6, num_samples=200)
    assert not np.array_equal(a.x, c.x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "mnist"}, r"unknown dataset 'mnist'; valid names: \['digits'"),
        ({"name": "hf:"}, "unknown dataset"),
        ({"name": "digits", "test_fraction": 1.0}, r"test_fraction must be a float in \(0, 1\)"),
        ({"name": "digits", "seed": -1}, "seed must be an int >= 0"),
        ({"name": "digits", "path": "/tmp"}, "path is only used by 'fashion_mnist'"),
        ({"name": "digits", "noise": 0.1}, r"unknown option\(s\) \['noise'\].*allowed: \[\]"),
        ({"name": "synthetic", "side": 0}, "side must be an int >= 1"),
        ({"name": "synthetic", "noise": -1.0}, "noise must be a finite float >= 0"),
        ({"name": "synthetic", "num_samples": 5}, "num_samples must be an int >= 20"),
    ],
)
def test_load_dataset_argument_errors(kwargs: dict[str, object], match: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        load_dataset(name, **kwargs)  # type: ignore[arg-type]


def test_hf_loader_reports_a_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="optional package `datasets`"):
        load_dataset("hf:zalando-datasets/fashion_mnist")


# ------------------------------------------------------------------------------------------
# IDX reader and fashion_mnist
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32])
def test_read_idx_round_trip(tmp_path: Path, compress: bool, dtype: type) -> None:
    array = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    if dtype is np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
    path = write_idx(tmp_path / "f-idx3-ubyte", array, compress=compress)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_detects_gzip_by_content_not_name(tmp_path: Path) -> None:
    array = np.array([3, 1, 4], dtype=np.uint8)
    path = write_idx(tmp_path / "labels-no-suffix", array, compress=True)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_rejects_corrupt_files(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "good", np.zeros((4, 2, 2), dtype=np.uint8), compress=False)
    raw = good.read_bytes()
    cases = {
        "truncated": (raw[:-3], "IDX data has 13 bytes, dimensions \\(4, 2, 2\\) need 16"),
        "bad_magic": (b"\x01\x00" + raw[2:], "not an IDX file"),
        "bad_type": (raw[:2] + b"\x07" + raw[3:], "unknown IDX type code 0x07"),
        "short_header": (raw[:6], "truncated IDX header"),
        "bad_gzip": (gzip.compress(raw)[:-10], "corrupt gzip data"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=match):
            read_idx(path)


def test_fashion_mnist_reader_on_tiny_files(tmp_path: Path) -> None:
    train_images, test_labels = write_fashion_files(tmp_path)
    train, test = load_dataset("fashion_mnist", path=str(tmp_path))
    assert train.x.shape == (30, 1, 28, 28) and test.x.shape == (12, 1, 28, 28)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    np.testing.assert_allclose(train.x[:, 0], train_images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(test.y, test_labels)
    assert train.num_classes == 10 and train.name == "fashion_mnist"


def test_fashion_mnist_subsampling_is_deterministic(tmp_path: Path) -> None:
    write_fashion_files(tmp_path, n_train=50, n_test=20)
    a_train, a_test = load_dataset("fashion_mnist", path=str(tmp_path), max_train=10, max_test=5)
    b_train, _ = load_dataset("fashion_mnist", path=str(tmp_path), max_train=10, seed=1)
    assert len(a_train) == 10 and len(a_test) == 5
    full, _ = load_dataset("fashion_mnist", path=str(tmp_path))
    rows = {row.tobytes() for row in full.x}
    assert all(row.tobytes() in rows for row in a_train.x)
    assert not np.array_equal(a_train.x, b_train.x)
    with pytest.raises(ValueError, match="max_train must be an int >= 1"):
        load_dataset("fashion_mnist", path=str(tmp_path), max_train=0)


def test_fashion_mnist_missing_file_says_how_to_get_it(tmp_path: Path) -> None:
    write_fashion_files(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_dataset("fashion_mnist", path=str(tmp_path))
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert "path=" in str(info.value)


def test_fashion_mnist_validates_contents(tmp_path: Path) -> None:
    write_fashion_files(tmp_path)
    bad_labels = np.full(12, 10, dtype=np.uint8)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", bad_labels, compress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\), found 10"):
        load_dataset("fashion_mnist", path=str(tmp_path))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", bad_labels[:5] % 10, compress=False)
    with pytest.raises(ValueError, match="has 12 images but .* has 5"):
        load_dataset("fashion_mnist", path=str(tmp_path), max_test=3)


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(),
    reason="real Fashion-MNIST absent (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist() -> None:
    train, test = load_dataset("fashion_mnist", max_train=2000)
    assert train.x.shape == (2000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert 0.0 == train.x.min() and train.x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(test.y), np.full(10, 1000))


# ------------------------------------------------------------------------------------------
# Partitioning
# ------------------------------------------------------------------------------------------


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    merged = np.concatenate(parts)
    assert len(merged) == n
    np.testing.assert_array_equal(np.sort(merged), np.arange(n))


def test_iid_partitions_are_equal_disjoint_and_deterministic() -> None:
    labels = np.arange(103) % 7
    parts = partition_indices(labels, 10, seed=2)
    assert_disjoint_cover(parts, 103)
    assert {len(p) for p in parts} == {10, 11}
    assert all(p.dtype == np.int64 for p in parts)
    again = partition_indices(labels, 10, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(labels, 10, seed=3)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_partitions_are_disjoint_covering_deterministic() -> None:
    labels = load_dataset("digits")[0].y
    parts = partition_indices(labels, 8, method="dirichlet", alpha=0.3, seed=1)
    assert_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 10
    again = partition_indices(labels, 8, method="dirichlet", alpha=0.3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = load_dataset("digits")[0].y
    for seed in range(3):
        strong = partition_indices(labels, 10, method="dirichlet", alpha=0.1, seed=seed)
        weak = partition_indices(labels, 10, method="dirichlet", alpha=100.0, seed=seed)
        # Measured on digits: about 0.6-0.72 at alpha=0.1, about 0.04 at alpha=100.
        assert label_skew(labels, strong, 10) > 0.5
        assert label_skew(labels, weak, 10) < 0.1


def test_dirichlet_respects_min_partition_size_or_fails_clearly() -> None:
    labels = np.repeat(np.arange(10), 30)
    parts = partition_indices(labels, 5, method="dirichlet", alpha=0.5, min_partition_size=30)
    assert min(len(p) for p in parts) >= 30
    with pytest.raises(ValueError, match="max_attempts=3"):
        partition_indices(
            labels, 20, method="dirichlet", alpha=0.01, min_partition_size=15, max_attempts=3
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "shards"}, r"method must be one of \['iid', 'dirichlet'\]"),
        ({"method": "dirichlet", "alpha": 0.0}, "alpha must be a finite float > 0"),
        ({"num_partitions": 0}, "num_partitions must be an int >= 1"),
        ({"num_partitions": 11}, "min_partition_size=10"),
        ({"min_partition_size": -1}, "min_partition_size must be an int >= 0"),
        ({"labels": np.zeros((2, 50), dtype=int)}, "labels must be a 1-D integer array"),
    ],
)
def test_partition_argument_errors(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"labels": np.arange(100) % 10, "num_partitions": 4}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        partition_indices(**args)  # type: ignore[arg-type]


def test_load_partition_covers_the_train_split() -> None:
    train, _ = load_dataset("synthetic", seed=0, num_samples=400)
    rows: list[bytes] = []
    for pid in range(4):
        local_train, local_val = load_partition(
            "synthetic", pid, 4, partitioner="dirichlet", alpha=1.0, num_samples=400
        )
        n = len(local_train) + len(local_val)
        assert len(local_val) == max(1, round(0.1 * n))
        rows += [r.tobytes() for r in np.concatenate([local_train.x, local_val.x])]
    assert len(rows) == len(set(rows)) == len(train)
    assert set(rows) == {r.tobytes() for r in train.x}


def test_load_partition_is_deterministic_and_seeded() -> None:
    a_train, a_val = load_partition("digits", 2, 5, seed=0)
    b_train, b_val = load_partition("digits", 2, 5, seed=0)
    np.testing.assert_array_equal(a_train.x, b_train.x)
    np.testing.assert_array_equal(a_val.y, b_val.y)
    c_train, _ = load_partition("digits", 2, 5, seed=1)
    assert not np.array_equal(a_train.x, c_train.x)
    no_val_train, no_val = load_partition("digits", 2, 5, val_fraction=0.0)
    assert len(no_val) == 0 and len(no_val_train) == len(a_train) + len(a_val)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"partition_id": 5}, r"partition_id must be an int in \[0, 5\)"),
        ({"partition_id": -1}, r"partition_id must be an int in \[0, 5\)"),
        ({"val_fraction": 1.0}, r"val_fraction must be a float in \[0, 1\)"),
        ({"partitioner": "pathological"}, "method must be one of"),
        ({"name": "cifar"}, "unknown dataset 'cifar'"),
    ],
)
def test_load_partition_argument_errors(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"name": "digits", "partition_id": 0, "num_partitions": 5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        load_partition(**args)  # type: ignore[arg-type]
