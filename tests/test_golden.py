"""Every CI run against webknossos 4.3.3's own output, with no reference installed.

`tests/golden/` holds small outputs of the reference, made by
`benchmarks/make_golden.py` (the reference in its own venv, as a black box):
the input arrays (`inputs-*.npz`) and, per case, every new mag of every layer
and the mags the reference listed (`CASE.npz`). The inputs are built for the
edges: ties in most 2-2-1 and 2-2-2 blocks (median middle pairs and mode
tie-breaks), odd sizes at an odd offset (partial border blocks), NaN, both
zeros and infinities in a float32 layer, negative int16, two uint16
channels, uint64 ids above 2**53, color and segmentation layers, an
anisotropic (2-2-1, 4-4-2, 8-8-4) and an isotropic (2, 4, 8) chain; the
`floats` case holds NaN of both signs, sums above the largest float32 and
subnormals, where float arithmetic has choices.

Each case runs as users run it (the command, default strategy: numpy kernels
for these small passes) and once with the compiled kernels forced on
(threshold 0, loaded before the run, their use asserted). Every voxel must
be bit-identical (floats compared as bits).
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from beam_downsample import demo
from beam_downsample.core.box import Box, region_in_mag
from beam_downsample.core.mags import factor_between, parse_mag
from beam_downsample.kernels import compiled, reduce
from beam_downsample.launch import cli
from beam_downsample.plan import units
from conftest import open_array, read_properties, run_cli

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
CASES = sorted(name[:-4] for name in os.listdir(GOLDEN) if name.endswith(".npz") and not name.startswith("inputs-"))


def load(name: str) -> tuple[dict, dict]:
    with np.load(os.path.join(GOLDEN, f"{name}.npz")) as data:
        return json.loads(str(data["meta"])), {key: data[key] for key in data.files if key != "meta"}


def write_inputs(name: str, path) -> dict:
    """The golden inputs as a dataset written by us; returns their meta."""
    meta, arrays = load(f"inputs-{name}")
    layers = []
    for layer in meta["layers"]:
        spec = {"name": layer["name"], "category": layer["category"], "data": arrays[f"layer/{layer['name']}"],
                "top_left": tuple(meta["top_left"])}
        if "largest_segment_id" in layer:
            spec["largest_segment_id"] = layer["largest_segment_id"]
        layers.append(spec)
    demo.write_dataset(str(path), layers, tuple(meta["voxel_size"]))
    return meta


def compare(path, case: str) -> int:
    """Asserts the dataset at `path` holds the case's golden mags, bit for bit; returns the mags compared."""
    meta, expected = load(case)
    inputs, input_arrays = load(f"inputs-{meta['inputs']}")
    listed = {layer["name"]: [m["path"].rsplit("/", 1)[-1] for m in layer["mags"]]
              for layer in read_properties(path)["dataLayers"]}
    assert listed == meta["listed"]
    start = tuple(inputs["top_left"])
    for key, golden in sorted(expected.items()):
        name, mag = key.split("/")
        size = input_arrays[f"layer/{name}"].shape[-3:]
        region = region_in_mag(Box(start, tuple(a + s for a, s in zip(start, size))), parse_mag(mag))
        array = open_array(os.path.join(str(path), name, mag))
        ours = array[(slice(None),) + tuple(slice(a, b) for a, b in zip(region.start, region.stop))].read().result()
        assert ours.shape == golden.shape, key
        if golden.dtype.kind == "f":
            ours, golden = ours.view(f"u{golden.dtype.itemsize}"), golden.view(f"u{golden.dtype.itemsize}")
        differ = np.argwhere(ours != golden)
        assert not differ.size, f"{case} {key}: {len(differ)} voxels differ from webknossos 4.3.3, e.g. at {differ[0].tolist()}"
    return len(expected)


def test_the_fixtures_are_small_and_cover_the_cases():
    sizes = sum(os.path.getsize(os.path.join(GOLDEN, name)) for name in os.listdir(GOLDEN))
    assert sizes < 500_000
    assert set(CASES) >= {"aniso", "iso", "uint64", "floats"}
    main, arrays = load("inputs-main")
    floats = arrays["layer/color_f32"]
    assert np.isnan(floats).any() and (np.signbit(floats) & (floats == 0)).any() and np.isinf(floats).any()
    assert arrays["layer/color_u16x2"].shape[0] == 2
    assert {layer["category"] for layer in main["layers"]} == {"color", "segmentation"}
    _, big = load("inputs-uint64")
    assert (big["layer/segmentation"] > 2**53).any()
    _, special = load("inputs-floats")
    values = special["layer/color_f32"]
    assert {True, False} <= set(np.signbit(values[np.isnan(values)]).tolist())  # NaN of both signs
    assert (np.abs(values) > 3e38).any() and ((values != 0) & (np.abs(values) < np.finfo(np.float32).tiny)).any()


@pytest.mark.parametrize("case", CASES)
def test_the_command_matches_webknossos(case, tmp_path):
    meta, _ = load(case)
    path = tmp_path / "ds"
    write_inputs(meta["inputs"], path)
    result = run_cli(path, *meta["flags"])
    assert result.returncode == 0, result.stderr
    assert compare(path, case) > 0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_the_compiled_kernels_match_webknossos(case, tmp_path, monkeypatch):
    """Threshold 0 (every pass uses the compiled kernels), kernels loaded before the run,
    and every level of every layer reduced by them."""
    meta, _ = load(case)
    path = tmp_path / "ds"
    inputs = write_inputs(meta["inputs"], path)
    monkeypatch.setattr(units, "COMPILED_MIN_VOXELS", 0)
    monkeypatch.setattr(reduce, "_COMPILED", [compiled])
    factors = [(2, 2, 1), (2, 2, 2)]
    kernels = [(("median" if layer["category"] == "color" else "mode"), f, np.dtype(layer["dtype"]))
               for layer in inputs["layers"] for f in factors]
    reduce.prepare(kernels)
    for thread in threading.enumerate():
        if thread.name == "beam-downsample-kernels":
            thread.join(300)
    used = set()
    real = compiled.downsample_box

    def spy(src, src_at, dst, dst_at, shape, factor, interpolation):
        used.add((interpolation, tuple(factor), src.dtype.str))
        return real(src, src_at, dst, dst_at, shape, factor, interpolation)

    monkeypatch.setattr(compiled, "downsample_box", spy)
    assert cli.main(["beam-downsample", str(path), "--distribution-strategy", "sequential", *meta["flags"]]) == 0
    assert compare(path, case) > 0
    for layer in inputs["layers"]:
        interpolation = "median" if layer["category"] == "color" else "mode"
        mags = [parse_mag(name) for name in meta["listed"][layer["name"]]]
        for factor in {factor_between(a, b) for a, b in zip(mags, mags[1:])}:
            assert (interpolation, factor, np.dtype(layer["dtype"]).str) in used, (layer["name"], factor)
