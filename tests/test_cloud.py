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
            boxes = -(-int(np.prod(shape)) * bytes_per_voxel // box)
            assert boxes <= UnitBudget.MAX_FETCHED_BOXES or list(shape) == [32 * f for f in (8, 8, 4)], (shape, box)
            assert local.prefetch_bytes(a_pass, shape, bytes_per_voxel) == 0


# ---------------------------------------------------------------------------
# on a bucket: fake-gcs-server behind the counting proxy of benchmarks/gcs_requests.py

import collections  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from conftest import tree_bytes  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gcs_requests  # noqa: E402  pylint: disable=wrong-import-position

BUCKET = "cloud-test"


class Bucket:
    """fake-gcs-server, the counting proxy in front of it, and a client straight to it."""

    def __init__(self, root):
        self.counter = gcs_requests.Counter()
        self.prefix = {"name": ""}
        upstream: dict = {"url": None}
        self.proxy = gcs_requests.make_proxy(upstream, self.counter, lambda: self.prefix["name"])
        self.url = f"http://127.0.0.1:{self.proxy.server_address[1]}"
        self.process, upstream["url"] = gcs_requests.start_emulator(root / "data", root / "server.log", self.url)
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        from google.auth.credentials import AnonymousCredentials  # pylint: disable=import-outside-toplevel
        from google.cloud import storage as gcs  # pylint: disable=import-outside-toplevel

        self.client = gcs.Client(project="test", credentials=AnonymousCredentials(),
                                 client_options={"api_endpoint": upstream["url"]})
        self.client.create_bucket(BUCKET)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
        self.env["STORAGE_EMULATOR_HOST"] = self.url

    def upload(self, local, prefix: str) -> str:
        bucket = self.client.bucket(BUCKET)
        for rel, content in tree_bytes(local).items():
            bucket.blob(f"{prefix}/{rel}").upload_from_string(content)
        self.prefix["name"] = prefix
        return f"gs://{BUCKET}/{prefix}"

    def download(self, prefix: str) -> dict[str, bytes]:
        blobs = self.client.list_blobs(BUCKET, prefix=f"{prefix}/")
        return {blob.name[len(prefix) + 1:]: blob.download_as_bytes() for blob in blobs}

    def run(self, *args) -> subprocess.CompletedProcess:
        """The CLI in a subprocess through the proxy; the requests it made are in `counts()` after."""
        self.counter.counts.clear()
        return subprocess.run([sys.executable, "-m", "beam_downsample", *map(str, args)], capture_output=True,
                              text=True, env=self.env, timeout=600, check=False)

    def counts(self) -> collections.Counter:
        """(kind, role) -> requests; kind as in the done line: reads, writes, lists, deletes."""
        kinds = {"GET": "reads", "list": "lists", "DELETE": "deletes"}
        found: collections.Counter = collections.Counter()
        for (_, method, role), value in self.counter.counts.items():
            found[(kinds.get(method, "writes"), role)] += value
        return found

    def close(self):
        self.proxy.shutdown()
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    found = Bucket(tmp_path_factory.mktemp("cloud-bucket"))
    yield found
    found.close()


def done_requests(stdout: str) -> dict[str, int]:
    """`done: ...; 74 storage requests (29 reads, 22 writes, 16 lists, 7 deletes)` -> counts by kind and total."""
    match = re.search(r"; (\d+) storage requests \(([^)]*)\)", stdout)
    assert match, stdout
    counted = {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", match.group(2))}
    counted["total"] = int(match.group(1))
    return counted


def estimated_total(stdout: str) -> int:
    match = re.search(r"requests of pass 1: (?:at most )?about ([\d,]+)", stdout)
    assert match, stdout
    return int(match.group(1).replace(",", ""))


def few_units_dataset(path, segmentation, data_format: str) -> None:
    """Real color and segmentation, 320x256x96 at an unaligned offset: a few units at 256M."""
    crop = np.ascontiguousarray(segmentation[40:360, 100:356, 10:106])
    fmt = "zarr3" if data_format == "zarr3-unsharded" else data_format
    demo.write_dataset(str(path), [
        {"name": "color", "category": "color", "data": demo.render_color(crop), "top_left": (33, 17, 5)},
        {"name": "segmentation", "category": "segmentation", "data": crop, "top_left": (33, 17, 5)},
    ], VOXEL_SIZE, data_format=fmt)
    if data_format == "zarr3-unsharded":
        unshard(path, "color")
        unshard(path, "segmentation")


@pytest.mark.parametrize("data_format", FORMATS)
def test_gcs_run_costs_a_few_requests_per_unit(bucket, segmentation, tmp_path, data_format):
    """A run of a few units per layer on the bucket: the same bytes as a local run; source reads
    per unit per layer under a small constant (sharded) or one per stored chunk (unsharded: the
    format's own cost); bookkeeping under a constant per unit; the done line's counts equal
    the proxy's, kind by kind; the dry run's estimate is close."""
    local = tmp_path / "ds"
    few_units_dataset(local, segmentation, data_format)
    prefix = f"few-{data_format}"
    url = bucket.upload(local, prefix)
    args = ["--distribution-strategy", "sequential", "--memory-budget", "600M", "--coarsest-mag", "4-4-2"]
    dry = bucket.run(url, *args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    units = sum(int(n) for n in re.findall(r"pass 1: .*? in (\d+) work units", dry.stdout))
    assert units >= 4, dry.stdout
    result = bucket.run(url, *args)
    assert result.returncode == 0, result.stderr
    counts = bucket.counts()
    assert run_local(local, *args) == 0
    assert bucket.download(prefix) == tree_bytes(local)

    source = sum(v for (kind, role), v in counts.items() if (kind, role) == ("reads", "source mag"))
    if data_format == "zarr3":  # a shard index, then one range per chunk column across x (units here: 4)
        assert source <= 5 * units, (source, units)
    else:  # one GET per stored chunk of the source, each once
        chunks = sum(1 for name in tree_bytes(local) if re.search(r"/1/(c/)?\d+[./]\d+[./]\d+[./]\d+$", name))
        assert source == chunks, (source, chunks)
    bookkeeping = sum(v for (kind, role), v in counts.items()
                      if role in ("markers", "worker state", "progress tallies", "failure records", "seeds"))
    assert bookkeeping <= 4 * units + 12, (bookkeeping, units, dict(counts))

    counted = done_requests(result.stdout)
    by_kind = collections.Counter()
    for (kind, _), value in counts.items():
        by_kind[kind] += value
    assert counted["total"] == sum(by_kind.values()), (counted, dict(counts))
    for kind in ("reads", "writes", "lists", "deletes"):
        assert counted[kind] == by_kind[kind], (kind, counted, dict(by_kind))
    assert abs(estimated_total(dry.stdout) - counted["total"]) <= 0.35 * counted["total"], (dry.stdout, counted)


def run_local(path, *args) -> int:
    return subprocess.run([sys.executable, "-m", "beam_downsample", str(path), *args], capture_output=True,
                          text=True, timeout=600, check=False).returncode


def test_worker_processes_report_their_requests(bucket, segmentation, tmp_path):
    """Units in two worker processes: their requests reach the done line through Beam's counters."""
    local = tmp_path / "ds"
    few_units_dataset(local, segmentation, "zarr3")
    url = bucket.upload(local, "workers")
    result = bucket.run(url, "--distribution-strategy", "multiprocessing", "--jobs", "2", "--memory-budget", "2G",
                        "--coarsest-mag", "4-4-2")
    assert result.returncode == 0, result.stderr
    counted = done_requests(result.stdout)
    assert counted["total"] == sum(bucket.counts().values()), (counted, dict(bucket.counts()))


def test_a_box_spanning_shards_reads_each_in_one_request(bucket, segmentation, tmp_path):
    """A box over 2x2x2 small shards: each shard's part is one GET (index and data in one where the
    box holds the shard's whole part of the layer, else its index once and one range)."""
    data = np.ascontiguousarray(segmentation[:128, :128, :128])
    path = tmp_path / "shards"
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}, "create": True, "metadata": {
        "shape": [1, 128, 128, 128], "data_type": "uint32", "fill_value": 0,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, 64, 64, 64]}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [1, 32, 32, 32], "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                                       {"name": "zstd", "configuration": {"level": 1}}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]}}
    ts.open(spec).result().write(data[None]).result()
    url = bucket.upload(path, "small-shards")
    for region, box, most in [("(0, 0, 0), (128, 128, 128)", "(0, 0, 0), (128, 128, 128)", 8),
                              (None, "(16, 16, 16), (112, 112, 112)", 16)]:
        script = f"""
import numpy as np, tensorstore as ts
from beam_downsample.core.box import Box
from beam_downsample.store import arrays, prefetch
spec = {{"driver": "zarr3", "kvstore": arrays.kvstore_spec({url!r})}}
local = ts.open({{"driver": "zarr3", "kvstore": {{"driver": "file", "path": {str(path)!r}}}}}).result()
source = arrays.open_array(spec, open=True)
box = Box({box})
fetched = prefetch.Prefetcher(spec, source).fetch(box, {f"Box({region})" if region else None})
assert np.array_equal(arrays.read_box(fetched.array, box, 1), arrays.read_box(local, box, 1))
"""
        bucket.counter.counts.clear()
        done = subprocess.run([sys.executable, "-c", script], env=bucket.env, capture_output=True, text=True,
                              timeout=300, check=False)
        assert done.returncode == 0, done.stderr
        gets = sum(v for (_, method, role), v in bucket.counter.counts.items()
                   if method == "GET" and role.startswith("c/"))
        assert gets <= most, (gets, dict(bucket.counter.counts))
        assert gets >= 8  # (each shard at least once: the proxy saw them)
