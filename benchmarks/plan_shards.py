"""Planning cost of a layer with many stored shards: bytes read, requests, and dry-run wall time.

    python benchmarks/plan_shards.py [--shards 32x32x12] [--gcs] [--delay 40] [--keep PATH]
                                     [--args "--memory-budget 256M"]

Writes a uint8 zarr3 layer in the reference layout (32^3 chunks in 1024^3 shards) whose every
shard holds one small block (one 32^3 chunk of data, off the shard's corner), so that each shard
has a full 512 KiB index, then:

Units smaller than a shard (`--args`, default `--memory-budget 256M`) make planning ask which
part of a shard holds data, which it answered by reading every stored shard's index.

- locally: `beam-downsample PATH --dry-run` in a fresh process (wall time, and what it read:
  tensorstore's `/tensorstore/kvstore/*/bytes_read` at its end), from this source tree and from
  any `--variant NAME=SRC` (e.g. a worktree of main);
- with --gcs: the layer uploaded to fake-gcs-server behind the counting proxy of
  gcs_requests.py, adding --delay ms to every request; the dry run as a subprocess (wall time,
  requests by kind as the proxy saw them).

The issue's goals: 12,288 shards locally: < 100 MB read, dry run <= 3 s; 4,096 shards on gs://
at 40 ms: <= 10 s.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import tensorstore as ts

import gcs_requests

SHARD = 1024
BLOCK = 32


def write_layer(path: str, shards: tuple[int, int, int]) -> None:
    """The dataset: one color layer of `shards` shards, each holding one 32^3 block of noise."""
    from beam_downsample import demo  # pylint: disable=import-outside-toplevel
    from beam_downsample.store import arrays  # pylint: disable=import-outside-toplevel
    from beam_downsample.store.properties import load_dataset  # pylint: disable=import-outside-toplevel

    os.makedirs(path, exist_ok=True)
    size = [s * SHARD for s in shards]
    layer = demo.layer_properties("color", "color", "uint8", (0, 0, 0), size, [(1, 1, 1)], 1, None, "zarr3")
    demo._write_header(path, "shards", (11.24, 11.24, 28.0), [layer], "zarr3")  # pylint: disable=protected-access
    dataset = load_dataset(path)
    (layer_,) = dataset.layers
    spec = arrays.new_mag_spec(layer_, path, (1, 1, 1))
    arrays.create_mag(spec, resume=False)
    array = arrays.open_array(arrays.target_spec(layer_, path, (1, 1, 1)), open=True)
    block = np.random.default_rng(0).integers(1, 255, (1, BLOCK, BLOCK, BLOCK), dtype=np.uint8)
    positions = [(x, y, z) for x in range(shards[0]) for y in range(shards[1]) for z in range(shards[2])]
    for first in range(0, len(positions), 256):  # 256 shards per transaction: bounded memory
        with ts.Transaction() as transaction:
            view = array.with_transaction(transaction)
            for x, y, z in positions[first:first + 256]:
                at = [s * SHARD + 96 for s in (x, y, z)]
                view[0:1, at[0]:at[0] + BLOCK, at[1]:at[1] + BLOCK, at[2]:at[2] + BLOCK].write(block).result()


DRIVER = """
import sys, tensorstore as ts
from beam_downsample.launch import cli
code = cli.main(["beam-downsample", *sys.argv[1:]])
read = sum(int(v.get("value", 0)) for m in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/")
           if m["name"].endswith("/bytes_read") for v in m.get("values", []))
print(f"BYTES_READ={read}")
sys.exit(code)
"""


def dry_run_subprocess(target: str, env: dict, args=(), src: str | None = None) -> tuple[float, str, int]:
    """(wall s, stdout, bytes tensorstore read) of `--dry-run` in a fresh process (source tree `src`)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", DRIVER, target, "--dry-run", *args], capture_output=True,
                            text=True, env=dict(env, **({"PYTHONPATH": src} if src else {})), cwd=src, timeout=3600,
                            check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    read = int(result.stdout.rsplit("BYTES_READ=", 1)[1].split()[0])
    return wall, result.stdout, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="32x32x12", help="shards along x, y, z (default: 12,288)")
    parser.add_argument("--gcs", action="store_true", help="plan on fake-gcs-server instead of locally")
    parser.add_argument("--delay", type=float, default=40.0, help="ms per request on the emulator")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", default=None, help="write (or reuse) the local layer here")
    parser.add_argument("--args", default="--memory-budget 256M", help="flags of the dry run")
    parser.add_argument("--variant", action="append", default=[], help="NAME=SRC: also plan with this source tree")
    options = parser.parse_args()
    shards = tuple(int(v) for v in options.shards.split("x"))
    root = tempfile.mkdtemp(prefix="plan-shards-")
    path = options.keep or os.path.join(root, "ds")
    try:
        if not os.path.exists(os.path.join(path, "datasource-properties.json")):
            started = time.perf_counter()
            write_layer(path, shards)
            print(f"wrote {np.prod(shards):,} shards in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        print(f"load average {os.getloadavg()[0]:.1f}")
        if options.gcs:
            report_gcs(path, root, options)
        else:
            report_local(path, options)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report_local(path: str, options) -> None:
    rows = []
    for name, src in [("this tree", None)] + [tuple(v.split("=", 1)) for v in options.variant]:
        runs = [dry_run_subprocess(path, dict(os.environ), options.args.split(), src) for _ in range(options.repeat)]
        walls = [wall for wall, _, _ in runs]
        print(runs[-1][1].rsplit("BYTES_READ=", 1)[0])
        rows.append(f"| {options.shards} | {name} | local | {min(walls):.2f} / {max(walls):.2f} | "
                    f"{runs[-1][2] / 1e6:.1f} MB |")
    print("| shards | source tree | where | dry run wall s (min / max) | planning read |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


def report_gcs(path: str, root: str, options) -> None:
    import cloud  # pylint: disable=import-outside-toplevel

    counter = gcs_requests.Counter()
    delay = {"seconds": 0.0}
    upstream: dict = {"url": None}
    proxy = gcs_requests.make_proxy(upstream, counter, lambda: "shards", delay)
    proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
    emulator, upstream["url"] = gcs_requests.start_emulator(os.path.join(root, "data"), os.path.join(root, "log"),
                                                            proxy_url)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        client = cloud.direct_client(upstream["url"])
        client.create_bucket(cloud.BUCKET)
        started = time.perf_counter()
        cloud.upload_tree(client, path, "shards")
        print(f"uploaded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        env = {k: v for k, v in os.environ.items() if k not in ("TENSORSTORE_GCS_HTTP_URL",
                                                                 "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
        env["STORAGE_EMULATOR_HOST"] = proxy_url
        walls, kinds = [], collections.Counter()
        for _ in range(options.repeat):
            counter.counts.clear()
            delay["seconds"] = options.delay / 1000
            wall, out, _ = dry_run_subprocess(f"gs://{cloud.BUCKET}/shards", env, options.args.split())
            delay["seconds"] = 0.0
            walls.append(wall)
            kinds = collections.Counter()
            for (_, method, _), value in counter.counts.items():
                kinds[method] += value
        print(out)
        print("| shards | where | dry run wall s (min / max) | requests |")
        print("|---|---|---|---|")
        print(f"| {options.shards} | gs://, {options.delay:g} ms a request | {min(walls):.2f} / {max(walls):.2f} | "
              + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) + " |")
    finally:
        proxy.shutdown()
        emulator.terminate()
        emulator.wait(timeout=10)


if __name__ == "__main__":
    main()
