"""Whole runs of the CLI on small real data, checked voxel by voxel against a
numpy reference written here (independent of beam_downsample.kernels and transforms.work)."""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest
import tensorstore as ts

from beam_downsample import demo
from beam_downsample.core.mags import mag_name
from beam_downsample.launch import cli
from conftest import open_array, read_properties, run_cli, tree_bytes, tree_digest

VOXEL_SIZE = (11.24, 11.24, 28.0)
TOP_LEFT = (3, 5, 7)
SHAPE = (150, 133, 70)
AXIS_ORDER = {"c": 0, "x": 1, "y": 2, "z": 3}
PYRAMID_16 = [(2, 2, 1), (4, 4, 2), (8, 8, 4), (16, 16, 8)]


# ---------------------------------------------------------------------------
# the reference


def region(top_left, size, mag):
    """The bounding box aligned outward to `mag`: (start, stop) in `mag` voxels."""
    start = tuple(a // m for a, m in zip(top_left, mag))
    stop = tuple(-(-(a + s) // m) for a, s, m in zip(top_left, size, mag))
    return start, stop


def ref_reduce(data: np.ndarray, factor, interpolation: str) -> np.ndarray:
    c, x, y, z = data.shape
    fx, fy, fz = factor
    n = fx * fy * fz
    # (c, ox, dx, oy, dy, oz, dz) -> (c, ox, oy, oz, dz, dx, dy): block order y fastest, then x, then z
    blocks = (
        data.reshape(c, x // fx, fx, y // fy, fy, z // fz, fz)
        .transpose(0, 1, 3, 5, 6, 2, 4)
        .reshape(c, x // fx, y // fy, z // fz, n)
    )
    if interpolation == "median":
        s = np.sort(blocks, axis=-1)
        if n % 2:
            return s[..., n // 2]
        if data.dtype.kind == "f":  # the reference: numpy's median of the block in block order
            with np.errstate(over="ignore", invalid="ignore"):
                return np.median(blocks, axis=-1).astype(data.dtype)
        total = s[..., n // 2 - 1].astype(object) + s[..., n // 2].astype(object)  # exact Python ints
        return np.where(total >= 0, total // 2, -(-total // 2)).astype(data.dtype)  # truncated toward zero
    if interpolation == "mode":
        counts = (blocks[..., :, None] == blocks[..., None, :]).sum(axis=-1)
        first_best = counts.argmax(axis=-1)  # first position holding a most frequent value
        return np.take_along_axis(blocks, first_best[..., None], axis=-1)[..., 0]
    if interpolation == "max":
        return blocks.max(axis=-1)
    if interpolation == "min":
        return blocks.min(axis=-1)
    if interpolation == "nearest":
        return blocks[..., 0]
    if interpolation == "mean":  # documented as tensorstore's downsample driver's mean: use it
        return ts.downsample(ts.array(data), [1, fx, fy, fz], "mean")[...].read().result()
    raise AssertionError(interpolation)


def reference_pyramid(source, source_mag, top_left, size, targets, interpolation, reduce=None):
    """mag -> (region start, data covering exactly the aligned region), chained level by level.

    The previous level's valid region is edge-replicated out to the block grid
    of the next one (no zeros from outside the bounding box are mixed in).
    `reduce(data, factor, interpolation)`: the block reduction (default `ref_reduce`)."""
    result = {}
    previous, previous_mag = source, source_mag
    previous_start, previous_stop = region(top_left, size, source_mag)
    assert previous.shape[1:] == tuple(b - a for a, b in zip(previous_start, previous_stop))
    for mag in targets:
        factor = tuple(m // p for m, p in zip(mag, previous_mag))
        start, stop = region(top_left, size, mag)
        low = [a * f for a, f in zip(start, factor)]
        high = [b * f for b, f in zip(stop, factor)]
        pad = [(0, 0)] + [(ps - lo, hi - pe) for ps, pe, lo, hi in zip(previous_start, previous_stop, low, high)]
        assert all(a >= 0 and b >= 0 for a, b in pad)
        padded = np.pad(previous, pad, mode="edge")
        reduced = (reduce or ref_reduce)(padded, factor, interpolation)
        assert reduced.shape[1:] == tuple(b - a for a, b in zip(start, stop))
        result[mag] = (start, reduced)
        previous, previous_mag, previous_start, previous_stop = reduced, mag, start, stop
    return result


def check_mag_array(dataset, layer, mag, start, expected, margin=40):
    """The array holds `expected` at `start` and zeros around it."""
    array = open_array(os.path.join(dataset, layer, mag_name(mag)))
    assert array.dtype.numpy_dtype == expected.dtype
    assert array.shape[0] == expected.shape[0]
    stop = [a + s for a, s in zip(start, expected.shape[1:])]
    low = [max(a - margin, 0) for a in start]
    high = [min(b + margin, s) for b, s in zip(stop, array.shape[1:])]
    window = array[(slice(None),) + tuple(slice(a, b) for a, b in zip(low, high))].read().result()
    inner = (slice(None),) + tuple(slice(a - lo, b - lo) for a, b, lo in zip(start, stop, low))
    np.testing.assert_array_equal(window[inner], expected, err_msg=f"{layer} {mag_name(mag)}")
    outside = window.copy()
    outside[inner] = 0
    assert not outside.any(), f"{layer} {mag_name(mag)}: non-zero voxels outside the aligned bounding box"


def check_layer(dataset, layer, source, source_mag, top_left, size, targets, interpolation):
    pyramid = reference_pyramid(source, source_mag, top_left, size, targets, interpolation)
    for mag, (start, expected) in pyramid.items():
        check_mag_array(dataset, layer, mag, start, expected)


def read_region(dataset, layer, mag, top_left, size):
    start, stop = region(top_left, size, mag)
    array = open_array(os.path.join(dataset, layer, mag_name(mag)))
    return array[(slice(None),) + tuple(slice(a, b) for a, b in zip(start, stop))].read().result()


def run_sequential(dataset, *args):
    code = cli.main(["beam-downsample", str(dataset), "--distribution-strategy", "sequential", *map(str, args)])
    assert code == 0


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def layers_data(segmentation):
    crop = np.ascontiguousarray(segmentation[100:250, 50:183, 20:90])
    assert crop.shape == SHAPE
    return {"color": demo.render_color(crop, seed=1), "segmentation": crop}


@pytest.fixture(scope="module")
def base(tmp_path_factory, layers_data):
    path = tmp_path_factory.mktemp("base") / "ds"
    demo.write_dataset(
        str(path),
        [
            {"name": "color", "category": "color", "data": layers_data["color"], "top_left": TOP_LEFT},
            {"name": "segmentation", "category": "segmentation", "data": layers_data["segmentation"],
             "top_left": TOP_LEFT},
        ],
        VOXEL_SIZE,
    )
    return path


def copy_of(base, tmp_path_factory, label):
    path = tmp_path_factory.mktemp(label) / "ds"  # same basename: the properties' id.name is the same
    shutil.copytree(base, path)
    return path


@pytest.fixture(scope="module")
def sequential_16(base, tmp_path_factory):
    path = copy_of(base, tmp_path_factory, "seq")
    run_sequential(path, "--coarsest-mag", "16")
    return path


# ---------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("layer, interpolation", [("color", "median"), ("segmentation", "mode")])
def test_sequential_matches_reference(sequential_16, layers_data, layer, interpolation):
    source = layers_data[layer][None]
    check_layer(sequential_16, layer, source, (1, 1, 1), TOP_LEFT, SHAPE, PYRAMID_16, interpolation)


@pytest.fixture(scope="module")
def compiled_16(base, tmp_path_factory):
    """The run of `sequential_16` with the compiled kernels forced on: threshold 0 (these
    passes are far below `COMPILED_MIN_VOXELS`), the kernels loaded before the run, and
    every (interpolation, factor, dtype) the compiled kernels reduced recorded."""
    from beam_downsample.kernels import compiled, reduce  # pylint: disable=import-outside-toplevel
    from beam_downsample.plan import units  # pylint: disable=import-outside-toplevel

    path = copy_of(base, tmp_path_factory, "compiled")
    used = set()
    real = compiled.downsample_box

    def spy(src, src_at, dst, dst_at, shape, factor, interpolation):
        used.add((interpolation, tuple(factor), src.dtype.str))
        return real(src, src_at, dst, dst_at, shape, factor, interpolation)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(units, "COMPILED_MIN_VOXELS", 0)
        patch.setattr(reduce, "_COMPILED", [compiled])
        reduce.prepare([(i, f, np.dtype(d)) for i, d in (("median", "uint8"), ("mode", "uint32"))
                        for f in ((2, 2, 1), (2, 2, 2))])
        for thread in threading.enumerate():
            if thread.name == "beam-downsample-kernels":
                thread.join(300)
        patch.setattr(compiled, "downsample_box", spy)
        run_sequential(path, "--coarsest-mag", "16")
    return path, used


@pytest.mark.parametrize("layer, interpolation, dtype", [("color", "median", "uint8"), ("segmentation", "mode", "uint32")])
def test_compiled_kernels_forced_on_match_reference(compiled_16, layers_data, layer, interpolation, dtype):
    """The production kernels end to end: every level of the pyramid came from a compiled
    kernel (2-2-1 then 2-2-2 steps) and equals the numpy reference."""
    path, used = compiled_16
    assert {(interpolation, (2, 2, 1), np.dtype(dtype).str), (interpolation, (2, 2, 2), np.dtype(dtype).str)} <= used
    check_layer(path, layer, layers_data[layer][None], (1, 1, 1), TOP_LEFT, SHAPE, PYRAMID_16, interpolation)


def test_source_mag_untouched(base, sequential_16):
    for layer in ("color", "segmentation"):
        before = tree_digest(os.path.join(base, layer, "1"))
        assert tree_digest(os.path.join(sequential_16, layer, "1")) == before


def test_properties_gain_mags(base, sequential_16):
    before = read_properties(base)
    after = read_properties(sequential_16)
    for old, new in zip(before["dataLayers"], after["dataLayers"]):
        name = new["name"]
        assert new["mags"] == [
            {"mag": list(m), "path": f"./{name}/{mag_name(m)}", "axisOrder": AXIS_ORDER}
            for m in [(1, 1, 1)] + PYRAMID_16
        ]
        assert {k: v for k, v in new.items() if k != "mags"} == {k: v for k, v in old.items() if k != "mags"}
    assert {k: v for k, v in after.items() if k != "dataLayers"} == {k: v for k, v in before.items() if k != "dataLayers"}
    assert after["dataLayers"][1]["largestSegmentId"] == before["dataLayers"][1]["largestSegmentId"]
    text = open(os.path.join(sequential_16, "datasource-properties.json"), encoding="utf-8").read()
    assert text == json.dumps(after, indent=4)


def check_ngff(dataset, layer, mags, voxel_size=VOXEL_SIZE):
    with open(os.path.join(dataset, layer, "zarr.json"), encoding="utf-8") as handle:
        group = json.load(handle)
    assert group["zarr_format"] == 3 and group["node_type"] == "group"
    ome = group["attributes"]["ome"]
    assert ome["version"] == "0.5"
    multiscale = ome["multiscales"][0]
    assert [a["name"] for a in multiscale["axes"]] == ["c", "x", "y", "z"]
    assert multiscale["axes"][0]["type"] == "channel"
    assert all(a["type"] == "space" and a["unit"] == "nanometer" for a in multiscale["axes"][1:])
    datasets = multiscale["datasets"]
    assert [d["path"] for d in datasets] == [mag_name(m) for m in mags]
    for entry, mag in zip(datasets, mags):
        (transform,) = entry["coordinateTransformations"]
        assert transform["type"] == "scale"
        assert transform["scale"] == pytest.approx([1.0] + [v * m for v, m in zip(voxel_size, mag)])


def check_array_layout(dataset, layer, mag, channels, dtype, bbox_stop, shard):
    with open(os.path.join(dataset, layer, mag_name(mag), "zarr.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    assert meta["zarr_format"] == 3 and meta["node_type"] == "array"
    assert meta["data_type"] == dtype
    assert meta["dimension_names"] == ["c", "x", "y", "z"]
    assert meta["fill_value"] == 0
    end = [-(-b // m) for b, m in zip(bbox_stop, mag)]
    assert meta["shape"] == [channels] + [max(-(-e // s), 1) * s for e, s in zip(end, shard)]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [channels, *shard]
    (sharding,) = meta["codecs"]
    assert sharding["name"] == "sharding_indexed"
    config = sharding["configuration"]
    assert config["chunk_shape"] == [channels, 32, 32, 32]
    inner = config["codecs"]
    assert inner[0] == {"name": "transpose", "configuration": {"order": [3, 2, 1, 0]}}
    assert inner[1]["name"] == "bytes"
    assert inner[2] == {"name": "zstd", "configuration": {"level": 5, "checksum": True}}
    assert [c["name"] for c in config["index_codecs"]] == ["bytes", "crc32c"]
    assert config["index_codecs"][0].get("configuration", {}).get("endian", "little") == "little"
    assert config.get("index_location", "end") == "end"


def test_ngff_and_array_layout(sequential_16):
    stop = [a + s for a, s in zip(TOP_LEFT, SHAPE)]
    for layer, dtype in (("color", "uint8"), ("segmentation", "uint32")):
        check_ngff(sequential_16, layer, [(1, 1, 1)] + PYRAMID_16)
        for mag in PYRAMID_16:
            check_array_layout(sequential_16, layer, mag, 1, dtype, stop, (1024, 1024, 1024))


def test_no_leftovers(sequential_16):
    files = set(tree_bytes(sequential_16))
    assert not any(".beam-downsample" in f or ".tmp" in f for f in files), sorted(files)
    layer_dirs = {f.split(os.sep)[1] for f in files if f.count(os.sep) >= 2}
    assert layer_dirs == {"1"} | {mag_name(m) for m in PYRAMID_16}


def test_multiprocessing_identical_to_sequential(base, sequential_16, tmp_path_factory):
    """Two worker processes, and a small budget so that several units of one pass write
    into the same shard concurrently: still the very same bytes as one sequential run."""
    path = copy_of(base, tmp_path_factory, "mp")
    result = run_cli(path, "--jobs", "2", "--coarsest-mag", "16", "--memory-budget", "964M")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    expected = tree_bytes(sequential_16)
    actual = tree_bytes(path)
    assert sorted(actual) == sorted(expected)
    different = [name for name in expected if actual[name] != expected[name]]
    assert not different


def test_memory_budget_splits_work_identically(base, sequential_16, tmp_path_factory, capsys):
    path = copy_of(base, tmp_path_factory, "budget")
    capsys.readouterr()
    run_sequential(path, "--coarsest-mag", "16", "--memory-budget", "300M")
    plan = capsys.readouterr().out
    assert "pass 2" in plan, plan  # the budget forces several passes ...
    assert any(f"in {n} work units" in plan for n in range(2, 1000)), plan  # ... and several units
    expected = tree_bytes(sequential_16)
    actual = tree_bytes(path)
    assert sorted(actual) == sorted(expected)
    assert not [name for name in expected if actual[name] != expected[name]]


def test_layer_name_only_touches_that_layer(base, tmp_path_factory, layers_data):
    path = copy_of(base, tmp_path_factory, "layer")
    segmentation_before = tree_digest(os.path.join(path, "segmentation"))
    run_sequential(path, "--layer-name", "color")  # default coarsest: max(150, 133) -> 4
    assert tree_digest(os.path.join(path, "segmentation")) == segmentation_before
    raw = read_properties(path)
    color, segmentation = raw["dataLayers"]
    assert [m["mag"] for m in color["mags"]] == [[1, 1, 1], [2, 2, 1], [4, 4, 2]]
    assert [m["mag"] for m in segmentation["mags"]] == [[1, 1, 1]]
    check_layer(path, "color", layers_data["color"][None], (1, 1, 1), TOP_LEFT, SHAPE, [(2, 2, 1), (4, 4, 2)], "median")
    check_ngff(path, "color", [(1, 1, 1), (2, 2, 1), (4, 4, 2)])
    check_ngff(path, "segmentation", [(1, 1, 1)])


def test_continue_from_existing_221(base, tmp_path_factory, layers_data):
    path = copy_of(base, tmp_path_factory, "continue")
    run_sequential(path, "--coarsest-mag", "2-2-1")
    assert [m["mag"] for m in read_properties(path)["dataLayers"][0]["mags"]] == [[1, 1, 1], [2, 2, 1]]
    check_layer(path, "color", layers_data["color"][None], (1, 1, 1), TOP_LEFT, SHAPE, [(2, 2, 1)], "median")

    # Make the color 2-2-1 differ from what mag 1 would give: the next run must start from it.
    start, stop = region(TOP_LEFT, SHAPE, (2, 2, 1))
    array = open_array(os.path.join(path, "color", "2-2-1"))
    index = (slice(None),) + tuple(slice(a, b) for a, b in zip(start, stop))
    modified = (255 - array[index].read().result()) // 3
    array[index].write(modified).result()
    kept = {layer: {m: tree_digest(os.path.join(path, layer, m)) for m in ("1", "2-2-1")}
            for layer in ("color", "segmentation")}

    run_sequential(path, "--coarsest-mag", "8")
    for layer in ("color", "segmentation"):
        for m in ("1", "2-2-1"):
            assert tree_digest(os.path.join(path, layer, m)) == kept[layer][m]
        assert [m["mag"] for m in read_properties(path)["dataLayers"][0]["mags"]] == [
            [1, 1, 1], [2, 2, 1], [4, 4, 2], [8, 8, 4]]
        check_ngff(path, layer, [(1, 1, 1), (2, 2, 1), (4, 4, 2), (8, 8, 4)])
    check_layer(path, "color", modified, (2, 2, 1), TOP_LEFT, SHAPE, [(4, 4, 2), (8, 8, 4)], "median")
    segmentation_221 = read_region(path, "segmentation", (2, 2, 1), TOP_LEFT, SHAPE)
    check_layer(path, "segmentation", segmentation_221, (2, 2, 1), TOP_LEFT, SHAPE, [(4, 4, 2), (8, 8, 4)], "mode")
    # and the segmentation is what one run to 8 would have given
    check_layer(path, "segmentation", layers_data["segmentation"][None], (1, 1, 1), TOP_LEFT, SHAPE,
                [(2, 2, 1), (4, 4, 2), (8, 8, 4)], "mode")


def test_thin_multichannel_and_uint64(tmp_path, layers_data):
    """Depth <= 32: shards 4096x4096x32; 3-channel color; uint64 labels above 2**53."""
    top_left, shape = (1, 2, 3), (70, 60, 20)
    crop = layers_data["segmentation"][:70, :60, :20]
    color = np.stack([demo.render_color(crop, seed=s) for s in range(3)])
    labels = crop.astype(np.uint64) % np.uint64(5)
    labels = np.where(labels == 0, np.uint64(0), labels + np.uint64(2**60))
    path = tmp_path / "ds"
    demo.write_dataset(
        str(path),
        [
            {"name": "color", "category": "color", "data": color, "top_left": top_left},
            {"name": "segmentation", "category": "segmentation", "data": labels, "top_left": top_left},
        ],
        VOXEL_SIZE,
    )
    run_sequential(path, "--coarsest-mag", "8")
    targets = [(2, 2, 1), (4, 4, 2), (8, 8, 4)]
    check_layer(path, "color", color, (1, 1, 1), top_left, shape, targets, "median")
    check_layer(path, "segmentation", labels[None], (1, 1, 1), top_left, shape, targets, "mode")
    stop = [a + s for a, s in zip(top_left, shape)]
    for mag in targets:
        check_array_layout(path, "color", mag, 3, "uint8", stop, (4096, 4096, 32))
        check_array_layout(path, "segmentation", mag, 1, "uint64", stop, (4096, 4096, 32))
    assert read_properties(path)["dataLayers"][0]["numChannels"] == 3


def test_flat_layer_uses_constant_z_and_interpolation_flag(tmp_path, layers_data):
    top_left, shape = (0, 0, 5), (64, 48, 1)
    labels = layers_data["segmentation"][:64, :48, 10:11]
    path = tmp_path / "ds"
    demo.write_dataset(
        str(path), [{"name": "segmentation", "category": "segmentation", "data": labels, "top_left": top_left}],
        (10.0, 10.0, 10.0),
    )
    run_sequential(path, "--interpolation", "max")  # anisotropic by default, but depth 1 -> constant_z
    targets = [(2, 2, 1), (4, 4, 1)]
    assert [m["mag"] for m in read_properties(path)["dataLayers"][0]["mags"]] == [[1, 1, 1], [2, 2, 1], [4, 4, 1]]
    check_layer(path, "segmentation", labels[None], (1, 1, 1), top_left, shape, targets, "max")


def test_second_run_does_nothing(sequential_16, tmp_path_factory):
    path = tmp_path_factory.mktemp("again") / "ds"
    shutil.copytree(sequential_16, path)
    before = tree_digest(path)
    run_sequential(path, "--coarsest-mag", "16")
    assert tree_digest(path) == before
