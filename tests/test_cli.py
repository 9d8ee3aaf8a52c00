"""Command-line behaviour (contract section 5): usage errors, help, dry runs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from beam_downsample.launch import api, cli
from conftest import PROPERTIES, read_properties, run_cli, tree_digest, write_properties

PROG = "beam-downsample"


def assert_usage_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("beam-downsample: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def run_in_process(capsys, *args):
    capsys.readouterr()
    code = cli.main([PROG, *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------
# dataset mutations for the error cases


def _break_json(path):
    (path / PROPERTIES).write_text('{"dataLayers": [', encoding="utf-8")


def _drop_data_layers(path):
    raw = read_properties(path)
    del raw["dataLayers"]
    write_properties(path, raw)


def _drop_mag_dir(path):
    shutil.rmtree(path / "color" / "1")


def _wrong_element_class(path):
    raw = read_properties(path)
    raw["dataLayers"][0]["elementClass"] = "uint16"
    write_properties(path, raw)


def _wkw(path):
    raw = read_properties(path)
    raw["dataLayers"][0]["dataFormat"] = "wkw"
    write_properties(path, raw)


def _zarr_v2(path):
    raw = read_properties(path)
    raw["dataLayers"][1]["dataFormat"] = "zarr"
    write_properties(path, raw)


# (id, argument list with "{ds}" for the dataset, mutation, needles in the message)
ERROR_CASES = [
    ("missing-target", [], None, ["TARGET"]),
    ("missing-target-with-options", ["--coarsest-mag", "8", "--dry-run"], None, ["TARGET"]),
    ("target-is-file", ["{ds}/zarr.json"], None, ["not a directory"]),
    ("target-not-a-dataset", ["{ds}/color"], None, ["datasource-properties.json"]),
    ("target-missing", ["{ds}/nowhere"], None, ["does not exist"]),
    ("two-targets", ["{ds}", "{ds}/color"], None, ["TARGET"]),
    ("broken-json", ["{ds}"], _break_json, ["JSON"]),
    ("no-data-layers", ["{ds}"], _drop_data_layers, ["dataLayers"]),
    ("unknown-layer", ["{ds}", "--layer-name", "nope"], None, ["--layer-name", "nope", "color", "segmentation"]),
    ("coarsest-3", ["{ds}", "--coarsest-mag", "3"], None, ["--coarsest-mag"]),
    ("coarsest-8-8", ["{ds}", "--coarsest-mag", "8-8"], None, ["--coarsest-mag"]),
    ("coarsest-0", ["{ds}", "--coarsest-mag", "0"], None, ["--coarsest-mag"]),
    ("coarsest-minus-4", ["{ds}", "--coarsest-mag", "-4"], None, ["--coarsest-mag"]),
    ("coarsest-minus-4-eq", ["{ds}", "--coarsest-mag=-4"], None, ["--coarsest-mag"]),
    ("coarsest-abc", ["{ds}", "--coarsest-mag", "abc"], None, ["--coarsest-mag"]),
    ("coarsest-before-target", ["--coarsest-mag", "3", "{ds}"], None, ["--coarsest-mag"]),
    ("coarsest-unreachable", ["{ds}", "--coarsest-mag", "1-1-2"], None, ["no progress"]),
    ("sampling-mode", ["{ds}", "--sampling-mode", "bogus"], None, ["--sampling-mode"]),
    ("interpolation", ["{ds}", "--interpolation", "bicubic"], None, ["--interpolation"]),
    ("jobs-0", ["{ds}", "--jobs", "0"], None, ["--jobs"]),
    ("jobs-minus-1", ["{ds}", "--jobs", "-1"], None, ["--jobs"]),
    ("jobs-abc", ["{ds}", "--jobs", "abc"], None, ["--jobs"]),
    ("jobs-sequential", ["{ds}", "--jobs", "2", "--distribution-strategy", "sequential"], None,
     ["--jobs", "sequential"]),
    ("resources-multiprocessing", ["{ds}", "--job-resources", '{"mem": "10M"}'], None, ["--job-resources"]),
    ("resources-sequential", ["{ds}", "--job-resources", "mem=10M", "--distribution-strategy", "sequential"], None,
     ["--job-resources"]),
    ("resources-garbage", ["{ds}", "--distribution-strategy", "slurm", "--job-resources", "garbage"], None,
     ["--job-resources"]),
    ("resources-bad-json", ["{ds}", "--distribution-strategy", "slurm", "--job-resources", '{"mem": '], None,
     ["--job-resources"]),
    ("strategy-unknown", ["{ds}", "--distribution-strategy", "mesos"], None, ["--distribution-strategy", "mesos"]),
    ("slurm-no-resources", ["{ds}", "--distribution-strategy", "slurm"], None, ["--job-resources", "required"]),
    ("kubernetes-no-resources", ["{ds}", "--distribution-strategy", "kubernetes"], None,
     ["--job-resources", "required"]),
    ("kubernetes-unknown-key", ["{ds}", "--distribution-strategy", "kubernetes", "--job-resources",
                                '{"mem": "10M", "image": "x", "gpus": 1}'], None, ["gpus", "kubernetes"]),
    ("kubernetes-no-image", ["{ds}", "--distribution-strategy", "kubernetes", "--job-resources", "mem=4Gi"], None,
     ["image"]),
    ("slurm-cpus-bad", ["{ds}", "--distribution-strategy", "slurm", "--job-resources", "cpus=many"], None,
     ["cpus"]),
    ("slurm-mem-bad", ["{ds}", "--distribution-strategy", "slurm", "--job-resources", "mem=lots"], None, ["lots"]),
    ("resources-dask", ["{ds}", "--distribution-strategy", "dask", "--job-resources", "mem=1G"], None,
     ["--job-resources", "dask"]),
    ("dask-scheduler-slurm", ["{ds}", "--distribution-strategy", "slurm", "--job-resources", "mem=1G",
                              "--dask-scheduler", "tcp://h:8786"], None, ["--dask-scheduler"]),
    ("dask-scheduler-jobs", ["{ds}", "--distribution-strategy", "dask", "--jobs", "2",
                             "--dask-scheduler", "tcp://h:8786"], None, ["--jobs", "--dask-scheduler"]),
    ("dask-client-address", ["{ds}", "--distribution-strategy", "dask", "--dask_client_address=tcp://h:8786"], None,
     ["--dask-scheduler"]),
    ("runner-with-dask", ["{ds}", "--distribution-strategy", "dask", "--runner=DirectRunner"], None,
     ["--runner", "dask"]),
    ("dataflow-local-target", ["{ds}", "--distribution-strategy", "dataflow", "--project=p", "--region=r",
                               "--temp_location=gs://b/t"], None, ["dataflow", "gs://"]),
    ("memory-budget-bad", ["{ds}", "--memory-budget", "lots"], None, ["--memory-budget"]),
    ("memory-budget-small", ["{ds}", "--memory-budget", "10M"], None, ["--memory-budget"]),
    ("unknown-flag", ["{ds}", "--frobnicate"], None, ["--frobnicate"]),
    ("misspelt-beam-flag", ["{ds}", "--direct_num_wokers=2"], None, ["--direct_num_wokers"]),
    ("mag-dir-missing", ["{ds}"], _drop_mag_dir, ["color", "1"]),
    ("dtype-disagrees", ["{ds}"], _wrong_element_class, ["color", "uint16"]),
    ("wkw", ["{ds}"], _wkw, ["wkw"]),
    ("zarr-v2", ["{ds}"], _zarr_v2, ["zarr"]),
]


def _args(template, ds):
    return [a.replace("{ds}", str(ds)) for a in template]


@pytest.mark.parametrize("args, mutate, needles", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_usage_error(tiny_dataset, capsys, args, mutate, needles):
    if mutate:
        mutate(tiny_dataset)
    before = tree_digest(tiny_dataset.parent)
    code, out, err = run_in_process(capsys, *_args(args, tiny_dataset))
    assert_usage_error(code, err, *needles)
    assert tree_digest(tiny_dataset.parent) == before


def test_coarsest_finer_than_source(make_dataset, capsys):
    rng = np.random.default_rng(0)
    path = make_dataset(layers=[{"name": "color", "category": "color", "mag": (4, 4, 4),
                                 "data": rng.integers(0, 255, (10, 9, 8), dtype=np.uint8)}])
    assert read_properties(path)["dataLayers"][0]["mags"][0]["mag"] == [4, 4, 4]
    before = tree_digest(path.parent)
    code, _, err = run_in_process(capsys, path, "--coarsest-mag", "2")
    assert_usage_error(code, err, "coarsest")
    assert tree_digest(path.parent) == before


def test_unknown_flag_before_target_names_the_flag(tiny_dataset, capsys):
    """Contract section 5: the message names the option. `--frobnicate DS` must not turn
    into "missing TARGET" because DS was taken for the unknown flag's value."""
    before = tree_digest(tiny_dataset.parent)
    code, _, err = run_in_process(capsys, "--frobnicate", tiny_dataset)
    assert_usage_error(code, err, "--frobnicate")
    assert tree_digest(tiny_dataset.parent) == before


def test_unknown_layer_lists_layers(tiny_dataset, capsys):
    code, _, err = run_in_process(capsys, tiny_dataset, "--layer-name", "colour")
    assert_usage_error(code, err)
    assert "color, segmentation" in err


# ---------------------------------------------------------------------------
# what is accepted


OPTIONS = ["--sampling-mode", "--layer-name", "--coarsest-mag", "--jobs", "--distribution-strategy",
           "--job-resources", "--interpolation", "--ignore-background", "--memory-budget", "--dry-run"]


def test_help_lists_every_option(capsys):
    code, out, err = run_in_process(capsys, "--help")
    assert code == 0
    for option in OPTIONS:
        assert option in out, option
    assert "anisotropic" in out and "isotropic" in out and "constant_z" in out
    # defaults
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if line.strip().startswith("--")}
    assert "default" in lines["--sampling-mode"] and "anisotropic" in lines["--sampling-mode"]
    assert "default" in lines["--distribution-strategy"] and "multiprocessing" in lines["--distribution-strategy"]
    assert "default" in lines["--memory-budget"] and "2G" in lines["--memory-budget"]
    assert "default" in lines["--jobs"].lower() and "cpu" in lines["--jobs"].lower()
    assert "default" in lines["--coarsest-mag"].lower()
    assert "default" in lines["--layer-name"].lower()
    assert "default" in lines["--interpolation"].lower() and "median" in lines["--interpolation"]
    assert "default" in lines["--dry-run"].lower()
    assert "default: 'false'" in lines["--ignore-background"].lower() and "nearest" in lines["--ignore-background"]


@pytest.mark.parametrize("position", ["after", "before", "mixed"])
def test_dry_run_prints_plan_and_changes_nothing(tiny_dataset, capsys, position):
    before = tree_digest(tiny_dataset.parent)
    options = ["--dry-run", "--coarsest-mag", "8", "--layer-name", "segmentation"]
    if position == "after":
        args = [tiny_dataset, *options]
    elif position == "before":
        args = [*options, tiny_dataset]
    else:
        args = options[:3] + [tiny_dataset] + options[3:]
    code, out, err = run_in_process(capsys, *args)
    assert code == 0, err
    assert "segmentation" in out and "2-2-1" in out and "4-4-2" in out and "8-8-4" in out
    assert "color" not in out
    assert tree_digest(tiny_dataset.parent) == before


@pytest.mark.parametrize(
    "beam_flags",
    [["--direct_num_workers=2"], ["--direct_num_workers", "2"], ["--direct_running_mode=in_memory"]],
    ids=["eq", "space", "mode"],
)
def test_beam_flags_accepted(tiny_dataset, capsys, beam_flags):
    before = tree_digest(tiny_dataset.parent)
    code, out, err = run_in_process(capsys, tiny_dataset, *beam_flags, "--dry-run")
    assert code == 0, err
    assert tree_digest(tiny_dataset.parent) == before
    code, out, err = run_in_process(capsys, *beam_flags, tiny_dataset, "--dry-run")
    assert code == 0, err


def test_options_before_target_real_run(tiny_dataset, capsys):
    code, out, err = run_in_process(
        capsys, "--distribution-strategy", "sequential", "--coarsest-mag", "4", "--direct_num_workers=2", tiny_dataset,
        "--layer-name", "color",
    )
    assert code == 0, err
    raw = read_properties(tiny_dataset)
    assert [m["mag"] for m in raw["dataLayers"][0]["mags"]] == [[1, 1, 1], [2, 2, 1], [4, 4, 2]]
    assert [m["mag"] for m in raw["dataLayers"][1]["mags"]] == [[1, 1, 1]]
    assert (tiny_dataset / "color" / "4-4-2" / "zarr.json").is_file()
    assert not (tiny_dataset / "segmentation" / "2-2-1").exists()


def test_flags_do_not_leak_between_calls(tiny_dataset, capsys):
    code, out, _ = run_in_process(capsys, tiny_dataset, "--dry-run", "--layer-name", "color", "--coarsest-mag", "8")
    assert code == 0 and "segmentation" not in out
    code, out, _ = run_in_process(capsys, tiny_dataset, "--dry-run")
    assert code == 0
    assert "color" in out and "segmentation" in out
    assert "8-8-4" not in out  # default coarsest for 40x36 is 4


def test_layers_align_with_existing_mags(make_dataset, capsys):
    """Contract section 2, alignment: another layer already holds 1, 2-2-1, 4-4-1, so at
    voxel size 10.5-10.5-24 anisotropic to 8 the segmentation gets 2-2-1, 4-4-1, 8-8-4."""
    rng = np.random.default_rng(1)
    path = make_dataset(
        layers=[
            {"name": "color", "category": "color", "mag": (4, 4, 1),
             "data": rng.integers(0, 255, (10, 9, 40), dtype=np.uint8)},
            {"name": "segmentation", "category": "segmentation",
             "data": rng.integers(0, 3, (40, 36, 40), dtype=np.uint32)},
        ],
        voxel_size=(10.5, 10.5, 24.0),
    )
    raw = read_properties(path)
    color = raw["dataLayers"][0]
    color["mags"] = [{"mag": list(m), "path": f"./color/{n}", "axisOrder": {"c": 0, "x": 1, "y": 2, "z": 3}}
                     for m, n in (((1, 1, 1), "1"), ((2, 2, 1), "2-2-1"), ((4, 4, 1), "4-4-1"))]
    write_properties(path, raw)
    before = tree_digest(path.parent)
    for args in ([path, "--coarsest-mag", "8", "--dry-run", "--layer-name", "segmentation"],
                 [path, "--coarsest-mag", "8", "--dry-run"]):
        code, out, err = run_in_process(capsys, *args)
        assert code == 0, err
        (line,) = [l for l in out.splitlines() if l.startswith("segmentation")]
        assert "2-2-1, 4-4-1, 8-8-4" in line and "4-4-2" not in line, line
    assert tree_digest(path.parent) == before


def test_nothing_to_do(tiny_dataset, capsys):
    run_in_process(capsys, tiny_dataset, "--distribution-strategy", "sequential", "--coarsest-mag", "2-2-1")
    before = tree_digest(tiny_dataset.parent)
    code, out, err = run_in_process(capsys, tiny_dataset, "--distribution-strategy", "sequential",
                                    "--coarsest-mag", "2-2-1")
    assert code == 0, err
    assert "nothing to do" in out
    assert tree_digest(tiny_dataset.parent) == before


# ---------------------------------------------------------------------------
# a handful as real processes: exit status, stderr


def test_subprocess_help():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in OPTIONS:
        assert option in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, needles",
    [
        ([], ["TARGET"]),
        (["{ds}", "--coarsest-mag", "abc"], ["--coarsest-mag"]),
        (["{ds}", "--frobnicate"], ["--frobnicate"]),
        (["{ds}", "--layer-name", "nope"], ["color", "segmentation"]),
        (["{ds}", "--distribution-strategy", "kubernetes", "--job-resources", "mem=1G,image=x,cpus=2"], ["cpus"]),
    ],
    ids=["missing-target", "coarsest", "unknown-flag", "layer", "kubernetes"],
)
def test_subprocess_usage_errors(tiny_dataset, args, needles):
    before = tree_digest(tiny_dataset.parent)
    result = run_cli(*_args(args, tiny_dataset))
    assert_usage_error(result.returncode, result.stderr, *needles)
    assert tree_digest(tiny_dataset.parent) == before


def test_subprocess_dry_run_with_beam_flag(tiny_dataset):
    before = tree_digest(tiny_dataset.parent)
    result = run_cli("--direct_num_workers=2", tiny_dataset, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "color" in result.stdout and "segmentation" in result.stdout
    assert tree_digest(tiny_dataset.parent) == before


@pytest.mark.parametrize("text, size", [
    ("2G", 2 << 30), ("2GiB", 2 << 30), ("1500M", 1500 << 20), ("1.5g", 3 << 29),
    ("2GB", 2_000_000_000), ("1500MB", 1_500_000_000), ("1tb", 10**12),
])
def test_memory_budget_sizes_binary_and_decimal(text, size):
    assert api.parse_size(text) == size
