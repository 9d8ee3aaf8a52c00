"""Compiled median and mode for the factors real plans use (2-2-1, 2-2-2), and
the reductions over non-zero voxels of `--ignore-background` (`background`).

numba kernels, bit-identical to the numpy kernels in `reduce` (which stay
the reference and cover everything else): the same block order (y fastest,
then x, then z) for the mode's tie-break, the same min/max network and
truncated mean of the middle pair for the median, the same NaN and signed
zero behaviour as numpy's `minimum`/`maximum` (`reduce.downsample_box` then
sets the NaN medians as `reduce.median_nans`). No Beam import.

Compiled code is cached on disk (`cache=True`): a worker process loads it
(~0.2 CPU-s, plus 0.25 to import numba) instead of compiling each kernel
and dtype again (~0.8 CPU-s); see `_cache_dir` for where. numba's cache is
not safe for processes that compile into one directory at once (two new
signatures of one function can be given the same data file, and a later
process then loads the wrong machine code for its dtype): every compile or
cache load of a kernel here happens in `ready`, holding an exclusive lock
on a file in the cache directory (`flock`; on NFS, too). Where no lock can
be taken, the cache moves to a directory of this machine, else of this
process.
Kernels release the GIL, so the tile threads of `work.run_unit` run them in
parallel.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from typing import Iterator, Sequence

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: the cache is then per process
    fcntl = None

import numpy as np

try:
    import numba
    from numba import types
    from numba.extending import overload
except ImportError:  # pragma: no cover - numba is a dependency; numpy still works without it
    numba = None

FACTORS = ((2, 2, 1), (2, 2, 2))
DTYPES = frozenset(np.dtype(t) for t in (
    "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64"))


def _cache_dir() -> None:
    """numba caches beside this module, else in ~/.cache/numba; where neither
    is writable (a read-only site-packages and home, as in some containers)
    it would refuse to cache at all, so fall back to a per-user temp dir."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    user = os.path.join(os.path.expanduser("~"), ".cache")
    if os.access(here if os.path.isdir(here) else os.path.dirname(here), os.W_OK):
        return
    if os.access(user if os.path.isdir(user) else os.path.expanduser("~"), os.W_OK):
        return
    numba.config.CACHE_DIR = _machine_cache_dir()


def available(src: np.ndarray, factor: Sequence[int], interpolation: str, dst: np.ndarray | None = None) -> bool:
    """Whether `src` (and `dst`) have a compiled kernel for `interpolation` at `factor`:
    Fortran order (the layout of tiles and level buffers) is required, as the
    kernels walk the memory flat."""
    return (
        numba is not None
        and (interpolation, tuple(factor)) in KERNELS
        and src.dtype in DTYPES
        and src.dtype.isnative
        and src.ndim == 4
        and src.flags.f_contiguous
        and (dst is None or (dst.dtype == src.dtype and dst.ndim == 4 and dst.shape[0] == src.shape[0]
                             and dst.flags.f_contiguous and dst.flags.writeable
                             and not np.may_share_memory(src, dst)))
    )


def downsample(data: np.ndarray, factor: Sequence[int], interpolation: str) -> np.ndarray:
    """`reduce.downsample` for the cases `available` accepts (the shape divisible by `factor`)."""
    if data.ndim != 4 or any(s % f for s, f in zip(data.shape[1:], factor)):
        raise ValueError(f"shape {data.shape[1:]} is not a multiple of factor {tuple(factor)}")
    shape = tuple(s // f for s, f in zip(data.shape[1:], factor))
    out = np.empty((data.shape[0], *shape), dtype=data.dtype, order="F")
    downsample_box(data, (0, 0, 0), out, (0, 0, 0), shape, factor, interpolation)
    return out


def downsample_box(src: np.ndarray, src_at: Sequence[int], dst: np.ndarray, dst_at: Sequence[int],
                   shape: Sequence[int], factor: Sequence[int], interpolation: str) -> None:
    """Reduces the box of `src` at `src_at` into the box of `dst` at `dst_at`
    shaped `shape` (in output voxels); both boxes must lie inside their arrays.
    Compiles or loads the kernel first if needed (`ready`)."""
    for a, at, n, f in zip(src.shape[1:], src_at, shape, factor):
        if at < 0 or at + n * f > a:
            raise ValueError(f"source box at {tuple(src_at)} of {tuple(shape)}x{tuple(factor)} outside {src.shape}")
    for a, at, n in zip(dst.shape[1:], dst_at, shape):
        if at < 0 or at + n > a:
            raise ValueError(f"target box at {tuple(dst_at)} of {tuple(shape)} outside {dst.shape}")
    if any(n == 0 for n in shape):
        return
    if not (src.flags.f_contiguous and dst.flags.f_contiguous):
        raise ValueError("the compiled kernels need Fortran-contiguous arrays")
    if not ready(src, factor, interpolation):
        raise RuntimeError(f"the compiled {interpolation} kernel at {tuple(factor)} could not be loaded")
    flat_src, flat_dst = src.reshape(-1, order="F"), dst.reshape(-1, order="F")  # views
    (nc, sx, sy, _), (_, dx, dy, _) = src.shape, dst.shape
    s0 = nc * (int(src_at[0]) + sx * (int(src_at[1]) + sy * int(src_at[2])))
    d0 = nc * (int(dst_at[0]) + dx * (int(dst_at[1]) + dy * int(dst_at[2])))
    KERNELS[interpolation, tuple(factor)](flat_src, s0, nc * sx, nc * sx * sy, flat_dst, d0, nc * dx, nc * dx * dy, nc,
                                          *(int(n) for n in shape))


# ---------------------------------------------------------------------------
# compiling and loading, one process of a machine (or cluster) at a time

LOCK_NAME = "beam-downsample-kernels.lock"
LOCK_WAIT_SECONDS = 600.0  # a compile holds the lock ~1 CPU-s; a holder stuck longer is not waited for

_READY: set = set()  # (interpolation, factor, dtype, writeable source): compiled or loaded in this process
_READY_LOCK = threading.Lock()


def ready(src: np.ndarray, factor: Sequence[int], interpolation: str, load: bool = True) -> bool:
    """Whether the kernel for `src`'s types is compiled in this process; with `load`, compiles it
    or loads it from the cache first, holding the cache directory's lock. False if that failed
    (the numpy kernels then do the work)."""
    key = (interpolation, tuple(factor), src.dtype.str, bool(src.flags.writeable))
    if key in _READY:
        return True
    if not load:
        return False
    with _READY_LOCK:
        if key in _READY:
            return True
        kernel = KERNELS[interpolation, tuple(factor)]
        sample = np.zeros(2 * int(np.prod(factor)), dtype=src.dtype)
        sample.setflags(write=src.flags.writeable)
        out = np.zeros(2, dtype=src.dtype)
        try:
            with _cache_lock():
                kernel(sample, 0, 0, 0, out, 0, 0, 0, 1, 0, 0, 0)  # an empty box: compiles or loads, touches nothing
        except (OSError, TimeoutError):
            return False
        _READY.add(key)
        return True


def cache_path() -> str | None:
    """The directory numba caches these kernels in (one for all: they share a source file)."""
    cache = getattr(median_221, "_cache", None)
    return getattr(cache, "cache_path", None)


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    """Holds the exclusive lock of the cache directory. Where no lock can be taken there
    (no flock on that filesystem), the cache moves to this machine's temp directory, and
    failing that to a directory of this process, which nobody else writes."""
    handle = None
    for fallback in (_machine_cache_dir, tempfile.mkdtemp, None):
        path = cache_path()
        if path is None:  # caching is off: nothing is shared
            break
        try:
            handle = _locked(os.path.join(path, LOCK_NAME))
            break
        except TimeoutError:
            raise
        except OSError:
            if fallback is None:
                break
            _move_cache(fallback())
    try:
        yield
    finally:
        if handle is not None:
            os.close(handle)  # releases the lock


def _machine_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), f"beam-downsample-numba-{os.getuid()}")


def _locked(path: str) -> int:
    """An open descriptor of `path` holding its exclusive flock (waits up to LOCK_WAIT_SECONDS)."""
    if fcntl is None:
        raise OSError("no flock on this platform")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} held for more than {LOCK_WAIT_SECONDS:.0f} s") from None
                time.sleep(0.02)
    except BaseException:
        os.close(handle)
        raise


def _move_cache(directory: str) -> None:
    """Caches every kernel of this module in `directory` from now on (before anything compiled)."""
    numba.config.CACHE_DIR = directory
    for dispatcher in _DISPATCHERS:
        dispatcher.enable_caching()


if numba is not None:
    _cache_dir()
    _jit = numba.njit(cache=True, nogil=True, boundscheck=False)
    _jit_inline = numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")

    # ----------------------------------------------------------------------
    # scalar helpers, chosen per dtype at compile time

    def _lo(a, b):  # pragma: no cover - compiled only
        """np.minimum: NaN wins, equal values give `b` (its signed zero)."""

    def _hi(a, b):  # pragma: no cover - compiled only
        """np.maximum: NaN wins, equal values give `b`."""

    def _mid(a, b):  # pragma: no cover - compiled only
        """`reduce._mean_of_two_truncated` for one pair."""

    @overload(_lo, jit_options={"cache": True})
    def _lo_impl(a, b):
        if isinstance(a, types.Float):
            return lambda a, b: a if (a < b or a != a) else b
        return lambda a, b: a if a < b else b

    @overload(_hi, jit_options={"cache": True})
    def _hi_impl(a, b):
        if isinstance(a, types.Float):
            return lambda a, b: a if (a > b or a != a) else b
        return lambda a, b: a if a > b else b

    @overload(_mid, jit_options={"cache": True})
    def _mid_impl(a, b):
        if isinstance(a, types.Float):
            kind = a

            def mid_float(a, b):  # numpy's mean of the pair, in the dtype's precision (+0.0 for zeros)
                return (kind(0.0) + a + b) / kind(2.0)

            return mid_float
        if isinstance(a, types.Integer) and a.bitwidth <= 32:
            kind = a

            def mid_narrow(a, b):
                total = np.int64(a) + np.int64(b)  # exact: no overflow in 64 bits
                half = total >> 1  # floor
                if total < 0:
                    half += total & 1  # truncate toward zero
                return kind(half)

            return mid_narrow
        if isinstance(a, types.Integer) and a.signed:
            kind = a

            def mid_int64(a, b):
                one = kind(1)
                floor = (a >> one) + (b >> one) + (a & b & one)
                if floor < kind(0):
                    floor += (a ^ b) & one
                return floor

            return mid_int64
        kind = a

        def mid_uint64(a, b):
            one = kind(1)
            return (a >> one) + (b >> one) + (a & b & one)

        return mid_uint64

    @_jit_inline
    def _pair4(v0, v1, v2, v3):
        """`reduce._middle_pair_of_four`: the second and third smallest of four."""
        return _hi(_lo(v0, v1), _lo(v2, v3)), _lo(_hi(v0, v1), _hi(v2, v3))

    @_jit
    def _median4(v0, v1, v2, v3):
        """The middle pair of four, then the truncated mean."""
        low, high = _pair4(v0, v1, v2, v3)
        return _mid(low, high)

    @_jit_inline
    def _pair8(v0, v1, v2, v3, v4, v5, v6, v7):
        """`reduce._middle_pair_of_eight`, comparator for comparator: the fourth and fifth smallest."""
        v0, v1 = _lo(v0, v1), _hi(v0, v1)
        v2, v3 = _lo(v2, v3), _hi(v2, v3)
        v4, v5 = _lo(v4, v5), _hi(v4, v5)
        v6, v7 = _lo(v6, v7), _hi(v6, v7)
        v0, v2 = _lo(v0, v2), _hi(v0, v2)
        v1, v3 = _lo(v1, v3), _hi(v1, v3)
        v4, v6 = _lo(v4, v6), _hi(v4, v6)
        v5, v7 = _lo(v5, v7), _hi(v5, v7)
        v1, v2 = _lo(v1, v2), _hi(v1, v2)
        v5, v6 = _lo(v5, v6), _hi(v5, v6)
        s4 = _hi(v0, v4)
        s5 = _hi(v1, v5)
        s2 = _lo(v2, v6)
        s3 = _lo(v3, v7)
        return _lo(s3, s5), _hi(s2, s4)

    @_jit
    def _median8(v0, v1, v2, v3, v4, v5, v6, v7):
        """The middle pair of eight, then the truncated mean."""
        low, high = _pair8(v0, v1, v2, v3, v4, v5, v6, v7)
        return _mid(low, high)

    @_jit
    def _mode4(v0, v1, v2, v3):
        """Most frequent of four, ties to the first in block order. As logic, not
        counts (64-bit counters halved the vector width): a value met twice wins
        unless one met later is met more often, which four voxels cannot hold."""
        if (v0 == v1) | (v0 == v2) | (v0 == v3):
            return v0
        if (v1 == v2) | (v1 == v3):
            return v1
        if v2 == v3:
            return v2
        return v0

    @_jit
    def _mode8(v0, v1, v2, v3, v4, v5, v6, v7):
        """Most frequent of eight, ties to the first in block order: the count of
        each position is 1 + how often its value comes again later, so only a
        value's first occurrence carries its full count."""
        c0 = 1 + (v0 == v1) + (v0 == v2) + (v0 == v3) + (v0 == v4) + (v0 == v5) + (v0 == v6) + (v0 == v7)
        if c0 >= 4:  # half or more: no other value can beat it, a tie goes to v0
            return v0
        c1 = 1 + (v1 == v2) + (v1 == v3) + (v1 == v4) + (v1 == v5) + (v1 == v6) + (v1 == v7)
        c2 = 1 + (v2 == v3) + (v2 == v4) + (v2 == v5) + (v2 == v6) + (v2 == v7)
        c3 = 1 + (v3 == v4) + (v3 == v5) + (v3 == v6) + (v3 == v7)
        c4 = 1 + (v4 == v5) + (v4 == v6) + (v4 == v7)
        c5 = 1 + (v5 == v6) + (v5 == v7)
        c6 = 1 + (v6 == v7)
        best, count = v0, c0
        if c1 > count:
            best, count = v1, c1
        if c2 > count:
            best, count = v2, c2
        if c3 > count:
            best, count = v3, c3
        if c4 > count:
            best, count = v4, c4
        if c5 > count:
            best, count = v5, c5
        if c6 > count:
            best = v6
        return best

    # ----------------------------------------------------------------------
    # kernels. The (c, x, y, z) arrays are Fortran order: channel, then x,
    # fastest. Each kernel reduces the box of `src` starting at (sx, sy, sz)
    # into the box of `dst` of shape (nx, ny, nz) starting at (dx, dy, dz),
    # walking both as flat memory with unsigned indices: numba then emits no
    # negative-index wraparound and LLVM vectorises the row loops (measured:
    # uint8 median 2-2-1 from 1.5 to 13 GVox/s, uint32 mode from 0.8 to 2.5).
    # A row of one channel is `n` voxels `step` apart (`step` = channels);
    # the one-channel case is its own call so the compiler sees `step == 1`.

    _U = np.uintp

    @_jit
    def _median_row4(s, a, b, d, o, n, step):
        for x in range(n):
            i, j, k = _U(a + 2 * step * x), _U(b + 2 * step * x), _U(step)
            d[_U(o + step * x)] = _median4(s[i], s[j], s[i + k], s[j + k])

    @_jit
    def _median_row8(s, a, b, e, f, d, o, n, step):
        for x in range(n):
            i, j, k = _U(a + 2 * step * x), _U(b + 2 * step * x), _U(step)
            p, q = _U(e + 2 * step * x), _U(f + 2 * step * x)
            d[_U(o + step * x)] = _median8(s[i], s[j], s[i + k], s[j + k], s[p], s[q], s[p + k], s[q + k])

    @_jit
    def _mode_row4(s, a, b, d, o, n, step):
        for x in range(n):
            i, j, k = _U(a + 2 * step * x), _U(b + 2 * step * x), _U(step)
            d[_U(o + step * x)] = _mode4(s[i], s[j], s[i + k], s[j + k])

    @_jit
    def _mode_row8(s, a, b, e, f, d, o, n, step):
        for x in range(n):
            i, j, k = _U(a + 2 * step * x), _U(b + 2 * step * x), _U(step)
            p, q = _U(e + 2 * step * x), _U(f + 2 * step * x)
            d[_U(o + step * x)] = _mode8(s[i], s[j], s[i + k], s[j + k], s[p], s[q], s[p + k], s[q + k])

    # Drivers: `s` and `d` are the flat memory of the source and target
    # arrays, `s0`/`d0` the boxes' first elements, `*ys`/`*zs` the strides of
    # y and z in elements, `nc` the channels; (nx, ny, nz) the target box.
    # Written out per reduction on purpose: one generic driver with the block's
    # reduction passed in and inlined (as the background drivers below do) ran
    # float32 median 2-2-2 at a third and uint16 mode 2-2-2 at half this speed
    # (benchmarks/kernels.py --size 256, three paired rounds).

    @_jit
    def median_221(s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz):
        for c in range(nc):
            for z in range(nz):
                for y in range(ny):
                    a = s0 + c + sys_ * 2 * y + szs * z
                    o = d0 + c + dys * y + dzs * z
                    if nc == 1:
                        _median_row4(s, a, a + sys_, d, o, nx, 1)
                    else:
                        _median_row4(s, a, a + sys_, d, o, nx, nc)

    @_jit
    def median_222(s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz):
        for c in range(nc):
            for z in range(nz):
                for y in range(ny):
                    a = s0 + c + sys_ * 2 * y + szs * 2 * z
                    o = d0 + c + dys * y + dzs * z
                    if nc == 1:
                        _median_row8(s, a, a + sys_, a + szs, a + szs + sys_, d, o, nx, 1)
                    else:
                        _median_row8(s, a, a + sys_, a + szs, a + szs + sys_, d, o, nx, nc)

    @_jit
    def mode_221(s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz):
        for c in range(nc):
            for z in range(nz):
                for y in range(ny):
                    a = s0 + c + sys_ * 2 * y + szs * z
                    o = d0 + c + dys * y + dzs * z
                    if nc == 1:
                        _mode_row4(s, a, a + sys_, d, o, nx, 1)
                    else:
                        _mode_row4(s, a, a + sys_, d, o, nx, nc)

    @_jit
    def mode_222(s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz):
        for c in range(nc):
            for z in range(nz):
                for y in range(ny):
                    a = s0 + c + sys_ * 2 * y + szs * 2 * z
                    o = d0 + c + dys * y + dzs * z
                    if nc == 1:
                        _mode_row8(s, a, a + sys_, a + szs, a + szs + sys_, d, o, nx, 1)
                    else:
                        _mode_row8(s, a, a + sys_, a + szs, a + szs + sys_, d, o, nx, nc)

    # ----------------------------------------------------------------------
    # `--ignore-background`: the reductions over a block's non-zero voxels,
    # bit-identical to `background`'s numpy kernels (whose docstring defines
    # them). Branch-free where it can be, so that LLVM still vectorises the rows.

    def _zero(a):  # pragma: no cover - compiled only
        """0 of `a`'s type."""

    def _tidy(a):  # pragma: no cover - compiled only
        """`background.tidy` for one value: floats give 0.0 for -0.0 and the standard NaN."""

    def _isnan(a):  # pragma: no cover - compiled only
        """NaN test; False for integers."""

    def _nan_of(a):  # pragma: no cover - compiled only
        """The standard NaN of `a`'s float type (0 for integers, never asked)."""

    def _ends(a):  # pragma: no cover - compiled only
        """(lowest, highest) value of `a`'s type (floats: -inf, +inf)."""

    def _count8(v0, v1, v2, v3, v4, v5, v6, v7):  # pragma: no cover - compiled only
        """Non-zero values among eight, as an unsigned integer as wide as the values
        (a 64-bit count would cut the vector lanes of uint8 data by eight)."""

    def _mean8(v0, v1, v2, v3, v4, v5, v6, v7):  # pragma: no cover - compiled only
        """`background.mean` of one block of up to eight (pad with 0)."""

    @overload(_zero, jit_options={"cache": True})
    def _zero_impl(a):
        kind = a
        return lambda a: kind(0)

    @overload(_tidy, jit_options={"cache": True})
    def _tidy_impl(a):
        if isinstance(a, types.Float):
            kind = a
            return lambda a: kind(np.nan) if a != a else (kind(0) if a == 0 else a)
        return lambda a: a

    @overload(_isnan, jit_options={"cache": True})
    def _isnan_impl(a):
        if isinstance(a, types.Float):
            return lambda a: a != a
        return lambda a: False

    @overload(_nan_of, jit_options={"cache": True})
    def _nan_of_impl(a):
        kind = a
        if isinstance(a, types.Float):
            return lambda a: kind(np.nan)
        return lambda a: kind(0)

    @overload(_ends, jit_options={"cache": True})
    def _ends_impl(a):
        kind = a
        if isinstance(a, types.Float):
            return lambda a: (kind(-np.inf), kind(np.inf))
        info = np.iinfo(f"{'int' if a.signed else 'uint'}{a.bitwidth}")
        low, high = int(info.min), int(info.max)
        return lambda a: (kind(low), kind(high))

    @overload(_count8, jit_options={"cache": True})
    def _count8_impl(v0, v1, v2, v3, v4, v5, v6, v7):
        lane = getattr(types, f"uint{v0.bitwidth}")

        def count8(v0, v1, v2, v3, v4, v5, v6, v7):
            return lane(lane(v0 != 0) + lane(v1 != 0) + lane(v2 != 0) + lane(v3 != 0)
                        + lane(v4 != 0) + lane(v5 != 0) + lane(v6 != 0) + lane(v7 != 0))

        return count8

    @overload(_mean8, jit_options={"cache": True})
    def _mean8_impl(v0, v1, v2, v3, v4, v5, v6, v7):
        kind = v0
        if isinstance(kind, types.Float):

            def mean_float(v0, v1, v2, v3, v4, v5, v6, v7):
                # zeros add nothing: the sum of all eight is the sum of the non-zero ones
                total = ((((((((0.0 + v0) + v1) + v2) + v3) + v4) + v5) + v6) + v7)
                count = _count8(v0, v1, v2, v3, v4, v5, v6, v7)
                return _tidy(kind(total / max(count, 1)) if count else kind(0))

            return mean_float
        if kind.bitwidth <= 32:

            def mean_narrow(v0, v1, v2, v3, v4, v5, v6, v7):
                total = (np.int64(v0) + np.int64(v1) + np.int64(v2) + np.int64(v3)
                         + np.int64(v4) + np.int64(v5) + np.int64(v6) + np.int64(v7))
                count = _count8(v0, v1, v2, v3, v4, v5, v6, v7)
                return kind(np.rint(np.float64(total) / max(count, 1))) if count else kind(0)

            return mean_narrow

        def mean_wide(v0, v1, v2, v3, v4, v5, v6, v7):
            # exact: each value split into q * count + r (`blocks.integer_mean_half_even`)
            count = _count8(v0, v1, v2, v3, v4, v5, v6, v7)
            k = np.int64(max(count, 1))
            d = kind(k)
            q = v0 // d + v1 // d + v2 // d + v3 // d + v4 // d + v5 // d + v6 // d + v7 // d
            r = (np.int64(v0 % d) + np.int64(v1 % d) + np.int64(v2 % d) + np.int64(v3 % d)
                 + np.int64(v4 % d) + np.int64(v5 % d) + np.int64(v6 % d) + np.int64(v7 % d))
            q += kind(r // k)
            twice = 2 * (r % k)
            if twice > k or (twice == k and q % kind(2) == kind(1)):
                q += kind(1)
            return q if count else kind(0)

        return mean_wide

    @_jit_inline
    def _mode4nz(v0, v1, v2, v3):
        """Most frequent non-zero of four, ties to the first; 0 if none. A non-zero value
        met twice wins unless one met later is met more often, which four cannot hold.
        Selects from the last rule to the first, without branches."""
        result = v0 if v0 != 0 else (v1 if v1 != 0 else (v2 if v2 != 0 else v3))  # all once: the first
        result = v2 if (v2 != 0) & (v2 == v3) else result
        result = v1 if (v1 != 0) & ((v1 == v2) | (v1 == v3)) else result
        result = v0 if (v0 != 0) & ((v0 == v1) | (v0 == v2) | (v0 == v3)) else result
        return _tidy(result)

    @_jit_inline
    def _mode8nz(v0, v1, v2, v3, v4, v5, v6, v7):
        """Most frequent non-zero of eight, ties to the first; 0 if none. A position's count
        is 1 + how often its value comes again later, 0 for background (`_mode8`)."""
        c0 = (1 + (v0 == v1) + (v0 == v2) + (v0 == v3) + (v0 == v4) + (v0 == v5) + (v0 == v6) + (v0 == v7)) * (v0 != 0)
        if c0 >= 4:  # half or more: no other value can beat it, a tie goes to v0
            return _tidy(v0)
        c1 = (1 + (v1 == v2) + (v1 == v3) + (v1 == v4) + (v1 == v5) + (v1 == v6) + (v1 == v7)) * (v1 != 0)
        c2 = (1 + (v2 == v3) + (v2 == v4) + (v2 == v5) + (v2 == v6) + (v2 == v7)) * (v2 != 0)
        c3 = (1 + (v3 == v4) + (v3 == v5) + (v3 == v6) + (v3 == v7)) * (v3 != 0)
        c4 = (1 + (v4 == v5) + (v4 == v6) + (v4 == v7)) * (v4 != 0)
        c5 = (1 + (v5 == v6) + (v5 == v7)) * (v5 != 0)
        c6 = (1 + (v6 == v7)) * (v6 != 0)
        c7 = 1 * (v7 != 0)
        best, count = v0, c0
        if c1 > count:
            best, count = v1, c1
        if c2 > count:
            best, count = v2, c2
        if c3 > count:
            best, count = v3, c3
        if c4 > count:
            best, count = v4, c4
        if c5 > count:
            best, count = v5, c5
        if c6 > count:
            best, count = v6, c6
        if c7 > count:
            best, count = v7, c7
        return _tidy(best if count else _zero(v0))

    @_jit
    def _klo(a, b):
        """The lesser of two (NaN order does not matter: a median over a NaN is NaN)."""
        return a if a < b else b

    @_jit
    def _khi(a, b):
        return b if a < b else a

    @_jit
    def _spread(v, odd, bottom, top):
        """A background voxel becomes `top`, or `bottom` after an odd number of earlier ones."""
        return (bottom if odd else top) if v == 0 else v

    @_jit_inline
    def _middle(k, a, b, nan, zero):
        """The median of `k` non-zero values whose middle pair is (a, b); 0 if none, NaN over a NaN."""
        low, high = _klo(a, b), _khi(a, b)
        result = low if k & 1 else _mid(low, high)
        return _nan_of(zero) if nan else _tidy(result if k else zero)

    # The median of a block's k non-zero values is the plain median's middle pair once
    # its z = n - k background voxels are replaced by the type's highest and lowest value
    # by turns, the first by the highest: floor(z/2) then sort below every value and
    # ceil(z/2) above, so the pair sits at the non-zero values' middle (an odd k takes
    # its lower value). The pruned networks of the plain median do the sorting.

    @_jit_inline
    def _median4nz(v0, v1, v2, v3):
        bottom, top = _ends(v0)
        z = _zero(v0)
        p1 = v0 == 0
        p2 = p1 ^ (v1 == 0)
        p3 = p2 ^ (v2 == 0)
        a, b = _pair4(_spread(v0, False, bottom, top), _spread(v1, p1, bottom, top), _spread(v2, p2, bottom, top),
                      _spread(v3, p3, bottom, top))
        nan = _isnan(v0) | _isnan(v1) | _isnan(v2) | _isnan(v3)
        return _middle(_count8(v0, v1, v2, v3, z, z, z, z), a, b, nan, z)

    @_jit_inline
    def _median8nz(v0, v1, v2, v3, v4, v5, v6, v7):
        bottom, top = _ends(v0)
        p1 = v0 == 0
        p2 = p1 ^ (v1 == 0)
        p3 = p2 ^ (v2 == 0)
        p4 = p3 ^ (v3 == 0)
        p5 = p4 ^ (v4 == 0)
        p6 = p5 ^ (v5 == 0)
        p7 = p6 ^ (v6 == 0)
        a, b = _pair8(_spread(v0, False, bottom, top), _spread(v1, p1, bottom, top), _spread(v2, p2, bottom, top),
                      _spread(v3, p3, bottom, top), _spread(v4, p4, bottom, top), _spread(v5, p5, bottom, top),
                      _spread(v6, p6, bottom, top), _spread(v7, p7, bottom, top))
        nan = (_isnan(v0) | _isnan(v1) | _isnan(v2) | _isnan(v3) | _isnan(v4) | _isnan(v5) | _isnan(v6)
               | _isnan(v7))
        return _middle(_count8(v0, v1, v2, v3, v4, v5, v6, v7), a, b, nan, _zero(v0))

    @_jit
    def _or_fill(v, fill):
        return fill if v == 0 else v

    @_jit_inline
    def _min8nz(v0, v1, v2, v3, v4, v5, v6, v7):
        """Least non-zero value (NaN wins, as np.minimum); 0 if none."""
        top = _ends(v0)[1]
        m = _lo(_lo(_lo(_or_fill(v0, top), _or_fill(v1, top)), _lo(_or_fill(v2, top), _or_fill(v3, top))),
                _lo(_lo(_or_fill(v4, top), _or_fill(v5, top)), _lo(_or_fill(v6, top), _or_fill(v7, top))))
        return _tidy(m if _count8(v0, v1, v2, v3, v4, v5, v6, v7) else _zero(v0))

    @_jit_inline
    def _max8nz(v0, v1, v2, v3, v4, v5, v6, v7):
        """Greatest non-zero value (NaN wins, as np.maximum); 0 if none."""
        bottom = _ends(v0)[0]
        m = _hi(_hi(_hi(_or_fill(v0, bottom), _or_fill(v1, bottom)), _hi(_or_fill(v2, bottom), _or_fill(v3, bottom))),
                _hi(_hi(_or_fill(v4, bottom), _or_fill(v5, bottom)), _hi(_or_fill(v6, bottom), _or_fill(v7, bottom))))
        return _tidy(m if _count8(v0, v1, v2, v3, v4, v5, v6, v7) else _zero(v0))

    @_jit_inline
    def _mean4nz(v0, v1, v2, v3):
        """Mean, min and max of a 2-2-1 block: as eight with four zeros (background, so the
        same answer; the constants fold away)."""
        z = _zero(v0)
        return _mean8(v0, v1, v2, v3, z, z, z, z)

    @_jit_inline
    def _min4nz(v0, v1, v2, v3):
        z = _zero(v0)
        return _min8nz(v0, v1, v2, v3, z, z, z, z)

    @_jit_inline
    def _max4nz(v0, v1, v2, v3):
        z = _zero(v0)
        return _max8nz(v0, v1, v2, v3, z, z, z, z)

    # Rows and drivers as for the median and mode above, one pair per factor for all five
    # reductions; `cell` is the reduction of one block (a compiled function passed on).

    @_jit_inline
    def _nonzero_row4(cell, s, a, b, d, o, n, step):
        for x in range(n):
            i, j, k = _U(a + 2 * step * x), _U(b + 2 * step * x), _U(step)
            d[_U(o + step * x)] = cell(s[i], s[j], s[i + k], s[j + k])

    @_jit_inline
    def _nonzero_row8(cell, s, a, b, e, f, d, o, n, step):
        for x in range(n):
            i, j, k = _U(a + 2 * step * x), _U(b + 2 * step * x), _U(step)
            p, q = _U(e + 2 * step * x), _U(f + 2 * step * x)
            d[_U(o + step * x)] = cell(s[i], s[j], s[i + k], s[j + k], s[p], s[q], s[p + k], s[q + k])

    @_jit_inline
    def _nonzero_221(cell, s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz):
        for c in range(nc):
            for z in range(nz):
                for y in range(ny):
                    a = s0 + c + sys_ * 2 * y + szs * z
                    o = d0 + c + dys * y + dzs * z
                    if nc == 1:
                        _nonzero_row4(cell, s, a, a + sys_, d, o, nx, 1)
                    else:
                        _nonzero_row4(cell, s, a, a + sys_, d, o, nx, nc)

    @_jit_inline
    def _nonzero_222(cell, s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz):
        for c in range(nc):
            for z in range(nz):
                for y in range(ny):
                    a = s0 + c + sys_ * 2 * y + szs * 2 * z
                    o = d0 + c + dys * y + dzs * z
                    if nc == 1:
                        _nonzero_row8(cell, s, a, a + sys_, a + szs, a + szs + sys_, d, o, nx, 1)
                    else:
                        _nonzero_row8(cell, s, a, a + sys_, a + szs, a + szs + sys_, d, o, nx, nc)

    # One compiled driver per reduction and factor. `op` is a closure variable, so a
    # compile-time constant that numba's cache keys on (a function would not be: its
    # pickle differs per process); numba prunes the other branches before it inlines, so
    # a driver compiles only its own reduction (a fifth of the time) and a process
    # compiles or loads only the reductions it uses.
    NONZERO = ("mode-nonzero", "median-nonzero", "mean-nonzero", "min-nonzero", "max-nonzero")  # by op

    def _nonzero_drivers(op: int):
        """(2-2-1 driver, 2-2-2 driver) of reduction `op`."""

        @_jit
        def at_221(s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz):
            if op == 0:
                _nonzero_221(_mode4nz, s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz)
            elif op == 1:
                _nonzero_221(_median4nz, s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz)
            elif op == 2:
                _nonzero_221(_mean4nz, s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz)
            elif op == 3:
                _nonzero_221(_min4nz, s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz)
            else:
                _nonzero_221(_max4nz, s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz)

        @_jit
        def at_222(s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz):
            if op == 0:
                _nonzero_222(_mode8nz, s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz)
            elif op == 1:
                _nonzero_222(_median8nz, s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz)
            elif op == 2:
                _nonzero_222(_mean8, s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz)
            elif op == 3:
                _nonzero_222(_min8nz, s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz)
            else:
                _nonzero_222(_max8nz, s, s0, sys_, szs, d, d0, dys, dzs, nc, nx, ny, nz)

        return at_221, at_222

    KERNELS = {
        ("median", (2, 2, 1)): median_221,
        ("median", (2, 2, 2)): median_222,
        ("mode", (2, 2, 1)): mode_221,
        ("mode", (2, 2, 2)): mode_222,
    }
    for _op, _name in enumerate(NONZERO):
        KERNELS[_name, (2, 2, 1)], KERNELS[_name, (2, 2, 2)] = _nonzero_drivers(_op)
    _DISPATCHERS = [value for value in list(globals().values()) if isinstance(value, numba.core.dispatcher.Dispatcher)]
    _DISPATCHERS += [driver for driver in KERNELS.values() if driver not in _DISPATCHERS]
else:  # pragma: no cover
    KERNELS = {}
    _DISPATCHERS = []
