"""`--ignore-background` end to end: the CLI's output, read back independently, against
a pyramid of the documented reductions built here (test_background's oracle, or the
vectorised one below for bigger windows), in every format; `--layer-name`, sparse
layers, resume, strategies, and the record a later `--bbox` refresh is checked against.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from test_background import oracle
from test_end_to_end import PYRAMID_16, ref_reduce, reference_pyramid, run_sequential
from test_formats import check_mag, element_class_layers, read_window
from test_sparse import check_sparse, far_boxes_read_zero, stored_keys, window_of, write_sparse

from beam_downsample import demo
from beam_downsample.core.mags import mag_name
from beam_downsample.launch import cli
from beam_downsample.plan.job import plan_job
from beam_downsample.plan.options import JobOptions
from beam_downsample.store.properties import load_dataset
from conftest import read_properties, run_cli, tree_bytes, tree_digest
from refresh_helpers import assert_same_pyramid, edit_finest_mag
from resilience_helpers import kill_group, outputs, start_cli, wait_until

VOXEL_SIZE = (11.24, 11.24, 28.0)
TOP_LEFT = (3, 5, 7)
SHAPE = (160, 128, 24)
CROP = (300, 300, 300)  # where in the bundled segmentation
TARGETS = [(2, 2, 1), (4, 4, 2), (8, 8, 4)]  # --coarsest-mag 8 at this voxel size
RECORD = "beam-downsample.json"
STATE_DIR = ".beam-downsample"


# ---------------------------------------------------------------------------
# data and references


def crop_of(segmentation) -> np.ndarray:
    return np.ascontiguousarray(segmentation[tuple(slice(c, c + s) for c, s in zip(CROP, SHAPE))])


def sparse_segmentation(segmentation) -> np.ndarray:
    """A crop of the real segmentation keeping every second of its small segments (under 1 %
    of the crop each), 0 elsewhere: a proofread-like layer of thin objects."""
    crop = crop_of(segmentation)
    ids, counts = np.unique(crop[crop != 0], return_counts=True)
    kept = ids[counts < crop.size // 100][::2]
    return np.where(np.isin(crop, kept), crop, 0).astype(np.uint32)


def margin_color(segmentation, margin=21) -> np.ndarray:
    """The demo's color rendering with a zero margin on one side (x < margin)."""
    color = demo.render_color(crop_of(segmentation), seed=2)
    color[:margin] = 0
    return color


def layers_of(segmentation) -> list[dict]:
    return [
        {"name": "color", "category": "color", "data": margin_color(segmentation), "top_left": TOP_LEFT},
        {"name": "segmentation", "category": "segmentation", "data": sparse_segmentation(segmentation),
         "top_left": TOP_LEFT},
    ]


def nonzero_reduce(data: np.ndarray, factor, interpolation: str) -> np.ndarray:
    """The documented reductions, vectorised over blocks (integers up to 32 bits): blocks as
    a last axis in block order, background masked; independent of beam_downsample.kernels."""
    c, x, y, z = data.shape
    fx, fy, fz = factor
    blocks = (data.reshape(c, x // fx, fx, y // fy, fy, z // fz, fz).transpose(0, 1, 3, 5, 6, 2, 4)
              .reshape(c, x // fx, y // fy, z // fz, fx * fy * fz))
    present = blocks != 0
    count = present.sum(axis=-1)
    if interpolation == "mode":
        counts = (blocks[..., :, None] == blocks[..., None, :]).sum(axis=-1) * present
        best = np.take_along_axis(blocks, counts.argmax(axis=-1)[..., None], axis=-1)[..., 0]
        return np.where(count > 0, best, 0).astype(data.dtype)
    if interpolation == "median":
        ordered = np.sort(np.where(present, blocks.astype(np.float64), np.inf), axis=-1)
        low = np.take_along_axis(ordered, np.maximum(count - 1, 0)[..., None] // 2, axis=-1)[..., 0]
        high = np.take_along_axis(ordered, (count // 2)[..., None], axis=-1)[..., 0]
        middle = np.where(count % 2 == 1, low, np.trunc((low + high) / 2))
        return np.where(count > 0, middle, 0).astype(data.dtype)
    raise AssertionError(interpolation)


def check_layers(path, layers, data_format="zarr3", targets=TARGETS, reduce=nonzero_reduce, interpolation=None):
    for spec in layers:
        data = spec["data"] if spec["data"].ndim == 4 else spec["data"][None]
        chosen = interpolation or ("mode" if spec["category"] == "segmentation" else "median")
        pyramid = reference_pyramid(data, (1, 1, 1), spec["top_left"], data.shape[1:], targets, chosen, reduce)
        for mag, (start, expected) in pyramid.items():
            check_mag(str(path), spec["name"], mag, data_format, start, expected)


def record_of(path, layer: str):
    file = os.path.join(path, layer, RECORD)
    if not os.path.exists(file):
        return None
    with open(file, encoding="utf-8") as handle:
        return json.load(handle)


def nonzero_record(interpolation: str, mags) -> dict:
    return {"mags": {m: {"interpolation": interpolation, "ignoreBackground": True} for m in mags}}


def run(path, *args) -> int:
    return cli.main(["beam-downsample", str(path), *map(str, args)])


@pytest.fixture(scope="module")
def layers(segmentation):
    made = layers_of(segmentation)
    assert 0.01 < np.count_nonzero(made[1]["data"]) / made[1]["data"].size < 0.25  # sparse, with data
    return made


@pytest.fixture(scope="module")
def base(layers, tmp_path_factory):
    """Per format: the dataset with mag 1 only (copy it)."""
    made = {}
    for data_format in ("zarr3", "zarr", "wkw"):
        path = tmp_path_factory.mktemp(f"base-{data_format}") / "ds"
        demo.write_dataset(str(path), layers, VOXEL_SIZE, data_format=data_format)
        made[data_format] = path
    return made


@pytest.fixture(scope="module")
def pyramid(base, tmp_path_factory):
    """zarr3 with the --ignore-background pyramid up to 8-8-4 (never changed; copy it)."""
    path = tmp_path_factory.mktemp("pyramid") / "ds"
    shutil.copytree(base["zarr3"], path)
    run_sequential(path, "--coarsest-mag", "8", "--ignore-background")
    return path


def copy(source, where) -> str:
    shutil.copytree(source, where / "ds")
    return where / "ds"


# ---------------------------------------------------------------------------
# voxels


@pytest.mark.parametrize("data_format", ["zarr3", "zarr", "wkw"])
def test_every_format_matches_the_reference(base, layers, tmp_path, data_format):
    path = copy(base[data_format], tmp_path)
    run_sequential(path, "--coarsest-mag", "8", "--ignore-background")
    check_layers(path, layers, data_format)
    names = ["2-2-1", "4-4-2", "8-8-4"]
    assert record_of(path, "segmentation") == nonzero_record("mode", names)
    assert record_of(path, "color") == nonzero_record("median", names)
    assert not os.path.exists(path / STATE_DIR)


def test_the_option_keeps_the_thin_objects(pyramid, layers):
    """What the option is for, on this small sparse layer: every id present at mag 1 is
    still there at 8-8-4 (a plain mode loses some), and the margin stays tissue-bright."""
    seg = layers[1]["data"]
    ids = set(np.unique(seg[seg != 0]).tolist())
    coarse = read_window(str(pyramid), "segmentation", (8, 8, 4), "zarr3", (0, 0, 0), (24, 20, 10))
    assert set(np.unique(coarse[coarse != 0]).tolist()) == ids
    plain = reference_pyramid(seg[None], (1, 1, 1), TOP_LEFT, SHAPE, TARGETS, "mode")[(8, 8, 4)][1]
    assert len(set(np.unique(plain[plain != 0]).tolist())) < len(ids)


@pytest.mark.parametrize("interpolation", ["mode", "median", "mean", "min", "max", "nearest"])
def test_every_reduction_on_several_element_classes(tmp_path, interpolation):
    """uint8, int16, float32 (with -0.0 and NaN), RGB and uint64 labels above 2**53, a third
    of every layer background, through the job's tiles and level buffers."""
    chosen = [layer for layer in element_class_layers(seed=5)
              if layer["name"] in ("c_uint8", "c_int16", "c_float32", "rgb", "labels_u64")]
    rng = np.random.default_rng(6)
    for layer in chosen:
        data = layer["data"]
        data[rng.random(data.shape) < 0.35] = 0
        if data.dtype.kind == "f":
            data[rng.random(data.shape) < 0.05] = -0.0
            data[rng.random(data.shape) < 0.002] = np.nan
    path = tmp_path / "ds"
    demo.write_dataset(str(path), chosen, VOXEL_SIZE)
    run_sequential(path, "--coarsest-mag", "4", "--interpolation", interpolation, "--ignore-background")
    check_layers(path, chosen, targets=TARGETS[:2], reduce=oracle, interpolation=interpolation)
    recorded = record_of(path, "c_uint8")
    assert recorded == (None if interpolation == "nearest" else nonzero_record(interpolation, ["2-2-1", "4-4-2"]))


def test_layer_name_applies_the_option_to_that_layer_only(base, layers, tmp_path):
    path = copy(base["zarr3"], tmp_path)
    color_before = tree_digest(path / "color")
    run_sequential(path, "--coarsest-mag", "8", "--layer-name", "segmentation", "--ignore-background")
    check_layers(path, layers[1:])
    assert tree_digest(path / "color") == color_before
    run_sequential(path, "--coarsest-mag", "8")  # the other layer, plainly
    check_layers(path, layers[:1], reduce=None)
    assert record_of(path, "color") is None
    assert record_of(path, "segmentation") == nonzero_record("mode", ["2-2-1", "4-4-2", "8-8-4"])


def test_default_run_writes_no_record_and_plain_voxels(base, layers, tmp_path):
    path = copy(base["zarr3"], tmp_path)
    run_sequential(path, "--coarsest-mag", "8")
    check_layers(path, layers, reduce=None)
    assert not glob.glob(str(path / "*" / RECORD))


def test_dry_run_names_the_reduction(base, capsys):
    assert run(base["zarr3"], "--dry-run", "--ignore-background", "--coarsest-mag", "8") == 0
    out = capsys.readouterr().out
    assert "segmentation (mode over non-zero voxels): pass 1" in out
    assert "color (median over non-zero voxels): pass 1" in out
    assert run(base["zarr3"], "--dry-run", "--ignore-background", "--interpolation", "nearest") == 0
    assert "non-zero" not in capsys.readouterr().out


def test_markers_differ_with_the_reduction(base):
    """A rerun reuses the done-markers of an interrupted run only if it reduces the same way."""
    dataset = load_dataset(str(base["zarr3"]))
    dirs = {flag: [c.marker_dir for p in plan_job(dataset, JobOptions(ignore_background=flag)) for c in p.configs]
            for flag in (False, True)}
    assert all(a != b for a, b in zip(dirs[False], dirs[True]))
    assert all(d.endswith(("_mode-nonzero", "_median-nonzero")) for d in dirs[True])
    nearest = [c.marker_dir for p in plan_job(dataset, JobOptions(interpolation="nearest", ignore_background=True))
               for c in p.configs]
    assert nearest == [c.marker_dir for p in plan_job(dataset, JobOptions(interpolation="nearest")) for c in p.configs]


# ---------------------------------------------------------------------------
# strategies


@pytest.mark.parametrize("strategy", [("multiprocessing", "--jobs", "2"), ("dask", "--jobs", "2")], ids=lambda s: s[0])
def test_strategies_write_the_same_bytes_as_sequential(pyramid, base, tmp_path, strategy):
    path = copy(base["zarr3"], tmp_path)
    result = run_cli(path, "--coarsest-mag", "8", "--ignore-background", "--distribution-strategy", *strategy,
                     "--memory-budget", "1G")
    assert result.returncode == 0, result.stderr[-2000:]
    assert tree_bytes(path) == tree_bytes(pyramid)


# ---------------------------------------------------------------------------
# sparse layers: all-zero tiles are skipped, empty space stays unstored; resume


@pytest.fixture(scope="module")
def sparse_base(segmentation, tmp_path_factory):
    path = tmp_path_factory.mktemp("sparse-nz") / "base"
    return path, write_sparse(path, segmentation, full=False)


@pytest.fixture(scope="module")
def sparse_done(sparse_base, tmp_path_factory):
    path = tmp_path_factory.mktemp("sparse-nz-run") / "ds"
    shutil.copytree(sparse_base[0], path)
    assert run(path, "--distribution-strategy", "sequential", "--coarsest-mag", "16-16-8", "--memory-budget", "256M",
               "--ignore-background") == 0
    return path


def test_sparse_layer_matches_the_reference_and_stores_only_near_data(sparse_base, sparse_done):
    path, layers = sparse_base
    check_sparse(sparse_done, layers, "zarr3", reduce=nonzero_reduce)
    far_boxes_read_zero(sparse_done, "zarr3")
    plain = plan_job(load_dataset(str(path)), JobOptions(jobs=1, coarsest_mag=(16, 16, 8), memory_budget=256 << 20))
    ours = plan_job(load_dataset(str(path)), JobOptions(jobs=1, coarsest_mag=(16, 16, 8), memory_budget=256 << 20,
                                                        ignore_background=True))
    assert [p.planned[0].tolist() for p in ours] == [p.planned[0].tolist() for p in plain]  # the same units hold data
    for layer in ("color", "segmentation"):
        keys = [k for k in stored_keys(sparse_done, layer, (2, 2, 1)) if k.startswith("c/")]
        assert 0 < len(keys) < 20, keys  # a few shards near the blocks, in a 32768 x 32768 x 4096 mag


def test_sparse_resume_after_kill_9(sparse_base, sparse_done, tmp_path):
    path = tmp_path / "ds"
    shutil.copytree(sparse_base[0], path)
    args = (path, "--distribution-strategy", "sequential", "--coarsest-mag", "16-16-8", "--memory-budget", "256M",
            "--ignore-background")
    proc = start_cli(tmp_path / "logs", "first", *args)

    def some_done():
        return bool(glob.glob(str(path / STATE_DIR / "*" / "*nonzero" / "*.done")))

    assert wait_until(some_done, proc, timeout=240), outputs(proc)
    kill_group(proc)
    assert run(*args) == 0
    assert tree_digest(path) == tree_digest(sparse_done)


def test_rerun_without_the_option_after_a_kill_reuses_no_marker(sparse_base, tmp_path):
    """Interrupted with the option, rerun without: the mags the first run finished (listed) keep
    its reduction and say so in the record; every other mag is plain, unit for unit."""
    path = tmp_path / "ds"
    shutil.copytree(sparse_base[0], path)
    common = (path, "--distribution-strategy", "sequential", "--coarsest-mag", "16-16-8", "--memory-budget", "256M")
    proc = start_cli(tmp_path / "logs", "first", *common, "--ignore-background")
    assert wait_until(lambda: bool(glob.glob(str(path / STATE_DIR / "*" / "*nonzero" / "*.done"))), proc,
                      timeout=240), outputs(proc)
    kill_group(proc)
    listed = {layer["name"]: [tuple(m["mag"]) for m in layer["mags"] if m["mag"] != [1, 1, 1]]
              for layer in read_properties(path)["dataLayers"]}
    assert run(*common) == 0
    for spec in sparse_base[1]:
        recorded = record_of(path, spec["name"]) or {"mags": {}}
        assert sorted(recorded["mags"]) == sorted(mag_name(m) for m in listed[spec["name"]])
        check_sparse_chain(path, spec, len(listed[spec["name"]]))


class FirstLevelsOverNonzero:
    """A `reduce` for `reference_pyramid`: over non-zero voxels for the first `levels` levels, plainly after."""

    def __init__(self, levels: int):
        self.levels, self.done = levels, 0

    def __call__(self, data, factor, interpolation):
        self.done += 1
        return (nonzero_reduce if self.done <= self.levels else ref_reduce)(data, factor, interpolation)


def check_sparse_chain(path, spec, levels: int) -> None:
    """Every block's window of the layer: the first `levels` mags over non-zero voxels, the rest plain."""
    interpolation = "mode" if spec["category"] == "segmentation" else "median"
    for offset, data in spec["blocks"]:
        start, stop = window_of(offset, data.shape)
        dense = np.zeros([b - a for a, b in zip(start, stop)], dtype=data.dtype)
        dense[tuple(slice(o - a, o - a + s) for o, a, s in zip(offset, start, data.shape))] = data
        pyramid = reference_pyramid(dense[None], (1, 1, 1), start, dense.shape, PYRAMID_16, interpolation,
                                    FirstLevelsOverNonzero(levels))
        for mag, (low, expected) in pyramid.items():
            high = [a + s for a, s in zip(low, expected.shape[1:])]
            got = read_window(str(path), spec["name"], mag, "zarr3", low, high)
            np.testing.assert_array_equal(got, expected, err_msg=f"{spec['name']} {mag_name(mag)} at {offset}")


# ---------------------------------------------------------------------------
# --bbox refresh: the same reduction as the pyramid, or refused


BOX = (20, 14, 9, 30, 24, 12)


def test_refresh_with_the_option_equals_a_full_recompute(pyramid, base, tmp_path):
    stale = copy(pyramid, tmp_path / "stale")
    edit_finest_mag(stale, BOX, seed=4)
    expected = copy(base["zarr3"], tmp_path / "expected")
    edit_finest_mag(expected, BOX, seed=4)
    run_sequential(expected, "--coarsest-mag", "8", "--ignore-background")
    run_sequential(stale, "--coarsest-mag", "8", "--ignore-background", "--bbox", ",".join(map(str, BOX)))
    assert_same_pyramid(stale, expected)
    for layer in ("color", "segmentation"):
        assert record_of(stale, layer) == record_of(expected, layer) == record_of(pyramid, layer)


def test_refresh_that_makes_missing_mags_records_them(pyramid, tmp_path):
    path = copy(pyramid, tmp_path)
    raw = read_properties(path)
    for layer in raw["dataLayers"]:
        layer["mags"] = [m for m in layer["mags"] if m["mag"] != [8, 8, 4]]
        shutil.rmtree(path / layer["name"] / "8-8-4")
    with open(path / "datasource-properties.json", "w", encoding="utf-8") as handle:
        json.dump(raw, handle, indent=4)
    for layer in ("color", "segmentation"):  # a record without the mag: made again, recorded again
        with open(path / layer / RECORD, encoding="utf-8") as handle:
            record = json.load(handle)
        del record["mags"]["8-8-4"]
        with open(path / layer / RECORD, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
    run_sequential(path, "--coarsest-mag", "8", "--ignore-background", "--bbox", ",".join(map(str, BOX)))
    assert_same_pyramid(path, pyramid)
    assert record_of(path, "segmentation") == record_of(pyramid, "segmentation")


@pytest.mark.parametrize("made, refresh, words", [
    (("--ignore-background",), (), "was made with mode over non-zero voxels (--ignore-background), and this --bbox "
                                    "refresh would use a plain mode; refresh it as it was made (--interpolation mode "
                                    "--ignore-background)"),
    ((), ("--ignore-background",), "was made with a plain reduction, and this --bbox refresh would use mode over "
                                   "non-zero voxels (--ignore-background); refresh it as it was made (without "
                                   "--ignore-background)"),
    (("--ignore-background", "--interpolation", "max"), ("--ignore-background", "--interpolation", "mode"),
     "was made with max over non-zero voxels"),
], ids=["option-then-plain", "plain-then-option", "other-interpolation"])
def test_refresh_with_another_reduction_is_refused_in_one_line(base, tmp_path, made, refresh, words):
    path = copy(base["zarr3"], tmp_path)
    run_sequential(path, "--coarsest-mag", "8", "--layer-name", "segmentation", *made)
    edit_finest_mag(path, BOX, seed=4)
    before = tree_digest(path)
    result = run_cli(path, "--coarsest-mag", "8", "--layer-name", "segmentation", "--bbox", ",".join(map(str, BOX)),
                     *refresh)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("beam-downsample: error: layer 'segmentation' mag 2-2-1 "), lines
    assert words in lines[0]
    assert tree_digest(path) == before


def test_bad_record_is_a_usage_error(pyramid, tmp_path):
    path = copy(pyramid, tmp_path)
    (path / "segmentation" / RECORD).write_text("{not json", encoding="utf-8")
    before = tree_digest(path)
    result = run_cli(path, "--coarsest-mag", "8", "--ignore-background", "--bbox", ",".join(map(str, BOX)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and RECORD in lines[0] and "is not JSON" in lines[0], lines
    assert tree_digest(path) == before
