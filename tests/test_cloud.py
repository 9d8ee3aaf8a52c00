"""Cloud-native I/O: a unit's source in a few rounds of requests (store.prefetch), bookkeeping
bounded per unit and per pass, request counts the user sees, planning that reads little.

The prefetch path is checked against tensorstore's own reads of the same arrays on local
files (any kvstore works; only remote ones use it in a run), for zarr3 sharded, zarr3
unsharded and zarr v2. Request counts are measured by the counting proxy of
benchmarks/gcs_requests.py in front of fake-gcs-server.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest
import tensorstore as ts

from beam_downsample import demo
from beam_downsample.core.box import Box, split_box
from beam_downsample.store import arrays, prefetch, stored

VOXEL_SIZE = (11.24, 11.24, 28.0)
FORMATS = ["zarr3", "zarr3-unsharded", "zarr"]


def unshard(dataset, layer: str) -> None:
    """Rewrites `layer`'s mag 1 as an unsharded zarr3 array of 32^3 chunks (one object per chunk)."""
    path = os.path.join(os.fspath(dataset), layer, "1")
    source = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}).result()
    data = source.read().result()
    metadata = source.spec().to_json()["metadata"]
    inner = metadata["codecs"][0]["configuration"]
    shutil.rmtree(path)
    target = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}, "create": True, "metadata": {
        "shape": metadata["shape"], "data_type": metadata["data_type"], "fill_value": 0,
        "dimension_names": metadata.get("dimension_names"),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": inner["chunk_shape"]}},
        "codecs": inner["codecs"]}}).result()
    target.write(data).result()


def blocks_dataset(path, segmentation, data_format: str, size=(200, 150, 96)) -> np.ndarray:
    """A segmentation layer of real data with empty chunks between two blocks (so some chunks
    are not stored); returns the layer as numpy (x, y, z)."""
    dense = np.zeros(size, dtype=np.uint32)
    dense[5:90, 10:70, 3:40] = segmentation[100:185, 60:120, 20:57]
    dense[130:200, 100:150, 64:96] = segmentation[0:70, 0:50, 0:32]
    fmt = "zarr3" if data_format == "zarr3-unsharded" else data_format
    demo.write_dataset(str(path), [{"name": "segmentation", "category": "segmentation", "data": dense}],
                       VOXEL_SIZE, data_format=fmt)
    if data_format == "zarr3-unsharded":
        unshard(path, "segmentation")
    return dense


def source_spec(path, data_format: str) -> dict:
    driver = "zarr" if data_format == "zarr" else "zarr3"
    return {"driver": driver, "kvstore": arrays.kvstore_spec(os.path.join(os.fspath(path), "segmentation", "1"))}


@pytest.mark.parametrize("data_format, whole", [(f, False) for f in FORMATS] + [("zarr3", True)])
def test_fetched_box_reads_like_the_source(segmentation, tmp_path, data_format, whole):
    """Every box read from the fetched chunks equals tensorstore's read of the source, and the
    stored-or-not answers equal tensorstore's storage statistics, for each format. `whole`: the
    layer's region is given, so a box holding a shard's part of it reads that shard whole."""
    dense = blocks_dataset(tmp_path / "ds", segmentation, data_format)
    spec = source_spec(tmp_path / "ds", data_format)
    source = arrays.open_array(spec, open=True)
    fetcher = prefetch.Prefetcher(spec, source)
    assert (fetcher.layout.shard is not None) == (data_format == "zarr3")
    rng = np.random.default_rng(3)
    for box in [Box((0, 0, 0), (200, 150, 96)), Box((64, 32, 32), (160, 128, 96)), Box((96, 0, 0), (128, 32, 32)),
                Box((150, 120, 60), (260, 200, 130))]:
        fetched = fetcher.fetch(box, Box((0, 0, 0), dense.shape) if whole else None)
        inside = box.intersect(Box((0, 0, 0), dense.shape))
        np.testing.assert_array_equal(arrays.read_box(fetched.array, inside, 1)[0], dense[
            tuple(slice(a, b) for a, b in zip(inside.start, inside.stop))])
        tiles = split_box(box, (32, 32, 32), 32**3 * 2)
        starts = rng.integers(0, 3, size=(len(tiles), 3)) * 16
        pieces = [Box(tuple(np.add(t.start, s)), t.stop) for t, s in zip(tiles, starts)]
        assert fetched.states(pieces) == stored.box_states(source, pieces), box
        assert fetched.nbytes > 0 or not dense[tuple(slice(a, b) for a, b in zip(inside.start, inside.stop))].any()


def test_a_box_with_nothing_stored_fetches_nothing(segmentation, tmp_path):
    blocks_dataset(tmp_path / "ds", segmentation, "zarr3")
    spec = source_spec(tmp_path / "ds", "zarr3")
    fetched = prefetch.Prefetcher(spec, arrays.open_array(spec, open=True)).fetch(Box((96, 0, 0), (128, 32, 32)))
    assert fetched.nbytes == 0 and fetched.states([fetched.box]) == [stored.NOTHING]
    assert not arrays.read_box(fetched.array, fetched.box, 1).any()


def test_a_corrupt_shard_index_is_named(segmentation, tmp_path):
    blocks_dataset(tmp_path / "ds", segmentation, "zarr3")
    spec = source_spec(tmp_path / "ds", "zarr3")
    shard = tmp_path / "ds" / "segmentation" / "1" / "c" / "0" / "0" / "0" / "0"
    content = bytearray(shard.read_bytes())
    content[-100] ^= 0xFF  # inside the index
    shard.write_bytes(bytes(content))
    fetcher = prefetch.Prefetcher(spec, arrays.open_array(spec, open=True))
    with pytest.raises(ValueError, match="c/0/0/0/0: shard index checksum mismatch"):
        fetcher.fetch(Box((0, 0, 0), (64, 64, 64)))


def test_only_object_stores_prefetch():
    assert prefetch.is_remote({"driver": "zarr3", "kvstore": {"driver": "gcs", "bucket": "b", "path": "p/"}})
    assert not prefetch.is_remote({"driver": "zarr3", "kvstore": {"driver": "file", "path": "/x/"}})
    assert not prefetch.is_remote({"driver": "wkw", "path": "/x"})


def test_prefetch_boxes_are_slabs_across_x_within_the_budget():
    from beam_downsample.core.config import PassConfig  # pylint: disable=import-outside-toplevel
    from beam_downsample.transforms import work  # pylint: disable=import-outside-toplevel

    config = PassConfig("l", 0, (1, 1, 1), {}, Box((0, 0, 0), (1024, 1024, 512)), 1, "mode", (), "",
                        tile_alignment=(32, 32, 32), prefetch_bytes=64 << 20)
    boxes = work.prefetch_boxes(config, Box((0, 0, 0), (1024, 1024, 512)), np.dtype(np.uint32))
    assert len(boxes) == 32
    assert all(b.shape == (32, 1024, 512) for b in boxes)  # whole y-z planes: contiguous in a shard
    one = work.prefetch_boxes(dataclasses.replace(config, prefetch_bytes=1 << 40), Box((0, 0, 0), (64, 64, 64)),
                              np.dtype(np.uint8))
    assert one == [Box((0, 0, 0), (64, 64, 64))]


def test_remote_units_hold_two_fetched_boxes_within_the_budget():
    """A remote source's units count two fetched boxes (at their raw size) in the budget, and the
    boxes planning hands out fill what the budget leaves, never less than a tile."""
    from beam_downsample.core.grid import Pass, UnitBudget  # pylint: disable=import-outside-toplevel
    from beam_downsample.plan.units import unit_shape  # pylint: disable=import-outside-toplevel

    a_pass = Pass((1, 1, 1), ((2, 2, 1), (4, 4, 2), (8, 8, 4)))
    for budget_bytes in (256 << 20, 1 << 30, 2 << 30, 8 << 30):
        for bytes_per_voxel in (1, 4, 8):
            local = UnitBudget(bytes=budget_bytes, threads=3, tile_voxels=4 << 20)
            remote = dataclasses.replace(local, remote=True)
            shape = unit_shape(a_pass, bytes_per_voxel, remote, (1 << 14, 1 << 14, 1 << 12))
            assert np.prod(shape) <= np.prod(unit_shape(a_pass, bytes_per_voxel, local, (1 << 14, 1 << 14, 1 << 12)))
            box = remote.prefetch_bytes(a_pass, shape, bytes_per_voxel)
            assert box >= remote.tile(a_pass, shape) * bytes_per_voxel
            peak = remote.unit_bytes(a_pass, shape, bytes_per_voxel, box)
            minimal = remote.unit_bytes(a_pass, [32 * f for f in (8, 8, 4)], bytes_per_voxel)
            assert peak <= budget_bytes or minimal > budget_bytes, (budget_bytes, bytes_per_voxel, shape)
            assert local.prefetch_bytes(a_pass, shape, bytes_per_voxel) == 0
