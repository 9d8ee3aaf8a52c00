"""Faults name what failed: a damaged local shard, a shard read cut short and a refused
write on GCS (a fault-injecting proxy in front of fake-gcs-server) each end the run
with exit status 1 and one line naming the layer, the mag, the stored object and
its box, and the remedy; a rerun says the same, and once the fault is gone a rerun
finishes with the output of an undisturbed run.
"""

from __future__ import annotations

import re
import shutil
import urllib.parse

import numpy as np
import pytest

from beam_downsample import demo
from beam_downsample.core.grid import WorkUnit
from beam_downsample.plan.job import plan_job
from beam_downsample.plan.options import JobOptions
from beam_downsample.store import arrays
from beam_downsample.store.properties import load_dataset
from beam_downsample.transforms import faults
from conftest import PROPERTIES, run_cli, tree_bytes
import gcs_helpers

BUCKET = "beam-downsample-faults"
REMEDY = "rerun to retry; if it persists the stored object is damaged"
SEQUENTIAL = ("--distribution-strategy", "sequential")


def fault_line(result) -> str:
    """The run's last stderr line, checked to be the only error line."""
    lines = gcs_helpers.error_lines(result.stderr)
    errors = [line for line in lines if line.startswith("beam-downsample: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory, segmentation):
    """Real segmentation (150x133x70 at an odd offset) and its color rendering, and a clean run of it."""
    crop = np.ascontiguousarray(segmentation[100:250, 50:183, 20:90])
    base = tmp_path_factory.mktemp("faults") / "base"
    demo.write_dataset(str(base), [
        {"name": "color", "category": "color", "data": demo.render_color(crop), "top_left": (3, 5, 7)},
        {"name": "segmentation", "category": "segmentation", "data": crop, "top_left": (3, 5, 7)},
    ], (11.24, 11.24, 28.0), name="ds")
    clean = tmp_path_factory.mktemp("faults-clean") / "ds"
    shutil.copytree(base, clean)
    assert run_cli(clean, *SEQUENTIAL).returncode == 0
    return base, tree_bytes(clean)


# ---------------------------------------------------------------------------
# a damaged local file


@pytest.mark.parametrize("strategy", ["sequential", "multiprocessing"])
def test_damaged_local_shard_is_named_with_layer_mag_box_and_remedy(small, tmp_path, strategy):
    base, clean = small
    target = tmp_path / "ds"
    shutil.copytree(base, target)
    shard = target / "color" / "1" / "c" / "0" / "0" / "0" / "0"
    original = shard.read_bytes()
    with open(shard, "r+b") as handle:  # the zstd frame of a chunk near the start
        handle.seek(200)
        handle.write(bytes(range(7, 107)))
    properties = (target / PROPERTIES).read_bytes()
    args = ("--distribution-strategy", strategy) + (("--jobs", "2") if strategy == "multiprocessing" else ())
    first = run_cli(target, *args)
    assert first.returncode == 1
    line = fault_line(first)
    assert line.startswith(f"beam-downsample: error: reading {shard} failed (layer 'color', mag 1, box "), line
    assert re.search(r", box \d+,\d+,\d+-\d+,\d+,\d+\): ", line), line
    assert REMEDY in line
    assert (target / PROPERTIES).read_bytes() == properties  # nothing new listed
    again = run_cli(target, *args)
    assert again.returncode == 1 and fault_line(again) == line  # the same line: it persists
    shard.write_bytes(original)  # repaired: the rerun resumes to the undisturbed result
    assert run_cli(target, *args).returncode == 0
    assert tree_bytes(target) == clean


def test_an_error_that_names_no_object_is_traced_to_the_damaged_one(small, tmp_path):
    """When the error's text names nothing (e.g. `OUT_OF_RANGE:` alone), the unit's source is
    read again object by object and the one that fails is named; else the unit is."""
    base, _ = small
    target = tmp_path / "ds"
    shutil.copytree(base, target)
    dataset = load_dataset(str(target))
    (plan,) = [p for p in plan_job(dataset, JobOptions(layer_name="segmentation")) if p.layer.name == "segmentation"]
    config, grid = plan.configs[0], plan.grids[0]
    unit: WorkUnit = grid.unit(int(plan.planned[0][0]))
    source = arrays.open_array(config.source_spec, open=True)
    bare = ValueError("OUT_OF_RANGE:")
    fault = faults.describe(bare, config, unit, source, [])
    assert str(fault).startswith(f"work unit {','.join(map(str, unit.box.start))}-") and "layer 'segmentation'" in str(fault)
    shard = target / "segmentation" / "1" / "c" / "0" / "0" / "0" / "0"
    with open(shard, "r+b") as handle:
        handle.seek(200)
        handle.write(bytes(range(7, 107)))
    source = arrays.open_array(config.source_spec, open=True)
    fault = str(faults.describe(bare, config, unit, source, []))
    assert fault.startswith(f"reading {shard} failed (layer 'segmentation', mag 1, box "), fault
    assert "ZSTD" in fault or "checksum" in fault, fault  # the reason of the read that failed
    assert fault.endswith(REMEDY)


# ---------------------------------------------------------------------------
# GCS behind a fault-injecting proxy


class Faults:
    """What the proxy does to responses: cut reads of some objects short, refuse some writes."""

    def __init__(self):
        self.cut: str | None = None  # object name prefix whose data reads are cut in half
        self.refuse: str | None = None  # object name prefix whose uploads are refused (403)

    def alter(self, method, path, headers, status, body):
        url = urllib.parse.urlsplit(path)
        name = urllib.parse.unquote(url.path.split("/o/", 1)[1]) if "/o/" in url.path else \
            urllib.parse.parse_qs(url.query).get("name", [""])[0]
        suffix = (headers.get("Range") or "").startswith("bytes=-")  # a shard index: left alone
        if self.cut and method == "GET" and name.startswith(self.cut) and status in (200, 206) and not suffix:
            return body[: len(body) // 2]
        if self.refuse and method in ("POST", "PUT") and name.startswith(self.refuse):
            return 403, b'{"error": {"code": 403, "message": "refused by the test proxy"}}'
        return body


@pytest.fixture(scope="module")
def faulty_gcs(tmp_path_factory):
    """fake-gcs-server behind a proxy that injects `Faults`; the environment points at the proxy."""
    injected = Faults()
    with gcs_helpers.emulated_gcs(tmp_path_factory.mktemp("faulty-gcs"), BUCKET, injected.alter):
        yield injected


@pytest.mark.parametrize("fault, objects, verb, layer, mag", [
    ("cut", "color/1/c/", "reading", "color", "1"),  # a shard read cut short
    ("refuse", "segmentation/2-2-1/c/", "writing", "segmentation", "2-2-1"),  # an upload refused (403)
], ids=["read-cut-short", "write-refused"])
def test_gcs_fault_is_named_and_a_rerun_after_it_is_identical(faulty_gcs, small, fault, objects, verb, layer, mag):
    base, clean = small
    prefix = f"{fault}-{layer}"
    url = gcs_helpers.upload(base, BUCKET, prefix)
    setattr(faulty_gcs, fault, f"{prefix}/{objects}")
    try:
        first = run_cli(url, *SEQUENTIAL)
        again = run_cli(url, *SEQUENTIAL)
    finally:
        setattr(faulty_gcs, fault, None)
    assert first.returncode == 1 and again.returncode == 1
    line = fault_line(first)
    assert line.startswith(f"beam-downsample: error: {verb} {url}/{objects}0/0/0/0 failed "
                           f"(layer '{layer}', mag {mag}, box "), line
    assert (REMEDY if verb == "reading" else "rerun to retry") in line
    assert fault_line(again) == line  # it persists: the same line
    assert run_cli(url, *SEQUENTIAL).returncode == 0  # the fault is gone: the run finishes, as if undisturbed
    assert gcs_helpers.download(BUCKET, prefix) == clean
