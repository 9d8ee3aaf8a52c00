"""Block reductions (median, mode, ...) with WEBKNOSSOS's exact rounding.

Pure numpy, no Beam; `downsample` hands median and mode (and the background-aware
reductions) at 2-2-1 and 2-2-2 to the compiled kernels of `compiled` (bit-identical,
3-10x faster), and
these numpy kernels do everything else and are the reference in tests. Every kernel takes an array shaped `(c, x, y, z)` and a
per-axis factor that divides x, y and z, and returns `(c, x/fx, y/fy, z/fz)`.
Blocks are never materialised as a reshaped copy: the kernels work on the
`fx*fy*fz` strided views of the input, ordered the way the reference walks a
block (y fastest, then x, then z), which is what the mode's tie-break needs.
The reductions over non-zero voxels (`--ignore-background`) are `background`'s,
named here `<interpolation>-nonzero` (`reduction`).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Sequence

import numpy as np

from beam_downsample.kernels import background
from beam_downsample.kernels.blocks import block_views, integer_mean_half_even, mean_of_two_truncated, mode_by

INTERPOLATIONS = ("median", "mode", "mean", "min", "max", "nearest")
DEFAULT_INTERPOLATION = {"color": "median", "segmentation": "mode"}


# --------------------------------------------------------------------------
# median


def _middle_pair_of_four(v: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Second and third smallest of four (a pruned sorting network)."""
    lo01, hi01 = np.minimum(v[0], v[1]), np.maximum(v[0], v[1])
    lo23, hi23 = np.minimum(v[2], v[3]), np.maximum(v[2], v[3])
    return np.maximum(lo01, lo23), np.minimum(hi01, hi23)


def _middle_pair_of_eight(v: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Fourth and fifth smallest of eight: Batcher's odd-even merge network,
    pruned to the comparators (and comparator halves) those two depend on."""
    s = list(v)

    def swap(i: int, j: int) -> None:
        s[i], s[j] = np.minimum(s[i], s[j]), np.maximum(s[i], s[j])

    for i, j in ((0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (1, 2), (5, 6)):
        swap(i, j)
    # Only one output of each remaining comparator matters.
    s4 = np.maximum(s[0], s[4])
    s5 = np.maximum(s[1], s[5])
    s2 = np.minimum(s[2], s[6])
    s3 = np.minimum(s[3], s[7])
    return np.minimum(s3, s5), np.maximum(s2, s4)


def median(data: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    """Median per block; an even block takes the truncated mean of its middle pair."""
    views = block_views(data, factor)
    n = len(views)
    if n == 1:
        return views[0].copy(order="K")
    if n == 2:
        low, high = views
    elif n == 4:
        low, high = _middle_pair_of_four(views)
    elif n == 8:
        low, high = _middle_pair_of_eight(views)
    else:
        stacked = np.stack(views)
        if data.dtype.kind == "f":  # a partition moves NaN aside: as numpy's median, with NaN checks
            with np.errstate(invalid="ignore"):
                return np.median(np.moveaxis(stacked, 0, -1), axis=-1).astype(data.dtype, copy=False)
        if n % 2:
            return np.partition(stacked, n // 2, axis=0)[n // 2]
        part = np.partition(stacked, (n // 2 - 1, n // 2), axis=0)
        low, high = part[n // 2 - 1], part[n // 2]
    if n % 2:  # unreachable for powers of two, kept for odd factors
        raise AssertionError
    result = mean_of_two_truncated(low, high, data.dtype)
    if data.dtype.kind == "f":
        median_nans(data, factor, result)
    return result


def median_nans(data: np.ndarray, factor: Sequence[int], result: np.ndarray) -> None:
    """Sets the medians of blocks that hold NaN to the NaN numpy's median of the block in
    block order gives, as the reference's: NaNs of both signs (from inf - inf at an earlier
    level) are chosen by numpy's partition, which no sorting network reproduces. The
    networks of 2, 4 and 8 voxels give NaN for every block holding one, so only the NaN
    results are computed again."""
    nan = np.isnan(result)
    if not nan.any():
        return
    values = np.stack([view[nan] for view in block_views(data, factor)], axis=-1)
    with np.errstate(invalid="ignore"):
        result[nan] = np.median(values, axis=-1)


# --------------------------------------------------------------------------
# mode


def _mode_of_views(views: list[np.ndarray]) -> np.ndarray:
    """Most frequent value; ties go to the value seen first in block order.

    Counts, for each position i, how often its value occurs at positions
    after i. The first occurrence of a value carries its full count and any
    later occurrence a smaller one, so the first position with the largest
    count is the first occurrence of the earliest most frequent value.
    """
    n = len(views)
    best_value = views[0].copy(order="K")
    if n == 1:
        return best_value
    count_dtype = np.uint8 if n < 256 else np.uint32
    best_count = np.ones(views[0].shape, dtype=count_dtype)
    for i in range(n - 1):
        count = np.ones(views[0].shape, dtype=count_dtype)
        for j in range(i + 1, n):
            count += views[i] == views[j]
        if i == 0:
            best_count = count
            continue
        better = count > best_count
        np.copyto(best_value, views[i], where=better)
        np.copyto(best_count, count, where=better)
    return best_value


def mode(data: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    """Mode per block (zero is an ordinary label); uniform blocks are answered at once (`blocks.mode_by`)."""
    return mode_by(data, factor, _mode_of_views)


# --------------------------------------------------------------------------
# the rest


def nearest(data: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    """The block's first voxel (dx = dy = dz = 0)."""
    fx, fy, fz = factor
    block_views(data, factor)  # validates the shape
    return data[:, ::fx, ::fy, ::fz].copy(order="K")


def _fold(data: np.ndarray, factor: Sequence[int], ufunc: np.ufunc) -> np.ndarray:
    views = block_views(data, factor)
    result = views[0].copy(order="K")
    for view in views[1:]:
        ufunc(result, view, out=result)
    return result


def minimum(data: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    return _fold(data, factor, np.minimum)


def maximum(data: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    return _fold(data, factor, np.maximum)


def mean(data: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    """Block mean exactly as tensorstore's downsample driver computes it.

    Integers round half to even. Floats are summed in their own precision
    in the driver's order (x slowest, z fastest), so the bits agree too.
    """
    views = block_views(data, factor)
    n = len(views)
    if data.dtype.kind == "f":
        fx, fy, fz = factor
        total = data[:, ::fx, ::fy, ::fz].copy(order="K")
        for dx in range(fx):
            for dy in range(fy):
                for dz in range(fz):
                    if dx or dy or dz:
                        total += data[:, dx::fx, dy::fy, dz::fz]
        total /= data.dtype.type(n)
        return total
    return integer_mean_half_even(views, n)


KERNELS: dict[str, Callable[[np.ndarray, Sequence[int]], np.ndarray]] = {
    "median": median,
    "mode": mode,
    "mean": mean,
    "min": minimum,
    "max": maximum,
    "nearest": nearest,
    **background.KERNELS,  # `--ignore-background`: mode-nonzero, median-nonzero, ...
}
reduction = background.reduction  # (interpolation, ignore_background) -> the name of its kernel


def downsample(data: np.ndarray, factor: Sequence[int], interpolation: str) -> np.ndarray:
    """Reduces `data` by `factor` with the named interpolation."""
    kernel = _kernel(interpolation)
    if tuple(factor) == (1, 1, 1) and interpolation in INTERPOLATIONS:  # (the background-aware ones tidy floats)
        return data.copy(order="K")
    fast = _compiled()
    if fast is not None and fast.available(data, factor, interpolation) and fast.ready(data, factor, interpolation):
        result = fast.downsample(data, factor, interpolation)
        if interpolation == "median" and data.dtype.kind == "f":
            median_nans(data, factor, result)
        return result
    return kernel(data, factor)


def downsample_box(src: np.ndarray, src_at: Sequence[int], dst: np.ndarray, dst_at: Sequence[int],
                   shape: Sequence[int], factor: Sequence[int], interpolation: str, wait: bool = True,
                   compiled: bool = True) -> None:
    """Reduces the box of `src` at `src_at` into the box of `dst` at `dst_at`, shaped
    `shape` in output voxels. A compiled kernel reads and writes the whole arrays
    in place (no copy of the box, no fresh pages, strides it can vectorise).

    `wait=False`: a compiled kernel is used only once `prepare` has loaded it;
    until then the numpy kernel (same result, bit for bit) does the work, so
    that the caller never waits for numba's import and cache load.
    `compiled=False` (little work: loading numba and its cached kernels would cost
    more than it saves) uses a compiled kernel only if it is loaded already, and
    never starts loading one."""
    kernel = _kernel(interpolation)
    if tuple(factor) != (1, 1, 1):
        if wait:
            fast = _compiled() if compiled or _COMPILED else None
        else:
            fast = _prepared(interpolation, factor, src.dtype, load=compiled)
        if (fast is not None and fast.available(src, factor, interpolation, dst)
                and fast.ready(src, factor, interpolation, load=wait and compiled)):
            fast.downsample_box(src, src_at, dst, dst_at, shape, factor, interpolation)
            if interpolation == "median" and src.dtype.kind == "f":
                median_nans(src[_box_index(src_at, shape, factor)], factor, dst[_box_index(dst_at, shape)])
            return
    source = _box_index(src_at, shape, factor)
    target = _box_index(dst_at, shape)
    copy = tuple(factor) == (1, 1, 1) and interpolation in INTERPOLATIONS
    dst[target] = src[source].copy(order="K") if copy else kernel(src[source], factor)


def _box_index(at: Sequence[int], shape: Sequence[int], factor: Sequence[int] = (1, 1, 1)) -> tuple:
    return (slice(None),) + tuple(slice(a, a + n * f) for a, n, f in zip(at, shape, factor))


# (interpolation, factor, dtype) whose compiled kernel `prepare` has loaded; the loader threads
_LOADED: set = set()
_LOADING: dict = {}
_LOAD_LOCK = threading.Lock()
_LOADERS: list = []  # loader threads started (joined by `wait_for_loaders` and `shutdown`)
_STOP = threading.Event()


def prepare(kernels: Sequence[tuple[str, Sequence[int], np.dtype]]) -> None:
    """Loads the compiled kernels for these (interpolation, factor, dtype) on a background
    thread: numba's import and cache load (~0.5 s, mostly holding the GIL) then overlap
    the first reads instead of stalling every tile thread on numba's compiler lock.

    The thread is no daemon: the interpreter never exits under it while it compiles
    (LLVM aborts or crashes then); `shutdown` stops it between kernels."""
    wanted = []
    for interpolation, factor, dtype in kernels:
        key = (interpolation, tuple(factor), np.dtype(dtype).str)
        with _LOAD_LOCK:
            if key in _LOADED or key in _LOADING or tuple(factor) == (1, 1, 1) or _STOP.is_set():
                continue
            _LOADING[key] = True
        wanted.append(key)
    if wanted:
        loader = threading.Thread(target=_load, args=(wanted,), name="beam-downsample-kernels")
        with _LOAD_LOCK:
            _LOADERS[:] = [thread for thread in _LOADERS if thread.is_alive()] + [loader]
        loader.start()


def wait_for_loaders() -> None:
    """Waits for the loader threads this process started: none of ours may outlive a run (a
    library call), and a thread inside numba's compiler at interpreter exit can crash it."""
    with _LOAD_LOCK:
        loaders = list(_LOADERS)
    for loader in loaders:
        loader.join()


def _load(keys) -> None:
    for interpolation, factor, dtype in keys:
        try:
            if _STOP.is_set():  # the run is over: numpy answers for what is not loaded
                continue
            fast = _compiled()
            sample = np.zeros((1, *(2 * f for f in factor)), dtype=np.dtype(dtype), order="F")
            if fast is not None and fast.available(sample, factor, interpolation):
                fast.ready(sample, factor, interpolation)  # compiles, or loads from the cache
        finally:
            with _LOAD_LOCK:
                _LOADED.add((interpolation, factor, dtype))
                _LOADING.pop((interpolation, factor, dtype), None)


def shutdown(timeout: float | None = None) -> bool:
    """Stops loading kernels (a kernel being compiled is finished) and waits for the loader
    threads, at most `timeout` seconds; True when none is left. Call before the interpreter exits."""
    _STOP.set()
    deadline = None if timeout is None else time.monotonic() + timeout
    with _LOAD_LOCK:
        loaders = list(_LOADERS)
    for thread in loaders:
        thread.join(None if deadline is None else max(deadline - time.monotonic(), 0))
    return not any(thread.is_alive() for thread in loaders)


def _prepared(interpolation: str, factor: Sequence[int], dtype: np.dtype, load: bool = True):
    """The compiled module if `prepare` has loaded this kernel, else None (and, with `load`,
    loading starts)."""
    key = (interpolation, tuple(factor), dtype.str)
    if key not in _LOADED:
        if load:
            prepare([(interpolation, factor, dtype)])
        return None
    return _COMPILED[0] if _COMPILED else None


def _kernel(interpolation: str):
    try:
        return KERNELS[interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}") from None


_COMPILED: list = []


def _compiled():
    """The compiled kernels, imported on first use (numba costs ~0.3 s to import,
    which the launcher never needs); None with BEAM_DOWNSAMPLE_KERNELS=numpy."""
    if not _COMPILED:
        if os.environ.get("BEAM_DOWNSAMPLE_KERNELS", "compiled") == "numpy":
            _COMPILED.append(None)
        else:
            from beam_downsample.kernels import compiled  # pylint: disable=import-outside-toplevel

            _COMPILED.append(compiled if compiled.numba is not None else None)
    return _COMPILED[0]
