"""Sparse layers: a huge bounding box holding a few real blocks. Work is planned
only where data is stored, every mag near the data equals a dense numpy
pyramid of the same blocks, and nothing is stored for empty space.

Also: the unit grid's arithmetic against brute force, the seeds, a
1,000,000-unit pass whose pipeline proto stays small, zero in gives zero out
for every interpolation, and kill -9 + rerun of a sparse run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import itertools
import os
import re
import shutil

import apache_beam as beam
import numpy as np
import pytest
import tensorstore as ts
from test_end_to_end import PYRAMID_16, reference_pyramid
from test_formats import read_window

from beam_downsample import demo
from beam_downsample.core.box import Box, split_box
from beam_downsample.core.grid import UnitGrid, seed_runs
from beam_downsample.core.mags import mag_name
from beam_downsample.kernels import reduce
from beam_downsample.launch import cli
from beam_downsample.plan.describe import describe
from beam_downsample.plan.job import plan_job
from beam_downsample.plan.options import JobOptions
from beam_downsample.plan.units import source_units
from beam_downsample.run import job
from beam_downsample.state import markers
from beam_downsample.store import arrays, prefetch, stored
from beam_downsample.store.properties import load_dataset
from beam_downsample.transforms import seeds, work
from beam_downsample.transforms.downsample import DownsamplePass
from conftest import read_properties, tree_digest
from resilience_helpers import kill_group, outputs, start_cli, wait_until

SIZE = (65536, 65536, 4096)
VOXEL_SIZE = (11.24, 11.24, 28.0)
ALIGN = (16, 16, 8)  # the coarsest mag 16-16-8: windows aligned to it reduce exactly like the whole layer


def blocks_of(segmentation, full: bool):
    """(offset, data) blocks: real ones, a tiny one at an odd offset straddling unit and
    shard boundaries, and one 32^3 chunk alone in its unit (and shard)."""
    blocks = [
        ((8181, 8187, 1021), np.ascontiguousarray(segmentation[100:121, 50:67, 30:39])),  # tiny, odd offset
        ((50016, 10016, 3008), np.ascontiguousarray(segmentation[300:332, 300:332, 300:332])),  # one chunk
    ]
    if full:
        blocks += [
            ((1024, 2048, 512), np.ascontiguousarray(segmentation[:256, :256, :128])),
            ((40976, 30736, 2056), np.ascontiguousarray(segmentation[256:512, 0:192, 128:224])),
        ]
    else:
        blocks += [((1000, 2040, 500), np.ascontiguousarray(segmentation[:80, :70, :40]))]
    return blocks


def sparse_layers(segmentation, full: bool = True):
    blocks = blocks_of(segmentation, full)
    return [
        {"name": "color", "category": "color", "dtype": "uint8",
         "blocks": [(o, demo.render_color(d)) for o, d in blocks]},
        {"name": "segmentation", "category": "segmentation", "dtype": "uint32", "blocks": blocks},
    ]


def write_sparse(path, segmentation, data_format="zarr3", full=True):
    layers = sparse_layers(segmentation, full)
    demo.write_sparse_dataset(str(path), SIZE, layers, VOXEL_SIZE, data_format)
    return layers


def window_of(offset, shape, margin=2):
    """The block's box aligned outward to the coarsest mag, plus `margin` coarsest voxels of zeros."""
    start = [max((o // a - margin) * a, 0) for o, a in zip(offset, ALIGN)]
    stop = [(-(-(o + s) // a) + margin) * a for o, s, a in zip(offset, shape, ALIGN)]
    return start, stop


def check_sparse(path, layers, data_format, reduce=None):
    """Every mag around every block equals the dense numpy pyramid of that block's window
    (`reduce`: the block reduction of `reference_pyramid`)."""
    for spec in layers:
        interpolation = "mode" if spec["category"] == "segmentation" else "median"
        for offset, data in spec["blocks"]:
            start, stop = window_of(offset, data.shape)
            dense = np.zeros([b - a for a, b in zip(start, stop)], dtype=data.dtype)
            dense[tuple(slice(o - a, o - a + s) for o, a, s in zip(offset, start, data.shape))] = data
            size = [b - a for a, b in zip(start, stop)]
            pyramid = reference_pyramid(dense[None], (1, 1, 1), start, size, PYRAMID_16, interpolation, reduce)
            for mag, (low, expected) in pyramid.items():
                high = [a + s for a, s in zip(low, expected.shape[1:])]
                got = read_window(str(path), spec["name"], mag, data_format, low, high)
                np.testing.assert_array_equal(got, expected, err_msg=f"{spec['name']} {mag_name(mag)} at {offset}")


def far_boxes_read_zero(path, data_format):
    for layer, mag in itertools.product(("color", "segmentation"), PYRAMID_16):
        for corner in ((20000, 50000, 100), (60000, 60000, 3900), (0, 40000, 2000)):
            low = [c // m for c, m in zip(corner, mag)]
            high = [a + 40 for a in low]
            assert not read_window(str(path), layer, mag, data_format, low, high).any(), (layer, mag, corner)


def stored_keys(path, layer, mag):
    spec = {"driver": "file", "path": os.path.join(str(path), layer, mag_name(mag)) + "/"}
    return [k.decode() for k in ts.KvStore.open(spec).result().list().result()]


def run(path, *args) -> int:
    return cli.main(["beam-downsample", str(path), *map(str, args)])


# ---------------------------------------------------------------------------
# the grid as arithmetic


def brute_force_units(region: Box, shape, boxes):
    """Indices (the old nested loops' order: z fastest) of units overlapping any box."""
    first = [a // s for a, s in zip(region.start, shape)]
    last = [-(-b // s) for b, s in zip(region.stop, shape)]
    found, index = set(), 0
    for ix in range(first[0], last[0]):
        for iy in range(first[1], last[1]):
            for iz in range(first[2], last[2]):
                cell = Box((ix * shape[0], iy * shape[1], iz * shape[2]),
                           ((ix + 1) * shape[0], (iy + 1) * shape[1], (iz + 1) * shape[2])).intersect(region)
                if any(not cell.intersect(b).empty for b in boxes):
                    found.add(index)
                index += 1
    return sorted(found)


def test_grid_arithmetic_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(30):
        start = tuple(int(v) for v in rng.integers(0, 300, 3))
        region = Box(start, tuple(a + int(v) for a, v in zip(start, rng.integers(1, 700, 3))))
        shape = tuple(int(v) for v in rng.choice([16, 32, 64, 128], 3))
        grid = UnitGrid("l", 0, region, shape)
        # unit(i) in index order is exactly the old enumeration
        assert [u.box for u in grid.units(range(grid.count))] == [
            Box(s, t) for s, t in zip(*[list(map(tuple, a)) for a in grid.boxes(np.arange(grid.count))])]
        boxes = []
        for _ in range(int(rng.integers(0, 6))):
            a = tuple(int(v) for v in rng.integers(0, 1100, 3))
            boxes.append(Box(a, tuple(x + int(v) for x, v in zip(a, rng.integers(1, 200, 3)))))
        starts = np.array([b.start for b in boxes], dtype=np.int64).reshape(-1, 3)
        stops = np.array([b.stop for b in boxes], dtype=np.int64).reshape(-1, 3)
        assert grid.overlapping(starts, stops).tolist() == brute_force_units(region, shape, boxes)
        for index in rng.integers(0, grid.count, 5):
            unit = grid.unit(int(index))
            assert grid.index_of_starts(np.array([unit.box.start])).tolist() == [index]


def test_petabyte_grid_plans_in_a_blink():
    """262144x262144x16384 voxels (1.1e15): count, boxes and overlaps without enumerating."""
    grid = UnitGrid("l", 0, Box((0, 0, 0), (262144, 262144, 16384)), (256, 256, 128))
    assert grid.count == 1024 * 1024 * 128
    starts = np.array([[1000, 1000, 1000], [200000, 100000, 9000]])
    indices = grid.overlapping(starts, starts + 512)
    assert len(indices) == 2 * (3 * 3 * 5)
    assert grid.unit(int(indices[0])).box.start == (768, 768, 896)
    assert grid.unit(int(indices[-1])).box.start == (200448, 100352, 9472)


def test_seed_runs_cover_exactly_and_spread():
    indices = np.array(sorted({*range(10, 5000), *range(7000, 7003), 9000}), dtype=np.int64)
    runs = seed_runs(indices, 64)
    assert np.concatenate([np.arange(a, b) for a, b in runs]).tolist() == indices.tolist()
    assert len(runs) >= 64 and max(b - a for a, b in runs) <= -(-len(indices) // 64)


def test_many_runs_spill_to_a_file(tmp_path):
    grid = UnitGrid("l", 0, Box((0, 0, 0), (64 * 200, 64 * 200, 64)), (64, 64, 64))
    indices = np.arange(0, grid.count, 2, dtype=np.int64)  # 20,000 runs of one unit
    made = seeds.make_seeds(grid, indices, str(tmp_path))
    assert len(made) <= seeds.PIECES and os.path.exists(tmp_path / seeds.SPILL_NAME)
    expander = seeds.Expander()
    assert [i for s in made for i in expander.indices(s)] == indices.tolist()


def test_million_unit_pass_has_a_small_pipeline(tmp_path):
    """Seeds, not units, go into the job graph: a pass of 1,000,000 units stays under 1 MB."""
    grid = UnitGrid("l", 0, Box((0, 0, 0), (100 * 64, 100 * 64, 100 * 64)), (64, 64, 64))
    assert grid.count == 1_000_000
    config = job.PassConfig(layer="l", pass_index=0, source_mag=(1, 1, 1), source_spec={"driver": "zarr3"},
                            source_region=grid.region, channels=1, interpolation="mode", levels=(),
                            marker_dir=str(tmp_path))
    pass_seeds = seeds.make_seeds(grid, grid.all_indices(), str(tmp_path))
    pipeline = beam.Pipeline()
    _ = pipeline | DownsamplePass(pass_seeds, [grid], [config])
    size = len(pipeline.to_runner_api().SerializeToString())
    assert size < 1 << 20, size
    # and scattered: every other unit (500,000 runs) spills to a file
    scattered = seeds.make_seeds(grid, np.arange(0, grid.count, 2), str(tmp_path))
    pipeline = beam.Pipeline()
    _ = pipeline | DownsamplePass(scattered, [grid], [config])
    assert len(pipeline.to_runner_api().SerializeToString()) < 1 << 20


@pytest.mark.parametrize("interpolation", reduce.INTERPOLATIONS)
@pytest.mark.parametrize("dtype", ["uint8", "uint32", "uint64", "int16", "float32"])
def test_zero_in_gives_zero_out(interpolation, dtype):
    """Why skipping units over empty space is exact: every reduction of zeros is zero."""
    for factor in ((2, 2, 1), (2, 2, 2), (4, 4, 2)):
        zeros = np.zeros((1, 32, 32, 16), dtype=dtype, order="F")
        out = reduce.downsample(zeros, factor, interpolation)
        assert out.shape == (1, 32 // factor[0], 32 // factor[1], 16 // factor[2]) and not out.any()


def test_fill_value_not_zero_plans_densely(tmp_path):
    path = tmp_path / "ds"
    demo.write_dataset(str(path), [{"name": "color", "category": "color",
                                    "data": np.full((64, 64, 64), 3, np.uint8)}], VOXEL_SIZE)
    meta_path = path / "color" / "1" / "zarr.json"
    text = meta_path.read_text().replace('"fill_value":0', '"fill_value":7')
    assert '"fill_value":7' in text
    meta_path.write_text(text)
    with pytest.raises(stored.Dense, match="fill value is 7"):
        stored.stored_boxes({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "color" / "1")}})
    plans = plan_job(load_dataset(str(path)), JobOptions())
    assert plans[0].dense_reason and len(plans[0].planned[0]) == plans[0].grids[0].count
    assert "planned densely: its fill value is 7" in describe(plans)


# ---------------------------------------------------------------------------
# whole runs on sparse layers


@pytest.fixture(scope="module")
def sparse_base(segmentation, tmp_path_factory):
    path = tmp_path_factory.mktemp("sparse") / "base"
    layers = write_sparse(path, segmentation)
    return path, layers


def units_near(grid, boxes):
    """Flat indices (z fastest) of the cells each box touches, by loops over its own cells only."""
    first = [a // s for a, s in zip(grid.region.start, grid.shape)]
    counts = [-(-b // s) - f for b, s, f in zip(grid.region.stop, grid.shape, first)]
    found = set()
    for box in boxes:
        ranges = [range(a // s - f, -(-b // s) - f) for a, b, s, f in zip(box.start, box.stop, grid.shape, first)]
        for ix, iy, iz in itertools.product(*ranges):
            found.add((ix * counts[1] + iy) * counts[2] + iz)
    return found


def test_dry_run_counts_the_units_that_hold_data(sparse_base, capsys):
    path, layers = sparse_base
    plans = plan_job(load_dataset(str(path)),
                     JobOptions(jobs=1, coarsest_mag=(16, 16, 8), memory_budget=256 << 20))
    for plan in plans:
        grid = plan.grids[0]
        assert grid.count > 100_000 and len(plan.planned[0]) < 200, grid
        blocks = next(s for s in layers if s["name"] == plan.layer.name)["blocks"]
        needed = units_near(grid, [Box(o, tuple(a + s for a, s in zip(o, d.shape))) for o, d in blocks])
        assert set(plan.planned[0].tolist()) == needed
        # the shard listing alone names many more (512 units share a 1024^3 shard); the storage
        # statistics leave only the units holding chunks, e.g. the lonely chunk's unit alone
        by_shard, _, exact = source_units(plan.configs[0], grid, refine=False)
        assert not exact
        assert len(by_shard) > 4 * len(needed)
        assert grid.index_of_starts(np.array([[50016, 10016, 3008]]))[0] in needed
    assert run(path, "--dry-run", "--coarsest-mag", "16-16-8", "--memory-budget", "256M") == 0
    out = capsys.readouterr().out
    assert re.search(r"pass 1: .* \(\d+ of [\d,]+ work units hold data\)", out), out


@pytest.fixture(scope="module")
def sparse_done(sparse_base, tmp_path_factory):
    path = tmp_path_factory.mktemp("sparse-run") / "ds"
    shutil.copytree(sparse_base[0], path)
    assert run(path, "--distribution-strategy", "sequential", "--coarsest-mag", "16-16-8",
               "--memory-budget", "256M") == 0
    return path


def test_sparse_run_matches_dense_numpy_pyramid(sparse_base, sparse_done):
    _, layers = sparse_base
    check_sparse(sparse_done, layers, "zarr3")
    far_boxes_read_zero(sparse_done, "zarr3")
    raw = read_properties(sparse_done)
    assert [[tuple(m["mag"]) for m in layer["mags"]] for layer in raw["dataLayers"]] == [
        [(1, 1, 1), *PYRAMID_16]] * 2
    assert not os.path.exists(sparse_done / ".beam-downsample")


def test_sparse_run_used_several_passes(sparse_base):
    plans = plan_job(load_dataset(str(sparse_base[0])),
                     JobOptions(jobs=1, coarsest_mag=(16, 16, 8), memory_budget=256 << 20))
    assert all(len(p.passes) >= 2 for p in plans), describe(plans)


def test_nothing_stored_for_empty_space(sparse_base, sparse_done):
    """Only shards near the blocks exist, in every mag."""
    _, layers = sparse_base
    for spec, mag in itertools.product(layers, PYRAMID_16):
        keys = [k for k in stored_keys(sparse_done, spec["name"], mag) if k.startswith("c/")]
        allowed = set()
        for offset, data in spec["blocks"]:
            low = [o // m // 1024 for o, m in zip(offset, mag)]
            high = [(o + s - 1) // m // 1024 for o, s, m in zip(offset, data.shape, mag)]
            allowed.update(itertools.product(*[range(a, b + 1) for a, b in zip(low, high)]))
        shards = {tuple(int(v) for v in k.split("/")[2:]) for k in keys}
        assert shards and shards <= allowed, (spec["name"], mag, shards - allowed)


@pytest.mark.parametrize("data_format", ["zarr"])
def test_sparse_zarr2(segmentation, tmp_path, data_format):
    path = tmp_path / "ds"
    layers = write_sparse(path, segmentation, data_format, full=False)
    assert run(path, "--distribution-strategy", "sequential", "--coarsest-mag", "16-16-8") == 0
    check_sparse(path, layers, data_format)
    far_boxes_read_zero(path, data_format)
    for spec, mag in itertools.product(layers, PYRAMID_16):
        root = path / spec["name"] / mag_name(mag)
        if data_format == "wkw":  # only files near the blocks (3 of them at most per mag)
            assert 0 < len(glob.glob(str(root / "z*" / "y*" / "x*.wkw"))) <= 3
        else:  # no chunk equal to the fill value is stored
            array = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(root)}}).result()
            keys = [k for k in stored_keys(path, spec["name"], mag) if re.fullmatch(r"\d+(/\d+){3}", k)]
            assert 0 < len(keys) < 100
            for key in keys:
                _, x, y, z = (int(v) for v in key.split("/"))
                chunk = array[:, x * 32:(x + 1) * 32, y * 32:(y + 1) * 32, z * 32:(z + 1) * 32].read().result()
                assert chunk.any(), (spec["name"], mag, key)


def test_sparse_resume_after_kill_9(sparse_base, sparse_done, tmp_path, capsys):
    """kill -9 once the first unit is done: the kill lands mid-run (the launcher dies of it, a
    pass has done and undone units, its mags are not listed), and the rerun resumes from the
    markers (it says so) to the bytes of an uninterrupted run."""
    path = tmp_path / "ds"
    shutil.copytree(sparse_base[0], path)
    args = (path, "--distribution-strategy", "sequential", "--coarsest-mag", "16-16-8", "--memory-budget", "256M")
    proc = start_cli(tmp_path / "logs", "first", *args)

    def done_markers():
        return [n for d in glob.glob(str(path / ".beam-downsample" / "*" / "*")) if os.path.isdir(d)
                for n in os.listdir(d) if n.endswith(".done")]

    assert wait_until(done_markers, proc, timeout=240), outputs(proc)
    kill_group(proc)
    assert proc.returncode == -9, outputs(proc)  # killed, not finished
    done = len(done_markers())
    listed = {layer["name"]: len(layer["mags"]) for layer in read_properties(path)["dataLayers"]}
    assert listed != {layer["name"]: len(layer["mags"]) for layer in read_properties(sparse_done)["dataLayers"]}
    capsys.readouterr()
    assert run(*args) == 0
    resumed = re.findall(r"resuming: (\d+) of (\d+) work units of pass \d+ already done", capsys.readouterr().err)
    assert resumed, "the rerun did not resume"
    assert 0 < sum(int(a) for a, _ in resumed) < sum(int(b) for _, b in resumed)  # some, not all, were done
    assert sum(int(a) for a, _ in resumed) >= done
    digest = {k: v for k, v in tree_digest(path).items()}
    clean = {k: v for k, v in tree_digest(sparse_done).items()}
    assert digest == clean


# ---------------------------------------------------------------------------
# DaskRunner: Create is a bag, Reshuffle a no-op; the seeds alone must spread the units


def test_dask_spreads_expanded_units_over_both_workers(segmentation, tmp_path):
    from beam_downsample.launch import runners  # pylint: disable=import-outside-toplevel
    from beam_downsample.state import progress  # pylint: disable=import-outside-toplevel

    path = tmp_path / "ds"
    demo.write_dataset(str(path), [{"name": "segmentation", "category": "segmentation",
                                    "data": np.ascontiguousarray(segmentation[:256, :256, :128])}], VOXEL_SIZE)
    engine = runners.plan_engine("dask", 2, [], None, str(path), 256 << 20, None)
    dataset = load_dataset(str(path))
    plans = plan_job(dataset, JobOptions(jobs=2, memory_budget=256 << 20, worker_memory=engine.worker_memory))
    (plan,) = plans
    assert len(plan.planned[0]) >= 8, describe(plans)
    job.create_targets(dataset, plans)
    config, grid = plan.configs[0], plan.grids[0]
    with engine.started() as (runner, options):
        pass_seeds = seeds.make_seeds(grid, plan.planned[0], config.marker_dir)
        job._run_pass(0, pass_seeds, [grid], [config], runner, options, True).wait_until_finish()  # pylint: disable=protected-access
    assert len(markers.not_done(config, grid, plan.planned[0])) == 0
    tallies = progress.read_tallies(config.marker_dir)
    assert sum(count for count, _, _ in tallies) == len(plan.planned[0])
    assert len({pid for _, pid, _ in tallies}) == 2, tallies  # both worker processes ran units


# ---------------------------------------------------------------------------
# inside a unit: only stored chunks are read, only data is written


SMALL = (512, 512, 128)


def small_sparse(path, segmentation):
    """A 512x512x128 segmentation layer holding two blocks, one at an odd offset."""
    dense = np.zeros(SMALL, dtype=np.uint32)
    blocks = [((37, 70, 9), np.ascontiguousarray(segmentation[100:160, 50:90, 30:50])),
              ((300, 260, 64), np.ascontiguousarray(segmentation[0:64, 0:64, 0:64]))]
    for offset, data in blocks:
        dense[tuple(slice(o, o + s) for o, s in zip(offset, data.shape))] = data
    layers = [{"name": "segmentation", "category": "segmentation", "dtype": "uint32", "blocks": blocks}]
    demo.write_sparse_dataset(str(path), SMALL, layers, VOXEL_SIZE)
    return dense


def test_stored_tiles_split_to_the_stored_chunks(segmentation, tmp_path):
    dense = small_sparse(tmp_path / "ds", segmentation)
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "ds" / "segmentation" / "1")}}
    array = ts.open(spec, context=stored.probe_context()).result()
    unit = Box((0, 0, 0), SMALL)
    tiles = split_box(unit, (32, 32, 32), 1 << 22)
    read, absent = work.stored_tiles(array, tiles, (32, 32, 32))
    # read and absent tiles partition the unit, on the 32^3 chunk grid
    cover = np.zeros([s // 32 for s in SMALL], dtype=np.int64)
    for tile in read + absent:
        assert all(a % 32 == 0 for a in tile.start) and all(b % 32 == 0 for b in tile.stop), tile
        cover[tuple(slice(a // 32, b // 32) for a, b in zip(tile.start, tile.stop))] += 1
    assert (cover == 1).all()
    # every chunk holding data (numpy: the stored ones, as tensorstore stores no all-zero chunk) is read
    holds = dense.reshape(16, 32, 16, 32, 4, 32).any(axis=(1, 3, 5))
    for tile in absent:
        assert not holds[tuple(slice(a // 32, b // 32) for a, b in zip(tile.start, tile.stop))].any(), tile
    # and little else: pieces of at most 64^3 around the data chunks
    assert sum(t.voxels for t in read) <= 8 * int(holds.sum()) * 32**3 < unit.voxels // 4
    assert len(tiles) < len(read) + len(absent)


class PoisonedScratch(work.Scratch):
    """Buffers that hold garbage when lent out, as reused memory may: nothing unset may be written."""

    @contextlib.contextmanager
    def borrow(self, kind, shape, dtype):
        with super().borrow(kind, shape, dtype) as buffer:
            buffer.fill(123)
            yield buffer


@pytest.mark.parametrize("skip_zeros, fetched", [(True, False), (False, False), (True, True), (False, True)])
def test_unit_writes_match_numpy(segmentation, tmp_path, skip_zeros, fetched):
    """skip_zeros on a fresh target writes only the tiles holding data; without it every
    voxel is written, so a target holding other data (a `--bbox` refresh) ends up exact.
    `fetched`: the source comes through store.prefetch (as from a bucket) in boxes of 1 MiB."""
    path = tmp_path / "ds"
    dense = small_sparse(path, segmentation)
    dataset = load_dataset(str(path))
    plans = plan_job(dataset, JobOptions(jobs=1, coarsest_mag=(16, 16, 8), memory_budget=256 << 20))
    job.create_targets(dataset, plans)
    (plan,) = plans
    for index, config in enumerate(plan.configs):
        context = ts.Context(arrays.context_spec())
        source = arrays.open_array(config.source_spec, context, open=True)
        targets = [arrays.open_array(level.spec, context, open=True) for level in config.levels]
        if not skip_zeros:  # stale data everywhere
            for level, target in zip(config.levels, targets):
                target[arrays.region_index(level.region)].write(
                    np.full((1, *level.region.shape), 7, dtype=np.uint32)).result()
        grid = plan.grids[index]
        prefetcher = prefetch.Prefetcher(config.source_spec, source) if fetched else None
        if fetched:
            config = dataclasses.replace(config, prefetch_bytes=1 << 20)
        for unit in grid.units(grid.all_indices()):
            work.run_unit(config, unit, source, targets, PoisonedScratch(), skip_zeros=skip_zeros, prefetcher=prefetcher)
    pyramid = reference_pyramid(dense[None], (1, 1, 1), (0, 0, 0), SMALL, PYRAMID_16, "mode")
    for mag, (start, expected) in pyramid.items():
        got = read_window(str(path), "segmentation", mag, "zarr3", [0, 0, 0], list(expected.shape[1:]))
        np.testing.assert_array_equal(got, expected, err_msg=mag_name(mag))
    # nothing is stored away from the blocks (mag 2-2-1: they lie at z < 30 or x >= 150)
    array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                     "path": str(path / "segmentation" / "2-2-1")}}).result()
    assert array[:, 0:128, 0:128, 64:128].storage_statistics(query_not_stored=True).result().not_stored


# ---------------------------------------------------------------------------
# wkw: files of 1024^3, listed by name; all-zero files are never written

WKW_SIZE = (16384, 16384, 2048)


def wkw_blocks(segmentation):
    """All inside the mag-1 file (1, 1, 0), so that the run reads one file per layer: a real
    block, a tiny one at an odd offset straddling unit boundaries, and a lone chunk."""
    return [
        ((1100, 1200, 100), np.ascontiguousarray(segmentation[0:96, 0:80, 0:64])),
        ((1531, 1529, 509), np.ascontiguousarray(segmentation[100:121, 50:67, 30:39])),
        ((1984, 1056, 960), np.ascontiguousarray(segmentation[300:332, 300:332, 300:332])),
    ]


def test_sparse_wkw(segmentation, tmp_path):
    """One uint8 layer: a wkw file holding data is compressed whole (1 GiB per file and mag
    here, mostly zeros), which is what a uint32 layer would make five times slower."""
    path = tmp_path / "ds"
    layers = [{"name": "color", "category": "color", "dtype": "uint8",
               "blocks": [(o, demo.render_color(d)) for o, d in wkw_blocks(segmentation)]}]
    demo.write_sparse_dataset(str(path), WKW_SIZE, layers, VOXEL_SIZE, "wkw")
    # units of 128^3: the tiny block straddles 8 of them
    assert run(path, "--distribution-strategy", "sequential", "--coarsest-mag", "16-16-8",
               "--memory-budget", "256M") == 0
    check_sparse(path, layers, "wkw")
    for spec, mag in itertools.product(layers, PYRAMID_16):
        for corner in ((8000, 8000, 1500), (15000, 100, 100), (100, 15000, 2000), (1100, 1200, 1500)):
            low = [c // m for c, m in zip(corner, mag)]
            high = [a + 40 for a in low]
            assert not read_window(str(path), spec["name"], mag, "wkw", low, high).any(), (spec["name"], mag, corner)
        # files exactly where the mag holds data (numpy: the files of the pyramid's non-zero voxels)
        expected = set()
        interpolation = "mode" if spec["category"] == "segmentation" else "median"
        for offset, data in spec["blocks"]:
            start, stop = window_of(offset, data.shape)
            dense = np.zeros([b - a for a, b in zip(start, stop)], dtype=data.dtype)
            dense[tuple(slice(o - a, o - a + s) for o, a, s in zip(offset, start, data.shape))] = data
            pyramid = reference_pyramid(dense[None], (1, 1, 1), start, [b - a for a, b in zip(start, stop)],
                                        PYRAMID_16, interpolation)
            low, reduced = pyramid[mag]
            positions = np.argwhere(reduced[0]) + np.array(low)
            expected.update(map(tuple, np.unique(positions // 1024, axis=0).tolist()))
        root = path / spec["name"] / mag_name(mag)
        found = {tuple(int(p[1:].split(".")[0]) for p in reversed(os.path.relpath(f, root).split(os.sep)))
                 for f in glob.glob(str(root / "z*" / "y*" / "x*.wkw"))}
        assert found == expected, (spec["name"], mag)


def test_all_zero_wkw_staging_files_become_no_files(tmp_path):
    """A staging file holding only zeros (written or holes) leaves no file, and removes a
    stale one; a file with one voxel set deep inside (after holes) is compressed."""
    import wkw  # pylint: disable=import-outside-toplevel

    from beam_downsample.store import wkw_io  # pylint: disable=import-outside-toplevel

    final, staging = str(tmp_path / "mag"), str(tmp_path / "staging")
    wkw_io.create(final, np.dtype("uint8"), 1, staging)
    region = Box((0, 0, 0), (2048, 1024, 1024))
    wkw_io.create_staging_files(staging, region, [(0, 0, 0), (1, 0, 0)])
    mag = wkw_io.WkwMag(final, staging)
    mag.write(Box((0, 0, 0), (64, 64, 64)), np.zeros((1, 64, 64, 64), np.uint8))  # zeros, not holes
    one = np.zeros((1, 32, 32, 32), np.uint8)
    one[0, 5, 6, 7] = 9
    mag.write(Box((1024 + 512, 480, 992), (1024 + 544, 512, 1024)), one)
    assert not wkw_io.holds_data(os.path.join(staging, "z0", "y0", "x0.wkw"))
    assert wkw_io.holds_data(os.path.join(staging, "z0", "y0", "x1.wkw"))
    near = str(tmp_path / "near")  # data right after the header, in the first extent
    wkw_io.create(str(tmp_path / "near-final"), np.dtype("int16"), 1, near)
    wkw_io.create_staging_files(near, Box((3, 5, 7), (43, 41, 19)))
    wkw_io.WkwMag(str(tmp_path / "near-final"), near).write(Box((3, 5, 7), (43, 41, 19)),
                                                             np.full((1, 40, 36, 12), 1234, np.int16))
    assert wkw_io.holds_data(os.path.join(near, "z0", "y0", "x0.wkw"))
    os.makedirs(os.path.join(final, "z0", "y0"))
    shutil.copy(os.path.join(staging, "z0", "y0", "x1.wkw"), os.path.join(final, "z0", "y0", "x0.wkw"))  # stale
    wkw_io.compress_staged([(staging, final, region)])
    assert sorted(glob.glob(os.path.join(final, "z*", "y*", "x*.wkw"))) == [os.path.join(final, "z0", "y0", "x1.wkw")]
    got = wkw.Dataset.open(final).read((1024 + 512 - 32, 480 - 32, 992 - 32), (96, 64, 64))
    assert got.sum() == 9 and got[0, 32 + 5, 32 + 6, 32 + 7] == 9


def test_sparse_multiprocessing_two_workers(sparse_base, tmp_path, monkeypatch):
    """The default strategy with --jobs 2: worker processes expand the seeds and skip empty
    tiles and units on their own; the result equals the dense numpy pyramid."""
    from beam_downsample.launch import runners  # pylint: disable=import-outside-toplevel

    path = tmp_path / "ds"
    shutil.copytree(sparse_base[0], path)
    processes = []
    for_pass = runners.LocalPasses.for_pass

    def recorded(self, units, *args, **kwargs):
        runner, options, configs = for_pass(self, units, *args, **kwargs)
        processes.append(options.view_as(beam.options.pipeline_options.DirectOptions).direct_num_workers)
        return runner, options, configs

    monkeypatch.setattr(runners.LocalPasses, "for_pass", recorded)
    assert run(path, "--jobs", "2", "--coarsest-mag", "16-16-8", "--memory-budget", "1G") == 0
    assert processes and processes[0] == 2, processes
    check_sparse(path, sparse_base[1], "zarr3")
    far_boxes_read_zero(path, "zarr3")
