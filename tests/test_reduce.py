"""Block reductions against a plain-Python reference (contract section 3).

Each case checks every implementation: `reduce.downsample` (what the job
calls), the numpy kernel and, where there is one, the compiled kernel.
"""

from __future__ import annotations

import collections
import fractions
import itertools
import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from beam_downsample.kernels import compiled, reduce

# ---------------------------------------------------------------------------
# plain-Python reference


def block(data: np.ndarray, c: int, ox: int, oy: int, oz: int, factor, c_order: bool = False) -> list:
    """The block's values as Python scalars, in block order (y fastest, then x, then z),
    or with `c_order` x slowest and z fastest (the order tensorstore sums a float mean in)."""
    fx, fy, fz = factor
    offsets = itertools.product(range(fx), range(fy), range(fz)) if c_order else (
        (dx, dy, dz) for dz in range(fz) for dx in range(fx) for dy in range(fy))
    return [data[c, ox * fx + dx, oy * fy + dy, oz * fz + dz].item() for dx, dy, dz in offsets]


def ref_median(values, dtype):
    """Integers: the exact mean of the middle pair truncated toward zero. Floats: as the
    reference's numpy median of the block (tests/golden): `(0 + a + b) / 2` in the dtype's
    precision, and for a block holding NaN the NaN numpy's median picks."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and any(v != v for v in values):
        with np.errstate(invalid="ignore"):
            return np.median(np.array(values, dtype=dtype))
    s = sorted(values)
    n = len(s)
    if n % 2:
        return s[n // 2]
    if dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            return (dtype.type(0) + dtype.type(s[n // 2 - 1]) + dtype.type(s[n // 2])) / dtype.type(2)
    total = s[n // 2 - 1] + s[n // 2]  # Python ints: exact, truncated toward zero
    return abs(total) // 2 * (1 if total >= 0 else -1)


def ref_mode(values, dtype):
    counts = collections.Counter(values)
    best = max(counts.values())
    for value in values:  # first occurrence in block order wins ties
        if counts[value] == best:
            return value


def ref_mean(values, dtype):
    """Integers: exact, half to even (Python's round of a Fraction). Floats: summed
    in their own precision in C order (see `block`), like tensorstore."""
    if np.dtype(dtype).kind in "iu":
        return round(fractions.Fraction(sum(values), len(values)))
    total = np.array(values[0], dtype=dtype)
    for v in values[1:]:
        total = (total + np.array(v, dtype=dtype)).astype(dtype)
    return (total / np.array(len(values), dtype=dtype)).astype(dtype)


REFERENCE = {
    "median": ref_median,
    "mode": ref_mode,
    "mean": ref_mean,
    "min": lambda values, dtype: min(values),
    "max": lambda values, dtype: max(values),
    "nearest": lambda values, dtype: values[0],
}


def reference(data: np.ndarray, factor, interpolation: str) -> np.ndarray:
    c, x, y, z = data.shape
    fx, fy, fz = factor
    out = np.zeros((c, x // fx, y // fy, z // fz), dtype=data.dtype)
    fn = REFERENCE[interpolation]
    for ci, ox, oy, oz in itertools.product(range(c), range(x // fx), range(y // fy), range(z // fz)):
        values = block(data, ci, ox, oy, oz, factor, c_order=interpolation == "mean" and data.dtype.kind == "f")
        out[ci, ox, oy, oz] = fn(values, data.dtype)
    return out


# ---------------------------------------------------------------------------
# data

FACTORS = [(2, 2, 1), (2, 2, 2), (1, 1, 2), (2, 1, 1), (4, 4, 1), (4, 2, 2), (1, 1, 1)]
DTYPES = ["uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64"]
OUT_SHAPE = (3, 4, 2)  # output voxels per axis


def make(dtype: str, factor, kind: str, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (channels,) + tuple(o * f for o, f in zip(OUT_SHAPE, factor))
    dtype = np.dtype(dtype)
    if kind == "ties":  # few distinct values, zero among them: many ties
        values = rng.integers(0, 3, shape)
        if dtype.kind == "i":
            values = values - 1
        return values.astype(dtype)
    if kind == "wide":
        if dtype.kind == "f":
            return (rng.standard_normal(shape) * 1000).astype(dtype)
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if kind == "big64":  # above 2**53, differing only in the low bits
        base = np.uint64(2**60 + 2**54)
        return (base + rng.integers(0, 3, shape).astype(np.uint64)).astype(np.uint64)
    if kind == "special":  # where arithmetic has choices: extremes; for floats NaN of both signs, zeros, inf
        return rng.choice(special_values(dtype), shape)
    raise AssertionError(kind)


def special_values(dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f":
        info = np.finfo(dtype)
        pool = np.array([np.nan, np.nan, 0.0, -0.0, np.inf, -np.inf, info.max, info.max * 0.9, -info.max,
                         info.smallest_subnormal, 3 * info.smallest_subnormal, info.tiny, 1.0, -2.5], dtype=dtype)
        pool[1] = -pool[1]  # a NaN with its sign bit set (inf - inf gives one)
        return pool
    info = np.iinfo(dtype)
    return np.array([info.min, info.min + 1, info.max, info.max - 1, 0, 1], dtype=dtype)


def compiled_scope(data, factor, interpolation) -> bool:
    """Cases the production path hands to the compiled kernels (given Fortran order)."""
    return interpolation in ("median", "mode") and tuple(factor) in COMPILED_FACTORS and data.dtype in compiled.DTYPES


def results(data, factor, interpolation) -> dict:
    """Every implementation's answer, by name: `downsample` (what the job calls), the numpy
    kernel, and `compiled`: `reduce.downsample` with the compiled kernels on, counted to have run."""
    out = {"downsample": reduce.downsample(data, factor, interpolation)}
    if tuple(factor) != (1, 1, 1):
        out["numpy"] = reduce.KERNELS[interpolation](data, factor)
    if compiled.available(data, factor, interpolation):
        calls = []
        real = compiled.downsample
        previous = list(reduce._COMPILED)  # pylint: disable=protected-access
        try:
            compiled.downsample = lambda *a: calls.append(a) or real(*a)
            reduce._COMPILED[:] = [compiled]  # pylint: disable=protected-access
            out["compiled"] = reduce.downsample(data, factor, interpolation)
        finally:
            compiled.downsample = real
            reduce._COMPILED[:] = previous  # pylint: disable=protected-access
        assert len(calls) == 1, "the compiled kernel did not run"
    return out


def bits(array: np.ndarray) -> np.ndarray:
    """Floats as their bits (NaN payloads, signed zeros); other arrays as they are."""
    return array.view(f"u{array.itemsize}") if array.dtype.kind == "f" else array


def check(data, factor, interpolation):
    """Every implementation against the plain-Python reference, on `data` in C and in Fortran
    order; in Fortran order the compiled kernel must have run wherever production uses it."""
    expected = reference(data, factor, interpolation)
    for layout in (np.ascontiguousarray(data), np.asfortranarray(data)):
        found = results(layout, factor, interpolation)
        if layout.flags.f_contiguous and layout.ndim == 4 and compiled_scope(layout, factor, interpolation):
            assert "compiled" in found
        for name, result in found.items():
            assert result.dtype == data.dtype, name
            assert result.shape == expected.shape, name
            np.testing.assert_array_equal(bits(result), bits(expected), err_msg=name)
    return found["downsample"]


@pytest.fixture(params=["compiled", "numpy"])
def backend(request, monkeypatch):
    """Runs a test of `reduce.downsample` once with and once without the compiled kernels."""
    monkeypatch.setattr(reduce, "_COMPILED", [compiled if request.param == "compiled" else None])
    return request.param


# ---------------------------------------------------------------------------
# every kernel, factor, dtype


KERNEL_CASES = [
    (interpolation, kind) for interpolation in ("median", "mode", "min", "max", "nearest")
    for kind in ("ties", "wide", "special")
    if not (kind == "special" and interpolation in ("min", "max"))  # which NaN or zero min/max keep: numpy decides
]


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")
@pytest.mark.parametrize("interpolation, kind", KERNEL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", FACTORS, ids=lambda f: "x".join(map(str, f)))
def test_kernel_matches_reference(interpolation, dtype, factor, kind):
    data = make(dtype, factor, kind, seed=zlib.crc32(repr((interpolation, dtype, factor, kind)).encode()))
    check(data, factor, interpolation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", FACTORS, ids=lambda f: "x".join(map(str, f)))
@pytest.mark.parametrize("kind", ["ties", "wide"])
def test_mean_matches_reference(dtype, factor, kind):
    check(make(dtype, factor, kind, seed=7), factor, "mean")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", [(2, 2, 2), (2, 2, 1), (4, 2, 1)], ids=lambda f: "x".join(map(str, f)))
def test_mean_bit_identical_to_tensorstore(dtype, factor):
    """The docs promise tensorstore's rounding for mean: checked against its downsample driver."""
    import tensorstore as ts  # pylint: disable=import-outside-toplevel

    data = make(dtype, factor, "wide", seed=11)
    if np.dtype(dtype).itemsize == 8 and np.dtype(dtype).kind in "iu":
        data = data // 8 * 8 + (data % 8)  # wide 64-bit values, above 2**53
    expected = ts.downsample(ts.array(data), [1, *factor], "mean")[...].read().result()
    np.testing.assert_array_equal(reduce.downsample(data, factor, "mean"), expected)


@pytest.mark.usefixtures("backend")
def test_signed_median_truncates_toward_zero():
    """Measured with the reference on int8/int16 layers: (-3 + -2) / 2 = -2.5 -> -2, not -3."""
    data = np.array([-3, -2, 3, 2, -128, -127, 127, 126], dtype=np.int8).reshape(1, 8, 1, 1)
    assert reduce.downsample(data, (2, 1, 1), "median").ravel().tolist() == [-2, 2, -127, 126]
    big = np.array([-(2**62) - 1, -(2**62) - 2], dtype=np.int64).reshape(1, 2, 1, 1)
    assert reduce.downsample(big, (2, 1, 1), "median").ravel().tolist() == [-(2**62) - 1]


@pytest.mark.usefixtures("backend")
def test_float_median_not_truncated():
    data = np.array([0.5, 1.0, -0.25, -2.0], dtype=np.float32).reshape(1, 4, 1, 1)
    assert reduce.downsample(data, (2, 1, 1), "median").ravel().tolist() == [0.75, -1.125]


def test_mean_rounds_half_to_even():
    data = np.array([1, 2, 2, 3, 3, 4, 5, 6], dtype=np.uint8).reshape(1, 8, 1, 1)
    # blocks of two: 1.5 -> 2, 2.5 -> 2, 3.5 -> 4, 5.5 -> 6
    assert reduce.downsample(data, (2, 1, 1), "mean").ravel().tolist() == [2, 2, 4, 6]
    data = np.array([-1, -2, -3, -2], dtype=np.int16).reshape(1, 4, 1, 1)
    assert reduce.downsample(data, (2, 1, 1), "mean").ravel().tolist() == [-2, -2]


@pytest.mark.parametrize("interpolation", ["median", "mode", "min", "max", "nearest"])
@pytest.mark.parametrize("factor", [(2, 2, 2), (4, 2, 2), (2, 2, 1)], ids=lambda f: "x".join(map(str, f)))
def test_uint64_above_2_53(interpolation, factor):
    data = make("uint64", factor, "big64", seed=3)
    result = check(data, factor, interpolation)
    if interpolation != "median":  # every value comes from the input, exactly
        assert set(result.ravel().tolist()) <= set(data.ravel().tolist())


@pytest.mark.usefixtures("backend")
def test_mode_uint64_exact_low_bits():
    base = 2**60 + 2**54
    values = [base + 1, base + 2, base + 2, base + 1, base + 3, base + 2, base + 1, base + 2]
    data = _one_block(values, dtype=np.uint64)
    assert reduce.downsample(data, (2, 2, 2), "mode").item() == base + 2
    assert reduce.downsample(data, (2, 2, 2), "nearest").item() == base + 1
    assert reduce.downsample(data, (2, 2, 2), "max").item() == base + 3


@pytest.mark.parametrize("factor", [(3, 1, 1), (1, 3, 1), (3, 3, 1), (3, 1, 3), (3, 2, 1)], ids=str)
@pytest.mark.parametrize("dtype", ["uint8", "uint64", "int16", "float32"])
def test_median_odd_and_other_block_sizes(factor, dtype):
    for kind in ("ties", "wide"):
        check(make(dtype, factor, kind, seed=11), factor, "median")


@pytest.mark.parametrize("interpolation", ["median", "mode", "mean", "min", "max", "nearest"])
@pytest.mark.parametrize("dtype", ["uint8", "uint32", "float32"])
def test_channels_reduced_independently(interpolation, dtype):
    factor = (2, 2, 2)
    data = make(dtype, factor, "ties", channels=3, seed=5)
    data[1] = make(dtype, factor, "wide", seed=6)[0]
    result = check(data, factor, interpolation)
    for c in range(3):
        np.testing.assert_array_equal(result[c : c + 1], reduce.downsample(data[c : c + 1].copy(), factor, interpolation))


@pytest.mark.parametrize("interpolation", ["median", "mode", "mean", "min", "max", "nearest"])
@pytest.mark.parametrize("factor", FACTORS + [(3, 1, 1)], ids=lambda f: "x".join(map(str, f)))
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", ["ties", "wide"])
def test_fortran_order_same_result(interpolation, factor, channels, kind):
    data = make("uint32", factor, kind, channels=channels, seed=9)
    if kind == "ties":  # mostly uniform blocks, a few mixed ones: the mode's sparse path
        data[:] = 1
        data.reshape(-1)[:: max(data.size // 7, 1)] = 2
    fortran = np.asfortranarray(data)
    assert fortran.flags.f_contiguous
    c_result = reduce.downsample(data, factor, interpolation)
    f_result = reduce.downsample(fortran, factor, interpolation)
    np.testing.assert_array_equal(c_result, f_result)
    np.testing.assert_array_equal(c_result, reference(data, factor, interpolation))


@pytest.mark.parametrize("interpolation", ["median", "mode", "min", "max", "nearest"])
def test_non_contiguous_input(interpolation):
    base = make("uint16", (4, 4, 4), "ties", channels=2, seed=2)
    view = base[:, 1:9, ::2, 2:6]  # (2, 8, 8, 4): strided, offset view
    check(view, (2, 2, 2), interpolation)


# ---------------------------------------------------------------------------
# hand-written cases


def _one_block(values, factor=(2, 2, 2), dtype=np.uint8):
    """One block holding `values` in block order."""
    fx, fy, fz = factor
    data = np.zeros((1, fx, fy, fz), dtype=dtype)
    for i, v in enumerate(values):
        dz, rest = divmod(i, fx * fy)
        dx, dy = divmod(rest, fy)
        data[0, dx, dy, dz] = v
    return data


@pytest.mark.usefixtures("backend")
def test_median_hand_cases():
    assert reduce.downsample(_one_block(range(1, 9)), (2, 2, 2), "median").item() == 4
    assert reduce.downsample(_one_block([8, 3, 1, 6, 2, 7, 5, 4]), (2, 2, 2), "median").item() == 4
    assert reduce.downsample(_one_block([0, 255] * 4), (2, 2, 2), "median").item() == 127
    assert reduce.downsample(_one_block([0] * 4 + [255] * 4), (2, 2, 2), "median").item() == 127
    assert reduce.downsample(_one_block([254, 255], (2, 1, 1)), (2, 1, 1), "median").item() == 254
    big = 2**32 - 1
    assert reduce.downsample(_one_block([big, big - 2, big, big], (2, 2, 1), np.uint32), (2, 2, 1), "median").item() == big
    # truncation towards zero, not floor
    assert reduce.downsample(_one_block([-3, 0], (2, 1, 1), np.int16), (2, 1, 1), "median").item() == -1
    assert reduce.downsample(_one_block([-32768, 32767], (2, 1, 1), np.int16), (2, 1, 1), "median").item() == 0
    assert reduce.downsample(_one_block([1.0, 2.0], (2, 1, 1), np.float32), (2, 1, 1), "median").item() == 1.5
    assert reduce.downsample(_one_block([5, 1, 9], (3, 1, 1)), (3, 1, 1), "median").item() == 5


@pytest.mark.usefixtures("backend")
def test_mode_tie_break_differs_from_c_order():
    # A at block positions 1 and 7, B at 4 and 5: tie 2-2, A comes first in block order
    # (in C order, z fastest, B would come first).
    a, b = 20, 30
    values = [9, a, 10, 11, b, b, 12, a]
    assert reduce.downsample(_one_block(values), (2, 2, 2), "mode").item() == a
    np.testing.assert_array_equal(
        reduce.downsample(np.asfortranarray(_one_block(values)), (2, 2, 2), "mode"), [[[[a]]]]
    )


@pytest.mark.usefixtures("backend")
def test_mode_tie_break_y_before_x():
    # B at (dx=0, dy=1) = block index 1, A at (dx=1, dy=0) = block index 2: B wins
    # (walking x fastest would pick A).
    a, b = 20, 30
    values = [9, b, a, 10, 11, 12, a, b]
    assert reduce.downsample(_one_block(values), (2, 2, 2), "mode").item() == b


@pytest.mark.usefixtures("backend")
def test_mode_zero_is_a_label():
    assert reduce.downsample(_one_block([5, 0, 0, 0, 5, 5, 7, 0], dtype=np.uint32), (2, 2, 2), "mode").item() == 0
    assert reduce.downsample(_one_block([0, 5, 5, 0, 3, 3, 3, 9], dtype=np.uint32), (2, 2, 2), "mode").item() == 3
    assert reduce.downsample(_one_block([0, 5, 5, 0, 1, 2, 3, 4], dtype=np.uint32), (2, 2, 2), "mode").item() == 0


def test_mode_large_block_counts():
    # 16*16*1 = 256 voxels per block: counts must not overflow a small counter type.
    values = [7] * 129 + [3] * 127
    data = _one_block(values, (16, 16, 1), np.uint32)
    assert reduce.downsample(data, (16, 16, 1), "mode").item() == 7
    values = [3] * 100 + [7] * 156
    data = _one_block(values, (16, 16, 1), np.uint32)
    assert reduce.downsample(data, (16, 16, 1), "mode").item() == 7


def test_nearest_is_first_voxel():
    data = _one_block([42, 1, 2, 3, 4, 5, 6, 7])
    assert data[0, 0, 0, 0] == 42
    assert reduce.downsample(data, (2, 2, 2), "nearest").item() == 42


def test_identity_factor_copies():
    data = make("uint8", (1, 1, 1), "wide")
    for interpolation in reduce.INTERPOLATIONS:
        result = reduce.downsample(data, (1, 1, 1), interpolation)
        np.testing.assert_array_equal(result, data)
        assert not np.shares_memory(result, data)


@pytest.mark.usefixtures("backend")
def test_input_not_modified():
    data = make("uint32", (2, 2, 2), "ties", channels=2)
    before = data.copy()
    for interpolation in reduce.INTERPOLATIONS:
        reduce.downsample(data, (2, 2, 2), interpolation)
    np.testing.assert_array_equal(data, before)


def test_errors():
    data = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="interpolation"):
        reduce.downsample(data, (2, 2, 1), "bicubic")
    with pytest.raises(ValueError):
        reduce.downsample(data, (2, 2, 2), "median")  # 3 not divisible by 2
    with pytest.raises(ValueError):
        reduce.downsample(np.zeros((4, 4, 4), dtype=np.uint8), (2, 2, 2), "mode")


def test_default_interpolation():
    assert reduce.DEFAULT_INTERPOLATION == {"color": "median", "segmentation": "mode"}


# ---------------------------------------------------------------------------
# compiled kernels: the same answers as numpy, bit for bit

COMPILED_FACTORS = [(2, 2, 1), (2, 2, 2)]


def test_compiled_kernels_cover_real_plans():
    """numba is a dependency: the factors real plans use must not fall back to numpy silently."""
    assert reduce._compiled() is compiled  # pylint: disable=protected-access
    for dtype, factor, interpolation in itertools.product(DTYPES, COMPILED_FACTORS, ["median", "mode"]):
        assert compiled.available(np.zeros((1, 4, 4, 4), dtype=dtype, order="F"), factor, interpolation)


@pytest.mark.parametrize("interpolation", ["median", "mode"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", COMPILED_FACTORS, ids=lambda f: "x".join(map(str, f)))
@pytest.mark.parametrize("out_shape", [(1, 1, 1), (5, 3, 7), (7, 1, 2)], ids=str)
@pytest.mark.parametrize("channels", [1, 3])
def test_compiled_odd_shapes(interpolation, dtype, factor, out_shape, channels):
    rng = np.random.default_rng(zlib.crc32(repr((interpolation, dtype, factor, out_shape, channels)).encode()))
    shape = (channels,) + tuple(o * f for o, f in zip(out_shape, factor))
    ties = rng.integers(0, 3, shape)
    if np.dtype(dtype).kind == "f":
        wide = rng.standard_normal(shape) * 1000
    else:
        info = np.iinfo(dtype)
        wide = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    for values in (ties, wide):
        data = np.asfortranarray(values.astype(dtype))
        check(data, factor, interpolation)
        check(np.ascontiguousarray(data), factor, interpolation)


@pytest.mark.parametrize("interpolation", ["median", "mode"])
@pytest.mark.parametrize("factor", COMPILED_FACTORS, ids=lambda f: "x".join(map(str, f)))
@pytest.mark.parametrize("dtype", ["int64", "uint64"])
def test_compiled_64_bit_extremes(interpolation, factor, dtype):
    """Values at the ends of the range and above 2**53: no float rounding, no overflow."""
    info = np.iinfo(dtype)
    pool = np.array([info.min, info.min + 1, info.max, info.max - 1, 2**53 + 1, 2**60 + 3, 0, 1], dtype=dtype)
    if dtype == "int64":
        pool = np.concatenate([pool, np.array([-(2**53) - 1, -(2**62) - 1, -1], dtype=dtype)])
    rng = np.random.default_rng(4)
    data = np.asfortranarray(pool[rng.integers(0, len(pool), (1, 8 * factor[0], 6 * factor[1], 4 * factor[2]))])
    check(data, factor, interpolation)


def _segmentation_crop(shape) -> np.ndarray:
    from beam_downsample import demo  # pylint: disable=import-outside-toplevel

    seg = demo.load_segmentation()
    x, y, z = shape
    return np.asfortranarray(seg[200:200 + x, 180:180 + y, 300:300 + z])[None]


@pytest.mark.parametrize("factor", COMPILED_FACTORS, ids=lambda f: "x".join(map(str, f)))
def test_compiled_real_segmentation(factor):
    """The real 512^3 segmentation (mostly uniform blocks, real label borders)."""
    small = _segmentation_crop((48, 48, 16))
    check(small, factor, "mode")
    check(small.astype(np.uint64, order="F") + np.uint64(2**60), factor, "mode")
    check((small % 251).astype(np.uint8, order="F"), factor, "median")
    big = _segmentation_crop((256, 256, 64))  # too big for the loop reference: numpy against compiled
    for data, interpolation in ((big, "mode"), ((big % 65521).astype(np.uint16, order="F"), "median")):
        found = results(data, factor, interpolation)
        assert set(found) == {"downsample", "numpy", "compiled"}
        np.testing.assert_array_equal(found["compiled"], found["numpy"])
        np.testing.assert_array_equal(found["downsample"], found["numpy"])


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("interpolation", ["median", "mode"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("factor", COMPILED_FACTORS, ids=lambda f: "x".join(map(str, f)))
def test_compiled_nan_inf_signed_zero_like_numpy(interpolation, dtype, factor):
    """NaN of both signs, infinities and both zeros: the compiled path gives the numpy kernel's bits."""
    pool = np.array([np.nan, -np.nan, 0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 3.5], dtype=dtype)
    rng = np.random.default_rng(8)
    seen = np.zeros(0, dtype=dtype)
    for weights in (None, [0.05, 0.05, 0.3, 0.3, 0.1, 0.05, 0.05, 0.05, 0.05]):
        picks = rng.choice(len(pool), size=(2, 16 * factor[0], 12 * factor[1], 6 * factor[2]), p=weights)
        data = np.asfortranarray(pool[picks])
        found = results(data, factor, interpolation)
        assert "compiled" in found
        bits = {name: r.view(f"u{r.dtype.itemsize}") for name, r in found.items()}
        np.testing.assert_array_equal(bits["compiled"], bits["numpy"])
        np.testing.assert_array_equal(bits["downsample"], bits["numpy"])
        seen = np.concatenate([seen, found["numpy"].ravel()])
    zeros = seen[seen == 0]
    assert np.isnan(seen).any() and zeros.size  # the cases were met
    if interpolation == "median":  # numpy's mean of the middle pair starts from +0.0, as the reference's
        assert not np.signbit(zeros).any()
    else:  # the mode keeps the first zero's sign
        assert np.signbit(zeros).any() and not np.signbit(zeros).all()


@pytest.mark.parametrize("interpolation", ["median", "mode", "mean"])
def test_downsample_box_writes_only_its_box(interpolation):
    """Reading a box of one array into a box of another, as `work.reduce_tile` does."""
    rng = np.random.default_rng(12)
    src = np.asfortranarray(rng.integers(0, 4, (2, 20, 18, 12)).astype(np.uint32))
    for factor, src_at, dst_at, shape in [((2, 2, 1), (2, 4, 1), (3, 0, 5), (4, 5, 7)),
                                          ((2, 2, 2), (0, 2, 4), (0, 1, 0), (10, 8, 4))]:
        dst = np.full((2, 14, 12, 12), 99, dtype=np.uint32, order="F")
        before = dst.copy(order="F")
        reduce.downsample_box(src, src_at, dst, dst_at, shape, factor, interpolation)
        source = (slice(None),) + tuple(slice(a, a + n * f) for a, n, f in zip(src_at, shape, factor))
        target = (slice(None),) + tuple(slice(a, a + n) for a, n in zip(dst_at, shape))
        np.testing.assert_array_equal(dst[target], reference(src[source], factor, interpolation))
        before[target] = dst[target]
        np.testing.assert_array_equal(dst, before)  # nothing outside the box touched
    with pytest.raises(ValueError):
        reduce.downsample_box(src, (12, 0, 0), dst, (0, 0, 0), (5, 2, 2), (2, 2, 1), "mode")


@pytest.mark.parametrize("interpolation,dtype", [("mode", "uint32"), ("median", "uint8")])
def test_compiled_levels_chained(interpolation, dtype, monkeypatch):
    """2-2-1 three times, then 2-2-2, through level buffers as a pass does: same as numpy."""
    data = _segmentation_crop((128, 128, 32))
    data = data.astype(dtype, order="F") if dtype == "uint32" else (data % 253).astype(dtype, order="F")
    factors = [(2, 2, 1), (2, 2, 1), (2, 2, 1), (2, 2, 2)]
    answers = {}
    for name in ("compiled", "numpy"):
        monkeypatch.setattr(reduce, "_COMPILED", [compiled if name == "compiled" else None])
        source, at, levels = data, (0, 0, 0), []
        shape = data.shape[1:]
        for factor in factors:
            shape = tuple(s // f for s, f in zip(shape, factor))
            buffer = np.zeros((1, shape[0] + 3, shape[1] + 1, shape[2] + 2), dtype=dtype, order="F")
            reduce.downsample_box(source, at, buffer, (3, 1, 2), shape, factor, interpolation)
            source, at = buffer, (3, 1, 2)
            levels.append(buffer[:, 3:, 1:, 2:].copy())
        answers[name] = levels
    expected = data
    for factor, ours, theirs in zip(factors, answers["compiled"], answers["numpy"]):
        expected = reduce.KERNELS[interpolation](expected, factor)
        np.testing.assert_array_equal(ours, expected)
        np.testing.assert_array_equal(theirs, expected)


_CACHE_PROBE = """
import json, sys, numpy as np
from beam_downsample.kernels import compiled, reduce
data = np.asfortranarray(np.arange(64, dtype=np.uint16).reshape(1, 4, 4, 4) % 5)
result = reduce.downsample(data, (2, 2, 2), "mode")
stats = compiled.mode_222.stats
print(json.dumps({"hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values()),
                  "result": result.ravel().tolist()}))
"""


def probe_twice(probe: str, cache_dir) -> list[dict]:
    """The JSON that `probe` prints, from two fresh processes one after the other on the kernel cache `cache_dir`."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    return [json.loads(subprocess.run([sys.executable, "-c", probe], env=env, check=True,
                                      capture_output=True, text=True).stdout) for _ in range(2)]


def test_compiled_cache_reused_by_next_process(tmp_path):
    """A cold worker compiles and stores; the next process loads instead of compiling."""
    runs = probe_twice(_CACHE_PROBE, tmp_path)
    assert runs[0]["misses"] >= 1 and runs[0]["hits"] == 0
    assert runs[1]["hits"] >= 1 and runs[1]["misses"] == 0
    assert any(tmp_path.rglob("*.nbi"))
    data = np.asfortranarray(np.arange(64, dtype=np.uint16).reshape(1, 4, 4, 4) % 5)
    assert runs[0]["result"] == runs[1]["result"] == reference(data, (2, 2, 2), "mode").ravel().tolist()


def test_numpy_kernels_on_request():
    """BEAM_DOWNSAMPLE_KERNELS=numpy: the numpy kernels only, and numba is never imported."""
    probe = ("import sys, numpy as np; from beam_downsample.kernels import reduce; "
             "r = reduce.downsample(np.ones((1, 4, 4, 2), np.uint8), (2, 2, 1), 'median'); "
             "print(reduce._compiled() is None, 'numba' in sys.modules, r.sum())")
    env = dict(os.environ, BEAM_DOWNSAMPLE_KERNELS="numpy")
    out = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True).stdout
    assert out.split() == ["True", "False", "8"]


def test_launcher_does_not_import_numba():
    """numba costs ~0.25 CPU-s to import: only processes that reduce a tile pay it."""
    probe = "import sys, beam_downsample.launch.cli, beam_downsample.transforms.work; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["False"]


@pytest.mark.parametrize("interpolation,dtype", [("mode", "uint32"), ("median", "uint8")])
def test_tiles_never_wait_for_the_compiled_kernels(interpolation, dtype, monkeypatch):
    """wait=False (the tile threads): until `prepare` has loaded a kernel the numpy kernel
    answers, bit-identical; afterwards the compiled one does."""
    import threading

    monkeypatch.setattr(reduce, "_LOADED", set())
    monkeypatch.setattr(reduce, "_LOADING", {})
    release, real_load = threading.Event(), reduce._load  # pylint: disable=protected-access

    def slow_load(keys):
        release.wait(30)
        real_load(keys)

    monkeypatch.setattr(reduce, "_load", slow_load)
    used = []
    real_box = compiled.downsample_box
    monkeypatch.setattr(compiled, "downsample_box", lambda *a, **k: used.append(a[-1]) or real_box(*a, **k))
    data = _segmentation_crop((64, 64, 32))
    data = data.astype(dtype, order="F") if dtype == "uint32" else (data % 253).astype(dtype, order="F")
    expected = reference(data, (2, 2, 1), interpolation)
    for step in ("before", "after"):
        dst = np.zeros((1, 32, 32, 32), dtype=dtype, order="F")
        reduce.downsample_box(data, (0, 0, 0), dst, (0, 0, 0), (32, 32, 32), (2, 2, 1), interpolation, wait=False)
        np.testing.assert_array_equal(dst, expected)
        if step == "before":
            assert used == []  # the loader is still held: numpy did it
            release.set()
            for thread in threading.enumerate():
                if thread.name == "beam-downsample-kernels":
                    thread.join(30)
            loaded = len(used)  # the loader's own first call
    assert len(used) == loaded + 1 and used[-1] == interpolation
