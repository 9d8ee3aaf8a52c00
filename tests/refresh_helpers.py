"""Helpers of the `--bbox` tests (test_refresh.py, test_gcs.py): a pyramid read back as
plain numbers, to compare a refreshed dataset with a full recompute."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from beam_downsample.core.box import Box, region_in_mag
from beam_downsample.store import arrays
from beam_downsample.store.properties import load_dataset

STATE_DIR = ".beam-downsample"


def mag_voxels(path) -> dict:
    """Every mag's voxels over the layer's region, per (layer, mag)."""
    dataset = load_dataset(str(path))
    voxels = {}
    for layer in dataset.layers:
        for mag in layer.mags:
            array = arrays.open_array(arrays.existing_mag_spec(layer, dataset.path, mag), open=True)
            voxels[layer.name, mag] = arrays.read_box(array, region_in_mag(layer.bbox, mag), layer.num_channels)
    return voxels


def metadata(path) -> dict:
    """Properties, layer NGFF metadata and each mag's array metadata (JSON, or wkw header bytes)."""
    found = {}
    for root, _, files in os.walk(path):
        for name in files:
            if name in ("datasource-properties.json", "zarr.json", ".zattrs", ".zgroup", ".zarray"):
                with open(os.path.join(root, name), encoding="utf-8") as handle:
                    found[os.path.relpath(os.path.join(root, name), path)] = json.load(handle)
            elif name == "header.wkw":
                with open(os.path.join(root, name), "rb") as handle:
                    found[os.path.relpath(os.path.join(root, name), path)] = handle.read()
    return found


def assert_same_pyramid(got, expected) -> None:
    assert metadata(got) == metadata(expected)
    got_voxels, expected_voxels = mag_voxels(got), mag_voxels(expected)
    assert got_voxels.keys() == expected_voxels.keys()
    for key, value in expected_voxels.items():
        differ = int(np.count_nonzero(got_voxels[key] != value))
        assert differ == 0, f"{key}: {differ} voxels differ from a full recompute"
    assert not (got / STATE_DIR).exists()


def edit_finest_mag(path, box6, seed: int) -> None:
    """New random values (and an erased slab) in the box, in mag 1 of every layer (zarr only)."""
    dataset = load_dataset(str(path))
    rng = np.random.default_rng(seed)
    box = Box(tuple(box6[:3]), tuple(a + s for a, s in zip(box6[:3], box6[3:])))
    for layer in dataset.layers:
        array = arrays.open_array(arrays.existing_mag_spec(layer, dataset.path, (1, 1, 1)), open=True)
        inside = box.intersect(layer.bbox)
        data = rng.integers(1, 200, (layer.num_channels, *inside.shape)).astype(layer.dtype)
        data[..., : max(inside.shape[2] // 3, 1)] = 0
        arrays.write_region(array, inside, data).result()


def copy_pyramid(pyramid, target) -> None:
    """Every mag but mag 1, the layers' metadata and the properties of `pyramid` into `target`
    (whose mag 1 was written with edited data): a pyramid made before the edit (stale)."""
    for layer in os.listdir(pyramid):
        if not (pyramid / layer).is_dir():
            continue
        for name in os.listdir(pyramid / layer):
            if name == "1":
                continue
            source, dest = pyramid / layer / name, target / layer / name
            if dest.is_dir():
                shutil.rmtree(dest)
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, dest)
    shutil.copy2(pyramid / "datasource-properties.json", target / "datasource-properties.json")
