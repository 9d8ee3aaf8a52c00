"""Reductions over a block's non-zero voxels (`--ignore-background`), in numpy, for
every interpolation and factor; `compiled` has the same for 2-2-1 and 2-2-2.

Background is 0 (in float layers 0.0 and -0.0). An output voxel is its
interpolation over the block's non-zero voxels only, taken in block order
(y fastest, then x, then z); a block without one gives 0. Channels are
reduced independently, each with its own background.

- mode: the most frequent non-zero value; a tie goes to the value met first.
- median: the middle non-zero value; of an even count the mean of the middle
  pair truncated toward zero (floats: in float64, rounded to the layer's
  type), as the plain median takes it.
- mean: integers, the exact mean of the non-zero values rounded half to even;
  floats, their sum in float64 in block order, divided by their count,
  rounded to the layer's type.
- min, max: of the non-zero values.
- nearest is not changed by it (`reduction` keeps its name).

Floats: NaN is not background but a value. A median, mean, min or max over
a NaN is NaN; the mode counts each NaN once (NaN equals nothing). No output
is -0.0, and a NaN output is the standard quiet NaN (`tidy`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from beam_downsample.kernels.blocks import block_views, integer_mean_half_even, mean_of_two_truncated, mode_by

SUFFIX = "-nonzero"


def reduction(interpolation: str, ignore_background: bool) -> str:
    """The kernel's name: `mode-nonzero` for the mode over non-zero voxels; `nearest`
    and every plain reduction keep the interpolation's name."""
    if ignore_background and interpolation != "nearest":
        return interpolation + SUFFIX
    return interpolation


def tidy(result: np.ndarray) -> np.ndarray:
    """Floats: -0.0 becomes 0.0 and every NaN the standard quiet NaN (in place)."""
    if result.dtype.kind == "f":
        result[result == 0] = 0
        result[np.isnan(result)] = np.nan
    return result


def nonzero_count(views: list[np.ndarray]) -> np.ndarray:
    """How many of each block's voxels are not background (int64)."""
    count = np.zeros(views[0].shape, dtype=np.int64)
    for view in views:
        count += view != 0
    return count


# --------------------------------------------------------------------------
# mode


def _mode_of_nonzero_views(views: list[np.ndarray]) -> np.ndarray:
    """Most frequent non-zero value, ties to the first in block order, 0 if none.

    A position's count is 1 + how often its value comes again later, or 0
    for background: the first occurrence of a value carries its full count,
    so the first position with the largest count is the answer.
    """
    n = len(views)
    count_dtype = np.uint8 if n < 256 else np.uint32
    best_value = views[0].copy(order="K")
    best_count = np.zeros(views[0].shape, dtype=count_dtype)
    for i in range(n):
        count = np.ones(views[0].shape, dtype=count_dtype)
        for j in range(i + 1, n):
            count += views[i] == views[j]
        count *= views[i] != 0
        better = count > best_count
        np.copyto(best_value, views[i], where=better)
        np.copyto(best_count, count, where=better)
    best_value[best_count == 0] = 0
    return best_value


def mode(data: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    return tidy(mode_by(data, factor, _mode_of_nonzero_views))


# --------------------------------------------------------------------------
# median


def _background_last(view: np.ndarray) -> np.ndarray:
    """Sort keys that order the non-zero values as they are and put 0 after all of them:
    unsigned v - 1 (0 wraps to the top), signed v - 1 above zero and 0 as the maximum,
    floats 0 as +inf (a real +inf ties with it, and equal keys are equal values)."""
    dtype = view.dtype
    if dtype.kind == "u":
        return view - dtype.type(1)
    if dtype.kind == "i":
        return np.where(view == 0, np.iinfo(dtype).max, view - (view > 0).astype(dtype)).astype(dtype)
    return np.where(view == 0, dtype.type(np.inf), view)


def _from_key(key: np.ndarray) -> np.ndarray:
    """The value of a `_background_last` key (of a non-zero value)."""
    dtype = key.dtype
    if dtype.kind == "u":
        return key + dtype.type(1)
    if dtype.kind == "i":
        return key + (key >= 0).astype(dtype)
    return key


def median(data: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    views = block_views(data, factor)
    count = nonzero_count(views)
    keys = np.stack([_background_last(view) for view in views])
    keys.sort(axis=0)
    low = np.take_along_axis(keys, np.maximum(count - 1, 0)[None] // 2, axis=0)[0]
    high = np.take_along_axis(keys, (count // 2)[None], axis=0)[0]
    low, high = _from_key(low), _from_key(high)
    with np.errstate(over="ignore", invalid="ignore"):
        result = np.where(count % 2 == 1, low, mean_of_two_truncated(low, high, data.dtype))
    if data.dtype.kind == "f":
        for view in views:
            result[np.isnan(view)] = np.nan
    result[count == 0] = 0
    return tidy(result)


# --------------------------------------------------------------------------
# mean, min, max


def mean(data: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    views = block_views(data, factor)
    count = nonzero_count(views)
    divisor = np.maximum(count, 1)
    if data.dtype.kind == "f":  # zeros add nothing: the sum of every voxel is the sum of the non-zero ones
        total = np.zeros(views[0].shape, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            for view in views:
                total += view
            result = (total / divisor).astype(data.dtype)
    else:
        result = integer_mean_half_even(views, divisor)
    result[count == 0] = 0
    return tidy(result)


def _fold_nonzero(data: np.ndarray, factor: Sequence[int], ufunc: np.ufunc, fill) -> np.ndarray:
    """`ufunc` folded over the non-zero voxels (background replaced by `fill`, which
    every value passes); 0 where a block has none."""
    views = block_views(data, factor)
    result = np.full(views[0].shape, fill, dtype=data.dtype)
    for view in views:
        ufunc(result, np.where(view != 0, view, fill), out=result)
    result[nonzero_count(views) == 0] = 0
    return tidy(result)


def _ends(dtype: np.dtype):
    """(lowest, highest) value of the type."""
    if dtype.kind == "f":
        return dtype.type(-np.inf), dtype.type(np.inf)
    info = np.iinfo(dtype)
    return dtype.type(info.min), dtype.type(info.max)


def minimum(data: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    return _fold_nonzero(data, factor, np.minimum, _ends(data.dtype)[1])


def maximum(data: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    return _fold_nonzero(data, factor, np.maximum, _ends(data.dtype)[0])


KERNELS: dict[str, Callable[[np.ndarray, Sequence[int]], np.ndarray]] = {
    "median" + SUFFIX: median,
    "mode" + SUFFIX: mode,
    "mean" + SUFFIX: mean,
    "min" + SUFFIX: minimum,
    "max" + SUFFIX: maximum,
}
