"""A read-only ``(n, d)`` view over per-client lists of layers, materialised block by block.

Flower delivers each client's model as a list of arrays (one per layer). Rules need
column blocks of the stacked ``(n, d)`` update matrix, its Gram matrix or weighted sums of
its rows. :class:`UpdateMatrix` provides these without ever stacking the whole matrix: it
copies ``max_block_bytes`` worth of columns at a time into one reused float32 buffer
(subtracting the optional ``base``, so client weights become deltas on the fly), which keeps
the extra memory of every rule a few megabytes plus its output.

Numerics. The blocks are float32 and the products run in float32 (torch GEMM), accumulated
across blocks in float64. Two safeguards make every result independent of the clients'
order and exact up to rounding for any finite inputs:

- *Range.* A block's float32 products are used only when every squared row norm of the
  block lies in ``[TINY, HUGE]`` (or is zero): then no element, product or partial sum can
  over- or underflow float32. Otherwise every row of that block is scaled by a power of
  two (exact) to values of magnitude below 2, multiplied in float32 again and the
  products scaled back in float64, which holds the square of any float32 value. Deltas
  beyond float32 itself (only from an absurd global model) are recomputed in float64 from
  the clients' arrays, and weighted sums of rows that come out non-finite are recomputed
  in float64 the same way.
- *Anchor.* Gram matrices are computed of the rows translated by an anchor, which removes
  what the rows share and keeps float32 products precise when the rows differ by far less
  than their magnitude. The anchor is the middle row (rules see the clients in a canonical
  order of their values, see :meth:`~.base.Aggregator.__call__`, so it is a typical one);
  an anchor far from the others (an outlier) would destroy that precision, so it is
  checked after the pass: when its median
  distance to the other rows exceeds ``ANCHOR_FACTOR`` times the smallest such median, the
  pass is repeated around the coordinate-wise median of the rows, which lies within the
  majority's range in every coordinate whenever fewer than half the rows are outliers, at
  any magnitude and position. Honest data costs one pass; an outlier that becomes the
  anchor costs a second pass and a median per coordinate.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

COMBINE_CHUNK = 1 << 16  # values per accumulation chunk of combine() (256 KiB, in cache)
DEFAULT_BLOCK_BYTES = 32 << 20  # measured best on 2 cores (n=50, d=1e6): fewer, larger GEMMs
#: float32 block products are trusted when every squared row norm is 0 or in [TINY, HUGE].
HUGE = 2.0**100
TINY = 2.0**-100
#: An anchor whose median distance to the other rows exceeds this multiple of the smallest
#: such median is replaced (see the module docstring).
ANCHOR_FACTOR = 4.0

Layers = Sequence[np.ndarray]


def _as_flat(array: np.ndarray, where: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in "fiub":
        raise TypeError(f"{where} has dtype {array.dtype}; only numeric arrays can be aggregated")
    return array.reshape(-1)


@dataclass(frozen=True)
class AnchoredGram:
    """All inner products of ``m`` rows ``x_i``, stored around an anchor point ``p``.

    ``centered[i, j] = (x_i - p) . (x_j - p)`` (well conditioned: what
    :meth:`UpdateMatrix.gram` returns), ``anchor[i] = (x_i - p) . p`` and
    ``anchor_sq = p . p``. The anchor is a point among the majority of the rows (see the
    module docstring). Together they give the uncentred Gram matrix and the Gram matrix of
    any linear mix ``Y = M X`` of the rows, around the same anchor, without touching the
    data again.
    """

    centered: np.ndarray
    anchor: np.ndarray
    anchor_sq: float

    def uncentered(self) -> np.ndarray:
        """``X X^T``."""
        a = self.anchor
        return self.centered + a[:, None] + a[None, :] + self.anchor_sq

    def squared_norms(self) -> np.ndarray:
        """``||x_i||^2``."""
        return np.diag(self.centered) + 2.0 * self.anchor + self.anchor_sq

    def mixed(self, mixing: np.ndarray) -> AnchoredGram:
        """The anchored Gram matrix of the rows ``Y = mixing @ X``, around the same ``p``.

        With ``r = M 1 - 1`` and ``X_c = X - 1 p^T``: ``Y - 1 p^T = M X_c + r p^T``, which
        expands into the stored products. For row-stochastic mixings (NNM, bucketing)
        ``r = 0`` and the centred part is exactly ``M C M^T``.
        """
        rest = mixing.sum(axis=1) - 1.0
        mixed_anchor = mixing @ self.anchor
        centered = mixing @ self.centered @ mixing.T
        if np.any(rest):
            centered += np.outer(mixed_anchor, rest) + np.outer(rest, mixed_anchor)
            centered += self.anchor_sq * np.outer(rest, rest)
        centered = (centered + centered.T) / 2.0
        return AnchoredGram(centered, mixed_anchor + rest * self.anchor_sq, self.anchor_sq)


def squared_distances(gram: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances from a (translated) Gram matrix (zero diagonal,
    >= 0)."""
    diagonal = np.diag(gram)
    distances = diagonal[:, None] + diagonal[None, :] - 2.0 * gram
    np.maximum(distances, 0.0, out=distances)
    np.fill_diagonal(distances, 0.0)
    return distances


def anchor_is_far(centered: np.ndarray, anchor: int) -> bool:
    """Whether row ``anchor`` lies far from the majority of the rows.

    Each row's typical distance is its median squared distance to the other rows; the
    anchor is far when its own is more than :data:`ANCHOR_FACTOR` times the smallest one.
    Distances computed around a far anchor lose precision between the other rows, but only
    down to a level far below the anchor's own (precise) distances, so a far anchor is
    always recognised, and an anchor that passes is near enough for precise products.
    """
    m = len(centered)
    if m < 3:
        return False
    distances = squared_distances(centered)
    np.fill_diagonal(distances, np.nan)
    typical = np.nanmedian(distances, axis=1)
    return bool(typical[anchor] > ANCHOR_FACTOR * typical.min())


def _column_medians(block: np.ndarray) -> np.ndarray:
    """The median of every column of ``block`` (float32), with the compiled kernels."""
    from . import _kernels  # lazy: compiled kernels are needed on this path only

    out = np.empty(block.shape[1], dtype=np.float32)
    _kernels.coordinate_median(block, _kernels.sorting_network(block.shape[0]), out)
    return out


def _underflowed_rows(squared: np.ndarray, block: np.ndarray | None) -> bool:
    """Whether a row of ``block`` with a zero float32 squared norm (``squared``) holds a
    non-zero value (its squares underflowed). Only the zero-norm rows are read: on ordinary
    data there are none, and no extra pass over the block is made."""
    if block is None:
        return False
    zero = np.flatnonzero(squared == 0)
    return bool(zero.size) and bool(np.any(block[zero] != 0))


def _safe_products(products: np.ndarray, block: np.ndarray | None = None) -> bool:
    """Whether float32 products of a block are free of over- and underflow: finite, and
    every squared row norm (the diagonal) within ``[TINY, HUGE]``, or zero for a row that
    is zero (checked when ``block``, the rows multiplied, is given: a row of values around
    1e-30 has squares that underflow to exactly 0)."""
    diagonal = np.diag(products)
    if not np.all(np.isfinite(products)) or np.any(diagonal > HUGE):
        return False
    if np.any((diagonal > 0) & (diagonal < TINY)):
        return False
    return not _underflowed_rows(diagonal, block)


def _block_products(block: np.ndarray, torch: Any) -> np.ndarray | None:
    """``block @ block.T`` (float64) from float32 products: directly when that is safe,
    else with every row first scaled by a power of two (exact) to values of magnitude
    below 2, the products scaled back in float64. ``None`` when the block holds non-finite
    values. May scale ``block``'s rows in place (it is scratch)."""
    tensor = torch.from_numpy(block)
    part = (tensor @ tensor.T).numpy().astype(np.float64)
    if _safe_products(part, block):
        return part
    low, high = torch.aminmax(tensor, dim=1)
    peak = np.maximum(-low.numpy(), high.numpy()).astype(np.float64)
    if not np.all(np.isfinite(peak)):
        return None
    exponent = np.zeros(len(peak))
    positive = peak > 0
    exponent[positive] = np.clip(np.floor(np.log2(peak[positive])), -120, 120)
    tensor.mul_(torch.from_numpy(np.exp2(-exponent).astype(np.float32))[:, None])
    part = (tensor @ tensor.T).numpy().astype(np.float64)
    scale = np.exp2(exponent)
    return part * np.outer(scale, scale)


def _all_finite(values: np.ndarray) -> bool:
    """Whether a float32 array holds no NaN/Inf: its float64 sum, which NaN and Inf
    propagate to and which finite float32 values cannot overflow."""
    return math.isfinite(float(np.sum(values, dtype=np.float64)))


def _safe_norms(norms: np.ndarray, block: np.ndarray | None = None) -> bool:
    """As :func:`_safe_products` for squared row norms ``norms`` of ``block``."""
    return bool(
        np.all(np.isfinite(norms)) and not np.any(norms > HUGE)
        and not np.any((norms > 0) & (norms < TINY))
    ) and not _underflowed_rows(norms, block)


def weighted_rows(weights: np.ndarray, block: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = weights @ block`` (float32) with torch's GEMV.

    Every BLAS-like product of the core goes through torch: alternating numpy's OpenBLAS
    with torch's (or the compiled kernels') thread pools within one aggregation stalls the
    pools against each other (measured 3-10x slower).
    A non-finite result (a float32 overflow of finite values) is recomputed in float64.
    """
    import torch  # lazy: a heavy import

    torch.mv(
        torch.from_numpy(block).T,
        torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)),
        out=torch.from_numpy(out),
    )
    if not _all_finite(out):
        exact = torch.from_numpy(block).double().T @ torch.from_numpy(
            np.asarray(weights, dtype=np.float64)
        )
        with np.errstate(over="ignore"):
            out[:] = exact.numpy()


class UpdateMatrix:
    """``n`` client updates of ``d`` coordinates, read in column blocks.

    Parameters
    ----------
    updates : sequence of sequences of np.ndarray
        ``updates[i][l]`` is layer ``l`` of client ``i``. All clients must have the same
        number of layers and the same shape per layer. Any numeric dtype is read as float32.
    base : sequence of np.ndarray, optional
        When given, row ``i`` is ``updates[i] - base`` (e.g. client weights minus the global
        model they were trained from), computed block by block.
    extra_rows : sequence of np.ndarray, optional
        Flat ``(d,)`` vectors appended as further rows after the clients, never offset by
        ``base`` (e.g. a rule's previous aggregate, already a delta).
    max_block_bytes : int, optional
        Size of the reused float32 block buffer (:data:`DEFAULT_BLOCK_BYTES` by default).
    order : sequence of int, optional
        Row ``k`` is client ``order[k]`` (a permutation of the clients; errors name the
        clients' input positions).
    """

    def __init__(
        self,
        updates: Sequence[Layers],
        base: Layers | None = None,
        *,
        extra_rows: Sequence[np.ndarray] = (),
        max_block_bytes: int | None = None,
        order: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        if len(updates) == 0:
            raise ValueError("no updates to aggregate")
        first = updates[0]
        if isinstance(first, np.ndarray):
            raise TypeError(
                "updates must be a list of clients, each a list of layer arrays; "
                "got a list of arrays (wrap a single-layer update as [array])"
            )
        self.shapes: list[tuple[int, ...]] = [tuple(np.shape(layer)) for layer in first]
        if not self.shapes:
            raise ValueError("updates have no layers")
        self._rows: list[list[np.ndarray]] = []
        for i in range(len(updates)) if order is None else order:
            client = updates[i]
            if len(client) != len(self.shapes):
                raise ValueError(
                    f"client {i} has {len(client)} layers, client 0 has {len(self.shapes)}"
                )
            row = []
            for layer_index, (layer, shape) in enumerate(zip(client, self.shapes, strict=True)):
                if tuple(np.shape(layer)) != shape:
                    raise ValueError(
                        f"client {i} layer {layer_index} has shape {np.shape(layer)}, "
                        f"expected {shape}"
                    )
                row.append(_as_flat(layer, f"client {i} layer {layer_index}"))
            self._rows.append(row)
        self._base: list[np.ndarray] | None = None
        if base is not None:
            if len(base) != len(self.shapes):
                raise ValueError(f"base has {len(base)} layers, updates have {len(self.shapes)}")
            for layer_index, (layer, shape) in enumerate(zip(base, self.shapes, strict=True)):
                if tuple(np.shape(layer)) != shape:
                    raise ValueError(
                        f"base layer {layer_index} has shape {np.shape(layer)}, expected {shape}"
                    )
            self._base = [_as_flat(layer, f"base layer {k}") for k, layer in enumerate(base)]
        dtypes = [{layer.dtype for layer in column} for column in zip(*self._rows, strict=True)]
        if self._base is not None:
            for layer_dtypes, base_layer in zip(dtypes, self._base, strict=True):
                layer_dtypes.add(base_layer.dtype)
        #: Layers whose deltas are computed in float64 (see _fill_exact).
        self._exact_layer = [kinds != {np.dtype(np.float32)} and self._base is not None
                             for kinds in dtypes]
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in self.shapes]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n = len(self._rows)
        self.d = int(self._offsets[-1])
        if self.d == 0:
            raise ValueError("updates have no coordinates")
        #: Rows of the matrix: the ``n`` clients, then the extra rows.
        self.num_rows = self.n
        self._append_rows(extra_rows)
        self.max_block_bytes = int(max_block_bytes or DEFAULT_BLOCK_BYTES)

    def _append_rows(self, extra_rows: Sequence[np.ndarray]) -> None:
        for k, extra in enumerate(extra_rows):
            flat = _as_flat(extra, f"extra row {k}")
            if flat.size != self.d:
                raise ValueError(f"extra row {k} has {flat.size} values, expected {self.d}")
            offsets = self._offsets
            self._rows.append([flat[offsets[j] : offsets[j + 1]] for j in range(len(self.shapes))])
        self.num_rows = len(self._rows)

    def with_extra_rows(self, extra_rows: Sequence[np.ndarray]) -> UpdateMatrix:
        """A matrix over the same rows plus ``extra_rows`` (flat, not offset by ``base``)."""
        extended = copy.copy(self)
        extended._rows = list(self._rows)
        extended._append_rows(extra_rows)
        return extended

    # ------------------------------------------------------------------ blocks
    def block_columns(self, num_rows: int) -> int:
        """Columns per block for ``num_rows`` rows (a multiple of 256, at least 256)."""
        columns = self.max_block_bytes // (4 * max(num_rows, 1))
        return max(256, columns - columns % 256)

    def block_ranges(self, num_rows: int) -> list[tuple[int, int]]:
        """Column ranges ``(start, stop)`` of the blocks :meth:`blocks` yields for ``num_rows``."""
        width = min(self.block_columns(num_rows), self.d)
        return [(start, min(start + width, self.d)) for start in range(0, self.d, width)]

    def blocks(
        self, rows: Sequence[int] | None = None
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(start, stop, block)``: rows ``rows`` (all by default), columns
        ``start:stop`` as a C-contiguous float32 ``(len(rows), stop - start)`` array.

        The block is one reused buffer: consume it (or copy it) before the next step. It is
        the caller's scratch space: modifying it never touches the updates.
        """
        selected = list(range(self.num_rows)) if rows is None else [int(r) for r in rows]
        ranges = self.block_ranges(len(selected))
        width = ranges[0][1] - ranges[0][0]
        buffer = np.empty((len(selected), width), dtype=np.float32)
        for start, stop in ranges:
            block = buffer if stop - start == width else np.empty_like(buffer[:, : stop - start])
            self._fill(block, selected, start, stop)
            yield start, stop, block

    def exact_block(
        self, start: int, stop: int, rows: Sequence[int] | None = None
    ) -> np.ndarray:
        """Columns ``start:stop`` of the selected rows as a new float64 array, the deltas
        computed in float64 (the slow, exact path of the reductions)."""
        selected = list(range(self.num_rows)) if rows is None else [int(r) for r in rows]
        block = np.empty((len(selected), stop - start), dtype=np.float64)
        self._fill(block, selected, start, stop)
        return block

    def _fill(self, block: np.ndarray, selected: list[int], start: int, stop: int) -> None:
        """Write rows ``selected``, columns ``start:stop`` into ``block`` (its dtype)."""
        offsets = self._offsets
        layer = int(np.searchsorted(offsets, start, side="right")) - 1
        while layer < len(self.shapes) and offsets[layer] < stop:
            lo = max(start, int(offsets[layer]))
            hi = min(stop, int(offsets[layer + 1]))
            src = slice(lo - int(offsets[layer]), hi - int(offsets[layer]))
            target = block[:, lo - start : hi - start]
            if self._exact_layer[layer] and block.dtype == np.float32:
                self._fill_exact(target, selected, layer, src)
                layer += 1
                continue
            np.stack([self._rows[client][layer][src] for client in selected], out=target,
                     casting="unsafe")
            if self._base is not None:
                clients = [i for i, client in enumerate(selected) if client < self.n]
                with np.errstate(over="ignore"):
                    if len(clients) == len(selected):
                        np.subtract(target, self._base[layer][src], out=target,
                                    casting="unsafe")
                    else:  # extra rows (already deltas) are not offset by the base
                        target[clients] -= self._base[layer][src]
            layer += 1

    def _fill_exact(self, target: np.ndarray, selected: list[int], layer: int, src: slice) -> None:
        """Deltas of a layer that is not float32 (integers, float64), subtracted in float64
        before the float32 cast: casting first would lose what float32 cannot hold (an
        int64 count of 2**40 + 1, a float64 step of 1e-9 on a weight of 1)."""
        base = None if self._base is None else self._base[layer][src].astype(np.float64)
        for position, client in enumerate(selected):
            values = self._rows[client][layer][src].astype(np.float64)
            if base is not None and client < self.n:
                values -= base
            target[position] = values

    # -------------------------------------------------------------- reductions
    def gram(self, *, centered: bool = True) -> np.ndarray:
        """Gram matrix (float64) of all rows.

        With ``centered=True`` (default) the rows are first translated by a common anchor
        row chosen among the majority (see the module docstring): pairwise distances
        ``G_ii + G_jj - 2 G_ij`` and affine combinations are translation invariant, and the
        translation keeps the float32 products precise when the rows differ by far less
        than their magnitude, whatever the position and size of outliers. With
        ``centered=False``, the plain ``X X^T``.
        """
        if not centered:
            return self._uncentered_gram()
        return self._anchored(with_anchor=False).centered

    def anchored_gram(self) -> AnchoredGram:
        """The :class:`AnchoredGram` of all rows (the centred Gram matrix :meth:`gram`
        computes, plus the products with the anchor)."""
        return self._anchored(with_anchor=True)

    def _anchored(self, *, with_anchor: bool) -> AnchoredGram:
        anchor = self.num_rows // 2
        gram = self._translated_pass(anchor, with_anchor)
        if not anchor_is_far(gram.centered, anchor):
            return gram
        return self._translated_pass(None, with_anchor)

    def _translated_pass(self, anchor: int | None, with_anchor: bool) -> AnchoredGram:
        """One pass over the data: the rows' products around row ``anchor``, or around the
        coordinate-wise median of the rows when ``anchor`` is ``None``."""
        import torch  # lazy: torch's CPU GEMM is ~2x OpenBLAS on these shapes

        size = self.num_rows
        centered = np.zeros((size, size), dtype=np.float64)
        products = np.zeros(size, dtype=np.float64)
        anchor_sq = 0.0
        for start, stop, block in self.blocks():
            tensor = torch.from_numpy(block)
            if anchor is None:
                point = torch.from_numpy(_column_medians(block))
                tensor -= point
            else:
                point = tensor[anchor].clone()
                tensor[:anchor] -= point  # torch: multi-threaded, no temporary copy
                tensor[anchor + 1 :] -= point
                tensor[anchor] = 0.0
            if with_anchor:
                point32 = point.numpy()
                anchor_sq += float(np.einsum("i,i->", point32, point32, dtype=np.float64))
                # einsum, not BLAS: alternating numpy BLAS with torch's thread pool stalls both
                along = np.einsum("ij,j->i", block, point32).astype(np.float64)
                if not np.all(np.abs(along) <= HUGE):  # float32 overflow (or NaN): float64
                    along = np.einsum("ij,j->i", block, point32, dtype=np.float64)
                products += along
            part = _block_products(block, torch)
            if part is None:  # values beyond float32 (deltas of an absurd model): float64
                exact = torch.from_numpy(self.exact_block(start, stop))
                exact -= point.double() if anchor is None else exact[anchor].clone()
                part = (exact @ exact.T).numpy()
            centered += part
        return AnchoredGram((centered + centered.T) / 2.0, products, anchor_sq)

    def _uncentered_gram(self) -> np.ndarray:
        import torch

        size = self.num_rows
        result = np.zeros((size, size), dtype=np.float64)
        for start, stop, block in self.blocks():
            part = _block_products(block, torch)
            if part is None:
                exact = torch.from_numpy(self.exact_block(start, stop))
                part = (exact @ exact.T).numpy()
            result += part
        return (result + result.T) / 2.0

    def squared_norms(self, rows: Sequence[int] | None = None) -> np.ndarray:
        """Squared Euclidean norm of each selected row (float64)."""
        size = self.num_rows if rows is None else len(rows)
        result = np.zeros(size, dtype=np.float64)
        for start, stop, block in self.blocks(rows):
            # float32 sums within a block (a few thousand terms), float64 across blocks
            part = np.einsum("ij,ij->i", block, block).astype(np.float64)
            if not _safe_norms(part, block):
                exact = self.exact_block(start, stop, rows)
                part = np.einsum("ij,ij->i", exact, exact)
            result += part
        return result

    def combine(self, weights: np.ndarray, rows: Sequence[int] | None = None) -> np.ndarray:
        """Flat float32 vector ``sum_i weights[i] * row_i`` over the selected rows.

        Accumulates straight from the clients' layers, chunk by chunk (no stacked block):
        each selected row is read once, the chunk being summed stays in cache. Uses torch
        like :meth:`gram`: alternating numpy's BLAS and torch's thread pools in one
        aggregation stalls both (measured 3-5x slower). A non-finite result (a float32
        overflow of finite values) is recomputed in float64, and a weight beyond float32's
        range is applied in float64 directly; the result stays non-finite only when the
        exact sum lies beyond float32's range.
        """
        import torch  # lazy, see gram()

        selected = list(range(self.num_rows)) if rows is None else [int(r) for r in rows]
        coefficients = [(r, float(w)) for r, w in zip(selected, np.asarray(weights), strict=True)
                        if w != 0.0]
        base_weight = -sum(w for r, w in coefficients if r < self.n)
        out = np.zeros(self.d, dtype=np.float32)
        # a weight beyond float32 (a rescaled tiny row) cannot scale float32 values: float64
        limit = float(np.finfo(np.float32).max)
        wide = abs(base_weight) > limit or any(abs(w) > limit for _, w in coefficients)
        with warnings.catch_warnings():  # the rows may be read-only views: only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            if not wide:
                self._accumulate(coefficients, base_weight, out, torch.float32, torch)
            if wide or not _all_finite(out):
                exact = np.zeros(self.d, dtype=np.float64)
                self._accumulate(coefficients, base_weight, exact, torch.float64, torch)
                with np.errstate(over="ignore"):
                    out[:] = exact
        return out

    def _accumulate(
        self, coefficients: list[tuple[int, float]], base_weight: float, out: np.ndarray,
        dtype: Any, torch: Any,
    ) -> None:
        for layer in range(len(self.shapes)):
            lo, hi = int(self._offsets[layer]), int(self._offsets[layer + 1])
            if self._exact_layer[layer] and out.dtype == np.float32:  # see _fill_exact
                exact = np.zeros(hi - lo)
                self._accumulate_layer(layer, coefficients, base_weight, exact)
                out[lo:hi] = exact
                continue
            for start in range(0, hi - lo, COMBINE_CHUNK):
                stop = min(hi - lo, start + COMBINE_CHUNK)
                acc = torch.from_numpy(out[lo + start : lo + stop])
                for row, weight in coefficients:
                    values = torch.from_numpy(self._rows[row][layer][start:stop])
                    acc.add_(values.to(dtype), alpha=weight)
                if self._base is not None and base_weight:
                    base = torch.from_numpy(self._base[layer][start:stop])
                    acc.add_(base.to(dtype), alpha=base_weight)

    def _accumulate_layer(
        self, layer: int, coefficients: list[tuple[int, float]], base_weight: float,
        out: np.ndarray,
    ) -> None:
        """One non-float32 layer of :meth:`combine`, in float64 from the native values."""
        for row, weight in coefficients:
            out += weight * self._rows[row][layer].astype(np.float64)
        if self._base is not None and base_weight:
            out += base_weight * self._base[layer].astype(np.float64)

    def base_layers(self) -> list[np.ndarray] | None:
        """The ``base`` the client rows are offset by (the global model the updates build
        on), as read-only layer views of the update shapes; ``None`` when the rows are the
        updates as given (relative to the zero model)."""
        if self._base is None:
            return None
        layers = [flat.reshape(shape) for flat, shape in zip(self._base, self.shapes, strict=True)]
        for layer in layers:
            layer.flags.writeable = False
        return layers

    def row(self, index: int) -> np.ndarray:
        """One row as a new flat float32 vector."""
        out = np.empty(self.d, dtype=np.float32)
        for start, stop, block in self.blocks([index]):
            out[start:stop] = block[0]
        return out

    def squared_distances_to(self, vector: np.ndarray) -> np.ndarray:
        """``||row_i - vector||^2`` (float64) for every row, ``vector`` flat ``(d,)``."""
        result = np.zeros(self.num_rows, dtype=np.float64)
        for start, stop, block in self.blocks():
            with np.errstate(over="ignore"):
                np.subtract(block, vector[start:stop], out=block)
            part = np.einsum("ij,ij->i", block, block).astype(np.float64)
            if not _safe_norms(part, block):
                exact = self.exact_block(start, stop)
                exact -= vector[start:stop]
                part = np.einsum("ij,ij->i", exact, exact)
            result += part
        return result

    def subset(self, rows: Sequence[int] | np.ndarray) -> UpdateMatrix:
        """A matrix over the client rows ``rows`` only (sharing the data, no copy)."""
        selected = [int(r) for r in rows]
        if not selected or min(selected) < 0 or max(selected) >= self.n:
            raise ValueError(f"subset rows must be client indices in 0..{self.n - 1}")
        part = copy.copy(self)
        part._rows = [self._rows[r] for r in selected]
        part.n = part.num_rows = len(selected)
        part.__dict__.pop("nbytes", None)
        return part

    # ------------------------------------------------------------------ shapes
    def unflatten(self, flat: np.ndarray) -> list[np.ndarray]:
        """Split a flat ``(d,)`` vector into arrays of the layer shapes (views of ``flat``)."""
        return [
            flat[self._offsets[k] : self._offsets[k + 1]].reshape(shape)
            for k, shape in enumerate(self.shapes)
        ]

    @cached_property
    def nbytes(self) -> int:
        """Size of the ``n`` updates as float32 (the reference for memory targets)."""
        return 4 * self.n * self.d


class MixedUpdateMatrix(UpdateMatrix):
    """The rows ``Y = M X`` of a source matrix ``X`` for a small mixing matrix ``M``
    (``m x n``), never materialised.

    Pre-aggregation stages (nearest-neighbour mixing, bucketing, clipping) are such linear
    maps. Blocks are ``M[rows] @ block`` of the source blocks (a row scaling when ``M`` is
    diagonal); ``combine(w)`` is the source's ``combine(M^T w)``. When every mixed row is a
    convex combination of the source rows (NNM, bucketing), the Gram matrix comes from the
    source's :class:`AnchoredGram` (``source_gram`` when the stage already has it, otherwise
    computed once on first use) through :meth:`AnchoredGram.mixed`, exactly and without
    touching the data again. Other mixings (clipping) scale rows far from the anchor by
    factors that Gram algebra would multiply into float32 rounding of those rows' products,
    so their Gram matrix is computed by one pass over the mixed blocks. Norms come from the
    Gram matrix. Any rule runs on it unchanged.

    Parameters
    ----------
    source : UpdateMatrix
        The client updates (without extra rows).
    mixing : np.ndarray
        ``(m, source.n)`` mixing matrix.
    source_gram : AnchoredGram, optional
        The source's anchored Gram matrix, if already computed.
    """

    def __init__(
        self,
        source: UpdateMatrix,
        mixing: np.ndarray,
        *,
        source_gram: AnchoredGram | None = None,
    ) -> None:
        mixing = np.asarray(mixing, dtype=np.float64)
        if source.num_rows != source.n:
            raise ValueError("the source of a mixed matrix cannot have extra rows")
        if mixing.ndim != 2 or mixing.shape[1] != source.n or mixing.shape[0] == 0:
            raise ValueError(
                f"mixing matrix has shape {mixing.shape}, expected (m, {source.n}) with m >= 1"
            )
        self.source = source
        self.mixing = mixing
        self.shapes = source.shapes
        self._offsets = source._offsets
        self.d = source.d
        self.max_block_bytes = source.max_block_bytes
        self.n = self.num_rows = mixing.shape[0]
        self._source_gram = source_gram
        self._gram: AnchoredGram | None = None
        self._classify()

    def _classify(self) -> None:
        mixing = self.mixing
        self._convex = bool(np.all(mixing >= 0) and np.allclose(mixing.sum(axis=1), 1.0))
        square = mixing.shape[0] == mixing.shape[1]
        self._diagonal = square and not np.any(mixing - np.diag(np.diag(mixing)))

    def with_extra_rows(self, extra_rows: Sequence[np.ndarray]) -> MixedUpdateMatrix:
        """The mixed rows plus ``extra_rows`` (flat, unmixed)."""
        k = len(extra_rows)
        extended = copy.copy(self)
        extended.source = self.source.with_extra_rows(extra_rows)
        rows, columns = self.mixing.shape
        mixing = np.zeros((rows + k, columns + k))
        mixing[:rows, :columns] = self.mixing
        mixing[rows:, columns:] = np.eye(k)
        extended.mixing = mixing
        extended.num_rows = rows + k
        extended._source_gram = None
        extended._gram = None
        extended._classify()
        return extended

    def base_layers(self) -> list[np.ndarray] | None:
        """The source's ``base`` (mixing deltas keeps their reference model)."""
        return self.source.base_layers()

    def subset(self, rows: Sequence[int] | np.ndarray) -> MixedUpdateMatrix:
        """The mixed rows ``rows`` only."""
        if self.num_rows != self.n:
            raise ValueError("cannot take a subset of a mixed matrix with extra rows")
        selected = [int(r) for r in rows]
        return MixedUpdateMatrix(
            self.source, self.mixing[selected], source_gram=self._source_gram
        )

    def block_columns(self, num_rows: int) -> int:
        return self.source.block_columns(self.source.num_rows)

    def block_ranges(self, num_rows: int) -> list[tuple[int, int]]:
        return self.source.block_ranges(self.source.num_rows)

    def blocks(
        self, rows: Sequence[int] | None = None
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(start, stop, M[rows] @ source_block)`` (a reused float32 buffer)."""
        import torch  # same GEMM backend as the Gram matrices (no thread-pool ping-pong)

        selected = self.mixing if rows is None else self.mixing[[int(r) for r in rows]]
        if self._diagonal:  # clipping: scale the source rows
            indices = list(range(self.num_rows)) if rows is None else [int(r) for r in rows]
            factors = np.diag(self.mixing)[indices].astype(np.float32)[:, None]
            for start, stop, block in self.source.blocks(indices):
                block *= factors
                yield start, stop, block
            return
        mixing32 = torch.from_numpy(np.ascontiguousarray(selected, dtype=np.float32))
        buffer: np.ndarray | None = None
        for start, stop, block in self.source.blocks():
            width = stop - start
            if buffer is None:
                buffer = np.empty((len(selected), width), dtype=np.float32)
            out = buffer
            if buffer.shape[1] != width:
                out = np.empty((len(selected), width), dtype=np.float32)
            torch.matmul(mixing32, torch.from_numpy(block), out=torch.from_numpy(out))
            yield start, stop, out

    def exact_block(
        self, start: int, stop: int, rows: Sequence[int] | None = None
    ) -> np.ndarray:
        selected = self.mixing if rows is None else self.mixing[[int(r) for r in rows]]
        return selected @ self.source.exact_block(start, stop)

    def anchored_gram(self) -> AnchoredGram:
        """The mixed rows' anchored Gram matrix (computed at most once): from the source's
        for convex mixings, else by a pass over the mixed blocks."""
        if self._gram is None:
            if not self._convex:
                self._gram = self._anchored(with_anchor=True)
            else:
                if self._source_gram is None:
                    self._source_gram = self.source.anchored_gram()
                self._gram = self._source_gram.mixed(self.mixing)
        return self._gram

    def gram(self, *, centered: bool = True) -> np.ndarray:
        gram = self.anchored_gram()
        return gram.centered if centered else gram.uncentered()

    def squared_norms(self, rows: Sequence[int] | None = None) -> np.ndarray:
        norms = self.anchored_gram().squared_norms()
        return norms if rows is None else norms[np.asarray(rows, dtype=np.int64)]

    def combine(self, weights: np.ndarray, rows: Sequence[int] | None = None) -> np.ndarray:
        selected = self.mixing if rows is None else self.mixing[[int(r) for r in rows]]
        coefficients = selected.T @ np.asarray(weights, dtype=np.float64)
        support = np.flatnonzero(coefficients)
        if support.size == 0:
            return np.zeros(self.d, dtype=np.float32)
        return self.source.combine(coefficients[support], rows=support.tolist())
