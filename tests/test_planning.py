"""Which mags get made (contract section 2) and how passes are tiled into work units."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from beam_downsample.core import mags
from beam_downsample.core.box import Box, region_in_mag, split_box
from beam_downsample.core.errors import PlanningError
from beam_downsample.core.grid import Pass, UnitBudget
from beam_downsample.plan.passes import group_passes
from beam_downsample.plan.pyramid import default_coarsest_mag, plan_mags
from beam_downsample.plan.units import plan_grid


def plan_units(*grid_args):
    """Every unit of the pass (a dense plan), in index order: `plan_grid`'s arguments."""
    grid = plan_grid(*grid_args)
    return grid.units(grid.all_indices())


M = mags.parse_mag
ONE = (1, 1, 1)


def names(plan):
    return [mags.mag_name(m) for m in plan]


# ---------------------------------------------------------------------------
# mags helpers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8", (8, 8, 8)),
        (8, (8, 8, 8)),
        ("16-16-8", (16, 16, 8)),
        ([16, 16, 8], (16, 16, 8)),
        ("1", (1, 1, 1)),
        (" 2-2-1 ", (2, 2, 1)),
    ],
)
def test_parse_mag(text, expected):
    assert M(text) == expected


@pytest.mark.parametrize("text", ["3", "8-8", "0", "-4", "abc", "2-2-3", "1-2-3-4", [2, 2], [2, 2, True], "", 6])
def test_parse_mag_rejects(text):
    with pytest.raises(mags.MagError):
        M(text)


@pytest.mark.parametrize(
    "mag, name", [((1, 1, 1), "1"), ((2, 2, 2), "2"), ((2, 2, 1), "2-2-1"), ((16, 16, 8), "16-16-8"), ((1, 1, 2), "1-1-2")]
)
def test_mag_name(mag, name):
    assert mags.mag_name(mag) == name


def test_sort_mags_finest_first():
    assert mags.sort_mags([(4, 4, 2), (1, 1, 1), (2, 2, 1), (8, 8, 4), (2, 2, 1)]) == [
        (1, 1, 1), (2, 2, 1), (4, 4, 2), (8, 8, 4)]


# ---------------------------------------------------------------------------
# golden rows of contract section 2

ANY_VOXEL_SIZES = [(10.5, 10.5, 24.0), (1.0, 1.0, 1.0), (32.0, 32.0, 40.0), (4.0, 4.0, 1.0)]

GOLDEN = [
    # (voxel size, mode, coarsest, source, align-with, expected)
    ((10.5, 10.5, 24), "anisotropic", "16", ONE, (), ["2-2-1", "4-4-2", "8-8-4", "16-16-8"]),
    ((10.5, 10.5, 35), "anisotropic", "16", ONE, (), ["2-2-1", "4-4-1", "8-8-2", "16-16-4"]),
    ((10.5, 10.5, 10.5), "anisotropic", "16", ONE, (), ["2", "4", "8", "16"]),
    ((1, 1, 4), "anisotropic", "16-16-2", ONE, (), ["2-2-1", "4-4-1", "8-8-2", "16-16-2"]),
    ((11.24, 11.24, 28), "anisotropic", "16", ONE, (), ["2-2-1", "4-4-2", "8-8-4", "16-16-8"]),
    ((1, 1, 1), "anisotropic", "8", (2, 2, 1), (), ["4", "8"]),
    ((10.5, 10.5, 24), "anisotropic", "8", ONE, ((1, 1, 1), (2, 2, 1), (4, 4, 1)), ["2-2-1", "4-4-1", "8-8-4"]),
] + [
    (voxel_size, "isotropic", "8", (2, 2, 1), (), ["4-4-2", "8-8-4"]) for voxel_size in ANY_VOXEL_SIZES
] + [
    (voxel_size, "constant_z", "8", ONE, (), ["2-2-1", "4-4-1", "8-8-1"]) for voxel_size in ANY_VOXEL_SIZES
]


@pytest.mark.parametrize("voxel_size, mode, coarsest, source, align, expected", GOLDEN)
def test_golden_plans(voxel_size, mode, coarsest, source, align, expected):
    plan = plan_mags(source, M(coarsest), mode, voxel_size, align)
    assert names(plan) == expected
    assert all(isinstance(m, tuple) and len(m) == 3 for m in plan)


GOLDEN_ERRORS = [
    ((10.5, 10.5, 24), "anisotropic", "16-16-2", (2, 2, 2)),
    ((10.5, 10.5, 24), "anisotropic", "1-1-2", ONE),
    ((10.5, 10.5, 24), "anisotropic", "4-4-16", ONE),
]


@pytest.mark.parametrize("voxel_size, mode, coarsest, source", GOLDEN_ERRORS)
def test_golden_errors(voxel_size, mode, coarsest, source):
    with pytest.raises(PlanningError, match="no progress"):
        plan_mags(source, M(coarsest), mode, voxel_size)


def test_passes_through_unwritten_catch_up_step():
    # From 4-4-2 at voxel size 1-1-1 the plan passes through 4-4-4 unwritten to 8.
    assert names(plan_mags((4, 4, 2), M("8"), "anisotropic", (1, 1, 1))) == ["8"]


def test_alignment_wins_over_sampling_mode_and_coarsest():
    # A mag of another layer with twice the largest component is the next step,
    # whatever the mode says, even beyond the coarsest mag on some axis.
    align = [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    assert names(plan_mags(ONE, M("4-4-1"), "constant_z", (1, 1, 1), align)) == ["2", "4"]


def test_alignment_includes_layers_own_mags():
    # The layer's own (source) mag is in the align set; it never matches "twice" itself.
    plan = plan_mags((2, 2, 1), M("8"), "anisotropic", (10.5, 10.5, 24), [(1, 1, 1), (2, 2, 1)])
    assert names(plan) == ["4-4-2", "8-8-4"]


def test_unknown_sampling_mode():
    with pytest.raises(PlanningError, match="sampling mode"):
        plan_mags(ONE, M("8"), "bogus", (1, 1, 1))


def test_coarsest_finer_than_source():
    with pytest.raises(PlanningError):
        plan_mags((4, 4, 4), M("2"), "anisotropic", (1, 1, 1))


def test_nothing_to_do_at_coarsest():
    assert plan_mags((8, 8, 4), M("8"), "anisotropic", (11.24, 11.24, 28)) == []
    assert plan_mags((4, 4, 4), M("4"), "isotropic", (1, 1, 1)) == []


# ---------------------------------------------------------------------------
# default coarsest mag


@pytest.mark.parametrize(
    "width, height, expected",
    [
        (65536, 65536, 1024),
        (65536, 100, 1024),
        (100, 65536, 1024),
        (4096, 4096, 64),
        (4096, 1, 64),
        (131072, 131072, 2048),
        (262144, 262144, 4096),
        (32768, 1000, 512),
        (32768, 32768, 512),
        (256, 256, 4),
        (1, 1, 4),
        (150, 133, 4),
        (400, 10, 4),
        (401, 10, 8),
    ],
)
def test_default_coarsest_mag(width, height, expected):
    assert default_coarsest_mag(width, height) == (expected,) * 3


def test_default_coarsest_mag_large_examples():
    # Contract: (131072, 262144, ...) -> 4096: the larger of width and height counts.
    assert default_coarsest_mag(131072, 262144) == (4096,) * 3
    assert default_coarsest_mag(262144, 131072) == (4096,) * 3


def test_default_coarsest_ignores_depth():
    # Only width and height are inputs at all; the layer's depth plays no part.
    assert default_coarsest_mag(256, 256) == (4, 4, 4)
    assert default_coarsest_mag(65536, 64) == (1024,) * 3


# ---------------------------------------------------------------------------
# modes


@pytest.mark.parametrize("voxel_size", ANY_VOXEL_SIZES)
def test_constant_z_keeps_source_z(voxel_size):
    plan = plan_mags((2, 2, 2), M("16"), "constant_z", voxel_size)
    assert names(plan) == ["4-4-2", "8-8-2", "16-16-2"]
    assert all(m[2] == 2 for m in plan)


@pytest.mark.parametrize("voxel_size", ANY_VOXEL_SIZES)
def test_isotropic_clamps_per_axis(voxel_size):
    assert names(plan_mags(ONE, M("16-16-2"), "isotropic", voxel_size)) == [
        "2", "4-4-2", "8-8-2", "16-16-2"]
    assert names(plan_mags(ONE, M("4-8-16"), "isotropic", voxel_size)) == [
        "2", "4", "4-8-8", "4-8-16"]


def test_anisotropic_from_221_isotropic_voxels():
    assert names(plan_mags((2, 2, 1), M("8"), "anisotropic", (1, 1, 1))) == ["4", "8"]


def test_anisotropic_clamps_to_coarsest():
    assert names(plan_mags(ONE, M("8-8-2"), "anisotropic", (11.24, 11.24, 28))) == [
        "2-2-1", "4-4-2", "8-8-2"]


PLAN_CASES = list(
    itertools.product(
        [(1, 1, 1), (2, 2, 1), (2, 2, 2), (4, 4, 1), (4, 4, 2)],
        ["4", "8", "16", "16-16-4", "8-8-2", "32-32-8"],
        ["anisotropic", "isotropic", "constant_z"],
        [(1, 1, 1), (11.24, 11.24, 28.0), (4.0, 4.0, 40.0), (10.5, 10.5, 35.0)],
    )
)


def no_progress_expected(coarsest: str, mode: str, voxel_size) -> bool:
    """The cases planning must refuse: anisotropic steps at an isotropic voxel size double every
    axis, so a coarsest mag flatter in z than in x-y is never reached."""
    mag = M(coarsest)
    return mode == "anisotropic" and len(set(voxel_size)) == 1 and mag[2] < mag[0]


def test_plan_invariants_refuse_exactly_the_expected_cases():
    refused = [case for case in PLAN_CASES if no_progress_expected(*case[1:])]
    assert len(refused) == 15  # 5 sources x 3 flat coarsest mags at voxel size 1-1-1


@pytest.mark.parametrize("source, coarsest, mode, voxel_size", PLAN_CASES)
def test_plan_invariants(source, coarsest, mode, voxel_size):
    """Whatever the inputs: each written mag is a multiple of the one before (chainable),
    its largest component grows strictly, starting above the source's (WEBKNOSSOS cannot
    hold two mags with the same largest component), and the last one reaches the coarsest;
    or, exactly where expected, planning refuses with 'no progress' naming the coarsest mag."""
    if no_progress_expected(coarsest, mode, voxel_size):
        with pytest.raises(PlanningError, match=f"^no progress: the coarsest mag {coarsest} cannot be reached"):
            plan_mags(source, M(coarsest), mode, voxel_size)
        return
    plan = plan_mags(source, M(coarsest), mode, voxel_size)
    previous = source
    for mag in plan:
        mags.factor_between(previous, mag)  # raises if not a multiple
        assert max(mag) > max(previous), (names(plan), "step does not grow after", mags.mag_name(previous))
        previous = mag
    if plan:
        assert max(plan[-1]) == max(M(coarsest))


@pytest.mark.parametrize(
    "mode, coarsest, expected",
    [("isotropic", "8-8-2", ["2", "4-4-2", "8-8-2"]), ("constant_z", "8", ["2", "4-4-2", "8-8-2"])],
)
def test_isotropic_steps_are_written_even_when_max_does_not_grow(mode, coarsest, expected):
    """Outside anisotropic mode the reference writes every step it takes: from 1-1-2 the
    first step 2-2-2 is written although its largest component equals the source's
    (checked against webknossos 4.3.3's planner, which answers ['2', '4-4-2', '8-8-2'])."""
    plan = plan_mags((1, 1, 2), M(coarsest), mode, (1.0, 1.0, 1.0))
    assert names(plan) == expected


def test_anisotropic_step_that_does_not_grow_is_passed_through_unwritten():
    assert names(plan_mags((2, 2, 1), (8, 8, 8), "anisotropic", (1.0, 1.0, 1.0))) == ["4", "8"]


# ---------------------------------------------------------------------------
# passes and work units

VOXEL = (11.24, 11.24, 28.0)


def _bbox(top_left, size):
    return Box(tuple(top_left), tuple(a + s for a, s in zip(top_left, size)))


BBOXES = [
    _bbox((3, 5, 7), (150, 133, 70)),
    _bbox((0, 0, 0), (1, 1, 1)),
    _bbox((1000, 37, 5), (333, 1021, 9)),
    _bbox((31, 33, 1), (2, 3, 200)),
    _bbox((0, 0, 0), (300, 260, 130)),
    _bbox((4095, 1, 63), (70, 2049, 66)),
]
BUDGETS = [2 << 20, 32 << 20, 1536 << 20]
CHAINS = [
    ((1, 1, 1), "16", "anisotropic"),
    ((1, 1, 1), "8", "isotropic"),
    ((2, 2, 1), "32", "anisotropic"),
    ((1, 1, 1), "8", "constant_z"),
]


def _local(box: Box, frame: Box) -> tuple:
    return tuple(slice(a - f, b - f) for a, b, f in zip(box.start, box.stop, frame.start))


def _chunk_box(box: Box) -> Box:
    return Box(tuple(a // 32 for a in box.start), tuple(-(-b // 32) for b in box.stop))


@pytest.mark.parametrize("bbox", BBOXES, ids=lambda b: f"{b.start}+{b.shape}")
@pytest.mark.parametrize("budget_bytes", BUDGETS)
@pytest.mark.parametrize("source, coarsest, mode", CHAINS)
@pytest.mark.parametrize("bytes_per_voxel, threads", [(1, 1), (4, 3), (3, 1)])
def test_work_units(bbox, budget_bytes, source, coarsest, mode, bytes_per_voxel, threads):
    budget = UnitBudget(bytes=budget_bytes, threads=threads)
    targets = plan_mags(source, M(coarsest), mode, VOXEL)
    passes = group_passes(source, targets, bytes_per_voxel, budget)

    # The passes chain the targets in order, each from the previous pass's last mag.
    assert [m for p in passes for m in p.target_mags] == list(targets)
    assert passes[0].source_mag == source
    for before, after in zip(passes, passes[1:]):
        assert after.source_mag == before.coarsest
    assert all(p.target_mags for p in passes)

    for index, a_pass in enumerate(passes):
        factor = mags.factor_between(a_pass.source_mag, a_pass.coarsest)
        needed = region_in_mag(bbox, a_pass.coarsest).scaled_up(factor)
        units = plan_units("layer", index, a_pass, bbox, bytes_per_voxel, budget)
        assert units
        assert len({u.key for u in units}) == len(units)
        for unit in units:
            box = unit.box
            assert unit.layer == "layer" and unit.pass_index == index
            assert not box.empty
            # inside the needed region
            assert all(n0 <= a < b <= n1 for a, b, n0, n1 in zip(box.start, box.stop, needed.start, needed.stop))
            for axis in range(3):
                f = factor[axis]
                assert box.start[axis] % f == 0 and box.stop[axis] % f == 0, (box, factor)
                grid = 32 * f
                assert box.start[axis] % grid == 0 or box.start[axis] == needed.start[axis], (box, grid)
                assert box.stop[axis] % grid == 0 or box.stop[axis] == needed.stop[axis], (box, grid)

        # disjoint, and together they cover every voxel of the needed region
        coverage = np.zeros(needed.shape, dtype=np.uint8)
        for unit in units:
            coverage[_local(unit.box, needed)] += 1
        assert coverage.min() == 1 and coverage.max() == 1

        # at every level of the pass, no two units write the same 32^3 chunk
        for mag in a_pass.target_mags:
            level_factor = mags.factor_between(a_pass.source_mag, mag)
            region = region_in_mag(bbox, mag)
            chunk_grid = _chunk_box(region)
            writers = np.zeros(chunk_grid.shape, dtype=np.int32)
            for unit in units:
                written = unit.box.scaled_down(level_factor).intersect(region)
                if not written.empty:
                    writers[_local(_chunk_box(written), chunk_grid)] += 1
            assert writers.min() == 1 and writers.max() == 1, mags.mag_name(mag)


def test_units_grow_within_budget():
    a_pass = Pass((1, 1, 1), ((2, 2, 1), (4, 4, 2)))
    bbox = _bbox((0, 0, 0), (2048, 2048, 1024))
    small_budget = UnitBudget(bytes=2 << 20)
    large_budget = UnitBudget(bytes=1536 << 20)
    small = plan_units("l", 0, a_pass, bbox, 1, small_budget)
    large = plan_units("l", 0, a_pass, bbox, 1, large_budget)
    assert len(large) < len(small)
    minimal = (128, 128, 64)  # one 32^3 chunk of 4-4-2 in mag-1 voxels
    for unit in small:
        assert unit.box.shape == minimal or small_budget.unit_bytes(a_pass, unit.box.shape, 1) <= small_budget.bytes
    middle = UnitBudget(bytes=64 << 20, threads=2)
    for unit in plan_units("l", 0, a_pass, bbox, 1, middle):
        assert middle.unit_bytes(a_pass, unit.box.shape, 1) <= middle.bytes
    for unit in large:
        # never more than one shard of the first target mag
        assert all(s <= 1024 * f for s, f in zip(unit.box.shape, (2, 2, 1)))


def test_group_passes_splits_on_budget():
    targets = [(2, 2, 1), (4, 4, 2), (8, 8, 4), (16, 16, 8)]
    one = group_passes(ONE, targets, 1, UnitBudget(bytes=1536 << 20))
    assert [p.target_mags for p in one] == [tuple(targets)]
    split = group_passes(ONE, targets, 4, UnitBudget(bytes=32 << 20))
    assert len(split) > 1
    assert [m for p in split for m in p.target_mags] == targets


@pytest.mark.parametrize(
    "box",
    [Box((0, 0, 0), (256, 256, 256)), Box((0, 4, 6), (156, 140, 78)), Box((64, 0, 32), (1088, 96, 1056)),
     Box((0, 0, 0), (1, 1, 1))],
    ids=str,
)
@pytest.mark.parametrize("align", [(32, 32, 32), (64, 64, 32), (128, 128, 64)], ids=str)
@pytest.mark.parametrize("max_voxels", [1, 32**3, 100_000])
def test_split_box_tiles(box, align, max_voxels):
    tiles = split_box(box, align, max_voxels)
    coverage = np.zeros(box.shape, dtype=np.uint8)
    for tile in tiles:
        assert not tile.empty
        assert all(a <= s and e <= b for s, e, a, b in zip(tile.start, tile.stop, box.start, box.stop))
        for axis in range(3):
            assert tile.start[axis] % align[axis] == 0 or tile.start[axis] == box.start[axis]
            assert tile.stop[axis] % align[axis] == 0 or tile.stop[axis] == box.stop[axis]
        assert tile.voxels <= max(max_voxels, math.prod(align))
        coverage[_local(tile, box)] += 1
    assert coverage.min() == 1 and coverage.max() == 1


def test_split_box_keeps_a_box_that_fits_whole():
    """A unit that fits `max_voxels` is one tile. This is the unit of the end-to-end
    test's 150x133x70 layer at (3, 5, 7) for the pass 1 -> 2-2-1, 4-4-2 (needed region
    (0, 4, 6)-(156, 140, 78)); it must not be cut at y=136 and z=72 (multiples of the
    box's own shape, on neither the 32-voxel chunk grid nor the box's edges)."""
    box = Box((0, 4, 6), (156, 140, 78))
    assert split_box(box, (32, 32, 32), 16 << 20) == [box]


def test_box_helpers():
    box = Box((3, 5, 7), (153, 138, 77))
    assert box.shape == (150, 133, 70)
    assert box.scaled_down((2, 2, 1)) == Box((1, 2, 7), (77, 69, 77))
    assert box.scaled_down((4, 4, 2)).scaled_up((4, 4, 2)) == Box((0, 4, 6), (156, 140, 78))
    assert Box((0, 0, 0), (4, 4, 4)).intersect(Box((4, 0, 0), (8, 4, 4))).empty
    assert region_in_mag(box, (16, 16, 8)) == Box((0, 0, 0), (10, 9, 10))
