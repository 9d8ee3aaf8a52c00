"""Distribution strategies: dask (real LocalCluster), slurm and kubernetes
(the job script / cluster spec the real libraries build), flink (options, and
a real run through Beam's local portable job service) and dataflow (offline
dry-run job construction with the staged setup.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import apache_beam as beam
import psutil
import pytest

from beam_downsample import demo
from beam_downsample.launch import cli, clusters, runners
from beam_downsample.plan.job import plan_job
from beam_downsample.plan.options import JobOptions
from beam_downsample.plan.passes import WORKER_OVERHEAD_BYTES, unit_budget
from beam_downsample.store.properties import load_dataset
from beam_downsample.transforms import seeds
from beam_downsample.transforms.downsample import DownsamplePass
from conftest import tiny_layers, tree_bytes, tree_digest

RESOURCES = {"mem": "6G", "cpus": 3, "time": "02:00:00", "partition": "big", "account": "lab", "qos": "high",
             "exclusive": True}


def run(*args) -> int:
    return cli.main(["beam-downsample", *map(str, args)])


@pytest.fixture
def fresh(tmp_path):
    """`fresh(where)`: a new tiny dataset `ds` under tmp_path/where (same name, so the properties compare equal)."""

    def make(where: str):
        path = tmp_path / where / "ds"
        demo.write_dataset(str(path), tiny_layers(), (11.24, 11.24, 28.0))
        return path

    return make


@pytest.fixture
def sequential_result(fresh):
    """The tree a `sequential` run writes, to compare every other strategy with."""
    path = fresh("sequential")
    assert run(path, "--distribution-strategy", "sequential") == 0
    return tree_bytes(path)


def dask_processes() -> list:
    """Our child processes that are dask workers (LocalCluster spawns them; not multiprocessing's resource tracker)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
    return found


def wait_gone(timeout=20.0) -> list:
    deadline = time.monotonic() + timeout
    while dask_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    return dask_processes()


# ---------------------------------------------------------------------------
# job resources -> engine settings


def test_slurm_settings_map_named_keys_and_pass_others_as_sbatch_lines():
    settings = clusters.slurm_settings(RESOURCES, default_memory=2 << 30)
    assert settings["memory"] == "6144MiB"
    assert settings["job_cpu"] == 3 and settings["cores"] == 1 and settings["processes"] == 1
    assert settings["walltime"] == "02:00:00"
    assert settings["queue"] == "big" and settings["account"] == "lab"
    assert settings["job_extra_directives"] == ["--qos=high", "--exclusive"]


def test_slurm_settings_accept_key_value_text_and_default_memory_to_the_budget():
    settings = clusters.slurm_settings(runners.parse_job_resources("cpus-per-task=2, time=1:00:00"), 3 << 30)
    assert settings["job_cpu"] == 2 and settings["walltime"] == "1:00:00"
    assert settings["memory"] == "3072MiB"


def test_slurm_job_script_from_dask_jobqueue_holds_the_resources():
    from dask_jobqueue import SLURMCluster

    engine = runners.plan_engine("slurm", 5, [], '{"mem": "6G", "cpus": 3, "time": "02:00:00", "partition": '
                                                 '"big", "account": "lab", "qos": "high", "exclusive": true}')
    with SLURMCluster(**engine.cluster.settings, scheduler_options={"port": 0, "dashboard_address": None}) as real:
        script = real.job_script()
    for line in ["#SBATCH -p big", "#SBATCH -A lab", "#SBATCH --cpus-per-task=3", "#SBATCH --mem=6G",
                 "#SBATCH -t 02:00:00", "#SBATCH --qos=high", "#SBATCH --exclusive",
                 "export DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE=False"]:
        assert line in script.splitlines(), (line, script)
    assert "--nthreads 1" in script and "--memory-limit 6.00GiB" in script
    # --dry-run prints the same script, built without starting a scheduler
    assert engine.cluster.job_script().replace("<scheduler-address>", "X").splitlines()[:10] == \
        [line for line in script.splitlines()[:10]]
    assert engine.cluster.jobs == 5


def test_kubernetes_cluster_spec_holds_the_resources():
    engine = runners.plan_engine("kubernetes", 4, [], "mem=4Gi,cpu=1500m,image=registry/bd:1,namespace=em")
    spec = engine.cluster.spec()
    assert spec["kind"] == "DaskCluster"
    worker = spec["spec"]["worker"]
    assert worker["replicas"] == 4
    container = worker["spec"]["containers"][0]
    assert container["image"] == "registry/bd:1"
    expected = {"memory": "4Gi", "cpu": "1500m"}
    assert container["resources"] == {"requests": expected, "limits": expected}
    assert container["args"][:5] == ["dask-worker", "--nthreads", "1", "--memory-limit", str(4 << 30)]
    assert spec["spec"]["scheduler"]["spec"]["containers"][0]["image"] == "registry/bd:1"
    assert engine.cluster.settings["namespace"] == "em"
    assert (engine.worker_memory, engine.worker_cores) == (4 << 30, 2)


@pytest.mark.parametrize("text, needle", [
    ("mem=4G,image=x,gpu=1", "gpu"),
    ("mem=4G", "image"),
    ("mem=4G,image=x,cpu=two", "two"),
    ("mem=four,image=x", "four"),
])
def test_kubernetes_bad_resources(text, needle):
    with pytest.raises(runners.UsageError, match=needle):
        runners.plan_engine("kubernetes", None, [], text)


@pytest.mark.parametrize("text, decimal, expected", [
    ("10M", False, 10 << 20), ("4G", False, 4 << 30), ("4GB", False, 4 << 30), ("4Gi", True, 4 << 30),
    ("4G", True, 4 * 10**9), ("1.5G", False, 3 << 29), ("1048576", False, 1 << 20),
])
def test_parse_memory(text, decimal, expected):
    assert clusters.parse_memory(text, decimal_units=decimal) == expected


def test_cluster_workers_size_units_from_their_own_memory(tiny_dataset):
    """Units for a cluster worker follow its memory, not this machine's budget and cores."""
    options = JobOptions(memory_budget=2 << 30, jobs=2, worker_memory=6 << 30, worker_cores=3)
    budget = unit_budget(options)
    assert budget.bytes == (6 << 30) - WORKER_OVERHEAD_BYTES and budget.threads == 4
    small = unit_budget(JobOptions(worker_memory=64 << 20, worker_cores=None))
    assert small.bytes == 32 << 20 and small.threads == 2


def test_missing_extra_names_it(tiny_dataset, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import fails as if not installed
    before = tree_digest(tiny_dataset)
    assert run(tiny_dataset, "--distribution-strategy", "slurm", "--job-resources", "mem=1G") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("beam-downsample: error: --distribution-strategy slurm needs the 'slurm' extra: "
                   "pip install 'beam-downsample[slurm]'")
    assert tree_digest(tiny_dataset) == before


@pytest.mark.parametrize("strategy, resources, needles", [
    ("slurm", "mem=2G,cpus=2,qos=low", ["#SBATCH --cpus-per-task=2", "#SBATCH --mem=2G", "#SBATCH --qos=low",
                                         "dask_worker"]),
    ("kubernetes", "mem=2Gi,cpu=2,image=me/bd:1", ['"kind": "DaskCluster"', '"memory": "2Gi"', '"cpu": "2"',
                                                   '"image": "me/bd:1"']),
    ("dask", None, ["LocalCluster of 3 worker processes"]),
    ("flink", None, ["FlinkRunner", "flink_master=h:8081", "parallelism=3", "setup_file="]),
])
def test_dry_run_prints_the_plan_and_what_would_be_submitted(tiny_dataset, capsys, strategy, resources, needles):
    before = tree_digest(tiny_dataset.parent)
    args = ["--distribution-strategy", strategy, "--jobs", "3", "--dry-run"]
    if strategy == "flink":
        args.append("--flink_master=h:8081")
    assert run(tiny_dataset, *args, *(["--job-resources", resources] if resources else [])) == 0
    out = capsys.readouterr().out
    assert "color: pass 1:" in out and "MiB" in out
    for needle in needles:
        assert needle in out, (needle, out)
    assert tree_digest(tiny_dataset.parent) == before
    assert not dask_processes()


# ---------------------------------------------------------------------------
# dask: a real dask.distributed LocalCluster with 2 worker processes


def test_dask_local_cluster_output_identical_to_sequential(fresh, sequential_result, capsys):
    path = fresh("dask")
    assert run(path, "--distribution-strategy", "dask", "--jobs", "2") == 0
    assert tree_bytes(path) == sequential_result
    assert not wait_gone(), "the LocalCluster's processes outlived the run"


def test_dask_existing_scheduler_output_identical_to_sequential(fresh, sequential_result):
    from distributed import LocalCluster

    path = fresh("dask-existing")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        before = set(cluster.scheduler.clients)
        assert run(path, "--distribution-strategy", "dask", "--dask-scheduler", cluster.scheduler_address) == 0
        time.sleep(0.5)  # the scheduler handles the client's goodbye asynchronously
        assert set(cluster.scheduler.clients) == before, "the run left its dask client connected"
        assert cluster.scheduler.workers, "the run must not close a cluster it did not start"
    assert tree_bytes(path) == sequential_result


def test_dask_cluster_closed_when_interrupted():
    with pytest.raises(KeyboardInterrupt):
        with clusters.LocalDask(1).started() as address:
            assert address.startswith("tcp://")
            assert dask_processes()
            raise KeyboardInterrupt
    assert not wait_gone()


def test_ctrl_c_is_deferred_to_the_passes_checkpoints():
    """Inside a dask run Ctrl-C sets a flag (dask would swallow a KeyboardInterrupt raised in its callbacks)."""
    from beam_downsample.launch.dask_runner import deferred_interrupts

    before = signal.getsignal(signal.SIGINT)
    with deferred_interrupts() as interrupted:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert interrupted.is_set()
    assert signal.getsignal(signal.SIGINT) is before


def test_interrupted_pass_cancels_its_units_and_closes_its_client():
    import threading

    from distributed import Client, LocalCluster

    from beam_downsample.launch.dask_runner import ClientClosingResult

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        client = Client(cluster.scheduler_address)
        busy = client.submit(time.sleep, 60)
        interrupted = threading.Event()
        threading.Timer(0.5, interrupted.set).start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            ClientClosingResult(client, [busy], interrupted).wait_until_finish()
        assert time.monotonic() - start < 10
        assert busy.cancelled() and client.status == "closed"


def test_dask_failing_unit_one_line_and_cluster_closed(make_dataset, capsys):
    path = make_dataset("dask-broken")
    chunk_dir = os.path.join(path, "color", "1")
    for directory, _, names in os.walk(chunk_dir):
        for name in names:
            if name != "zarr.json":
                with open(os.path.join(directory, name), "r+b") as handle:
                    handle.seek(max(os.path.getsize(handle.name) // 2, 0))
                    handle.write(b"garbage!" * 4)
    assert run(path, "--distribution-strategy", "dask", "--jobs", "2") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "color" in err[0] and "rerun" in err[0], err
    assert not wait_gone()


# ---------------------------------------------------------------------------
# flink


def test_flink_options():
    engine = runners.plan_engine("flink", 4, ["--flink_master=host:8081"])
    options = engine.options.get_all_options()
    assert engine.runner == "FlinkRunner" and options["runner"] == "FlinkRunner"
    assert options["flink_master"] == "host:8081"
    assert options["parallelism"] == 4
    # workers run Beam's SDK container: our package is staged from the source tree
    assert options["environment_type"] is None and options["setup_file"] == runners.SETUP_FILE
    assert os.path.isfile(options["setup_file"])
    assert not engine.record_failures  # Flink retries a failed bundle
    # what the user gives wins
    given = runners.plan_engine("flink", 4, ["--flink_master=h:1", "--parallelism=8", "--environment_type=EXTERNAL",
                                             "--environment_config=localhost:50000",
                                             "--sdk_container_image=me/beam:1"]).options.get_all_options()
    assert given["parallelism"] == 8 and given["environment_type"] == "EXTERNAL" and given["setup_file"] is None


@pytest.fixture
def job_service():
    """Beam's local portable job service in its own process; yields its endpoint."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("localhost", port), timeout=1):
                break
            assert process.poll() is None and time.monotonic() < deadline, "job service did not start"
            time.sleep(0.2)
        yield f"localhost:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_flink_portable_path_output_identical_to_sequential(fresh, sequential_result, job_service):
    path = fresh("portable")
    assert run(path, "--distribution-strategy", "flink", f"--job_endpoint={job_service}",
               "--environment_type=LOOPBACK") == 0
    assert tree_bytes(path) == sequential_result


# ---------------------------------------------------------------------------
# dataflow


DATAFLOW_FLAGS = ["--project=demo-project", "--region=europe-west1", "--temp_location=gs://demo-bucket/tmp"]


def test_dataflow_dry_run_job_stages_setup_py(tiny_dataset, tmp_path):
    """DataflowRunner builds the whole job offline with --dry_run=True (no credentials, no network)."""
    engine = runners.plan_engine("dataflow", 3, [*DATAFLOW_FLAGS, "--dry_run=True"], target="gs://demo-bucket/ds")
    options = engine.options.get_all_options()
    assert options["runner"] == "DataflowRunner" and options["setup_file"] == runners.SETUP_FILE
    assert options["max_num_workers"] == 3 and not engine.record_failures
    plans = plan_job(load_dataset(str(tiny_dataset)), JobOptions(worker_memory=engine.worker_memory))
    pipeline = beam.Pipeline(runner=engine.runner, options=engine.options)
    pass_seeds = [s for p in plans for s in seeds.make_seeds(p.grids[0], p.planned[0])]
    _ = pipeline | DownsamplePass(pass_seeds, [p.grids[0] for p in plans], [p.configs[0] for p in plans])
    result = pipeline.run()
    result.wait_until_finish()
    staged = [
        artifact.role_payload
        for environment in result.job.proto_pipeline.components.environments.values()
        for artifact in environment.dependencies
    ]
    assert any(b"workflow.tar.gz" in payload for payload in staged), staged  # Beam's name for the setup.py sdist
    assert result.job.proto.type.name == "JOB_TYPE_BATCH"


@pytest.mark.parametrize("flags, needle", [
    ([], "--project"),
    (["--project=p", "--temp_location=gs://b/t"], "--region"),
])
def test_dataflow_needs_its_flags(flags, needle):
    with pytest.raises(runners.UsageError, match=needle):
        runners.plan_engine("dataflow", None, flags, target="gs://b/ds")
