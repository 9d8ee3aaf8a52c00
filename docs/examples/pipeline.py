"""Write mag 1 of a new segmentation layer in a Beam pipeline, then downsample it in the same pipeline.

    python docs/examples/pipeline.py DATASET_DIR

tests/test_library.py runs this file (with Beam's FnApiRunner) and compares the result
with `beam-downsample` run afterwards.
"""

from __future__ import annotations

import json
import os
import sys

import apache_beam as beam
import numpy as np
import tensorstore as ts

import beam_downsample as bd

SIZE = (256, 192, 64)  # x, y, z voxels of the new layer
BLOCK = 64  # the pipeline writes mag 1 in blocks of 64^3 voxels


def create_layer(dataset: str, name: str = "segmentation") -> dict:
    """An empty uint32 mag 1 (zarr3) and a properties file that lists it: what a tool that
    starts a new layer writes before its pipeline runs. Returns the mag's tensorstore spec."""
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": os.path.join(dataset, name, "1")},
        "metadata": {
            "shape": [1, *SIZE],
            "data_type": "uint32",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, 32, 32, 32]}},
            "dimension_names": ["c", "x", "y", "z"],
        },
    }
    ts.open(spec, create=True, delete_existing=True).result()
    layer = {
        "name": name, "category": "segmentation", "elementClass": "uint32", "dataFormat": "zarr3",
        "numChannels": 1, "largestSegmentId": 1000,
        "boundingBox": {"topLeft": [0, 0, 0], "width": SIZE[0], "height": SIZE[1], "depth": SIZE[2]},
        "mags": [{"mag": [1, 1, 1], "path": f"./{name}/1"}],
    }
    properties = {"id": {"name": os.path.basename(dataset), "team": ""}, "version": 1,
                  "scale": {"factor": [11.24, 11.24, 28.0], "unit": "nanometer"}, "dataLayers": [layer]}
    with open(os.path.join(dataset, "datasource-properties.json"), "w", encoding="utf-8") as file:
        json.dump(properties, file, indent=2)
    return spec


class WriteBlock(beam.DoFn):
    """Your step: computes one block of labels (here: random ones) and writes it into mag 1."""

    def __init__(self, spec: dict):
        self._spec = spec

    def setup(self):
        self._array = ts.open(self._spec).result()

    def process(self, corner):
        x, y, z = corner
        labels = np.random.default_rng(x + 7 * y + 49 * z).integers(0, 50, (1, BLOCK, BLOCK, BLOCK), dtype=np.uint32)
        self._array[:, x:x + BLOCK, y:y + BLOCK, z:z + BLOCK].write(labels).result()
        yield corner


def build(pipeline: beam.Pipeline, dataset: str, spec: dict, downsample: bool = True):
    """Adds the job to `pipeline`: write every block, then (with `downsample`) make the pyramid."""
    corners = [(x, y, z) for x in range(0, SIZE[0], BLOCK) for y in range(0, SIZE[1], BLOCK)
               for z in range(0, SIZE[2], BLOCK)]
    written = pipeline | "Blocks" >> beam.Create(corners) | "Write" >> beam.ParDo(WriteBlock(spec))
    if not downsample:
        return written
    # starts once every block is written; one LayerResult per layer comes out when the job is done
    return written | "Downsample" >> bd.beam.DownsamplePyramid(dataset, "segmentation")


def main(dataset: str, runner=None) -> None:
    os.makedirs(dataset, exist_ok=True)
    spec = create_layer(dataset)
    with bd.beam.lock_layers(dataset, "segmentation"):  # keeps a beam-downsample of this layer away meanwhile
        with beam.Pipeline(runner=runner) as pipeline:
            results = build(pipeline, dataset, spec)
            _ = results | "Print" >> beam.Map(print)


if __name__ == "__main__":
    main(sys.argv[1])
