"""`--bbox` refresh: after an edit of mag 1 inside a box, refreshing the existing mags
must give exactly what deleting them and downsampling again gives (every mag, every
voxel, properties, NGFF metadata), in zarr3, zarr v2 and wkw, and must rewrite
nothing outside each mag's part of the box.

The expected result is never computed by a refresh: it is a full run on a dataset
written afresh from the edited data.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

from beam_downsample import demo
from beam_downsample.core.box import Box, region_in_mag
from beam_downsample.plan.job import plan_job
from beam_downsample.plan.options import JobOptions
from beam_downsample.store import arrays
from beam_downsample.store.properties import load_dataset
from conftest import run_cli, tree_digest
from refresh_helpers import assert_same_pyramid, copy_pyramid, mag_voxels
from resilience_helpers import kill_group, start_cli, wait_until

VOXEL_SIZE = (11.24, 11.24, 28.0)
TOP_LEFT = (3, 5, 7)
SHAPE = (2100, 40, 24)  # past x = 2048: two work units and three mag-1 shards / wkw files along x
ARGS = ("--coarsest-mag", "16")
FORMATS = ["zarr3", "zarr", "wkw"]
CORNER = (3, 5, 7, 20, 20, 10)  # at the layer's topLeft
WIDE = (1000, 9, 10, 1100, 20, 9)  # x 1000..2100: several units, shards and files
STATE_DIR = ".beam-downsample"


def original_layers(seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"name": "color", "category": "color", "data": rng.integers(0, 256, SHAPE, dtype=np.uint8),
         "top_left": TOP_LEFT},
        {"name": "segmentation", "category": "segmentation", "data": rng.integers(0, 6, SHAPE, dtype=np.uint32),
         "top_left": TOP_LEFT, "largest_segment_id": 1000},
    ]


def edited_layers(box6, seed=1) -> list[dict]:
    """The original data with the box overwritten (new random values, and a zeroed slab)."""
    rng = np.random.default_rng(seed)
    start = [b - t for b, t in zip(box6[:3], TOP_LEFT)]
    index = tuple(slice(max(a, 0), a + s) for a, s in zip(start, box6[3:]))
    layers = []
    for layer in original_layers():
        data = layer["data"].copy()
        part = data[index]
        part[...] = rng.integers(100, 200, part.shape).astype(data.dtype)
        part[:, :, : max(part.shape[2] // 3, 1)] = 0  # an erased slab: must become 0 in every mag
        layers.append(dict(layer, data=data))
    return layers


def bbox_arg(box6) -> str:
    return ",".join(map(str, box6))


def run_ok(*args) -> str:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory):
    """Per format: a dataset of the original data with its full pyramid (never changed; copy it)."""
    made = {}
    for data_format in FORMATS:
        path = tmp_path_factory.mktemp(f"pyramid-{data_format}") / "ds"
        demo.write_dataset(str(path), original_layers(), VOXEL_SIZE, name="ds", data_format=data_format)
        run_ok(path, *ARGS)
        made[data_format] = path
    return made


def stale_copy(pyramid, box6, target, data_format: str):
    """mag 1 edited inside the box, every other mag as it was before the edit (stale)."""
    demo.write_dataset(str(target), edited_layers(box6), VOXEL_SIZE, name="ds", data_format=data_format)
    copy_pyramid(pyramid, target)
    return target


def recomputed(box6, target, data_format: str, *args):
    """The expected result: the edited data written afresh and downsampled in full."""
    demo.write_dataset(str(target), edited_layers(box6), VOXEL_SIZE, name="ds", data_format=data_format)
    run_ok(target, *(args or ARGS))
    return target


# ---------------------------------------------------------------------------
# equal to a full recompute, every format


# wkw runs the wide box only (its several files; a wkw refresh takes ~90 s here): the corner's
# alignment is the format-independent planning the zarr cases check
@pytest.mark.parametrize("box6, data_format", [
    pytest.param(box, data_format, id=f"{name}-{data_format}")
    for name, box in (("corner", CORNER), ("wide", WIDE)) for data_format in FORMATS
    if (name, data_format) != ("corner", "wkw")
])
def test_refresh_equals_full_recompute(pyramids, tmp_path, data_format, box6):
    stale = stale_copy(pyramids[data_format], box6, tmp_path / "stale", data_format)
    expected = recomputed(box6, tmp_path / "expected", data_format)
    before = mag_voxels(stale)
    after_full = mag_voxels(expected)
    assert any(np.any(before[k] != after_full[k]) for k in before if k[1] != (1, 1, 1)), "the edit changed nothing"
    out = run_ok(stale, "--bbox", bbox_arg(box6), *ARGS)
    assert "refreshing --bbox" in out
    assert_same_pyramid(stale, expected)


def test_wide_refresh_runs_several_units(pyramids, tmp_path):
    out = run_ok(pyramids["zarr3"], "--bbox", bbox_arg(WIDE), "--dry-run", *ARGS)
    counts = [int(line.split(" in ")[1].split()[0]) for line in out.splitlines() if "refreshing" in line]
    assert counts and all(count >= 2 for count in counts), out


def test_wkw_refresh_rewrites_only_the_files_it_touches(pyramids, tmp_path):
    """The corner box touches file x0 of every mag; x1 of mag 2-2-1 (x 1024..1051) keeps its bytes and mtime."""
    stale = stale_copy(pyramids["wkw"], CORNER, tmp_path / "stale", "wkw")
    untouched = stale / "color" / "2-2-1" / "z0" / "y0" / "x1.wkw"
    touched = stale / "color" / "2-2-1" / "z0" / "y0" / "x0.wkw"
    before = (untouched.read_bytes(), untouched.stat().st_mtime_ns, touched.read_bytes())
    time.sleep(0.01)
    run_ok(stale, "--bbox", bbox_arg(CORNER), *ARGS)
    assert (untouched.read_bytes(), untouched.stat().st_mtime_ns) == before[:2]
    assert touched.read_bytes() != before[2]


def test_refresh_rewrites_nothing_outside_each_mags_part_of_the_box(pyramids, tmp_path):
    """Voxels of every mag just outside the box (aligned outward) are poisoned first: a refresh
    that wrote any of them would undo the poison. Everything else must equal a full recompute."""
    stale = stale_copy(pyramids["zarr3"], WIDE, tmp_path / "stale", "zarr3")
    expected = mag_voxels(recomputed(WIDE, tmp_path / "expected", "zarr3"))
    dataset = load_dataset(str(stale))
    box = Box(WIDE[:3], tuple(a + s for a, s in zip(WIDE[:3], WIDE[3:])))
    poisoned = {}
    for layer in dataset.layers:
        for mag in sorted(layer.mags)[1:]:
            region = region_in_mag(layer.bbox, mag)
            inner = region_in_mag(box, mag).intersect(region)
            shell = Box(tuple(a - 1 for a in inner.start), tuple(b + 1 for b in inner.stop)).intersect(region)
            array = arrays.open_array(arrays.existing_mag_spec(layer, dataset.path, mag), open=True)
            data = arrays.read_box(array, shell, layer.num_channels)
            mask = np.ones(data.shape, dtype=bool)
            mask[(slice(None),) + tuple(slice(a - s, b - s) for a, b, s in zip(inner.start, inner.stop, shell.start))] = False
            data[mask] += 1  # outside the box the stale value is the right one: the poison differs from it
            arrays.write_region(array, shell, data).result()
            poisoned[layer.name, mag] = (shell, mask, data.copy())
    run_ok(stale, "--bbox", bbox_arg(WIDE), *ARGS)
    got = mag_voxels(stale)
    for (name, mag), (shell, mask, data) in poisoned.items():
        region = region_in_mag(dataset.layer(name).bbox, mag)
        local = (slice(None),) + tuple(slice(a - r, b - r) for a, b, r in zip(shell.start, shell.stop, region.start))
        assert np.array_equal(got[name, mag][local][mask], data[mask]), f"{name} {mag}: a voxel outside was rewritten"
        rest = np.ones(got[name, mag].shape, dtype=bool)
        rest[local] = ~mask
        assert np.array_equal(got[name, mag][rest], expected[name, mag][rest]), f"{name} {mag}"


# ---------------------------------------------------------------------------
# mags the layer lacks, mags the plan does not make


def drop_mags(path, keep: set) -> None:
    """Deletes every mag not in `keep` (names) of every layer, directories and properties entries."""
    properties = path / "datasource-properties.json"
    raw = json.loads(properties.read_text())
    for layer in raw["dataLayers"]:
        for entry in layer["mags"]:
            name = os.path.basename(entry["path"].rstrip("/"))
            if name not in keep:
                shutil.rmtree(path / layer["name"] / name)
        layer["mags"] = [e for e in layer["mags"] if os.path.basename(e["path"].rstrip("/")) in keep]
    properties.write_text(json.dumps(raw, indent=4))


@pytest.mark.parametrize("keep", [{"1", "2-2-1"}, {"1", "2-2-1", "8-8-4"}], ids=["prefix", "gap"])
def test_planned_mags_the_layer_lacks_are_made_in_full(pyramids, tmp_path, keep):
    """Refreshed up to the first missing mag; from there every mag is made in full (8-8-4 of
    the gap case is replaced). The NGFF metadata must list exactly what a full run lists."""
    stale = stale_copy(pyramids["zarr3"], WIDE, tmp_path / "stale", "zarr3")
    drop_mags(stale, keep)
    # the NGFF metadata of the layer still lists the dropped mags: a refresh rewrites it
    expected = recomputed(WIDE, tmp_path / "expected", "zarr3")
    out = run_ok(stale, "--bbox", bbox_arg(WIDE), *ARGS)
    assert "pass 1: 1 -> 2-2-1 in" in out and "refreshing" in out.splitlines()[0]
    assert_same_pyramid(stale, expected)


def test_a_mag_the_plan_does_not_make_is_refused(pyramids, tmp_path):
    stale = stale_copy(pyramids["zarr3"], CORNER, tmp_path / "stale", "zarr3")
    before = tree_digest(stale)
    result = run_cli(stale, "--bbox", bbox_arg(CORNER), "--coarsest-mag", "16", "--sampling-mode", "isotropic")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "does not make" in result.stderr and "2-2-1" in result.stderr
    assert tree_digest(stale) == before


# ---------------------------------------------------------------------------
# usage errors: exit 2, one line, nothing touched


@pytest.mark.parametrize("value, words", [
    ("1,2,3", "six integers"),
    ("1,2,3,4,5,x", "six integers"),
    ("1,2,3,4.5,5,6", "six integers"),
    ("", "six integers"),
    ("1,2,3,0,5,6", "positive"),
    ("1,2,3,4,-5,6", "positive"),
    ("5000,0,0,10,10,10", "outside layer"),
    ("-100,-100,-100,50,50,50", "outside layer"),
])
def test_bad_bbox_is_a_usage_error(pyramids, tmp_path, value, words):
    path = tmp_path / "ds"
    shutil.copytree(pyramids["zarr3"], path)
    before = tree_digest(path)
    result = run_cli(path, f"--bbox={value}", *ARGS)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and words in result.stderr, result.stderr
    assert tree_digest(path) == before


def test_dry_run_touches_nothing(pyramids, tmp_path):
    path = tmp_path / "ds"
    shutil.copytree(pyramids["wkw"], path)
    before = tree_digest(path)
    out = run_ok(path, "--bbox", bbox_arg(WIDE), "--dry-run", *ARGS)
    assert "refreshing --bbox 1000,9,10,1100,20,9" in out
    assert tree_digest(path) == before


def test_layer_name_refreshes_only_that_layer(pyramids, tmp_path):
    stale = stale_copy(pyramids["zarr3"], CORNER, tmp_path / "stale", "zarr3")
    before = mag_voxels(stale)
    expected = mag_voxels(recomputed(CORNER, tmp_path / "expected", "zarr3"))
    run_ok(stale, "--bbox", bbox_arg(CORNER), "--layer-name", "segmentation", *ARGS)
    got = mag_voxels(stale)
    for key in got:
        want = expected[key] if key[0] == "segmentation" or key[1] == (1, 1, 1) else before[key]
        assert np.array_equal(got[key], want), key


# ---------------------------------------------------------------------------
# strategies and kill -9


@pytest.mark.parametrize("strategy", [("sequential",), ("dask", "--jobs", "2")], ids=["sequential", "dask"])
def test_refresh_on_other_strategies(pyramids, tmp_path, strategy):
    stale = stale_copy(pyramids["zarr3"], WIDE, tmp_path / "stale", "zarr3")
    expected = recomputed(WIDE, tmp_path / "expected", "zarr3")
    run_ok(stale, "--bbox", bbox_arg(WIDE), "--distribution-strategy", *strategy, *ARGS)
    assert_same_pyramid(stale, expected)


KILL_BOX = (0, 0, 0, 512, 512, 128)
KILL_ARGS = ("--memory-budget", "964M", "--distribution-strategy", "multiprocessing", "--jobs", "2")


def test_refresh_killed_mid_pass_then_rerun_equals_full_recompute(segmentation, tmp_path):
    """A real 512x512x256 segmentation, the refresh cut in many small units; kill -9 of the
    launcher and its workers after a few units, then the same command again."""
    layers = [{"name": "segmentation", "category": "segmentation", "data": np.ascontiguousarray(segmentation[:, :, :256])}]
    edited = [dict(layers[0], data=layers[0]["data"].copy())]
    edited[0]["data"][100:400, 50:300, 10:100] = 7
    base = tmp_path / "base"
    demo.write_dataset(str(base), layers, VOXEL_SIZE, name="ds")
    run_ok(base, *KILL_ARGS)
    stale = tmp_path / "stale"
    demo.write_dataset(str(stale), edited, VOXEL_SIZE, name="ds")
    copy_pyramid(base, stale)
    expected = tmp_path / "expected"
    demo.write_dataset(str(expected), edited, VOXEL_SIZE, name="ds")
    run_ok(expected, *KILL_ARGS)

    box = ("--bbox", "100,50,10,300,250,90")
    markers_root = stale / STATE_DIR / "segmentation"

    def some_done():
        return sum(len([n for n in files if n.endswith(".done")]) for _, _, files in os.walk(markers_root)) >= 2

    proc = start_cli(tmp_path / "logs", "refresh", stale, *box, *KILL_ARGS)
    try:
        hit = wait_until(some_done, proc, timeout=120)
        running = proc.poll() is None
    finally:
        kill_group(proc)
    assert hit and running, "the refresh ended before it could be killed"
    for other in ((), ("--bbox", "0,0,0,10,10,10")):  # a plain run, another box: told to rerun this one
        told = run_cli(stale, *other, *KILL_ARGS, "--dry-run")
        assert told.returncode == 0 and "--bbox 100,50,10,300,250,90 refresh was interrupted" in told.stderr, told
    rerun = run_cli(stale, *box, *KILL_ARGS)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming:" in rerun.stderr, rerun.stderr
    assert_same_pyramid(stale, expected)


# ---------------------------------------------------------------------------
# a big box over a sparse layer


SPARSE_SIZE = (32768, 32768, 2048)
BLOCK_A, BLOCK_B = (64, 96, 32), (20000, 20480, 1000)


def sparse_layers(with_b: bool, edit_a: bool) -> list[dict]:
    rng = np.random.default_rng(3)
    a = rng.integers(1, 9, (160, 130, 70), dtype=np.uint32)
    b = rng.integers(1, 9, (100, 100, 50), dtype=np.uint32)
    if edit_a:
        a[40:120, 30:100, 10:50] = rng.integers(20, 30, (80, 70, 40), dtype=np.uint32)
    blocks = [(BLOCK_A, a)] + ([(BLOCK_B, b)] if with_b else [])
    return [{"name": "segmentation", "category": "segmentation", "dtype": "uint32", "blocks": blocks}]


def stored_keys(path) -> dict:
    """Per mag directory, the names of the stored shard files."""
    keys = {}
    for mag in sorted(os.listdir(path / "segmentation")):
        if (path / "segmentation" / mag).is_dir():
            root = path / "segmentation" / mag
            keys[mag] = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root)
                               for f in files if f != "zarr.json")
    return keys


def test_big_box_over_a_sparse_layer_plans_by_the_data_and_clears_erased_blocks(tmp_path):
    """Block B is erased and block A edited in mag 1; the box (6.9e11 voxels) covers both.
    Units are planned only where the source or a target mag holds data; every mag of B's
    region must be cleared (its shards deleted), and the data equals a full recompute."""
    base = tmp_path / "base"
    demo.write_sparse_dataset(str(base), SPARSE_SIZE, sparse_layers(True, False), VOXEL_SIZE)
    run_ok(base)
    stale = tmp_path / "stale"
    demo.write_sparse_dataset(str(stale), SPARSE_SIZE, sparse_layers(False, True), VOXEL_SIZE)
    copy_pyramid(base, stale)
    expected = tmp_path / "expected"
    demo.write_sparse_dataset(str(expected), SPARSE_SIZE, sparse_layers(False, True), VOXEL_SIZE)
    run_ok(expected)
    assert stored_keys(stale) != stored_keys(expected)  # B's shards are still there

    box = ("--bbox", "0,0,0,24000,24000,1200")
    plan = run_ok(stale, *box, "--dry-run")
    counts = [int(line.split(" in ")[1].split()[0]) for line in plan.splitlines() if "refreshing" in line]
    assert counts and max(counts) <= 8, plan  # the two blocks' units, not the box's millions
    run_ok(stale, *box)
    assert stored_keys(stale) == stored_keys(expected)
    dataset = load_dataset(str(stale))
    reference = load_dataset(str(expected))
    (layer,) = dataset.layers
    for mag in layer.mags:
        got = arrays.open_array(arrays.existing_mag_spec(layer, dataset.path, mag), open=True)
        want = arrays.open_array(arrays.existing_mag_spec(reference.layers[0], reference.path, mag), open=True)
        for offset, shape in ((BLOCK_A, (160, 130, 70)), (BLOCK_B, (100, 100, 50))):
            region = region_in_mag(Box(offset, tuple(a + s for a, s in zip(offset, shape))), mag)
            region = Box(tuple(max(a - 2, 0) for a in region.start), tuple(b + 2 for b in region.stop))
            assert np.array_equal(arrays.read_box(got, region, 1), arrays.read_box(want, region, 1)), (mag, offset)


def test_passes_with_little_work_use_the_numpy_kernels(pyramids, tmp_path, monkeypatch):
    """A 20x20x10 refresh (and the small passes of a run) must not pay for loading numba; a
    pass of many voxels must use it. The two kernels give the same bytes (test_reduce.py)."""
    dataset = load_dataset(str(pyramids["zarr3"]))
    small = plan_job(dataset, JobOptions(bboxes=(Box((3, 5, 7), (23, 25, 17)),), coarsest_mag=(16, 16, 16)))
    assert all(not config.compiled for plan in small for config in plan.configs)
    monkeypatch.setattr("beam_downsample.plan.units.COMPILED_MIN_VOXELS", 1000)
    full = plan_job(dataset, JobOptions(bboxes=(Box((3, 5, 7), (23, 25, 17)),), coarsest_mag=(16, 16, 16)))
    assert all(plan.configs[0].compiled for plan in full)
