"""Column tiling shared by the compiled kernels and the code that sizes their outputs (kept
apart from :mod:`._kernels` so that sizing a result does not import numba)."""

TILE = 256  # coordinates per tile: n * TILE float32 values stay in L1/L2 for n <= 200


def num_tiles(columns: int) -> int:
    """Number of tiles the kernels split ``columns`` coordinates into."""
    return (columns + TILE - 1) // TILE
