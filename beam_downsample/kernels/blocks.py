"""What the numpy kernels share: a block's voxels as strided views in block
order, the truncated mean of a middle pair, and the mode's scaffolding (uniform
blocks answered at once, mixed blocks gathered and counted).

Pure numpy. `reduce` (plain reductions) and `background` (reductions over
the non-zero voxels) both build on it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def block_views(data: np.ndarray, factor: Sequence[int]) -> list[np.ndarray]:
    """The block's voxels as strided views, in block order `dy + fy*dx + fx*fy*dz`."""
    fx, fy, fz = factor
    if data.ndim != 4:
        raise ValueError(f"expected a (c, x, y, z) array, got shape {data.shape}")
    if any(s % f for s, f in zip(data.shape[1:], factor)):
        raise ValueError(f"shape {data.shape[1:]} is not a multiple of factor {tuple(factor)}")
    return [
        data[:, dx::fx, dy::fy, dz::fz]
        for dz in range(fz)
        for dx in range(fx)
        for dy in range(fy)
    ]


def mean_of_two_truncated(a: np.ndarray, b: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`(a + b) / 2` truncated toward zero, as the reference's float computation
    gives for every integer it can represent; floats as numpy's mean of the pair.

    Integers use exact integer arithmetic (no overflow, no float64 rounding),
    so 64-bit values above 2**53 come out exact: the floor of the mean is
    `(a >> 1) + (b >> 1) + (a & b & 1)`, and a negative odd sum rounds up
    to truncate toward zero (measured against the reference for int8/int16).

    Floats: `(0 + a + b) / 2` in the dtype's own precision, which is how the
    reference's numpy median averages the middle pair (tests/golden): a zero
    mean is +0.0 whatever the zeros' signs, and a float32 sum above the
    largest float32 is inf.
    """
    if dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            total = a + dtype.type(0)
            total += b
            total /= dtype.type(2)
        return total
    floor = (a >> 1) + (b >> 1) + (a & b & 1)
    if dtype.kind == "u":
        return floor
    return floor + ((a ^ b) & 1 & (floor < 0))


def mode_by(data: np.ndarray, factor: Sequence[int], of_views: Callable[[list[np.ndarray]], np.ndarray]) -> np.ndarray:
    """A mode per block: uniform blocks give their value, the mixed ones `of_views`
    of their voxels (in block order).

    Segmentations are mostly uniform blocks; those are answered by one
    comparison chain and only mixed blocks go through `of_views`.
    """
    views = block_views(data, factor)
    n = len(views)
    if n == 1:
        return views[0].copy(order="K")
    first = views[0]
    uniform = first == views[1]
    for view in views[2:]:
        uniform &= first == view
    result = first.copy(order="K")
    order = "F" if uniform.flags.f_contiguous and not uniform.flags.c_contiguous else "C"
    mixed = np.flatnonzero(np.ravel(~uniform, order=order))
    if mixed.size == 0:
        return result
    if mixed.size > uniform.size // 2 or not (data.flags.c_contiguous or data.flags.f_contiguous):
        return of_views(views)
    # Gather only the mixed blocks, straight from the input's memory.
    coords = np.unravel_index(mixed, uniform.shape, order=order)
    strides = [stride // data.itemsize for stride in data.strides]
    base = coords[0] * strides[0]
    for axis, f in enumerate(factor, start=1):
        base += coords[axis] * (f * strides[axis])
    flat = np.ravel(data, order="K")  # a view: data is contiguous
    fx, fy, fz = factor
    gathered = [
        flat.take(base + (dx * strides[1] + dy * strides[2] + dz * strides[3]))
        for dz in range(fz)
        for dx in range(fx)
        for dy in range(fy)
    ]
    flat_result = np.ravel(result, order=order)
    if not np.shares_memory(flat_result, result):  # pragma: no cover - layouts differ
        return of_views(views)
    flat_result[mixed] = of_views(gathered)
    return result


def integer_mean_half_even(views: list[np.ndarray], count) -> np.ndarray:
    """The sum of integer `views` divided by `count` (an int, or an int64 array shaped
    like a view; at least 1), rounded half to even, exactly.

    Up to 32 bits the float64 sum is exact and so is the rounding of the
    quotient (a fraction of .5 is representable, other ones stay far from it).
    64-bit values would lose digits above 2**53 in float64: each is split
    into `q * count + r` so the sum never overflows.
    """
    dtype = views[0].dtype
    if dtype.itemsize < 8:
        total = views[0].astype(np.float64)
        for view in views[1:]:
            total += view
        total /= count
        np.rint(total, out=total)
        return total.astype(dtype)
    divisor = np.asarray(count).astype(dtype)
    quotient = views[0] // divisor
    remainder = (views[0] % divisor).astype(np.int64)
    for view in views[1:]:
        quotient += view // divisor
        remainder += (view % divisor).astype(np.int64)
    quotient += (remainder // count).astype(dtype)
    remainder %= count
    twice = 2 * remainder
    round_up = (twice > count) | ((twice == count) & (quotient % dtype.type(2) == 1))
    quotient += round_up.astype(dtype)
    return quotient
