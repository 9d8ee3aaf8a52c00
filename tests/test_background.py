"""`--ignore-background` kernels: every reduction over a block's non-zero voxels, at
every element class and several factors, against a brute-force oracle written
here (a loop over blocks with `collections.Counter`, `statistics` and exact
fractions), plus hypothesis properties.

Each case checks every implementation: `reduce.downsample` (what the job calls),
the numpy kernel and, at 2-2-1 and 2-2-2, the compiled kernel (on Fortran-order
input, which it needs; the tests assert it ran).
"""

from __future__ import annotations

import collections
import contextlib
import fractions
import itertools
import math
import statistics
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from beam_downsample.kernels import background, compiled, reduce
from test_reduce import _one_block, probe_twice

REDUCTIONS = ["mode", "median", "mean", "min", "max"]
DTYPES = ["uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64"]
FACTORS = [(2, 2, 1), (2, 2, 2), (1, 1, 2), (2, 1, 1), (4, 4, 1), (4, 2, 2), (3, 1, 1), (3, 3, 1), (1, 1, 1)]
COMPILED_FACTORS = [(2, 2, 1), (2, 2, 2)]
# The compiled kernels are one source per reduction; numba specialises it per dtype through the
# overloads of `compiled` (integer or float, signed or not, 64-bit). Each (reduction, factor,
# dtype) costs a compile of 5-13 s on a fresh cache (CI's), 100 of them for every dtype: the
# compiled kernels run on unsigned 8, 32 and 64 bits (above 2**53) and both floats, and on int16
# (signed: negative odd sums) for median and mean; the numpy kernels run on every dtype.
COMPILED_CASES = [(r, d) for r in REDUCTIONS for d in ("uint8", "uint32", "uint64", "float32", "float64")] + [
    ("median", "int16"), ("mean", "int16")]


# ---------------------------------------------------------------------------
# the oracle: one block at a time, Python numbers


def block_values(data: np.ndarray, c: int, ox: int, oy: int, oz: int, factor) -> list:
    """The block's voxels as Python numbers, y fastest, then x, then z."""
    fx, fy, fz = factor
    return [data[c, ox * fx + dx, oy * fy + dy, oz * fz + dz].item()
            for dz in range(fz) for dx in range(fx) for dy in range(fy)]


def oracle_value(values: list, interpolation: str, dtype: np.dtype):
    """The documented reduction of one block's values (docs/background.md)."""
    dtype = np.dtype(dtype)
    kept = [v for v in values if v != 0]  # -0.0 == 0 is background too; NaN != 0 is kept
    if interpolation == "nearest":
        return values[0]
    if not kept:
        return 0
    if interpolation == "mode":
        # NaN equals nothing: each NaN is a value of its own
        keys = [("nan", i) if v != v else v for i, v in enumerate(kept)]
        counts = collections.Counter(keys)
        top = max(counts.values())
        return next(v for k, v in zip(keys, kept) if counts[k] == top)  # the first in block order
    if any(v != v for v in kept):
        return math.nan
    if interpolation == "min":
        return min(kept)
    if interpolation == "max":
        return max(kept)
    if interpolation == "median":
        low, high = statistics.median_low(kept), statistics.median_high(kept)
        if len(kept) % 2:
            return low
        if dtype.kind == "f":
            return (float(low) + float(high)) / 2  # float64, rounded to the type below
        return math.trunc(fractions.Fraction(low + high, 2))  # toward zero, exact
    if interpolation == "mean":
        if dtype.kind == "f":
            total = 0.0
            for v in kept:  # float64, block order
                total += v
            return total / len(kept)
        return round(fractions.Fraction(sum(kept), len(kept)))  # half to even, exact
    raise AssertionError(interpolation)


def oracle(data: np.ndarray, factor, interpolation: str) -> np.ndarray:
    c, x, y, z = data.shape
    fx, fy, fz = factor
    out = np.zeros((c, x // fx, y // fy, z // fz), dtype=data.dtype)
    for ci, ox, oy, oz in itertools.product(range(c), range(x // fx), range(y // fy), range(z // fz)):
        value = oracle_value(block_values(data, ci, ox, oy, oz, factor), interpolation, data.dtype)
        if data.dtype.kind == "f" and interpolation != "nearest":
            value = data.dtype.type(value).item()  # rounded to the layer's type (float32: to nearest)
            value = 0.0 if value == 0 else (math.nan if value != value else value)  # no -0.0, the standard NaN
        out[ci, ox, oy, oz] = value
    return out


def bits(array: np.ndarray) -> np.ndarray:
    return array.view(f"u{array.itemsize}")


# ---------------------------------------------------------------------------
# data


def make(dtype: str, factor, kind: str, channels: int = 1, out_shape=(3, 4, 2), seed: int = 0,
         fortran: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (channels,) + tuple(o * f for o, f in zip(out_shape, factor))
    dtype = np.dtype(dtype)
    if kind == "sparse":  # mostly background, few labels: ties among non-zero values, all-zero blocks
        values = rng.choice([0, 0, 0, 0, 1, 2, 3], size=shape)
        if dtype.kind == "i":
            values = values * rng.choice([-1, 1], size=shape)
    elif kind == "wide":  # the whole range, a third background
        if dtype.kind == "f":
            values = rng.standard_normal(shape) * 1000
        else:
            info = np.iinfo(dtype)
            values = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        values = np.where(rng.random(shape) < 0.35, 0, values)
    elif kind == "special":  # floats: both zeros, NaN, infinities
        pool = np.array([0.0, -0.0, 0.0, -0.0, np.nan, np.inf, -np.inf, 1.5, -2.25, 1e-45, -1e-45])
        values = pool[rng.integers(0, len(pool), shape)]
    elif kind == "extremes":  # integers: the ends of the range, above 2**53
        info = np.iinfo(dtype)
        pool = [0, 0, 0, info.min, info.min + 1, info.max, info.max - 1, 1]
        if dtype.itemsize == 8:
            pool += [2**53 + 1, 2**60 + 3] + ([-(2**53) - 1, -(2**62) - 1] if dtype.kind == "i" else [])
        values = np.array(pool, dtype=dtype)[rng.integers(0, len(pool), shape)]
    else:
        raise AssertionError(kind)
    data = values.astype(dtype)
    return np.asfortranarray(data) if fortran else data


def kinds(dtype: str) -> list[str]:
    return ["sparse", "wide"] + (["special"] if np.dtype(dtype).kind == "f" else ["extremes"])


def implementations(data, factor, interpolation) -> dict:
    """Every implementation's answer for the background-aware `interpolation` (the compiled
    kernel's for the COMPILED_CASES; the others run the numpy kernels only)."""
    name = reduce.reduction(interpolation, True)
    fast = compiled.available(data, factor, name) and (interpolation, data.dtype.name) in COMPILED_CASES
    with contextlib.nullcontext() if fast else numpy_kernels_only():
        found = {"downsample": reduce.downsample(data, factor, name)}
    if name in background.KERNELS:  # nearest has no kernel of its own here
        found["numpy"] = background.KERNELS[name](data, factor)
    if fast:
        found["compiled"] = compiled.downsample(data, factor, name)
    return found


@contextlib.contextmanager
def numpy_kernels_only():
    """`reduce` as with BEAM_DOWNSAMPLE_KERNELS=numpy, meanwhile."""
    saved = list(reduce._COMPILED)  # pylint: disable=protected-access
    reduce._COMPILED[:] = [None]  # pylint: disable=protected-access
    try:
        yield
    finally:
        reduce._COMPILED[:] = saved  # pylint: disable=protected-access


def check(data, factor, interpolation) -> dict:
    expected = oracle(data, factor, interpolation)
    found = implementations(data, factor, interpolation)
    for name, result in found.items():
        assert result.dtype == data.dtype and result.shape == expected.shape, name
        differ = np.flatnonzero(bits(result) != bits(expected))
        assert differ.size == 0, (f"{name}: {differ.size} voxels differ, e.g. {result.ravel()[differ[:3]]} "
                                  f"instead of {expected.ravel()[differ[:3]]}")
    return found


# ---------------------------------------------------------------------------
# every reduction, element class and factor against the oracle


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")
@pytest.mark.parametrize("interpolation", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", FACTORS, ids=lambda f: "x".join(map(str, f)))
def test_numpy_kernels_match_the_oracle(interpolation, dtype, factor):
    for kind in kinds(dtype):
        data = make(dtype, factor, kind, seed=zlib.crc32(repr((interpolation, dtype, factor, kind)).encode()))
        check(data, factor, interpolation)


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")
@pytest.mark.parametrize("interpolation,dtype", COMPILED_CASES)
@pytest.mark.parametrize("factor", COMPILED_FACTORS, ids=lambda f: "x".join(map(str, f)))
@pytest.mark.parametrize("channels", [1, 3])
def test_compiled_kernels_match_the_oracle(interpolation, dtype, factor, channels):
    """Fortran order, as tiles and level buffers are: the compiled kernel must run."""
    for kind in kinds(dtype):
        for out_shape in ((5, 3, 7), (1, 1, 1)):
            data = make(dtype, factor, kind, channels, out_shape, fortran=True,
                        seed=zlib.crc32(repr((interpolation, dtype, factor, kind, channels)).encode()))
            assert "compiled" in check(data, factor, interpolation)


def test_compiled_kernels_cover_every_element_class():
    """numba is a dependency: 2-2-1 and 2-2-2 never fall back to numpy silently."""
    assert reduce._compiled() is compiled  # pylint: disable=protected-access
    for dtype, factor, interpolation in itertools.product(DTYPES, COMPILED_FACTORS, REDUCTIONS):
        name = reduce.reduction(interpolation, True)
        assert compiled.available(np.zeros((1, 4, 4, 4), dtype=dtype, order="F"), factor, name)


@pytest.mark.parametrize("factor", COMPILED_FACTORS, ids=lambda f: "x".join(map(str, f)))
def test_real_segmentation_made_sparse(segmentation, factor):
    """The bundled segmentation with most ids erased: compiled, numpy and the oracle agree."""
    crop = np.asfortranarray(segmentation[200:248, 180:228, 300:316])
    kept = np.unique(crop)[::7]
    data = np.asfortranarray(np.where(np.isin(crop, kept), crop, 0))[None]
    assert 0.05 < np.count_nonzero(data) / data.size < 0.5
    for interpolation in ("mode", "max"):
        assert "compiled" in check(data, factor, interpolation)
    big = np.asfortranarray(np.where(np.isin(segmentation[:256, :256, :64], kept), segmentation[:256, :256, :64], 0))[None]
    found = implementations(big, factor, "mode")  # too big for the oracle: the two kernels agree
    np.testing.assert_array_equal(found["compiled"], found["numpy"])


@pytest.mark.parametrize("interpolation", REDUCTIONS)
def test_compiled_levels_chained_through_buffers(interpolation):
    """2-2-1 twice, then 2-2-2, box into box as a pass does (offsets, margins): same as numpy."""
    data = make("uint32", (8, 8, 2), "sparse", out_shape=(6, 5, 3), seed=3, fortran=True)
    name = reduce.reduction(interpolation, True)
    source, at, expected = data, (0, 0, 0), data
    for factor in ((2, 2, 1), (2, 2, 1), (2, 2, 2)):
        shape = tuple(s // f for s, f in zip(expected.shape[1:], factor))
        buffer = np.full((1, shape[0] + 3, shape[1] + 1, shape[2] + 2), 7, dtype=data.dtype, order="F")
        assert compiled.available(source, factor, name, buffer)
        reduce.downsample_box(source, at, buffer, (3, 1, 2), shape, factor, name)
        expected = oracle(expected, factor, interpolation)
        np.testing.assert_array_equal(buffer[:, 3:, 1:, 2:], expected)
        assert (buffer[:, :3] == 7).all() and (buffer[:, :, :1] == 7).all()  # nothing outside the box
        source, at = buffer, (3, 1, 2)


# ---------------------------------------------------------------------------
# the definitions, by hand


def one_block(values, factor=(2, 2, 2), dtype=np.uint32) -> np.ndarray:
    """One block holding `values` in block order, in Fortran order (the compiled kernels run)."""
    return np.asfortranarray(_one_block(values, factor, dtype))


def every(values, interpolation, factor=(2, 2, 2), dtype=np.uint32) -> set:
    """The answers of every implementation, as a set of bit patterns' values (one if they agree)."""
    found = implementations(one_block(values, factor, dtype), factor, interpolation)
    assert len({bits(r).item() for r in found.values()}) == 1, found
    return found["numpy"].item()


def test_thin_object_survives_the_mode():
    assert reduce.downsample(one_block([0, 0, 0, 0, 0, 0, 0, 9]), (2, 2, 2), "mode").item() == 0
    assert every([0, 0, 0, 0, 0, 0, 0, 9], "mode") == 9
    assert every([0, 0, 0, 0, 0, 0, 0, 0], "mode") == 0


def test_mode_tie_goes_to_the_first_non_zero_in_block_order():
    assert every([0, 0, 5, 7, 7, 5, 0, 0], "mode") == 5  # 5 at position 2, 7 at position 3
    assert every([0, 7, 5, 0, 0, 0, 5, 7], "mode") == 7
    assert every([0, 0, 0, 3, 4, 4, 3, 3], "mode") == 3  # a majority wins over the first
    assert every([8, 0, 0, 0, 6, 0, 0, 0], "mode") == 8
    # y before x: position 1 is (dx=0, dy=1), position 2 is (dx=1, dy=0)
    assert every([0, 30, 20, 0], "mode", (2, 2, 1)) == 30


def test_median_of_an_even_count_is_the_truncated_mean_of_the_middle_pair():
    assert every([0, 0, 0, 0, 0, 0, 10, 3], "median") == 6  # (3 + 10) / 2 = 6.5 -> 6
    assert every([0, 1, 2, 3, 4, 0, 0, 0], "median") == 2  # (2 + 3) / 2 -> 2
    assert every([0, 0, 0, 0, 9, 0, 4, 1], "median") == 4  # odd count: the middle one
    assert every([0, -3, -2, 0], "median", (2, 2, 1), np.int16) == -2  # -2.5 toward zero
    assert every([0, 1.0, 2.0, 0], "median", (2, 2, 1), np.float32) == 1.5


def test_mean_is_the_rounded_mean_of_the_non_zero_values():
    assert every([0, 0, 0, 0, 0, 0, 1, 2], "mean") == 2  # 1.5 -> 2 (half to even)
    assert every([0, 0, 0, 0, 0, 2, 3, 0], "mean") == 2  # 2.5 -> 2
    assert every([0, 0, 0, 0, 0, 3, 4, 0], "mean") == 4  # 3.5 -> 4
    assert every([255, 0, 0, 0, 255, 0, 0, 254], "mean", dtype=np.uint8) == 255  # 254.67
    assert every([0, -1, -2, 0], "mean", (2, 2, 1), np.int8) == -2  # -1.5 -> -2
    top = 2**63 - 1
    assert every([top, 0, top - 1, 0], "mean", (2, 2, 1), np.int64) == top - 1  # top - 1.5 -> even: top - 1
    assert every([0, 0.1, 0.2, 0], "mean", (2, 2, 1), np.float32) == np.float32((np.float32(0.1).item() + np.float32(0.2).item()) / 2)


def test_min_and_max_skip_the_background():
    assert every([0, 0, 7, 0, 3, 0, 0, 0], "min") == 3
    assert every([0, -5, 0, -7], "max", (2, 2, 1), np.int16) == -5
    assert every([0, 5, 0, -7], "min", (2, 2, 1), np.int16) == -7
    assert every([0, 0, 0, 0], "min", (2, 2, 1), np.int16) == 0


def test_nearest_is_unchanged():
    assert reduce.reduction("nearest", True) == "nearest"
    data = one_block([0, 4, 4, 4, 4, 4, 4, 4])
    assert reduce.downsample(data, (2, 2, 2), reduce.reduction("nearest", True)).item() == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_background_nan_and_signed_zero(dtype):
    """-0.0 is background like 0.0; NaN is a value: median, mean, min and max over one are
    NaN, the mode counts each NaN once; no output is -0.0; NaN out is the standard NaN."""
    nan, neg = np.nan, -0.0
    for interpolation in REDUCTIONS:
        out = every([neg, neg, 0.0, neg, 0.0, 0.0, neg, neg], interpolation, dtype=dtype)
        assert out == 0 and not np.signbit(out)
        assert every([neg, 0.0, 2.5, neg, 0, 0, 0, 0], interpolation, dtype=dtype) == 2.5
    for interpolation in ("median", "mean", "min", "max"):
        assert np.isnan(every([0, 1.0, nan, 2.0, 0, 0, 0, 0], interpolation, dtype=dtype))
    assert every([0, 1.0, nan, 2.0, nan, 0, 2.0, 0], "mode", dtype=dtype) == 2.0  # NaN never counts twice
    assert np.isnan(every([0, nan, 1.0, 2.0, 0, 0, 0, 0], "mode", dtype=dtype))  # all once: the first
    payload = np.array([0x7FF4000000000001], dtype=np.uint64).view(np.float64)[0]  # a signalling NaN
    out = implementations(one_block([0, payload, 0, 0, 0, 0, 0, 0], dtype=dtype), (2, 2, 2), "max")
    standard = bits(np.array([np.nan], dtype=dtype)).item()
    assert {bits(r).item() for r in out.values()} == {standard}
    ulp, minus_two_ulp = np.array([0x00000001, 0x80000002], dtype=np.uint32).view(np.float32)
    mean_to_zero = every([0, ulp, minus_two_ulp, 0], "mean", (2, 2, 1), np.float32)  # -0.5 ulp: -0.0 in float32
    assert mean_to_zero == 0 and not np.signbit(mean_to_zero)


def test_all_zero_input_gives_zero_for_every_reduction():
    for dtype, factor, interpolation in itertools.product(DTYPES, FACTORS, REDUCTIONS):
        data = np.zeros((2, *(3 * f for f in factor)), dtype=dtype, order="F")
        for result in implementations(data, factor, interpolation).values():
            assert not result.any() and not np.signbit(result).any()


def test_channels_have_their_own_background():
    data = np.zeros((2, 2, 2, 2), dtype=np.uint8)
    data[0, 0, 0, 0], data[1, 1, 1, 1] = 5, 9  # channel 0 one voxel, channel 1 another
    out = reduce.downsample(np.asfortranarray(data), (2, 2, 2), "mode-nonzero")
    assert out.ravel().tolist() == [5, 9]


_CACHE_PROBE = """
import json, numpy as np
from beam_downsample.kernels import compiled, reduce
data = np.asfortranarray(np.arange(64, dtype=np.uint16).reshape(1, 4, 4, 4) % 3)
result = reduce.downsample(data, (2, 2, 2), "mode-nonzero")
driver = compiled.KERNELS["mode-nonzero", (2, 2, 2)]
other = compiled.KERNELS["median-nonzero", (2, 2, 2)]
print(json.dumps({"hits": sum(driver.stats.cache_hits.values()), "misses": sum(driver.stats.cache_misses.values()),
                  "median_compiled": bool(other.signatures) or sum(compiled._median8nz.stats.cache_misses.values()) > 0,
                  "result": result.ravel().tolist()}))
"""


def test_compiled_cache_reused_by_next_process_and_only_the_reduction_used_is_compiled(tmp_path):
    runs = probe_twice(_CACHE_PROBE, tmp_path)
    assert runs[0]["misses"] >= 1 and runs[0]["hits"] == 0
    assert runs[1]["hits"] >= 1 and runs[1]["misses"] == 0
    assert not runs[0]["median_compiled"] and not runs[1]["median_compiled"]
    data = np.asfortranarray(np.arange(64, dtype=np.uint16).reshape(1, 4, 4, 4) % 3)
    assert runs[0]["result"] == runs[1]["result"] == oracle(data, (2, 2, 2), "mode").ravel().tolist()


def test_unknown_reduction_named():
    with pytest.raises(ValueError, match="interpolation"):
        reduce.downsample(np.zeros((1, 2, 2, 2), np.uint8), (2, 2, 2), "nearest-nonzero")


# ---------------------------------------------------------------------------
# properties


def _blocks_strategy(dtypes=("uint8", "uint32", "int16", "uint64", "float32")):
    """(data, factor): small arrays, mostly background, in C or Fortran order."""

    @st.composite
    def build(draw):
        dtype = np.dtype(draw(st.sampled_from(dtypes)))
        factor = draw(st.sampled_from([(2, 2, 1), (2, 2, 2), (1, 2, 2), (4, 1, 1), (3, 2, 1)]))
        out = draw(st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2)))
        channels = draw(st.integers(1, 2))
        shape = (channels, *(o * f for o, f in zip(out, factor)))
        if dtype.kind == "f":
            elements = st.floats(-(2.0**100), 2.0**100, width=dtype.itemsize * 8)  # sums of eight stay finite
        else:
            info = np.iinfo(dtype)
            elements = st.integers(int(info.min), int(info.max))
        labels = draw(st.lists(elements, min_size=1, max_size=4))
        pick = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, len(labels) + 3)))
        table = np.array(labels + [0, 0, 0, 0], dtype=dtype)
        data = table[np.minimum(pick, len(table) - 1)]
        if draw(st.booleans()):
            data = np.asfortranarray(data)
        return data, factor

    return build()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_blocks_strategy(), interpolation=st.sampled_from(["mode", "min", "max"]))
def test_property_a_block_with_data_never_gives_zero(case, interpolation):
    data, factor = case
    result = implementations(data, factor, interpolation)["downsample"]
    any_data = np.zeros(result.shape, dtype=bool)
    for view in _views(data, factor):
        any_data |= view != 0
    assert (result[any_data] != 0).all()
    assert (result[~any_data] == 0).all()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_blocks_strategy(), interpolation=st.sampled_from(["mode", "min", "max", "nearest"]))
def test_property_the_result_is_one_of_the_blocks_values(case, interpolation):
    """mode, min and max: one of the block's non-zero values (0 only for a block without one);
    nearest: the block's first voxel, whatever it is (the option does not change it)."""
    data, factor = case
    result = implementations(data, factor, interpolation)["downsample"]
    views = _views(data, factor)
    for index in np.ndindex(result.shape):
        values = [v[index].item() for v in views]
        got = result[index].item()
        if interpolation == "nearest":
            assert got == values[0]
        else:
            assert got in [v for v in values if v != 0] or (got == 0 and not any(values))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_blocks_strategy(), interpolation=st.sampled_from(["mode", "median", "mean", "min", "max", "nearest"]))
def test_property_without_the_option_nothing_changes(case, interpolation):
    """Without --ignore-background the kernel name and every byte are the plain reduction's."""
    from test_reduce import reference  # the plain reductions' own oracle

    data, factor = case
    name = reduce.reduction(interpolation, False)
    assert name == interpolation
    result = reduce.downsample(data, factor, name)
    expected = reference(data, factor, interpolation).astype(data.dtype)
    # Equal values, equal bytes, except that -0.0 and 0.0 compare equal: which of them a median of
    # a block holding both returns depends on the sort's order of equal keys (hypothesis found
    # [-0, 0, -0, -0]), so floats compare by value, NaN equal to NaN.
    if data.dtype.kind == "f":
        np.testing.assert_array_equal(result, expected)
    else:
        assert result.tobytes() == expected.tobytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_blocks_strategy(), interpolation=st.sampled_from(REDUCTIONS))
def test_property_every_implementation_matches_the_oracle(case, interpolation):
    data, factor = case
    check(data, factor, interpolation)


def _views(data, factor) -> list[np.ndarray]:
    fx, fy, fz = factor
    return [data[:, dx::fx, dy::fy, dz::fz] for dz in range(fz) for dx in range(fx) for dy in range(fy)]
