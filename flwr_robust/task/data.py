"""Bundled datasets, an IDX reader and client partitioners.

Everything here works offline: ``digits`` ships with scikit-learn, ``synthetic`` is generated,
``fashion_mnist`` reads the IDX files of Debian's ``dataset-fashion-mnist`` package. Only the
optional ``hf:<dataset-id>`` loader needs the network.

Loaded datasets are cached per process and their arrays are read-only, so many simulated clients
share one copy safely; derive modified data (label flips, triggers) with :meth:`Dataset.subset`,
``dataclasses.replace`` or explicit copies.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "PARTITIONERS",
    "Dataset",
    "load_dataset",
    "load_partition",
    "partition_indices",
    "read_idx",
]

DATASETS: tuple[str, ...] = ("digits", "fashion_mnist", "synthetic", "hf:<dataset-id>")
PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist/"

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True, eq=False)
class Dataset:
    """An immutable labelled image dataset.

    Parameters
    ----------
    x : np.ndarray
        Images, float32, shape (N, C, H, W). Stored as a read-only array.
    y : np.ndarray
        Labels, int64, shape (N,), each in ``[0, num_classes)``. Stored as a read-only array.
    num_classes : int
        Number of classes of the task (not only those present in ``y``).
    name : str
        Name of the source dataset.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        x = _readonly(np.asarray(self.x, dtype=np.float32))
        y = _readonly(np.asarray(self.y, dtype=np.int64))
        if x.ndim != 4:
            raise ValueError(f"x must have shape (N, C, H, W), got shape {x.shape}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must have shape ({x.shape[0]},), got shape {y.shape}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got [{y.min()}, {y.max()}]"
            )
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one image."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, indices: ArrayLike) -> Dataset:
        """Return the samples at ``indices`` (integer positions) as a new dataset.

        Parameters
        ----------
        indices : array-like of int
            Positions to take, in the order given.

        Returns
        -------
        Dataset
            A dataset holding copies of the selected samples.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return Dataset(self.x[idx], self.y[idx], self.num_classes, self.name)


def _readonly(array: np.ndarray) -> np.ndarray:
    """Return a read-only view of ``array`` (the caller's array keeps its flags)."""
    view = array.view()
    view.setflags(write=False)
    return view


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    path: str | None = None,
    test_fraction: float = 0.2,
    **options: Any,
) -> tuple[Dataset, Dataset]:
    """Load a dataset as (train, test), deterministically under ``seed`` and cached per process.

    Parameters
    ----------
    name : str
        ``"digits"`` (scikit-learn's 8x8 digits, the project default), ``"fashion_mnist"`` (IDX
        files, official 60k/10k split), ``"synthetic"`` (Gaussian class clusters, for tests) or
        ``"hf:<dataset-id>"`` (Hugging Face, needs the ``datasets`` package and the network).
    seed : int, default=0
        Seed of the train/test split, of the synthetic generator and of any subsampling.
    path : str or None, default=None
        Directory of the Fashion-MNIST IDX files (default ``/usr/share/datasets/fashion-mnist/``).
        Only valid for ``"fashion_mnist"``.
    test_fraction : float, default=0.2
        Fraction held out as test set, in (0, 1); stratified by label. Not used by
        ``"fashion_mnist"`` (official split), nor by ``"hf:..."`` datasets that have a test split.
    **options
        Dataset-specific options. ``fashion_mnist``: ``max_train``, ``max_test`` (deterministic
        subsampling). ``synthetic``: ``num_samples`` (600), ``num_classes`` (10), ``side`` (8),
        ``noise`` (0.5). ``hf:...``: ``image_key`` ("image"), ``label_key`` ("label").

    Returns
    -------
    tuple[Dataset, Dataset]
        The train and test sets, with read-only arrays shared between calls.
    """
    _check_int("seed", seed, minimum=0)
    if not (isinstance(test_fraction, int | float) and 0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    if path is not None and name != "fashion_mnist":
        raise ValueError(f"path is only used by 'fashion_mnist', not by {name!r}")
    for key, value in options.items():
        if not isinstance(value, Hashable):
            raise TypeError(f"option {key!r} must be hashable, got {type(value).__name__}")
    return _load_cached(name, seed, path, float(test_fraction), tuple(sorted(options.items())))


@lru_cache(maxsize=4)  # a full Fashion-MNIST train split is 188 MB as float32
def _load_cached(
    name: str,
    seed: int,
    path: str | None,
    test_fraction: float,
    options: tuple[tuple[str, Any], ...],
) -> tuple[Dataset, Dataset]:
    """Dispatch to a loader; cached so that simulated clients in one process share the data."""
    opts = dict(options)
    if name == "digits":
        _check_options(name, opts, ())
        return _load_digits(seed, test_fraction)
    if name == "synthetic":
        _check_options(name, opts, ("num_samples", "num_classes", "side", "noise"))
        return _load_synthetic(seed, test_fraction, **opts)
    if name == "fashion_mnist":
        _check_options(name, opts, ("max_train", "max_test"))
        return _load_fashion_mnist(FASHION_MNIST_DIR if path is None else path, seed, **opts)
    if isinstance(name, str) and name.startswith("hf:") and len(name) > 3:
        _check_options(name, opts, ("image_key", "label_key"))
        return _load_hf(name[3:], seed, test_fraction, **opts)
    raise ValueError(f"unknown dataset {name!r}; valid names: {list(DATASETS)}")


def _check_options(name: str, options: dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for dataset {name!r}; allowed: {list(allowed)}"
        )


def _check_int(param: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{param} must be an int >= {minimum}, got {value!r}")


def _stratified_split(
    x: np.ndarray, y: np.ndarray, num_classes: int, name: str, seed: int, test_fraction: float
) -> tuple[Dataset, Dataset]:
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y
    )
    full = Dataset(x, y, num_classes, name)
    return full.subset(np.sort(train_idx)), full.subset(np.sort(test_idx))


def _load_digits(seed: int, test_fraction: float) -> tuple[Dataset, Dataset]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are integers in 0..16.
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    return _stratified_split(x, bunch.target, 10, "digits", seed, test_fraction)


def _load_synthetic(
    seed: int,
    test_fraction: float,
    num_samples: int = 600,
    num_classes: int = 10,
    side: int = 8,
    noise: float = 0.5,
) -> tuple[Dataset, Dataset]:
    """Random binary class prototypes (side x side) plus Gaussian noise, clipped to [0, 1]."""
    _check_int("num_classes", num_classes, minimum=2)
    _check_int("num_samples", num_samples, minimum=2 * num_classes)
    _check_int("side", side, minimum=1)
    if not (isinstance(noise, int | float) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite float >= 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    prototypes = (rng.random((num_classes, 1, side, side)) < 0.5).astype(np.float32)
    y = rng.permutation(np.arange(num_samples) % num_classes)
    x = prototypes[y] + rng.normal(0.0, noise, (num_samples, 1, side, side)).astype(np.float32)
    np.clip(x, 0.0, 1.0, out=x)
    return _stratified_split(x, y, num_classes, "synthetic", seed, test_fraction)


# --------------------------------------------------------------------------------------------
# IDX files (MNIST / Fashion-MNIST format)
# --------------------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a native-endian numpy array.

    The format is: two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int,
    0x0D float, 0x0E double), the number of dimensions, each dimension as a big-endian uint32,
    then the big-endian data.

    Parameters
    ----------
    path : str or Path
        The file to read; gzip compression is detected from its content, not its name.

    Returns
    -------
    np.ndarray
        The array with the dimensions stored in the file.

    Raises
    ------
    ValueError
        When the header is invalid or the data size does not match the dimensions.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip data ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise ValueError(f"{path}: unknown IDX type code 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dims)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX data has {len(raw) - header} bytes, dimensions {shape} need {expected}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find_idx_file(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}.gz (or {stem}) not found in {directory}. Install it with "
        "`apt-get install dataset-fashion-mnist` (files land in "
        f"{FASHION_MNIST_DIR}) or pass path=<directory holding the IDX files>."
    )


@lru_cache(maxsize=2)
def _read_fashion_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one split's images (uint8, (N, H, W)) and labels (uint8, (N,))."""
    folder = Path(directory)
    image_file, label_file = (_find_idx_file(folder, stem) for stem in _FASHION_FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{image_file}: expected uint8 images of shape (N, H, W), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{label_file}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{image_file} has {len(images)} images but {label_file} has {len(labels)}"
        )
    if labels.size and labels.max() >= 10:
        raise ValueError(f"{label_file}: labels must lie in [0, 10), found {labels.max()}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _load_fashion_mnist(
    directory: str, seed: int, max_train: int | None = None, max_test: int | None = None
) -> tuple[Dataset, Dataset]:
    rng = np.random.default_rng(seed)
    out = []
    for split, limit in (("train", max_train), ("test", max_test)):
        images, labels = _read_fashion_split(str(directory), split)
        if limit is not None:
            _check_int(f"max_{split}", limit, minimum=1)
            if limit < len(labels):
                keep = np.sort(rng.choice(len(labels), size=limit, replace=False))
                images, labels = images[keep], labels[keep]
        x = images[:, None, :, :].astype(np.float32) / np.float32(255.0)
        out.append(Dataset(x, labels, 10, "fashion_mnist"))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# Hugging Face (optional, needs the network)
# --------------------------------------------------------------------------------------------


def _load_hf(
    dataset_id: str,
    seed: int,
    test_fraction: float,
    image_key: str = "image",
    label_key: str = "label",
) -> tuple[Dataset, Dataset]:
    """Load an image-classification dataset from the Hugging Face hub via ``datasets``."""
    try:
        import datasets as hf_datasets
    except ImportError as err:
        raise ImportError(
            f"dataset 'hf:{dataset_id}' needs the optional package `datasets` "
            "(pip install datasets); the bundled 'digits' works offline"
        ) from err
    try:
        splits = hf_datasets.load_dataset(dataset_id)
    except Exception as err:  # network, hub and parsing errors all surface here
        raise RuntimeError(
            f"could not load 'hf:{dataset_id}' from the Hugging Face hub (offline?): {err}"
        ) from err
    if "train" not in splits:
        raise ValueError(f"'hf:{dataset_id}' has no 'train' split (splits: {list(splits)})")
    features = splits["train"].features
    if image_key not in features or label_key not in features:
        raise ValueError(
            f"'hf:{dataset_id}' lacks column image_key={image_key!r} or label_key={label_key!r}; "
            f"columns: {list(features)}"
        )
    num_classes = getattr(features[label_key], "num_classes", None)

    def to_arrays(split: Any) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([np.asarray(img, dtype=np.float32) for img in split[image_key]])
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        return x / np.float32(255.0), np.asarray(split[label_key], dtype=np.int64)

    x_train, y_train = to_arrays(splits["train"])
    if num_classes is None:
        num_classes = int(y_train.max()) + 1
    name = f"hf:{dataset_id}"
    if "test" in splits:
        x_test, y_test = to_arrays(splits["test"])
        return (
            Dataset(x_train, y_train, num_classes, name),
            Dataset(x_test, y_test, num_classes, name),
        )
    return _stratified_split(x_train, y_train, num_classes, name, seed, test_fraction)


# --------------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------------


def partition_indices(
    labels: ArrayLike,
    num_partitions: int,
    *,
    method: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 10,
    max_attempts: int = 100,
) -> list[np.ndarray]:
    """Split sample indices into disjoint partitions that cover all of them.

    Parameters
    ----------
    labels : array-like of int, shape (N,)
        The label of every sample.
    num_partitions : int
        Number of partitions (clients), >= 1.
    method : {"iid", "dirichlet"}, default="iid"
        ``"iid"``: a seeded shuffle cut into near-equal parts (sizes differ by at most one).
        ``"dirichlet"``: label skew; for every class, the proportions of its samples given to
        each partition are drawn from Dirichlet(alpha). Small alpha means strong skew.
    alpha : float, default=0.5
        Dirichlet concentration, > 0. Only used by ``"dirichlet"``.
    seed : int, default=0
        Seed; the same arguments always give the same partitions.
    min_partition_size : int, default=10
        Smallest allowed partition. Dirichlet draws are repeated until every partition reaches it.
    max_attempts : int, default=100
        Dirichlet draws tried before giving up with a ValueError.

    Returns
    -------
    list[np.ndarray]
        One sorted int64 index array per partition.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    _check_int("num_partitions", num_partitions, minimum=1)
    _check_int("seed", seed, minimum=0)
    _check_int("min_partition_size", min_partition_size, minimum=0)
    _check_int("max_attempts", max_attempts, minimum=1)
    if method not in PARTITIONERS:
        raise ValueError(f"method must be one of {list(PARTITIONERS)}, got {method!r}")
    if num_partitions * min_partition_size > len(y):
        raise ValueError(
            f"cannot give {num_partitions} partitions at least min_partition_size="
            f"{min_partition_size} samples each out of {len(y)}"
        )
    rng = np.random.default_rng(seed)
    if method == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(y)), num_partitions)]

    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite float > 0, got {alpha!r}")
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for idx in by_class:
            shuffled = rng.permutation(idx)
            proportions = rng.dirichlet(np.full(num_partitions, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
            for part, chunk in zip(parts, np.split(shuffled, cuts), strict=True):
                part.append(chunk)
        merged = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in merged) >= min_partition_size:
            return merged
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in max_attempts={max_attempts} gave all "
        f"{num_partitions} partitions >= min_partition_size={min_partition_size} samples; "
        "raise alpha or max_attempts, or lower num_partitions or min_partition_size"
    )


def load_partition(
    name: str,
    partition_id: int,
    num_partitions: int,
    *,
    partitioner: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    val_fraction: float = 0.1,
    path: str | None = None,
    **options: Any,
) -> tuple[Dataset, Dataset]:
    """Return one client's (train, validation) data, taken from the dataset's train split.

    Parameters
    ----------
    name : str
        Dataset name, as for :func:`load_dataset`.
    partition_id : int
        This client's partition, in ``[0, num_partitions)``.
    num_partitions : int
        Number of partitions (clients).
    partitioner : {"iid", "dirichlet"}, default="iid"
        Partitioning method, see :func:`partition_indices`.
    alpha : float, default=0.5
        Dirichlet concentration (``partitioner="dirichlet"`` only).
    seed : int, default=0
        Seed of the dataset, the partitioning and the train/validation split.
    val_fraction : float, default=0.1
        Fraction of the partition held out for validation, in [0, 1). At least one sample is
        held out when it is > 0 and the partition has two or more samples.
    path : str or None, default=None
        Passed to :func:`load_dataset`.
    **options
        Passed to :func:`load_dataset` (including ``test_fraction``) except
        ``min_partition_size`` and ``max_attempts``, which go to :func:`partition_indices`.

    Returns
    -------
    tuple[Dataset, Dataset]
        The client's training and validation sets.
    """
    _check_int("num_partitions", num_partitions, minimum=1)
    if (
        isinstance(partition_id, bool)
        or not isinstance(partition_id, int | np.integer)
        or not 0 <= partition_id < num_partitions
    ):
        raise ValueError(
            f"partition_id must be an int in [0, {num_partitions}), got {partition_id!r}"
        )
    if not (isinstance(val_fraction, int | float) and 0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction must be a float in [0, 1), got {val_fraction!r}")
    split_keys = ("min_partition_size", "max_attempts")
    split_options = tuple(sorted((k, options.pop(k)) for k in split_keys if k in options))
    train, _ = load_dataset(name, seed=seed, path=path, **options)
    parts = _cached_partitions(
        name,
        seed,
        path,
        tuple(sorted(options.items())),
        num_partitions,
        partitioner,
        float(alpha),
        split_options,
    )
    local = train.subset(parts[partition_id])
    n = len(local)
    n_val = min(max(1, round(val_fraction * n)), n - 1) if val_fraction > 0 and n >= 2 else 0
    order = np.random.default_rng([seed, int(partition_id)]).permutation(n)
    return local.subset(np.sort(order[n_val:])), local.subset(np.sort(order[:n_val]))


@lru_cache(maxsize=16)
def _cached_partitions(
    name: str,
    seed: int,
    path: str | None,
    options: tuple[tuple[str, Any], ...],
    num_partitions: int,
    partitioner: str,
    alpha: float,
    split_options: tuple[tuple[str, Any], ...],
) -> tuple[np.ndarray, ...]:
    """Partition once per configuration, so that simulated clients in one process share it."""
    train, _ = load_dataset(name, seed=seed, path=path, **dict(options))
    parts = partition_indices(
        train.y, num_partitions, method=partitioner, alpha=alpha, seed=seed, **dict(split_options)
    )
    for part in parts:
        part.setflags(write=False)
    return tuple(parts)
