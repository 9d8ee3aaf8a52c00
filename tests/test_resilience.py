"""Robustness: kill -9 and rerun, retried/duplicated work units, layer locks,
leftovers of crashed runs, corrupt input and an unwritable target.

The promises of docs/reliability.md under "Crashes and reruns" are what is checked here:
a rerun after a crash is byte-identical to an uninterrupted run, a mag is
listed only once its data is complete, a unit run twice (even concurrently)
writes the same bytes, one run at a time per layer, and problems end with a
short message.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from unittest import mock

import numpy as np
import pytest

from beam_downsample import demo
from beam_downsample.core.box import Box
from beam_downsample.core.mags import mag_name, parse_mag
from beam_downsample.launch import runners
from beam_downsample.plan.describe import describe
from beam_downsample.plan.job import plan_job
from beam_downsample.plan.options import JobOptions
from beam_downsample.run import job
from beam_downsample.state import markers
from beam_downsample.store import arrays, locks
from beam_downsample.store.properties import load_dataset
from beam_downsample.store.storage import TEMP_PREFIX
from beam_downsample.transforms import work
from beam_downsample.transforms.downsample import DownsampleUnitFn
from conftest import PROPERTIES, read_properties, run_cli, skip_or_fail, tiny_layers, tree_bytes, tree_digest
from resilience_helpers import (
    kill_group,
    open_unit_arrays,
    outputs,
    pinned_cpus,
    run_cli_pinned,
    run_items_in_lockstep,
    start_cli,
    wait_until,
)

STATE_DIR = ".beam-downsample"
BIG_VOXEL_SIZE = (32.0, 32.0, 40.0)
# 32 MiB per worker (964M: the launcher and 2 workers at 300 MiB, 2 units): many work units, 3 passes in all.
BIG_ARGS = ("--memory-budget", "964M", "--distribution-strategy", "multiprocessing", "--jobs", "2")
BIG_OPTIONS = JobOptions(memory_budget=964 << 20, jobs=2)
SEQUENTIAL = ("--distribution-strategy", "sequential")


# ---------------------------------------------------------------------------
# datasets


def cheap_color(segmentation: np.ndarray) -> np.ndarray:
    """A uint8 image that follows the segmentation (hash of the label), much cheaper than demo.render_color."""
    return (segmentation * np.uint32(2654435761) >> np.uint32(24)).astype(np.uint8)


def write_real_dataset(path, segmentation: np.ndarray) -> None:
    demo.write_dataset(
        str(path),
        [
            {"name": "color", "category": "color", "data": cheap_color(segmentation)},
            {"name": "segmentation", "category": "segmentation", "data": segmentation},
        ],
        BIG_VOXEL_SIZE,
    )


def copy_dataset(source, target):
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def big_base(tmp_path_factory, segmentation):
    """512x512x256 of the real segmentation plus a uint8 color layer (never run on; copy it)."""
    path = tmp_path_factory.mktemp("big") / "base"
    write_real_dataset(path, np.ascontiguousarray(segmentation[:, :, :256]))
    return path


@pytest.fixture(scope="module")
def big_clean(big_base, tmp_path_factory):
    """An uninterrupted run on a copy of big_base: (path, tree_digest, wall time)."""
    path = copy_dataset(big_base, tmp_path_factory.mktemp("big-clean") / "ds")
    started = time.monotonic()
    result = run_cli_pinned(path, *BIG_ARGS)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout
    assert not (path / STATE_DIR).exists()
    return types.SimpleNamespace(path=path, digest=tree_digest(path), seconds=elapsed)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """The conftest tiny dataset (anisotropic voxel size: color/2-2-1 is the first new mag)."""
    path = tmp_path_factory.mktemp("tiny") / "base"
    demo.write_dataset(str(path), tiny_layers(), (11.24, 11.24, 28.0))
    return path


@pytest.fixture(scope="module")
def tiny_clean(tiny_base, tmp_path_factory):
    path = copy_dataset(tiny_base, tmp_path_factory.mktemp("tiny-clean") / "ds")
    result = run_cli(path, *SEQUENTIAL)
    assert result.returncode == 0, result.stderr
    assert [m["mag"] for m in read_properties(path)["dataLayers"][0]["mags"]] == [[1, 1, 1], [2, 2, 1], [4, 4, 2]]
    return types.SimpleNamespace(path=path, digest=tree_digest(path))


# ---------------------------------------------------------------------------
# comparing trees


def diff_digests(actual: dict, expected: dict) -> list[str]:
    """Human-readable differences between two tree_digest results (empty if identical)."""
    problems = []
    for key in sorted(set(actual) | set(expected)):
        if key not in expected:
            problems.append(f"extra: {key}")
        elif key not in actual:
            problems.append(f"missing: {key}")
        elif actual[key] != expected[key]:
            problems.append(f"differs: {key}")
    return problems


def without_state(digest: dict) -> dict:
    return {k: v for k, v in digest.items() if not k.startswith(STATE_DIR + "/")}


def subtree(digest: dict, prefix: str) -> dict:
    prefix = prefix.rstrip("/") + "/"
    return {k: v for k, v in digest.items() if k.startswith(prefix)}


def listing_problems(path, clean_digest: dict) -> list[str]:
    """What is wrong with the properties/NGFF listing of a (possibly crashed) dataset:
    unreadable JSON, or a listed mag whose files differ from the finished clean run's."""
    problems = []
    try:
        raw = read_properties(path)
        load_dataset(str(path))
    except Exception as error:  # pylint: disable=broad-except
        return [f"{PROPERTIES} unreadable: {error!r}"]
    digest = tree_digest(path)
    for layer in raw["dataLayers"]:
        listed = [os.path.normpath(entry["path"]) for entry in layer["mags"]]
        try:
            with open(os.path.join(path, layer["name"], "zarr.json"), encoding="utf-8") as handle:
                group = json.load(handle)
            ngff = group["attributes"]["ome"]["multiscales"][0]["datasets"]
            listed += [os.path.join(layer["name"], entry["path"]) for entry in ngff]
        except Exception as error:  # pylint: disable=broad-except
            problems.append(f"{layer['name']}/zarr.json unreadable: {error!r}")
        for mag_dir in sorted(set(listed)):
            expected = subtree(clean_digest, mag_dir)
            if not expected:
                problems.append(f"{mag_dir} is listed but the clean run has no such mag")
            elif subtree(digest, mag_dir) != expected:
                problems.append(f"{mag_dir} is listed but incomplete: " + "; ".join(
                    diff_digests(subtree(digest, mag_dir), expected)[:5]))
    leftovers = [name for name in os.listdir(path) if name.startswith(".tmp-")]
    if leftovers:
        problems.append(f"temp files of an interrupted atomic write: {leftovers}")
    return problems


def unreadable_mags(path) -> list[str]:
    """Listed mags that tensorstore cannot read back completely."""
    errors = []
    for layer in read_properties(path)["dataLayers"]:
        for entry in layer["mags"]:
            mag_path = os.path.join(path, os.path.normpath(entry["path"]))
            try:
                array = arrays.open_array({"driver": "zarr3", "kvstore": arrays.kvstore_spec(mag_path)}, open=True)
                array.read().result()
            except Exception as error:  # pylint: disable=broad-except
                errors.append(f"{entry['path']}: {str(error)[:300]}")
    return errors


# ---------------------------------------------------------------------------
# plans and markers


def plan_pinned(dataset, options=BIG_OPTIONS):
    """plan_job as a run pinned to PINNED_CORES cores plans it."""
    with mock.patch.object(job, "available_cores", lambda: len(pinned_cpus())):
        return plan_job(dataset, options)


def current_plans(path, options=BIG_OPTIONS):
    return plan_pinned(load_dataset(str(path)), options)


def count_markers(directories) -> int:
    return sum(
        len([n for n in os.listdir(d) if n.endswith(".done")]) for d in directories if os.path.isdir(d)
    )


def expected_resume_lines(path, options=BIG_OPTIONS) -> list[str]:
    """The `resuming:` lines a rerun must print, from the markers on disk that match its plan."""
    plans = current_plans(path, options)
    lines = []
    for index in range(max((len(p.passes) for p in plans), default=0)):
        active = [p for p in plans if index < len(p.passes)]
        total = sum(len(p.units[index]) for p in active)
        done = sum(markers.is_done(p.configs[index], u) for p in active for u in p.units[index])
        if done:
            lines.append(f"resuming: {done} of {total} work units of pass {index + 1} already done")
    return lines


def lists_mag(path, layer_name: str, mag) -> bool:
    try:
        raw = read_properties(path)
    except (OSError, ValueError):
        return False
    for layer in raw["dataLayers"]:
        if layer["name"] == layer_name:
            return any(tuple(entry["mag"]) == tuple(mag) for entry in layer["mags"])
    return False


def stale_locks_to_take_over(path, options=BIG_OPTIONS) -> list[str]:
    """Lock files left by a killed run, of the layers a rerun will work on (and so must take over)."""
    active = [p.layer.name for p in current_plans(path, options) if p.target_mags]
    return [f"{name}.lock" for name in active if os.path.exists(os.path.join(path, STATE_DIR, f"{name}.lock"))]


def lock_holder(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle).get("pid")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# 1. kill -9 at several points, rerun: byte-identical to an uninterrupted run


@pytest.fixture(scope="module")
def crash_chain(big_base, big_clean, tmp_path_factory):
    """Runs the big job and kills its whole process group (launcher and Beam workers) at four
    points, each time on the rerun of the same command, then reruns it to completion:

    0. 0.5 s after the run took its layer locks (creating arrays or starting Beam);
    1. in pass 1, once 20 more of its 80 units are marked done (16 color units, then the
       segmentation units that all read-modify-write the same shard);
    2. in pass 2, once 3 of its units are marked done (pass 1 is listed by then);
    3. right after segmentation mag 4 is listed (the last pass is starting up).
    """
    root = tmp_path_factory.mktemp("crash")
    target = copy_dataset(big_base, root / "ds")
    logs = root / "logs"
    fresh = current_plans(target)
    pass1_dirs = [p.configs[0].marker_dir for p in fresh]
    pass2_dirs = [p.configs[1].marker_dir for p in fresh if len(p.configs) > 1]
    assert sum(len(p.units[0]) for p in fresh) == 80 and len(pass2_dirs) == 2, describe(fresh)

    started = {}
    locks = [os.path.join(target, STATE_DIR, f"{p.layer.name}.lock") for p in fresh]

    def starting_up():  # 0.5 s after the run took its locks: creating arrays or starting Beam
        if "locked" not in started:
            if all(lock_holder(lock) == started["pid"] for lock in locks):
                started["locked"] = time.monotonic()
            return False
        return time.monotonic() - started["locked"] >= 0.5

    kill_points = [
        ("starting up", starting_up),
        ("20 more units of pass 1 done", lambda: count_markers(pass1_dirs) >= started["markers"] + 20),
        ("3 units of pass 2 done", lambda: count_markers(pass2_dirs) >= 3),
        ("segmentation mag 4 listed", lambda: lists_mag(target, "segmentation", (4, 4, 4))),
    ]
    kills = []
    for index, (name, reached) in enumerate(kill_points):
        expected_resume = expected_resume_lines(target)
        stale_locks = stale_locks_to_take_over(target)
        started.clear()
        started.update(t=time.monotonic(), markers=count_markers(pass1_dirs))
        proc = start_cli(logs, f"run{index}", target, *BIG_ARGS)
        started["pid"] = proc.pid
        try:
            hit = wait_until(reached, proc, timeout=180)
            was_running = proc.poll() is None
        finally:
            kill_group(proc)
        stdout, stderr = outputs(proc)
        kills.append(
            types.SimpleNamespace(
                name=name,
                hit=hit,
                was_running=was_running,
                returncode=proc.returncode,
                seconds=time.monotonic() - started["t"],
                stdout=stdout,
                stderr=stderr,
                expected_resume=expected_resume,
                stale_locks=stale_locks,
                markers=count_markers(pass1_dirs + pass2_dirs),
                listing_problems=listing_problems(target, big_clean.digest),
                properties=read_properties(target),
            )
        )
    final_expected_resume = expected_resume_lines(target)
    final_stale_locks = stale_locks_to_take_over(target)
    started["t"] = time.monotonic()
    final = run_cli_pinned(target, *BIG_ARGS)
    final_seconds = time.monotonic() - started["t"]
    with open(root / "summary.txt", "w", encoding="utf-8") as handle:  # for post-mortems
        for kill in kills:
            print(kill.name, kill.hit, kill.was_running, kill.returncode, round(kill.seconds, 2), kill.markers,
                  kill.expected_resume, kill.stale_locks, kill.listing_problems, file=handle)
        print("final", final.returncode, round(final_seconds, 2), final.stderr[-3000:], file=handle)
    return types.SimpleNamespace(
        target=target,
        kills=kills,
        final=final,
        final_seconds=final_seconds,
        final_expected_resume=final_expected_resume,
        final_stale_locks=final_stale_locks,
        digest=tree_digest(target),
    )


def error_lines(stderr: str, limit: int = 3) -> str:
    """The first few lines of a run's stderr that report an error (its tracebacks left out)."""
    lines = [line[:400] for line in stderr.splitlines() if "error" in line.lower() and not line.startswith(" ")]
    return "\n".join(lines[:limit]) or stderr[-1000:]


def test_crash_kill_points_hit_while_running(crash_chain):
    for kill in crash_chain.kills:
        assert kill.hit and kill.was_running, (
            f"kill point {kill.name!r} was not reached while the run was going "
            f"(exit {kill.returncode}):\n{error_lines(kill.stderr)}"
        )
        assert kill.returncode == -9


def test_crash_after_each_kill_only_complete_mags_are_listed(crash_chain, big_base):
    base_mags = {layer["name"]: layer["mags"] for layer in read_properties(big_base)["dataLayers"]}
    for kill in crash_chain.kills:
        assert kill.listing_problems == [], f"after kill {kill.name!r}"
    # and the kills did land in different states: nothing, then pass 1 listed, then more
    expected = [0, 0, 3, 5]  # then color 2, 4 and segmentation 2; then color 8 and segmentation 4 too
    for kill, count in zip(crash_chain.kills, expected):
        if kill.hit and kill.was_running:  # (test_crash_kill_points_hit_while_running reports the others)
            listed = sum(len(layer["mags"]) - len(base_mags[layer["name"]]) for layer in kill.properties["dataLayers"])
            assert listed == count, f"after kill {kill.name!r}"


def test_crash_reruns_report_resuming_and_take_over_stale_locks(crash_chain):
    runs = [(k.name, k.stderr, k.expected_resume, k.stale_locks) for k in crash_chain.kills[1:]]
    previous = crash_chain.kills
    runs.append(("final run", crash_chain.final.stderr, crash_chain.final_expected_resume,
                 crash_chain.final_stale_locks))
    assert any(expected for _, _, expected, _ in runs), "no rerun had markers to resume from"
    for (name, stderr, expected, stale), before in zip(runs, previous):
        if expected:
            for line in expected:
                assert line in stderr, f"rerun that ended at {name!r} should say {line!r}; stderr:\n{stderr}"
        else:
            assert "resuming:" not in stderr, f"rerun that ended at {name!r}: no marker matched, yet:\n{stderr}"
        for lock in stale:
            assert "removing stale lock" in stderr and lock in stderr, (
                f"rerun that ended at {name!r} should take over the stale lock {lock} of the run killed at "
                f"{before.name!r}; stderr:\n{stderr}"
            )


def test_crash_final_rerun_data_byte_identical_to_clean_run(crash_chain, big_clean):
    final = crash_chain.final
    assert final.returncode == 0, error_lines(final.stderr)
    assert "done" in final.stdout
    problems = diff_digests(without_state(crash_chain.digest), big_clean.digest)
    assert problems == [], "\n".join(problems[:20])


def test_crash_final_rerun_leaves_no_state_dir(crash_chain, big_clean):
    """Every file, none excepted: `.beam-downsample/` must be gone, so the whole tree is identical."""
    state = sorted(k for k in crash_chain.digest if k.startswith(STATE_DIR + "/"))
    assert state == [], f"left behind after the final rerun: {len(state)} entries, e.g. {state[:8]}"
    assert crash_chain.digest == big_clean.digest


# ---------------------------------------------------------------------------
# 2. a unit run twice (in a row, concurrently) writes the same bytes


@pytest.fixture(scope="module")
def medium_base(tmp_path_factory, segmentation):
    """256x256x128 real segmentation plus color: pass 1 has 2 color and 8 segmentation units
    with BIG_OPTIONS, several of them sharing one shard per mag."""
    path = tmp_path_factory.mktemp("medium") / "base"
    write_real_dataset(path, np.ascontiguousarray(segmentation[:256, :256, :128]))
    return path


def prepare(medium_base, target):
    """A copy of medium_base with every target array created; the (config, unit) items of pass 1."""
    copy_dataset(medium_base, target)
    dataset = load_dataset(str(target))
    plans = plan_pinned(dataset)
    job.create_targets(dataset, plans)
    items = [(p.configs[0], unit) for p in plans for unit in p.units[0]]
    assert len(items) == 10 and len({u.box for _, u in items if u.layer == "segmentation"}) == 8
    return plans, items


def data_digest(path) -> dict:
    """Every file of the dataset but the done-markers (run_unit writes none)."""
    return without_state(tree_digest(path))


@pytest.fixture(scope="module")
def single_run(medium_base, tmp_path_factory):
    target = tmp_path_factory.mktemp("units") / "single"
    _, items = prepare(medium_base, target)
    for config, unit in items:
        source, targets = open_unit_arrays(config)
        work.run_unit(config, unit, source, targets)
    digest = data_digest(target)
    # the pass-1 mags really hold data
    assert any(k.startswith("segmentation/2/c/") for k in digest) and any(k.startswith("color/4/c/") for k in digest)
    return digest


def test_unit_run_twice_in_a_row_writes_same_bytes(medium_base, single_run, tmp_path):
    _, items = prepare(medium_base, tmp_path / "ds")
    for config, unit in items:
        source, targets = open_unit_arrays(config)
        work.run_unit(config, unit, source, targets)
        work.run_unit(config, unit, source, targets)
    assert diff_digests(data_digest(tmp_path / "ds"), single_run) == []


def test_unit_run_twice_concurrently_in_threads_writes_same_bytes(medium_base, single_run, tmp_path):
    _, items = prepare(medium_base, tmp_path / "ds")
    barrier = threading.Barrier(2)
    errors = []

    def worker():
        try:
            run_items_in_lockstep(items, barrier)
        except BaseException as error:  # pylint: disable=broad-except
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert diff_digests(data_digest(tmp_path / "ds"), single_run) == []


def test_unit_run_twice_concurrently_in_processes_writes_same_bytes(medium_base, single_run, tmp_path):
    _, items = prepare(medium_base, tmp_path / "ds")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2, timeout=120)
    processes = [context.Process(target=run_items_in_lockstep, args=(items, barrier)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=180)
    assert [p.exitcode for p in processes] == [0, 0]
    assert diff_digests(data_digest(tmp_path / "ds"), single_run) == []


def test_dofn_redelivered_unit_writes_the_same_bytes(medium_base, single_run, tmp_path):
    """A retried or duplicated bundle runs its unit again: same bytes, marker kept."""
    plans, items = prepare(medium_base, tmp_path / "ds")
    fn = DownsampleUnitFn([p.configs[0] for p in plans])
    fn.setup()

    def bundle(*units):  # markers are written beside the next unit; all of them by the bundle's end
        fn.start_bundle()
        keys = [key for unit in units for key in fn.process(unit)]
        fn.finish_bundle()
        return keys

    config, unit = next((c, u) for c, u in items if u.layer == "segmentation")
    assert not markers.is_done(config, unit)
    assert bundle(unit) == [unit.key]
    assert markers.is_done(config, unit)
    with open(markers.marker_path(config, unit), encoding="utf-8") as handle:
        assert handle.read() == "done\n"
    first = data_digest(tmp_path / "ds")
    assert bundle(unit) == [unit.key]  # second delivery
    assert data_digest(tmp_path / "ds") == first
    assert bundle(*[other for _, other in items]) == [other.key for _, other in items]
    assert all(markers.is_done(c, u) for c, u in items)
    assert diff_digests(data_digest(tmp_path / "ds"), single_run) == []


def test_launcher_hands_a_pass_only_the_units_without_a_marker(medium_base, tmp_path):
    plans, items = prepare(medium_base, tmp_path / "ds")
    config, unit = items[0]
    markers.mark_done(config, unit)
    plan = next(p for p in plans if p.configs[0] is config)
    todo = plan.grids[0].units(markers.not_done(config, plan.grids[0], plan.planned[0]))
    assert unit not in todo and len(todo) == sum(1 for c, _ in items if c is config) - 1
    # a marker of another plan's box (not a unit of this grid) is ignored
    other = dataclasses.replace(unit, box=Box(unit.box.start, tuple(b - 1 for b in unit.box.stop)))
    markers.mark_done(config, other)
    assert len(markers.not_done(config, plan.grids[0], plan.planned[0])) == len(todo)


# ---------------------------------------------------------------------------
# 3. one run at a time per layer


@pytest.fixture(scope="module")
def concurrent_layers(big_base, big_clean, tmp_path_factory):
    """Run A on segmentation (multiprocessing, ~20 s); while it holds its lock, B on
    segmentation (must be refused) and then D on color (must be allowed) run to the end."""
    root = tmp_path_factory.mktemp("locks")
    target = copy_dataset(big_base, root / "ds")
    seg_lock = os.path.join(target, STATE_DIR, "segmentation.lock")
    a = start_cli(root / "logs", "a", target, "--layer-name", "segmentation", *BIG_ARGS)
    try:
        held = wait_until(lambda: lock_holder(seg_lock) == a.pid, a, timeout=60)
        b = run_cli_pinned(target, "--layer-name", "segmentation", *BIG_ARGS)
        a_alive_after_b = a.poll() is None
        d = run_cli(target, "--layer-name", "color", *SEQUENTIAL)
        a_alive_after_d = a.poll() is None and lock_holder(seg_lock) == a.pid
        a.wait(timeout=300)
    finally:
        if a.poll() is None:
            kill_group(a)
    a_stdout, a_stderr = outputs(a)
    return types.SimpleNamespace(
        target=target, seg_lock=seg_lock, held=held, a_alive_after_b=a_alive_after_b,
        a_alive_after_d=a_alive_after_d, a_returncode=a.returncode, a_stderr=a_stderr,
        b=b, d=d, digest=tree_digest(target),
    )


def test_lock_second_run_on_same_layer_is_refused(concurrent_layers):
    run = concurrent_layers
    assert run.held and run.a_alive_after_b, "run A did not hold its lock while B ran"
    assert run.b.returncode == 2, run.b.stderr
    lines = run.b.stderr.strip().splitlines()
    assert len(lines) == 1, run.b.stderr
    assert lines[0].startswith("beam-downsample: error:") and run.seg_lock in lines[0]


def test_lock_run_on_other_layer_is_allowed(concurrent_layers):
    run = concurrent_layers
    assert run.a_alive_after_d, "run A ended before the color run did: they did not overlap"
    assert run.d.returncode == 0, run.d.stderr
    assert run.a_returncode == 0, run.a_stderr


def test_lock_concurrent_runs_on_two_layers_keep_every_new_mag(concurrent_layers, big_clean):
    """Both runs list their mags in the one datasource-properties.json: neither may drop the other's."""
    raw = read_properties(concurrent_layers.target)
    listed = {layer["name"]: [mag_name(parse_mag(m["mag"])) for m in layer["mags"]] for layer in raw["dataLayers"]}
    assert listed == {"color": ["1", "2", "4", "8"], "segmentation": ["1", "2", "4", "8"]}
    assert diff_digests(concurrent_layers.digest, big_clean.digest) == []


def _run_in_process(dataset, plans) -> None:
    """What the CLI does after planning, in this process (sequential strategy)."""
    engine = runners.plan_engine("sequential", None, [])
    job.run_job(dataset, plans, engine.runner, engine.options, log=lambda message: None)


def test_other_layer_run_leaves_this_runs_marker_dirs_alone(tiny_base, tiny_clean, tmp_path):
    """Run A (segmentation, here in-process) has created its arrays and marker directories and
    holds its lock; run D (color) runs start to end meanwhile. D must not touch A's state."""
    target = copy_dataset(tiny_base, tmp_path / "ds")
    dataset = load_dataset(str(target))
    plans = plan_job(dataset, JobOptions(layer_name="segmentation", jobs=1))
    with locks.LayerLocks(dataset, ["segmentation"], log=lambda message: None):
        job.create_targets(dataset, plans)
        other = run_cli(target, "--layer-name", "color", *SEQUENTIAL)
        assert other.returncode == 0, other.stderr  # another layer: allowed while segmentation is locked
        gone = [c.marker_dir for p in plans for c in p.configs if not os.path.isdir(c.marker_dir)]
        assert gone == [], "the color run removed the segmentation run's (empty) marker directories"
        _run_in_process(dataset, plans)
    assert unreadable_mags(target) == []
    assert diff_digests(tree_digest(target), tiny_clean.digest) == []


def test_other_layer_run_and_this_run_both_keep_their_mags(tiny_base, tiny_clean, tmp_path):
    """Run A (segmentation, in-process) read the properties and holds its lock; run D (color)
    runs start to end and lists its mags; then A lists its own. Both layers' mags must stay listed."""
    target = copy_dataset(tiny_base, tmp_path / "ds")
    dataset = load_dataset(str(target))
    plans = plan_job(dataset, JobOptions(layer_name="segmentation", jobs=1))
    with locks.LayerLocks(dataset, ["segmentation"], log=lambda message: None):
        other = run_cli(target, "--layer-name", "color", *SEQUENTIAL)
        assert other.returncode == 0, other.stderr
        assert lists_mag(target, "color", (4, 4, 2))
        job.create_targets(dataset, plans)
        _run_in_process(dataset, plans)
    listed = {layer["name"]: [m["mag"] for m in layer["mags"]] for layer in read_properties(target)["dataLayers"]}
    assert listed == {"color": [[1, 1, 1], [2, 2, 1], [4, 4, 2]], "segmentation": [[1, 1, 1], [2, 2, 1], [4, 4, 2]]}
    assert diff_digests(tree_digest(target), tiny_clean.digest) == []


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])  # pylint: disable=consider-using-with
    child.wait()
    return child.pid


def test_lock_stale_is_taken_over(tiny_base, tiny_clean, tmp_path):
    target = copy_dataset(tiny_base, tmp_path / "ds")
    os.makedirs(target / STATE_DIR)
    lock = os.path.join(target, STATE_DIR, "color.lock")
    dead = _dead_pid()
    with open(lock, "w", encoding="utf-8") as handle:
        json.dump({"pid": dead, "host": socket.gethostname(), "started": time.time() - 3600}, handle)
    result = run_cli(target, *SEQUENTIAL)
    assert result.returncode == 0, result.stderr
    assert f"removing stale lock {lock} (pid {dead} is gone)" in result.stderr
    assert tree_digest(target) == tiny_clean.digest  # the lock and .beam-downsample are gone too


def test_temp_json_of_a_killed_run_is_removed_by_the_rerun(tiny_base, tiny_clean, tmp_path):
    """A kill between mkstemp and rename leaves a temp file next to the properties or a layer's zarr.json."""
    target = copy_dataset(tiny_base, tmp_path / "ds")
    leftovers = [target / f"{TEMP_PREFIX}killed.json"] + [
        target / layer / f"{TEMP_PREFIX}killed.json" for layer in ("color", "segmentation")]
    for path in leftovers:
        path.write_text('{"half": ')
    result = run_cli(target, *SEQUENTIAL)
    assert result.returncode == 0, result.stderr
    assert diff_digests(tree_digest(target), tiny_clean.digest) == []


@pytest.mark.parametrize("holder", ["live pid on this host", "pid on another host"])
def test_lock_held_refuses_with_one_line_and_touches_nothing(tiny_base, tmp_path, holder):
    target = copy_dataset(tiny_base, tmp_path / "ds")
    os.makedirs(target / STATE_DIR)
    lock = os.path.join(target, STATE_DIR, "segmentation.lock")
    if holder == "live pid on this host":
        content = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    else:
        content = {"pid": _dead_pid(), "host": socket.gethostname() + "-elsewhere", "started": time.time()}
    with open(lock, "w", encoding="utf-8") as handle:
        json.dump(content, handle)
    before = tree_digest(target)
    result = run_cli(target, *SEQUENTIAL)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lock in lines[0], result.stderr
    assert tree_digest(target) == before  # the color lock taken first was given back


# ---------------------------------------------------------------------------
# 4. an unlisted mag left by a crashed run is rebuilt


def _junk_other_dtype(mag_dir):
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(mag_dir) + "/"},
            "metadata": {"shape": [1, 64, 64, 16], "data_type": "uint16", "chunk_grid": {
                "name": "regular", "configuration": {"chunk_shape": [1, 32, 32, 16]}}}}
    array = arrays.open_array(spec, create=True, delete_existing=True)
    array.write(np.full(array.shape, 1234, dtype=np.uint16)).result()
    with open(os.path.join(mag_dir, "stray.bin"), "wb") as handle:
        handle.write(os.urandom(1000))


def _junk_random_files(mag_dir):
    os.makedirs(os.path.join(mag_dir, "c", "0", "0", "0"))
    for name in ("zarr.json", os.path.join("c", "0", "0", "0", "0"), "stray.bin"):
        with open(os.path.join(mag_dir, name), "wb") as handle:
            handle.write(os.urandom(5000))


def _junk_same_layout_garbage(mag_dir, dataset_path):
    """What a run killed after creating the arrays but before its first marker leaves, plus garbage data."""
    layer = load_dataset(str(dataset_path)).layer("color")
    array = arrays.open_array(arrays.new_mag_spec(layer, str(dataset_path), (2, 2, 1)), create=True, delete_existing=True)
    array[:, :64, :64, :32].write(np.random.default_rng(1).integers(0, 256, (1, 64, 64, 32), dtype=np.uint8)).result()


def _junk_stale_tensorstore_lock(mag_dir, dataset_path):
    """What kill -9 during a shard write leaves: the array, and the tensorstore file driver's
    `<shard>.__lock` temp file holding a partial write, longer than the shard will be."""
    _junk_same_layout_garbage(mag_dir, dataset_path)
    shard = os.path.join(mag_dir, "c", "0", "0", "0", "0")
    with open(shard + ".__lock", "wb") as handle:
        handle.write(b"\xee" * (os.path.getsize(shard) + 300_000))


@pytest.mark.parametrize(
    "junk,with_marker_dir",
    [
        ("other dtype", False),
        ("random files", False),
        ("other dtype", True),
        ("stale tensorstore lock file", False),
        ("stale tensorstore lock file", True),
    ],
)
def test_unlisted_partial_mag_is_rebuilt(tiny_base, tiny_clean, tmp_path, junk, with_marker_dir):
    target = copy_dataset(tiny_base, tmp_path / "ds")
    mag_dir = target / "color" / "2-2-1"
    os.makedirs(mag_dir)
    if junk == "other dtype":
        _junk_other_dtype(mag_dir)
    elif junk == "random files":
        _junk_random_files(mag_dir)
    else:
        _junk_stale_tensorstore_lock(mag_dir, target)
    if with_marker_dir:  # a run crashed after creating its marker directory: create_targets "resumes"
        plans = current_plans(target, JobOptions(jobs=1))
        os.makedirs(plans[0].configs[0].marker_dir)
    assert not lists_mag(target, "color", (2, 2, 1))
    result = run_cli(target, *SEQUENTIAL)
    assert result.returncode == 0, result.stderr
    assert unreadable_mags(target) == []
    problems = diff_digests(tree_digest(target), tiny_clean.digest)
    assert problems == [], "\n".join(problems)


# ---------------------------------------------------------------------------
# 5. a corrupt source chunk: short error, nothing new listed


@pytest.mark.parametrize(
    "where,strategy",
    [("middle", "multiprocessing"), ("chunk data", "sequential")],
)
def test_corrupt_source_chunk_fails_short_and_lists_nothing(tiny_base, tmp_path, where, strategy):
    target = copy_dataset(tiny_base, tmp_path / "ds")
    shard = target / "color" / "1" / "c" / "0" / "0" / "0" / "0"
    size = os.path.getsize(shard)
    # the tiny layer's shard is mostly index (4096x4096x32 shards): its middle is the shard index,
    # its first bytes the zstd frame of the first chunk
    offset = size // 2 - 50 if where == "middle" else 200
    with open(shard, "r+b") as handle:
        handle.seek(offset)
        handle.write(bytes(range(7, 107)))
    properties_before = (target / PROPERTIES).read_bytes()
    ngff_before = {name: (target / name / "zarr.json").read_bytes() for name in ("color", "segmentation")}
    args = ("--distribution-strategy", strategy) + (("--jobs", "2") if strategy == "multiprocessing" else ())
    result = run_cli(target, *args)
    assert result.returncode not in (0, None)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) < 5, f"{len(lines)} lines on stderr:\n" + "\n".join(lines[:12]) + "\n..."
    assert lines and lines[0].startswith("beam-downsample: error:")
    message = lines[0]
    assert any(word in message for word in ("DATA_LOSS", "corrupt", "checksum", "Digest mismatch", "decod")), message
    assert "color/1" in message, message  # names the damaged file
    assert (target / PROPERTIES).read_bytes() == properties_before
    assert {name: (target / name / "zarr.json").read_bytes() for name in ngff_before} == ngff_before
    state = target / STATE_DIR
    assert not state.exists() or not [n for n in os.listdir(state) if n.endswith(".lock")]


# ---------------------------------------------------------------------------
# 6. a target we may not write to


NOBODY = 65534
# A non-root user that can read (but not write) everything: CAP_DAC_READ_SEARCH lets it reach the
# interpreter and the package under /root; writing is still subject to the file modes.
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
           "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


def _unprivileged(command: list[str]) -> list[str]:
    return command if os.geteuid() != 0 else SETPRIV + command


def test_target_not_writable_fails_with_one_line(tiny_base, tmp_path):
    target = copy_dataset(tiny_base, tmp_path / "ds")
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        skip_or_fail("running as root and setpriv is not installed: cannot drop privileges")
    probe = subprocess.run(
        _unprivileged([sys.executable, "-c", "import sys, beam_downsample.store.arrays; open(sys.argv[1], 'w')",
                       str(target / "probe")]),
        capture_output=True, text=True, cwd="/", timeout=120,
    )
    if "PermissionError" not in probe.stderr:
        skip_or_fail(f"cannot run the CLI as a user without write access here: {probe.stderr.strip()[-300:]}")
    os.chmod(target, 0o555)
    try:
        before = tree_digest(target)
        result = subprocess.run(
            _unprivileged([sys.executable, "-m", "beam_downsample", str(target), *SEQUENTIAL]),
            capture_output=True, text=True, cwd="/", timeout=300,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        after = tree_digest(target)
    finally:
        os.chmod(target, 0o755)
    assert after == before
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, f"exit {result.returncode}, stderr:\n{result.stderr}"
    assert lines[0].startswith("beam-downsample: error:") and str(target) in lines[0]
