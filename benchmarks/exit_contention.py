"""Exit statuses of runs started at the same moment on one shared, empty compiled-kernel cache.

    python benchmarks/exit_contention.py [--runs 4] [--rounds 3] [--depth 256] [--warm] [--src DIR] [ARGS ...]

    git archive main | tar -x -C /tmp/src-main
    python benchmarks/exit_contention.py --src /tmp/src-main      # before
    python benchmarks/exit_contention.py --src .                  # after

The demo dataset (512x512xDEPTH, color uint8 + the real uint32
segmentation) is written once; each round copies it RUNS times and starts
`beam-downsample COPY ARGS` on every copy at once (PYTHONPATH=SRC, this
interpreter), all with one `NUMBA_CACHE_DIR`: a new empty directory each
round (a fresh install), or with `--warm` one directory kept over the
rounds (filled by an unmeasured first round). A run is good when it exits
0 and its dataset is identical to every other run's. Prints one row per run
(exit status or signal, seconds, LLVM/assertion lines on stderr) and the
count of bad exits, with the load average.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def tree_digest(root: str) -> str:
    """One sha256 over every file's relative path and content."""
    digest = hashlib.sha256()
    for directory, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(directory, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def describe_status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


def suspicious_lines(text: str) -> list[str]:
    signs = ("Assertion", "LLVM", "llvm", "Fatal Python error", "Segmentation fault", "Aborted", "Traceback")
    return [line for line in text.splitlines() if any(sign in line for sign in signs)]


def run_round(src: str, base: str, work: str, runs: int, cache: str, args: list[str], extra_env=None) -> list[dict]:
    """Starts `runs` runs at once on fresh copies of `base` (in `work`) with NUMBA_CACHE_DIR=`cache`;
    per run its exit status, seconds, output digest, suspicious stderr lines and last stderr line."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=os.path.abspath(src), **(extra_env or {}))
    env.pop("CI", None)
    procs = []
    for index in range(runs):
        copy = os.path.join(work, f"ds{index}")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(base, copy)
        err = open(os.path.join(work, f"ds{index}.err"), "w+", encoding="utf-8")  # pylint: disable=consider-using-with
        procs.append((copy, err))
    started = []
    for copy, err in procs:
        started.append((subprocess.Popen([sys.executable, "-m", "beam_downsample", copy, *args], env=env,
                                         stdout=subprocess.DEVNULL, stderr=err, cwd=work), time.monotonic()))
    rows = []
    for (copy, err), (proc, start) in zip(procs, started):
        code = proc.wait(timeout=1800)
        seconds = time.monotonic() - start
        err.seek(0)
        text = err.read()
        err.close()
        rows.append({"code": code, "seconds": seconds, "digest": tree_digest(copy), "suspicious": suspicious_lines(text),
                     "last": (text.strip().splitlines() or [""])[-1][:160]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4, help="runs started at once per round (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--depth", type=int, default=256, help="z extent of the demo dataset (default 256)")
    parser.add_argument("--warm", action="store_true", help="keep one cache over the rounds (after an unmeasured "
                                                            "round that fills it)")
    parser.add_argument("--src", default=os.path.dirname(HERE), help="source tree to run (PYTHONPATH)")
    parser.add_argument("--work", help="work directory (default: a temp dir, removed)")
    parser.add_argument("args", nargs="*", help="beam-downsample arguments after TARGET (default: none)")
    options = parser.parse_args(argv)
    work = options.work or tempfile.mkdtemp(prefix="beam-downsample-contention-")
    os.makedirs(work, exist_ok=True)
    try:
        base = os.path.join(work, "base")
        if not os.path.exists(base):
            subprocess.run([sys.executable, "-m", "beam_downsample.demo", base, "--depth", str(options.depth)],
                           check=True, env=dict(os.environ, PYTHONPATH=os.path.abspath(options.src)),
                           stdout=subprocess.DEVNULL)
        warm_cache = os.path.join(work, "cache-warm")
        if options.warm:
            shutil.rmtree(warm_cache, ignore_errors=True)
            run_round(options.src, base, work, 1, warm_cache, options.args)
        print(f"source {os.path.abspath(options.src)}, {options.runs} runs at once, {options.rounds} rounds, "
              f"{'warm' if options.warm else 'empty'} shared NUMBA_CACHE_DIR; load before "
              f"{os.getloadavg()[0]:.1f}")
        print("| round | run | status | s | identical | LLVM/assert lines | last stderr line |")
        print("|---|---|---|---|---|---|---|")
        bad = total = 0
        digests = set()
        all_rows = []
        for round_index in range(options.rounds):
            cache = warm_cache if options.warm else os.path.join(work, f"cache-{round_index}")
            if not options.warm:
                shutil.rmtree(cache, ignore_errors=True)
            rows = run_round(options.src, base, work, options.runs, cache, options.args)
            all_rows.append((round_index, rows))
            digests.update(r["digest"] for r in rows if r["code"] == 0)
        reference = max(digests, key=lambda d: sum(r["digest"] == d for _, rows in all_rows for r in rows)) \
            if digests else None
        for round_index, rows in all_rows:
            for index, row in enumerate(rows):
                same = row["digest"] == reference
                good = row["code"] == 0 and same
                total += 1
                bad += not good
                print(f"| {round_index + 1} | {index + 1} | {describe_status(row['code'])} | {row['seconds']:.1f} | "
                      f"{'yes' if same else 'NO'} | {len(row['suspicious'])} | {row['last'].replace('|', '/')} |")
                for line in row["suspicious"][:3]:
                    print(f"|  |  |  |  |  |  | {line.strip()[:160].replace('|', '/')} |")
        print(f"\nbad exits: {bad} of {total}; distinct outputs among exit-0 runs: {len(digests)}; "
              f"load after {os.getloadavg()[0]:.1f}")
        return 0 if bad == 0 and len(digests) <= 1 else 1
    finally:
        if not options.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
