"""Writes WEBKNOSSOS zarr3 datasets: the bundled demo, and fixtures for tests
and benchmarks.

`python -m beam_downsample.demo PATH` writes the demo dataset: the real EM
segmentation bundled in `beam_downsample/data/` (seung-lab igneous test data,
pinky40 EM segmentation, 512^3 uint32 at 32x32x40 nm) plus a color layer
rendered from it (bright cells, dark membranes, noise).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Sequence

import numpy as np

from beam_downsample.core.box import Box
from beam_downsample.core.mags import Mag
from beam_downsample.store import arrays
from beam_downsample.store.properties import element_class_for, mag_entry, save_properties
from beam_downsample.store.storage import write_json_atomically

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
SEGMENTATION_FILE = os.path.join(DATA_DIR, "connectomics.npy.ckl.gz")


def load_segmentation() -> np.ndarray:
    """The bundled 512^3 uint32 segmentation (x, y, z)."""
    import crackle  # pylint: disable=import-outside-toplevel

    return np.asarray(crackle.load(SEGMENTATION_FILE))


def render_color(segmentation: np.ndarray, seed: int = 0) -> np.ndarray:
    """An EM-like uint8 image: membranes (label changes) dark, cells bright, plus noise."""
    boundary = np.zeros(segmentation.shape, dtype=bool)
    for axis in range(3):
        front = [slice(None)] * 3
        back = [slice(None)] * 3
        front[axis] = slice(1, None)
        back[axis] = slice(None, -1)
        boundary[tuple(front)] |= segmentation[tuple(front)] != segmentation[tuple(back)]
    rng = np.random.default_rng(seed)
    image = np.where(boundary, 60, 170).astype(np.int16)
    image += rng.integers(-40, 41, size=segmentation.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def layer_properties(
    name: str,
    category: str,
    element_class: str,
    top_left: Sequence[int],
    size: Sequence[int],
    mags: Sequence[Mag] = ((1, 1, 1),),
    num_channels: int = 1,
    largest_segment_id: int | None = None,
    data_format: str = "zarr3",
) -> dict:
    layer = {
        "name": name,
        "category": category,
        "boundingBox": {"topLeft": list(top_left), "width": size[0], "height": size[1], "depth": size[2]},
        "dataFormat": data_format,
        "mags": [mag_entry(name, m, data_format) for m in mags],
        "numChannels": num_channels,
        "elementClass": element_class,
    }
    if category == "segmentation":
        layer["largestSegmentId"] = largest_segment_id
    return layer


def write_dataset(
    path: str,
    layers: Sequence[dict],
    voxel_size: Sequence[float],
    name: str | None = None,
    data_format: str = "zarr3",
) -> None:
    """Writes a dataset in `data_format` (zarr3, zarr or wkw, the reference's layouts); each
    layer dict has `name`, `category`, `data` (c, x, y, z) or (x, y, z) in mag-1 voxels,
    optional `top_left`, `element_class`, `largest_segment_id`, `mag`."""
    from beam_downsample.store.properties import load_dataset  # pylint: disable=import-outside-toplevel

    os.makedirs(path, exist_ok=True)
    raw_layers = []
    for spec in layers:
        data = spec["data"]
        if data.ndim == 3:
            data = data[None]
        top_left = tuple(spec.get("top_left", (0, 0, 0)))
        mag = tuple(spec.get("mag", (1, 1, 1)))
        channels = data.shape[0]
        element_class = spec.get("element_class") or element_class_for(data.dtype, channels)
        size = [s * m for s, m in zip(data.shape[1:], mag)]
        largest = spec.get("largest_segment_id")
        if spec["category"] == "segmentation" and largest is None:
            largest = int(data.max())
        raw_layers.append(
            layer_properties(spec["name"], spec["category"], element_class, top_left, size, [mag], channels, largest,
                             data_format)
        )
    _write_header(path, name, voxel_size, raw_layers, data_format)
    dataset = load_dataset(path)
    for spec, layer in zip(layers, dataset.layers):
        data = spec["data"] if spec["data"].ndim == 4 else spec["data"][None]
        (mag,) = layer.mags
        spec = arrays.new_mag_spec(layer, path, mag)
        arrays.create_mag(spec, resume=False)
        array = arrays.open_array(arrays.target_spec(layer, path, mag), open=True)
        start = tuple(a // m for a, m in zip(layer.bbox.start, mag))
        box = Box(start, tuple(a + s for a, s in zip(start, data.shape[1:])))  # type: ignore[arg-type]
        arrays.write_region(array, box, data).result()
        arrays.finish_mags([spec])
        arrays.update_ngff(os.path.join(path, layer.name), layer, dataset.voxel_size, dataset.unit, [mag])
    shutil.rmtree(os.path.join(path, arrays.STATE_DIR), ignore_errors=True)  # wkw staging


def _write_header(path: str, name, voxel_size: Sequence[float], raw_layers: list, data_format: str) -> None:
    """The dataset's properties and, for zarr, its group metadata."""
    raw = {
        "id": {"name": name or os.path.basename(os.path.abspath(path)), "team": ""},
        "scale": {"factor": [float(v) for v in voxel_size], "unit": "nanometer"},
        "dataLayers": raw_layers,
        "version": 1,
    }
    if data_format == "zarr3":
        write_json_atomically(os.path.join(path, "zarr.json"), {"zarr_format": 3, "node_type": "group"})
    elif data_format == "zarr":
        write_json_atomically(os.path.join(path, ".zgroup"), {"zarr_format": "2"})
    save_properties(path, raw)


def write_sparse_dataset(
    path: str,
    size: Sequence[int],
    layers: Sequence[dict],
    voxel_size: Sequence[float],
    data_format: str = "zarr3",
) -> None:
    """A dataset whose layers have the bounding box `size` (from the origin) but hold
    data only in a few blocks: each layer dict has `name`, `category`, `dtype` and
    `blocks`, a list of (offset, data (x, y, z)) in mag-1 voxels. Only the blocks'
    chunks, shards or wkw files are stored; costs grow with the blocks, not the box."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    from beam_downsample.core.grid import UnitGrid  # pylint: disable=import-outside-toplevel
    from beam_downsample.store.properties import load_dataset  # pylint: disable=import-outside-toplevel

    os.makedirs(path, exist_ok=True)
    raw_layers = []
    for spec in layers:
        dtype = np.dtype(spec["dtype"])
        largest = max((int(d.max()) for _, d in spec["blocks"]), default=0)
        raw_layers.append(layer_properties(spec["name"], spec["category"], element_class_for(dtype, 1), (0, 0, 0),
                                           list(size), [(1, 1, 1)], 1, largest, data_format))
    _write_header(path, None, voxel_size, raw_layers, data_format)
    dataset = load_dataset(path)
    for spec, layer in zip(layers, dataset.layers):
        mag = (1, 1, 1)
        create = arrays.new_mag_spec(layer, path, mag)
        files = None
        if data_format == "wkw":
            side = 1024
            grid = UnitGrid("", 0, layer.bbox, (side, side, side))
            starts = np.array([o for o, _ in spec["blocks"]], dtype=np.int64).reshape(-1, 3)
            stops = starts + np.array([d.shape for _, d in spec["blocks"]], dtype=np.int64).reshape(-1, 3)
            files = grid.boxes(grid.overlapping(starts, stops))[0] // side
        arrays.create_mag(create, resume=False, files=files)
        array = arrays.open_array(arrays.target_spec(layer, path, mag), open=True)
        for offset, data in spec["blocks"]:
            box = Box(tuple(offset), tuple(a + s for a, s in zip(offset, data.shape)))  # type: ignore[arg-type]
            arrays.write_region(array, box, np.asfortranarray(data[None])).result()
        arrays.finish_mags([create])
        arrays.update_ngff(os.path.join(path, layer.name), layer, dataset.voxel_size, dataset.unit, [mag])
    shutil.rmtree(os.path.join(path, arrays.STATE_DIR), ignore_errors=True)  # wkw staging


def make_demo(path: str, depth: int = 256) -> None:
    segmentation = load_segmentation()[:, :, :depth]
    write_dataset(
        path,
        [
            {"name": "color", "category": "color", "data": render_color(segmentation)},
            {"name": "segmentation", "category": "segmentation", "data": segmentation},
        ],
        voxel_size=(32.0, 32.0, 40.0),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the beam-downsample demo dataset.")
    parser.add_argument("path", help="directory to create (must not exist)")
    parser.add_argument("--depth", type=int, default=256, help="z extent (1..512, default 256)")
    args = parser.parse_args(argv)
    if os.path.exists(args.path):
        print(f"demo: {args.path} exists already; remove it or choose another path", file=sys.stderr)
        return 2
    make_demo(args.path, args.depth)
    print(f"demo dataset written to {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
