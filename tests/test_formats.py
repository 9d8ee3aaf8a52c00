"""Every element class in every format, end to end through the CLI, against the
numpy reference of test_end_to_end; arrays are read back with tensorstore's
zarr drivers and the wkw package directly, not through beam_downsample.store.arrays.

Also: every interpolation on every dtype, --interpolation with --layer-name,
layers far from the origin, layers smaller than one chunk, depth-1 layers,
layers without mag 1, and the refusal of formats that cannot be written."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import tensorstore as ts
import wkw
from test_end_to_end import reference_pyramid, run_sequential

from beam_downsample import demo
from beam_downsample.core.mags import mag_name
from beam_downsample.launch import cli
from conftest import read_properties, run_cli, tree_bytes, tree_digest, write_properties

VOXEL_SIZE = (11.24, 11.24, 28.0)
SHAPE = (40, 36, 12)
TOP_LEFT = (3, 5, 7)
TARGETS = [(2, 2, 1), (4, 4, 2)]  # --coarsest-mag 4 at this voxel size


def values(dtype: str, shape, seed: int) -> np.ndarray:
    """Wide values with many ties: the extremes of the dtype, zero, and small numbers."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return (rng.standard_normal(shape) * 1000).astype(dtype)
    info = np.iinfo(dtype)
    pool = np.array([info.min, info.max, 0, 1, 2, info.max // 3, info.min // 3], dtype=dtype)
    wide = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return np.where(rng.random(shape) < 0.5, pool[rng.integers(0, len(pool), shape)], wide)


def element_class_layers(seed: int = 0) -> list[dict]:
    """One color layer per channel dtype, RGB, two uint16 channels, uint64 labels above 2**53."""
    layers = []
    for i, dtype in enumerate(["uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
                               "float32", "float64"]):
        layers.append({"name": f"c_{dtype}", "category": "color", "data": values(dtype, SHAPE, seed + i)})
    layers.append({"name": "rgb", "category": "color", "data": values("uint8", (3, *SHAPE), seed + 20),
                   "element_class": "uint24"})
    layers.append({"name": "two_uint16", "category": "color", "data": values("uint16", (2, *SHAPE), seed + 21)})
    labels = np.random.default_rng(seed + 22).integers(0, 4, SHAPE).astype(np.uint64) * np.uint64(2**60 + 1)
    layers.append({"name": "labels_u64", "category": "segmentation", "data": labels})
    for layer in layers:
        layer["top_left"] = TOP_LEFT
    return layers


# ---------------------------------------------------------------------------
# reading back, independently of beam_downsample.store.arrays


def read_window(dataset, layer: str, mag, data_format: str, low, high) -> np.ndarray:
    """Voxels [low, high) of a mag; beyond a zarr array's shape they read as 0 (fill value)."""
    path = os.path.join(dataset, layer, mag_name(mag))
    if data_format == "wkw":
        return wkw.Dataset.open(path).read(low, [b - a for a, b in zip(low, high)])
    array = ts.open({"driver": data_format, "kvstore": {"driver": "file", "path": path}}).result()
    result = np.zeros((array.shape[0], *[b - a for a, b in zip(low, high)]), dtype=array.dtype.numpy_dtype)
    inside = [min(b, s) for b, s in zip(high, array.shape[1:])]
    stored = array[(slice(None),) + tuple(slice(a, b) for a, b in zip(low, inside))].read().result()
    result[(slice(None),) + tuple(slice(0, b - a) for a, b in zip(low, inside))] = stored
    return result


def check_mag(dataset, layer, mag, data_format, start, expected, margin=40):
    """`expected` at `start`, zeros in a margin around it."""
    stop = [a + s for a, s in zip(start, expected.shape[1:])]
    low = [max(a - margin, 0) for a in start]
    high = [b + margin for b in stop]
    window = read_window(dataset, layer, mag, data_format, low, high)
    inner = (slice(None),) + tuple(slice(a - lo, b - lo) for a, b, lo in zip(start, stop, low))
    assert window.dtype == expected.dtype, f"{layer} {mag_name(mag)}"
    np.testing.assert_array_equal(window[inner], expected, err_msg=f"{layer} {mag_name(mag)}")
    outside = window.copy()
    outside[inner] = 0
    assert not outside.any(), f"{layer} {mag_name(mag)}: non-zero voxels outside the aligned bounding box"


def check_layers(dataset, layers, data_format, targets=TARGETS, interpolation=None):
    for spec in layers:
        data = spec["data"] if spec["data"].ndim == 4 else spec["data"][None]
        source_mag = tuple(spec.get("mag", (1, 1, 1)))
        size = [s * m for s, m in zip(data.shape[1:], source_mag)]
        chosen = interpolation or ("mode" if spec["category"] == "segmentation" else "median")
        pyramid = reference_pyramid(data, source_mag, spec["top_left"], size, targets, chosen)
        for mag, (start, expected) in pyramid.items():
            check_mag(dataset, spec["name"], mag, data_format, start, expected)


def write(tmp_path, layers, data_format, name="ds"):
    path = tmp_path / name
    demo.write_dataset(str(path), layers, VOXEL_SIZE, data_format=data_format)
    return path


# ---------------------------------------------------------------------------
# element classes x formats


@pytest.mark.parametrize("data_format", ["zarr3", "zarr"])
def test_every_element_class(tmp_path, data_format):
    layers = element_class_layers()
    path = write(tmp_path, layers, data_format)
    run_sequential(path, "--coarsest-mag", "4")
    check_layers(path, layers, data_format)
    raw = {layer["name"]: layer for layer in read_properties(path)["dataLayers"]}
    assert raw["rgb"]["elementClass"] == "uint24" and raw["rgb"]["numChannels"] == 3
    assert raw["two_uint16"]["elementClass"] == "uint32" and raw["two_uint16"]["numChannels"] == 2
    for layer in raw.values():
        assert layer["dataFormat"] == data_format
        assert [m["mag"] for m in layer["mags"]] == [[1, 1, 1], [2, 2, 1], [4, 4, 2]]


WKW_LAYERS = ["c_int16", "c_float32", "rgb", "labels_u64"]  # every wkw file costs seconds to compress


def test_wkw_element_classes_and_layout(tmp_path):
    layers = [layer for layer in element_class_layers(seed=5) if layer["name"] in WKW_LAYERS]
    path = write(tmp_path, layers, "wkw")
    run_sequential(path, "--coarsest-mag", "2-2-1")
    check_layers(path, layers, "wkw", targets=[(2, 2, 1)])
    for layer in read_properties(path)["dataLayers"]:
        assert layer["mags"][-1] == {"mag": [2, 2, 1], "path": f"./{layer['name']}/2-2-1", "cubeLength": 1024,
                                     "axisOrder": {"c": 0, "x": 1, "y": 2, "z": 3}}
        header = wkw.Dataset.open(os.path.join(path, layer["name"], "2-2-1")).header
        assert (header.block_len, header.file_len, header.block_type) == (32, 32, wkw.Header.BLOCK_TYPE_LZ4HC)
        assert not os.path.exists(os.path.join(path, layer["name"], ".zattrs"))
    assert not os.path.exists(os.path.join(path, ".beam-downsample")), "staging files left behind"


def test_zarr2_layout_and_ngff(tmp_path):
    layers = [layer for layer in element_class_layers() if layer["name"] in ("c_uint16", "rgb")]
    path = write(tmp_path, layers, "zarr")
    run_sequential(path, "--coarsest-mag", "4")
    for layer, dtype, channels in (("c_uint16", "<u2", 1), ("rgb", "|u1", 3)):
        with open(os.path.join(path, layer, "2-2-1", ".zarray"), encoding="utf-8") as handle:
            meta = json.load(handle)
        stop = [-(-(a + s) // m) for a, s, m in zip(TOP_LEFT, SHAPE, (2, 2, 1))]
        assert meta == {"chunks": [channels, 32, 32, 32], "compressor": {"id": "zstd", "level": 5},
                        "dimension_separator": "/", "dtype": dtype, "fill_value": 0, "filters": None,
                        "order": "F", "shape": [channels] + [-(-e // 32) * 32 for e in stop], "zarr_format": 2}
        with open(os.path.join(path, layer, ".zattrs"), encoding="utf-8") as handle:
            (multiscale,) = json.load(handle)["multiscales"]
        assert multiscale["version"] == "0.4"
        assert [d["path"] for d in multiscale["datasets"]] == ["1", "2-2-1", "4-4-2"]
        assert multiscale["datasets"][2]["coordinateTransformations"] == [
            {"type": "scale", "scale": pytest.approx([1.0, 44.96, 44.96, 56.0])}]
        assert not os.path.exists(os.path.join(path, layer, "zarr.json"))


# ---------------------------------------------------------------------------
# interpolations


@pytest.mark.parametrize("interpolation", ["median", "mode", "mean", "min", "max", "nearest"])
def test_every_interpolation_on_every_dtype(tmp_path, interpolation):
    layers = element_class_layers(seed=7)
    path = write(tmp_path, layers, "zarr3")
    run_sequential(path, "--coarsest-mag", "4", "--interpolation", interpolation)
    check_layers(path, layers, "zarr3", interpolation=interpolation)


def test_interpolation_applies_to_the_named_layer_only(tmp_path):
    layers = [layer for layer in element_class_layers(seed=9) if layer["name"] in ("c_uint8", "labels_u64")]
    path = write(tmp_path, layers, "zarr3")
    labels_before = tree_digest(os.path.join(path, "labels_u64"))
    run_sequential(path, "--coarsest-mag", "4", "--layer-name", "c_uint8", "--interpolation", "max")
    check_layers(path, layers[:1], "zarr3", interpolation="max")
    assert tree_digest(os.path.join(path, "labels_u64")) == labels_before
    run_sequential(path, "--coarsest-mag", "4")  # now the other layer, with its default (mode)
    check_layers(path, layers[1:], "zarr3")
    check_layers(path, layers[:1], "zarr3", interpolation="max")  # untouched by the second run


# ---------------------------------------------------------------------------
# odd geometry: far from the origin, smaller than a chunk, one voxel deep, no mag 1


GEOMETRY = {
    "far": {"top_left": (1030, 2077, 70), "shape": (50, 40, 20)},
    "tiny": {"top_left": (5, 3, 2), "shape": (5, 3, 9)},
    "flat": {"top_left": (40, 9, 13), "shape": (60, 50, 1)},
}


@pytest.mark.parametrize("data_format", ["zarr3", "zarr", "wkw"])
@pytest.mark.parametrize("geometry", GEOMETRY)
def test_odd_geometry(tmp_path, data_format, geometry):
    """One layer per dataset (layers align their mags with each other's); depth 1 -> constant_z."""
    top_left, shape = GEOMETRY[geometry]["top_left"], GEOMETRY[geometry]["shape"]
    layer = {"name": geometry, "category": "color", "data": values("uint16", shape, seed=30), "top_left": top_left}
    path = write(tmp_path, [layer], data_format)
    coarsest = "2-2-1" if data_format == "wkw" else "4"  # every wkw file costs seconds to compress
    run_sequential(path, "--coarsest-mag", coarsest)
    targets = [(2, 2, 1)] if data_format == "wkw" else [(2, 2, 1), (4, 4, 1 if shape[2] == 1 else 2)]
    check_layers(path, [layer], data_format, targets=targets)
    (raw,) = read_properties(path)["dataLayers"]
    assert [m["mag"] for m in raw["mags"]] == [[1, 1, 1]] + [list(m) for m in targets]


@pytest.mark.parametrize("data_format", ["zarr3", "zarr"])
def test_layer_without_mag_1_starts_at_its_finest_mag(tmp_path, data_format):
    data = values("uint8", (20, 18, 12), seed=40)
    labels = values("uint32", (20, 18, 12), seed=41) % 3
    layers = [
        {"name": "color", "category": "color", "data": data, "top_left": (4, 6, 7), "mag": (2, 2, 1)},
        {"name": "segmentation", "category": "segmentation", "data": labels, "top_left": (4, 6, 7), "mag": (2, 2, 1)},
    ]
    path = write(tmp_path, layers, data_format)
    assert [m["mag"] for m in read_properties(path)["dataLayers"][0]["mags"]] == [[2, 2, 1]]
    run_sequential(path, "--coarsest-mag", "8")
    targets = [(4, 4, 2), (8, 8, 4)]
    check_layers(path, layers, data_format, targets=targets)
    for layer in read_properties(path)["dataLayers"]:
        assert [m["mag"] for m in layer["mags"]] == [[2, 2, 1], [4, 4, 2], [8, 8, 4]]
        assert not os.path.exists(os.path.join(path, layer["name"], "1"))


# ---------------------------------------------------------------------------
# formats we cannot write


@pytest.mark.parametrize("data_format, message", [
    ("n5", "dataFormat 'n5', which is read-only"),
    ("neuroglancerPrecomputed", "dataFormat 'neuroglancerPrecomputed', which is read-only"),
    ("tiff", "unknown dataFormat 'tiff'"),
])
def test_unwritable_formats_refused(tiny_dataset, data_format, message):
    raw = read_properties(tiny_dataset)
    raw["dataLayers"][1]["dataFormat"] = data_format
    write_properties(tiny_dataset, raw)
    before = tree_digest(tiny_dataset)
    result = run_cli(tiny_dataset, "--distribution-strategy", "sequential")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("beam-downsample: error: "), result.stderr
    assert message in lines[0] and "'segmentation'" in lines[0]
    assert "Traceback" not in result.stderr
    assert tree_digest(tiny_dataset) == before


# ---------------------------------------------------------------------------
# wkw: several units share a staging file; crashes before and during compression


@pytest.fixture(scope="module")
def wkw_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("wkw_base") / "ds"
    data = values("uint16", (300, 260, 40), seed=50)
    demo.write_dataset(str(path), [{"name": "color", "category": "color", "data": data, "top_left": TOP_LEFT}],
                       VOXEL_SIZE, data_format="wkw")
    return path


WKW_ARGS = ("--coarsest-mag", "4", "--memory-budget", "300M")  # 6 units share each 2-2-1 and 4-4-2 file


@pytest.fixture(scope="module")
def wkw_clean(wkw_base, tmp_path_factory):
    path = tmp_path_factory.mktemp("wkw_clean") / "ds"
    shutil.copytree(wkw_base, path)
    run_sequential(path, *WKW_ARGS)
    return path


def test_wkw_units_sharing_files_in_two_processes(wkw_base, wkw_clean, tmp_path):
    path = tmp_path / "ds"
    shutil.copytree(wkw_base, path)
    # 964M: the launcher and two worker processes (300 MiB each) plus two 32 MiB units
    result = run_cli(path, *WKW_ARGS[:-1], "964M", "--jobs", "2")
    assert result.returncode == 0, result.stderr
    assert "in 6 work units" in result.stdout
    assert tree_bytes(path) == tree_bytes(wkw_clean)


@pytest.mark.parametrize("in_memory", [True, False], ids=["from-memory", "file-to-file"])
def test_wkw_rerun_after_crash_in_compression_is_identical(wkw_base, wkw_clean, tmp_path, monkeypatch, in_memory):
    """Killed after every unit is done and one of two files is compressed: the rerun
    skips the units, compresses the rest and ends byte-identical to a clean run
    (which compressed from memory), whichever way the files are compressed."""
    from beam_downsample.store import wkw_io  # pylint: disable=import-outside-toplevel

    path = tmp_path / "ds"
    shutil.copytree(wkw_base, path)
    if not in_memory:
        monkeypatch.setattr(wkw_io, "IN_MEMORY_BYTES", 0)
    compress_file = wkw_io.compress_file
    calls = []

    def crashing(*args):
        calls.append(args)
        compress_file(*args)  # the temp file is complete: the crash comes before its rename
        if len(calls) > 1:
            raise OSError("simulated crash while compressing")

    monkeypatch.setattr(wkw_io, "compress_file", crashing)
    assert cli.main(["beam-downsample", str(path), "--distribution-strategy", "sequential", *WKW_ARGS]) != 0
    assert [m["mag"] for m in read_properties(path)["dataLayers"][0]["mags"]] == [[1, 1, 1]]
    monkeypatch.setattr(wkw_io, "compress_file", compress_file)
    run_sequential(path, *WKW_ARGS)
    assert tree_bytes(path) == tree_bytes(wkw_clean)


def test_wkw_staging_files_exist_before_any_unit_runs(tmp_path):
    """Units only write blocks into existing staging files, so no two processes race to create one."""
    from beam_downsample.core.box import Box  # pylint: disable=import-outside-toplevel
    from beam_downsample.store import arrays, wkw_io  # pylint: disable=import-outside-toplevel
    from beam_downsample.store.properties import load_dataset  # pylint: disable=import-outside-toplevel

    def staged(root):
        return sorted(os.path.relpath(os.path.join(d, f), root)
                      for d, _, files in os.walk(root) for f in files if f != "header.wkw")

    layer = {"name": "far", "category": "color", "data": values("uint8", (50, 40, 20), seed=60),
             "top_left": GEOMETRY["far"]["top_left"]}
    path = write(tmp_path, [layer], "wkw")
    (loaded,) = load_dataset(str(path)).layers
    spec = arrays.new_mag_spec(loaded, str(path), (2, 2, 1))
    assert arrays.create_mag(spec, resume=False) is False
    assert staged(spec["staging"]) == [os.path.join("z0", "y1", "x0.wkw")]  # 2-2-1: x 515..540, y 1038..1059
    assert arrays.create_mag(spec, resume=True) is True
    wkw_io.create_staging_files(spec["staging"], Box((1000, 0, 2040), (1100, 10, 2050)))  # 2 x 2 files
    assert staged(spec["staging"]) == [os.path.join("z0", "y1", "x0.wkw")] + [
        os.path.join(f"z{z}", "y0", f"x{x}.wkw") for z in (1, 2) for x in (0, 1)]
    data = wkw.Dataset.open(spec["staging"]).read((0, 0, 0), (1100, 10, 2050))
    assert not data.any()
