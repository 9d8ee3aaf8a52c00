"""The library: `beam_downsample.downsample`/`prepare` against the command (one code path:
the same output, the same dry-run plan, the same errors as exceptions), calls one after
another in one process, Ctrl-C, the result's figures, and `beam.DownsamplePyramid` inside
a user's pipeline (the docs' example, run here, against the command run afterwards)."""

from __future__ import annotations

import _thread
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

import beam_downsample as bd
from beam_downsample import demo
from beam_downsample.core.box import region_in_mag
from beam_downsample.core.mags import parse_mag
from beam_downsample.launch import cli
from beam_downsample.run import inline
from beam_downsample.store.properties import load_dataset
from beam_downsample.transforms import work
from conftest import PROPERTIES, read_properties, run_cli, tree_digest
from refresh_helpers import assert_same_pyramid, edit_finest_mag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "docs", "examples", "pipeline.py")
SEQUENTIAL = {"distribution_strategy": "sequential"}
STATE_DIR = ".beam-downsample"
VOXEL_SIZE = (11.24, 11.24, 28.0)
# the bundled segmentation's first 128 slices in units of ~100 MB: 16 units in pass 1, two passes
MANY_UNITS = {"memory_budget": "400M", **SEQUENTIAL}


def run_in_process(capsys, *args):
    capsys.readouterr()
    code = cli.main(["beam-downsample", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def our_threads() -> set:
    return {t for t in threading.enumerate() if t.name.startswith("beam-downsample")}


@pytest.fixture
def real_dataset(tmp_path, segmentation):
    def make(name: str):
        path = tmp_path / name / "ds"
        data = np.ascontiguousarray(segmentation[:, :, :128])
        demo.write_dataset(str(path), [{"name": "segmentation", "category": "segmentation", "data": data}],
                           VOXEL_SIZE, name="ds")
        return path

    return make


# ---------------------------------------------------------------------------
# the package face


def test_import_is_cheap_and_every_public_name_resolves():
    heavy = "sorted(m for m in ('apache_beam', 'tensorstore', 'numba') if m in sys.modules)"
    code = (f"import sys, beam_downsample as bd; print({heavy}); "
            "print([n for n in bd.__all__ if getattr(bd, n, None) is None])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["[]", "[]"], result.stdout  # nothing heavy at import; all names resolve
    with pytest.raises(AttributeError):
        bd.no_such_name  # pylint: disable=pointless-statement
    assert issubclass(bd.UsageError, bd.Error) and issubclass(bd.UsageError, ValueError)
    assert issubclass(bd.DatasetError, bd.Error) and issubclass(bd.RunError, RuntimeError)
    assert bd.beam.DownsamplePyramid is inline.DownsamplePyramid


# ---------------------------------------------------------------------------
# the API against the command


def test_api_and_cli_make_the_same_dataset(make_dataset, capsys):
    by_api, by_cli = make_dataset("api/ds"), make_dataset("cli/ds")
    result = bd.downsample(by_api, coarsest_mag=8, progress=False, **SEQUENTIAL)
    code, _, err = run_in_process(capsys, by_cli, "--coarsest-mag", "8", "--distribution-strategy", "sequential")
    assert code == 0, err
    assert tree_digest(by_api) == tree_digest(by_cli)
    listed = {layer["name"]: [m["mag"] for m in layer["mags"]] for layer in read_properties(by_cli)["dataLayers"]}
    for name, layer in result.layers.items():
        assert [list(parse_mag(m)) for m in layer.made] == listed[name][1:]
        assert layer.refreshed == () and layer.units_already_done == 0


def test_api_dry_run_is_the_clis_plan_and_touches_nothing(make_dataset, capsys):
    path = make_dataset()
    before = tree_digest(path.parent)
    result = bd.downsample(path, coarsest_mag="8-8-4", layer_name="segmentation", dry_run=True)
    code, out, err = run_in_process(capsys, path, "--coarsest-mag", "8-8-4", "--layer-name", "segmentation",
                                    "--dry-run")
    assert code == 0, err
    assert out == result.plan + "\n"
    assert result.dry_run and "8-8-4" in result.plan and list(result.layers) == ["segmentation"]
    assert result.layers["segmentation"].made == ("2-2-1", "4-4-2", "8-8-4")
    assert tree_digest(path.parent) == before


def _bad_bbox_file(path):
    box_file = path.parent / "boxes.txt"
    box_file.write_text("3,5,7,10,10,10\n\n# a comment\n3,5,7,10,ten,10\n", encoding="utf-8")
    return ["--bbox-file", box_file], {"bbox_file": str(box_file)}


def _broken_json(path):
    (path / PROPERTIES).write_text('{"dataLayers": [', encoding="utf-8")
    return [], {}


# (id, CLI arguments, API keywords, the error class, words in the message); a callable makes both
ERRORS = [
    ("unknown-layer", ["--layer-name", "nope"], {"layer_name": "nope"}, bd.DatasetError, ["nope"]),
    ("coarsest", ["--coarsest-mag", "abc"], {"coarsest_mag": "abc"}, bd.UsageError, ["--coarsest-mag"]),
    ("unreachable", ["--coarsest-mag", "1-1-2"], {"coarsest_mag": "1-1-2"}, bd.UsageError, ["no progress"]),
    ("sampling", ["--sampling-mode", "bogus"], {"sampling_mode": "bogus"}, bd.UsageError, ["--sampling-mode"]),
    ("interpolation", ["--interpolation", "bicubic"], {"interpolation": "bicubic"}, bd.UsageError,
     ["--interpolation"]),
    ("budget", ["--memory-budget", "10M"], {"memory_budget": "10M"}, bd.UsageError, ["--memory-budget"]),
    ("jobs-sequential", ["--jobs", "2", "--distribution-strategy", "sequential"],
     {"jobs": 2, "distribution_strategy": "sequential"}, bd.UsageError, ["--jobs"]),
    ("strategy", ["--distribution-strategy", "mesos"], {"distribution_strategy": "mesos"}, bd.UsageError,
     ["mesos"]),
    ("beam-flag", ["--direct_num_wokers=2"], {"pipeline_options": ["--direct_num_wokers=2"]}, bd.UsageError,
     ["--direct_num_wokers"]),
    ("beam-flag-dict", ["--direct_num_wokers=2"], {"pipeline_options": {"direct_num_wokers": 2}}, bd.UsageError,
     ["--direct_num_wokers"]),
    ("slurm-resources-dict", ["--distribution-strategy", "slurm", "--job-resources", "mem=lots"],
     {"distribution_strategy": "slurm", "job_resources": {"mem": "lots"}}, bd.UsageError, ["lots"]),
    ("bbox-outside", ["--bbox", "5000,0,0,10,10,10"], {"bboxes": ["5000,0,0,10,10,10"]}, bd.UsageError,
     ["outside layer"]),
    ("bbox-file", _bad_bbox_file, None, bd.UsageError, ["line 4", "boxes.txt"]),
    ("broken-json", _broken_json, None, bd.DatasetError, ["JSON"]),
]


@pytest.mark.parametrize("args, kwargs, family, words", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_api_raises_the_clis_error(make_dataset, capsys, args, kwargs, family, words):
    path = make_dataset()
    if callable(args):
        args, kwargs = args(path)
    before = tree_digest(path.parent)
    code, _, err = run_in_process(capsys, path, *args)
    with pytest.raises(bd.Error) as raised:
        bd.downsample(path, progress=False, **kwargs)
    assert isinstance(raised.value, family), type(raised.value)
    assert code == 2 and err == f"beam-downsample: error: {raised.value}\n"
    for word in words:
        assert word in str(raised.value)
    assert tree_digest(path.parent) == before


def corrupt_chunk(path) -> tuple:
    """Garbles the first chunk's data in color mag 1 (as test_resilience does); returns (file, its bytes)."""
    shard = path / "color" / "1" / "c" / "0" / "0" / "0" / "0"
    original = shard.read_bytes()
    with open(shard, "r+b") as handle:
        handle.seek(200)
        handle.write(bytes(range(7, 107)))
    return shard, original


def test_a_fault_during_the_run_is_the_clis_error(make_dataset, capsys):
    """The command first, then the library on the same dataset: the same unit fails again."""
    path = make_dataset()
    corrupt_chunk(path)
    listed = read_properties(path)
    code, _, err = run_in_process(capsys, path, "--distribution-strategy", "sequential")
    with pytest.raises(bd.RunError) as raised:
        bd.downsample(path, progress=False, **SEQUENTIAL)
    assert code == 1
    assert err.splitlines()[-1] == f"beam-downsample: error: {raised.value} {cli.RETRY}"
    assert "color/1" in str(raised.value) and "\n" not in str(raised.value)
    assert read_properties(path) == listed  # nothing new listed


def test_calls_one_after_another_and_after_a_failed_call(make_dataset):
    """Two calls, then a call that fails (a corrupt chunk), then the same call once the chunk is
    repaired: each result equals the command's, and no thread, lock or run state is left."""
    reference = make_dataset("reference/ds")
    assert run_cli(reference, "--distribution-strategy", "sequential").returncode == 0
    before = set(threading.enumerate())
    for name in ("first", "second"):
        path = make_dataset(f"{name}/ds")
        bd.downsample(path, progress=False, **SEQUENTIAL)
        assert tree_digest(path) == tree_digest(reference)
    path = make_dataset("failing/ds")
    shard, original = corrupt_chunk(path)
    with pytest.raises(bd.RunError):
        bd.downsample(path, progress=False, **SEQUENTIAL)
    assert not [n for n in os.listdir(path / STATE_DIR) if n.endswith(".lock")]
    shard.write_bytes(original)
    result = bd.downsample(path, progress=False, **SEQUENTIAL)
    assert_same_pyramid(path, reference)
    assert result.layers["segmentation"].made == ("2-2-1", "4-4-2")
    assert set(threading.enumerate()) <= before, set(threading.enumerate()) - before


@pytest.fixture
def ctrl_c():
    """Python's own SIGINT handler for the test (importing dask_jobqueue, as test_slurm does at
    collection, replaces it with one that raises SystemExit)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_importing_the_slurm_extra_keeps_ctrl_c():
    code = ("import signal; from beam_downsample.launch import clusters; clusters.require_extra('slurm'); "
            "import sys; assert 'dask_jobqueue' in sys.modules; "
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.getsignal(signal.SIGINT)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def test_ctrl_c_stops_the_run_in_this_process_and_the_same_call_resumes(real_dataset, ctrl_c):
    path, reference = real_dataset("ds"), real_dataset("reference")
    assert run_cli(reference, "--distribution-strategy", "sequential").returncode == 0
    assert bd.downsample(path, dry_run=True, **MANY_UNITS).layers["segmentation"].units >= 8

    def interrupt_after_two_units():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = sum(len([f for f in files if f.endswith(".done")]) for _, _, files in os.walk(path / STATE_DIR))
            if done >= 2:
                _thread.interrupt_main()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=interrupt_after_two_units, daemon=True)
    watcher.start()
    with pytest.raises(KeyboardInterrupt):
        bd.downsample(path, progress=False, **MANY_UNITS)
    watcher.join()
    assert not our_threads(), our_threads()
    assert not [n for n in os.listdir(path / STATE_DIR) if n.endswith(".lock")]
    done = sum(len([f for f in files if f.endswith(".done")]) for _, _, files in os.walk(path / STATE_DIR))
    time.sleep(1)  # nothing writes any more
    assert done == sum(len([f for f in files if f.endswith(".done")]) for _, _, files in os.walk(path / STATE_DIR))
    result = bd.downsample(path, progress=False, **MANY_UNITS)
    layer = result.layers["segmentation"]
    assert layer.units_already_done == done >= 2
    assert layer.units_run + layer.units_empty + layer.units_already_done == layer.units
    assert_same_pyramid(path, reference)
    assert not our_threads()


# ---------------------------------------------------------------------------
# the result's figures


def expected_written(path, result) -> dict:
    """Voxels of every new mag inside each layer's bounding box (a dense layer: all written)."""
    dataset = load_dataset(str(path))
    return {layer.name: sum(region_in_mag(layer.bbox, parse_mag(m)).voxels for m in result.layers[layer.name].made)
            for layer in dataset.layers}


def test_result_figures_of_a_dense_run(make_dataset):
    path = make_dataset()
    result = bd.downsample(path, coarsest_mag=8, progress=False, **SEQUENTIAL)
    written = expected_written(path, result)
    for layer in load_dataset(str(path)).layers:
        got = result.layers[layer.name]
        assert got.voxels_written == written[layer.name]
        assert got.bytes_written == written[layer.name] * layer.dtype.itemsize
        assert got.voxels_read >= layer.bbox.voxels and got.bytes_read == got.voxels_read * layer.dtype.itemsize
        assert got.units_empty == 0 and got.units_run == got.units >= 1
    assert result.metrics["voxels_written"] == sum(written.values())


def sparse_layer(path):
    """A segmentation of 1024x1024x256 holding one 50^3 block: one stored shard."""
    rng = np.random.default_rng(5)
    block = rng.integers(1, 9, (50, 50, 50), dtype=np.uint32)
    demo.write_sparse_dataset(str(path), (1024, 1024, 256), [{"name": "segmentation", "category": "segmentation",
                              "dtype": "uint32", "blocks": [((600, 40, 100), block)]}], VOXEL_SIZE)


def test_result_figures_come_from_tallies_where_the_runner_has_no_counters(tmp_path, monkeypatch):
    """DaskRunner reports no Beam counters: the figures then come from the workers' tallies and
    must equal what the counters say on Beam's FnApiRunner with as many worker processes.
    Planning without refinement plans every unit of the stored shard: most are empty."""
    monkeypatch.setattr("beam_downsample.plan.units.REFINE_LIMIT", 0)
    figures = {}
    for strategy in ("multiprocessing", "dask"):
        path = tmp_path / strategy / "ds"
        sparse_layer(path)
        result = bd.downsample(path, progress=False, coarsest_mag=4, distribution_strategy=strategy, jobs=2,
                               memory_budget="1G")
        layer = result.layers["segmentation"]
        assert (result.metrics == {}) == (strategy == "dask")  # DaskRunner: no counters
        assert layer.units_empty > 0 and layer.units_run > 0
        assert layer.units_run + layer.units_empty == layer.units
        figures[strategy] = (layer.units, layer.units_run, layer.units_empty, layer.voxels_read, layer.voxels_written)
    assert figures["dask"] == figures["multiprocessing"]


# ---------------------------------------------------------------------------
# Beam transforms in the user's pipeline


def load_example():
    spec = importlib.util.spec_from_file_location("docs_pipeline_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_pipeline_example_equals_the_command_afterwards(tmp_path, capsys):
    example = load_example()
    ours = tmp_path / "in-pipeline" / "ds"
    example.main(str(ours), runner=FnApiRunner())
    printed = capsys.readouterr().out
    assert "LayerResult(layer='segmentation', made=('2-2-1', '4-4-2')" in printed
    reference = tmp_path / "afterwards" / "ds"
    os.makedirs(reference)
    spec = example.create_layer(str(reference))
    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        example.build(pipeline, str(reference), spec, downsample=False)
    assert [m["mag"] for m in read_properties(reference)["dataLayers"][0]["mags"]] == [[1, 1, 1]]
    result = run_cli(reference)
    assert result.returncode == 0, result.stderr
    assert_same_pyramid(ours, reference)


def test_the_transform_plans_after_the_step_it_waits_on(tmp_path, monkeypatch):
    """At the moment the transform plans its units, every block of the user's step is stored."""
    example = load_example()
    seen = []
    real_plan_job = inline.plan_job

    def counting_plan_job(dataset, options):
        mag1 = os.path.join(dataset.path, "segmentation", "1")
        seen.append(sum(len(files) for _, _, files in os.walk(mag1)))
        return real_plan_job(dataset, options)

    monkeypatch.setattr(inline, "plan_job", counting_plan_job)
    path = tmp_path / "ds"
    os.makedirs(path)
    spec = example.create_layer(str(path))
    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        example.build(pipeline, str(path), spec)
    blocks = len(range(0, example.SIZE[0], example.BLOCK)) * len(range(0, example.SIZE[1], example.BLOCK)) * \
        len(range(0, example.SIZE[2], example.BLOCK))
    chunks_per_block = (example.BLOCK // 32) ** 3
    # built: the layer is empty (zarr.json only); run: after the wait, every chunk of every block
    assert seen == [1, 1 + blocks * chunks_per_block], seen


def test_the_transform_is_resumable_and_keeps_passes_in_order(real_dataset, monkeypatch):
    """Pass 1 fails after three units; the same pipeline again finishes (the done units are
    skipped) and equals the command's result; pass 2 reads what pass 1 wrote."""
    path, reference = real_dataset("ds"), real_dataset("reference")
    assert run_cli(reference, "--distribution-strategy", "sequential").returncode == 0
    budget = 400 << 20
    real_run_unit = work.run_unit
    calls = []

    def failing_run_unit(config, *args, **kwargs):
        calls.append(config.pass_index)
        if len(calls) == 4:
            raise OSError("injected: the disk went away")
        return real_run_unit(config, *args, **kwargs)

    monkeypatch.setattr(work, "run_unit", failing_run_unit)
    with pytest.raises(Exception, match="injected"):
        with beam.Pipeline(runner=FnApiRunner()) as pipeline:
            _ = pipeline | bd.beam.DownsamplePyramid(str(path), memory_budget=budget)
    assert [m["mag"] for m in read_properties(path)["dataLayers"][0]["mags"]] == [[1, 1, 1]]
    monkeypatch.setattr(work, "run_unit", real_run_unit)
    record = path.parent / "results.jsonl"
    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        transform = bd.beam.DownsamplePyramid(str(path), memory_budget=budget)
        assert transform._passes == 2  # pylint: disable=protected-access
        _ = pipeline | transform | beam.Map(record_result, str(record))
    (layer,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert layer["units_already_done"] == 3 and layer["made"] == ["2-2-1", "4-4-2", "8-8-4"]
    assert layer["units_run"] + layer["units_empty"] + 3 == layer["units"]
    assert_same_pyramid(path, reference)


def record_result(result, path: str) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(dataclasses.asdict(result)) + "\n")


def test_the_transform_makes_and_refreshes_every_layer_as_the_command(make_dataset):
    """Two layers in one transform, then a refresh of two boxes after an edit of mag 1: each
    equal to the command's on a copy."""
    ours, theirs = make_dataset("transform/ds"), make_dataset("command/ds")
    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        _ = pipeline | bd.beam.DownsamplePyramid(str(ours), coarsest_mag=8)
    assert run_cli(theirs, "--coarsest-mag", "8").returncode == 0
    assert_same_pyramid(ours, theirs)
    boxes = ["3,5,7,10,10,5", "30,20,9,10,16,3"]
    for path in (ours, theirs):
        edit_finest_mag(path, [3, 5, 7, 10, 10, 5], seed=1)
        edit_finest_mag(path, [30, 20, 9, 10, 16, 3], seed=2)
    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        _ = pipeline | bd.beam.DownsamplePyramid(str(ours), coarsest_mag=8, bboxes=boxes)
    result = run_cli(theirs, "--coarsest-mag", "8", *[f"--bbox={b}" for b in boxes])
    assert result.returncode == 0 and "refreshing --bbox 3,5,7,10,10,5 --bbox 30,20,9,10,16,3" in result.stdout
    assert_same_pyramid(ours, theirs)


def test_the_transform_refuses_bad_options_when_built(make_dataset):
    path = make_dataset()
    with pytest.raises(bd.DatasetError, match="nope"):
        bd.beam.DownsamplePyramid(str(path), "nope")
    with pytest.raises(bd.UsageError, match="outside layer"):
        bd.beam.DownsamplePyramid(str(path), bboxes=["5000,0,0,10,10,10"])
    with pytest.raises(bd.UsageError, match="--coarsest-mag"):
        bd.beam.DownsamplePyramid(str(path), coarsest_mag="3")
