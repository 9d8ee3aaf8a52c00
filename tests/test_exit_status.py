"""The exit status is a contract (docs/exit-status.md): 0 when every planned mag is
listed, 1 for a fault during the run, 2 for bad usage or a bad dataset, 130 for
Ctrl-C; never a signal, never an abort from a thread of ours.

The compiled kernels load on a background thread and are cached on disk by numba:
runs started at once on one empty cache directory (a fresh install, a SLURM array
on one venv) must all exit 0 with the same output, a kernel still compiling when
a run ends must not crash the exit, and concurrent compiles must leave a cache
that gives every later process the right machine code for its dtype.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from beam_downsample import demo
from beam_downsample.launch import cli
from beam_downsample.plan import units
from beam_downsample.store import properties as properties_module
from conftest import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import exit_contention  # noqa: E402  pylint: disable=wrong-import-position

RUNS, ROUNDS = 3, 3


def python(code: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=ROOT)


# ---------------------------------------------------------------------------
# runs at once on one empty compiled-kernel cache


@pytest.fixture(scope="module")
def demo_128(tmp_path_factory):
    """512x512x128 color uint8 + the real uint32 segmentation: 32 Mi voxels per layer, exactly
    what makes a pass use the compiled kernels (units.COMPILED_MIN_VOXELS)."""
    assert 512 * 512 * 128 >= units.COMPILED_MIN_VOXELS
    path = tmp_path_factory.mktemp("contention") / "base"
    demo.make_demo(str(path), depth=128)
    return str(path)


def test_runs_at_once_on_one_empty_kernel_cache_all_exit_0_with_identical_output(demo_128, tmp_path):
    numpy_only = os.path.join(tmp_path, "numpy")
    os.makedirs(numpy_only)
    expected = exit_contention.run_round(ROOT, demo_128, numpy_only, 1, str(tmp_path / "unused"),
                                         ["--distribution-strategy", "sequential"], {"BEAM_DOWNSAMPLE_KERNELS": "numpy"})
    assert expected[0]["code"] == 0, expected[0]["last"]
    started = time.monotonic()
    for index in range(ROUNDS):
        cache = tmp_path / f"cache-{index}"  # empty: a fresh install
        work = tmp_path / f"round-{index}"
        work.mkdir()
        rows = exit_contention.run_round(ROOT, demo_128, str(work), RUNS, str(cache), [])
        for row in rows:
            assert row["code"] == 0, f"round {index + 1}: {exit_contention.describe_status(row['code'])}: {row}"
            assert not row["suspicious"], row["suspicious"]
            assert row["digest"] == expected[0]["digest"]  # and identical to the numpy kernels' output
        assert list(cache.rglob("*.nbi")) and list(cache.rglob("*.nbc"))  # the runs compiled into it
    print(f"\n{RUNS} runs at once x {ROUNDS} rounds on empty caches: {time.monotonic() - started:.0f} s")


# ---------------------------------------------------------------------------
# the cache lock

_READY = """
import json, sys, time
import numpy as np
from beam_downsample.kernels import compiled
started = time.monotonic()
results = {}
for dtype in sys.argv[1].split(","):
    data = np.asfortranarray(np.random.default_rng(len(dtype)).integers(0, 3, (1, 8, 6, 4)).astype(dtype))
    assert compiled.ready(data, (2, 2, 2), "mode") and compiled.ready(data, (2, 2, 1), "median")
    results[dtype] = [compiled.downsample(data, (2, 2, 2), "mode").ravel().tolist(),
                      compiled.downsample(data, (2, 2, 1), "median").ravel().tolist()]
stats = [compiled.mode_222.stats, compiled.median_221.stats]
print(json.dumps({"seconds": time.monotonic() - started, "results": results,
                  "hits": sum(sum(s.cache_hits.values()) for s in stats),
                  "misses": sum(sum(s.cache_misses.values()) for s in stats),
                  "cache": compiled.cache_path()}))
"""


def test_a_compile_waits_for_the_cache_lock(tmp_path):
    """While another process holds the cache directory's lock, nothing is compiled into it."""
    holder = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-c", "import sys; from beam_downsample.kernels import compiled; "
                               "import os; fd = compiled._locked(os.path.join(compiled.cache_path(), compiled.LOCK_NAME)); "
                               "print('held', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)},
        cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        compiling = subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, "-c", _READY, "uint16"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}, cwd=ROOT)
        time.sleep(4)  # numba's import and a compile take ~1-2 s
        assert compiling.poll() is None  # waiting for the lock
        assert not list(tmp_path.rglob("*.nbi"))
        holder.stdin.write("\n")
        holder.stdin.flush()
        out, err = compiling.communicate(timeout=120)
        assert compiling.returncode == 0, err
        report = json.loads(out)
        assert report["misses"] == 2 and report["cache"].startswith(str(tmp_path))
        assert list(tmp_path.rglob("*.nbi"))
    finally:
        holder.kill()
        holder.wait()


def test_processes_compiling_different_dtypes_at_once_leave_a_cache_every_process_can_trust(tmp_path):
    """numba gives two signatures compiled at the same moment the same data file unless the
    compiles are serialised; a later process would then load one dtype's machine code for
    another. Five processes compile five dtypes at once, then one process loads them all."""
    dtypes = ["uint8", "uint16", "uint32", "uint64", "float32"]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", _READY, dtype], stdout=subprocess.PIPE,  # pylint: disable=consider-using-with
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for dtype in dtypes]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    result = subprocess.run([sys.executable, "-c", _READY, ",".join(dtypes)], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=300, check=True)
    report = json.loads(result.stdout)
    assert report["misses"] == 0 and report["hits"] == 2 * len(dtypes)  # everything came from the cache
    from beam_downsample.kernels import reduce  # pylint: disable=import-outside-toplevel

    for dtype in dtypes:
        data = np.asfortranarray(np.random.default_rng(len(dtype)).integers(0, 3, (1, 8, 6, 4)).astype(dtype))
        assert report["results"][dtype] == [reduce.mode(data, (2, 2, 2)).ravel().tolist(),
                                            reduce.median(data, (2, 2, 1)).ravel().tolist()], dtype


def test_the_cache_moves_to_this_machine_where_no_lock_can_be_taken(tmp_path):
    """A cache directory whose filesystem refuses flock: the kernels compile into a
    directory of this machine instead, and still work."""
    code = f"""
    import json, os, numpy as np
    from beam_downsample.kernels import compiled, reduce
    real = compiled._locked
    def refuse(path):
        if path.startswith({str(tmp_path)!r}):
            raise OSError(37, "No locks available")
        return real(path)
    compiled._locked = refuse
    data = np.asfortranarray(np.arange(64, dtype=np.uint32).reshape(1, 4, 4, 4) % 3)
    assert compiled.ready(data, (2, 2, 2), "mode")
    print(json.dumps({{"cache": compiled.cache_path(), "ok": compiled.downsample(data, (2, 2, 2), "mode").tolist()
                       == reduce.mode(data, (2, 2, 2)).tolist()}}))
    """
    result = python(code, {"NUMBA_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and not report["cache"].startswith(str(tmp_path))
    assert not list(tmp_path.rglob("*.nbc"))


# ---------------------------------------------------------------------------
# no thread of ours runs into the interpreter's exit


def test_a_kernel_still_compiling_when_the_process_ends_is_finished_first(tmp_path):
    """The loader thread is stopped between kernels and joined: the exit waits for the
    kernel being compiled (no LLVM under a finalizing interpreter), skips the others."""
    code = """
    import threading, time, numpy as np
    from beam_downsample.kernels import reduce
    from beam_downsample.launch import exiting
    reduce.prepare([("mode", (2, 2, 2), np.uint32), ("median", (2, 2, 1), np.uint8), ("mode", (2, 2, 1), np.int64)])
    time.sleep(0.3)
    loaders = [t for t in threading.enumerate() if t.name == "beam-downsample-kernels"]
    assert loaders and not any(t.daemon for t in loaders)
    exiting.exit_process(0)
    """
    for index in range(3):
        cache = tmp_path / str(index)
        result = python(code, {"NUMBA_CACHE_DIR": str(cache)})
        assert result.returncode == 0, result.stderr
        assert "Assertion" not in result.stderr and "LLVM" not in result.stderr


def test_a_thread_of_ours_that_never_ends_does_not_hold_up_the_exit():
    """A pipeline thread left blocked on dead workers: the exit status is kept, without a
    finalization that could run into the thread."""
    code = """
    import threading, time
    from beam_downsample.launch import exiting
    exiting.OTHER_SECONDS = 0.5
    threading.Thread(target=threading.Event().wait, name="beam-downsample-pass", daemon=True).start()
    print("bye", flush=True)
    exiting.exit_process(3)
    """
    started = time.monotonic()
    result = python(code)
    assert result.returncode == 3 and result.stdout == "bye\n", result.stderr
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("raised,status,text", [
    ("KeyboardInterrupt()", 130, "beam-downsample: interrupted"),
    ("OSError(5, 'Input/output error')", 1, "beam-downsample: error: OSError: [Errno 5] Input/output error"),
])
def test_an_exception_outside_the_run_is_one_line_and_its_status(raised, status, text):
    """Ctrl-C or an unforeseen error while planning: one line, 130 or 1, no traceback."""
    code = f"""
    from beam_downsample.launch import cli
    def main():
        raise {raised}
    cli.main = main
    cli.run()
    """
    result = python(code)
    assert result.returncode == status
    assert result.stderr.startswith(text) and result.stderr.count("\n") == 1, result.stderr


def test_exit_0_only_when_every_planned_mag_is_listed(tiny_dataset, monkeypatch, capsys):
    """A run whose listing of a mag did not stick (another process rewrote the properties)
    exits 1 naming the mag, not 0."""
    real = properties_module.with_new_mags

    def lose_color_4(raw, layer, mags):
        return real(raw, layer, [m for m in mags if not (layer == "color" and max(m) == 4)])

    monkeypatch.setattr("beam_downsample.run.job.with_new_mags", lose_color_4)
    code = cli.main(["beam-downsample", str(tiny_dataset), "--distribution-strategy", "sequential",
                     "--coarsest-mag", "4"])
    err = capsys.readouterr().err
    assert code == 1
    assert "color/4-4-1" in err or "color/4-4-2" in err or "color/4" in err, err
    assert "are not listed in the properties" in err


def test_exit_0_when_every_planned_mag_is_listed(tiny_dataset):
    result = run_cli(tiny_dataset, "--distribution-strategy", "sequential")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("done")
