"""Requests and wall time of whole runs on gs:// (fake-gcs-server behind a latency proxy), against
a local run of the same data, for one or more source trees, in alternating rounds.

    python benchmarks/cloud.py [--datasets /work/bench/bench-512,/work/bench/bench-full]
                               [--formats zarr3,zarr,zarr3-unsharded] [--delays 0,40] [--rounds 3] [--warmup]
                               [--variant before=/tmp/cloud-before --variant after=.]
                               [--args "--distribution-strategy sequential"] [--json out.json]

Each dataset directory (e.g. made by `benchmarks/make_bench_dataset.py`) is uploaded once; every
run gets a fresh server-side copy of it under its own prefix. A run is `beam-downsample` started
from a variant's source tree (PYTHONPATH=SRC, this interpreter, run in SRC: `python -c` puts the
working directory before PYTHONPATH) with STORAGE_EMULATOR_HOST
pointing at the counting proxy of `gcs_requests.py`, which sleeps `delay` ms before forwarding
each request (an object store's time to first byte). Per round the variants take turns, and so
do the delays (0 then 40, 40 then 0, ...) and a local run of the same data, so a change of the
machine's load hits all alike. After each gs:// run every object under its prefix is compared
(sha256) with the files of the variant's local run: `identical` must say yes.

Printed: per dataset, variant and place the requests by kind (lists; reads of array data, of
anything else; writes; deletes; the total; all from the proxy), the wall time (min and
median over the rounds) and the peak RSS of the run's process tree, then the median over rounds of the paired ratio wall(40 ms) / wall(0 ms)
and the `done:` line of the last gs:// run (what the tool reports about itself).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import ab
import gcs_requests

BUCKET = "cloud-bench"
KINDS = ("list", "read data", "read other", "write", "delete")


def kind_of(method_kind: str, role: str) -> str:
    """The table's column of one counted request (gcs_requests.classify's kind and role)."""
    if method_kind == "list":
        return "list"
    if method_kind == "GET":
        data = role in ("source mag", "new mags")
        return "read data" if data else "read other"
    if method_kind == "DELETE":
        return "delete"
    return "write"


def direct_client(url: str):
    """A google-cloud-storage client straight to the emulator (uploads and checks are not counted)."""
    from google.auth.credentials import AnonymousCredentials  # pylint: disable=import-outside-toplevel
    from google.cloud import storage as gcs  # pylint: disable=import-outside-toplevel

    return gcs.Client(project="bench", credentials=AnonymousCredentials(), client_options={"api_endpoint": url})


def upload_tree(client, local: str, prefix: str) -> None:
    bucket = client.bucket(BUCKET)
    for directory, _, files in os.walk(local):
        for name in files:
            full = os.path.join(directory, name)
            bucket.blob(f"{prefix}/{os.path.relpath(full, local)}").upload_from_filename(full)


def copy_prefix(client, source: str, target: str) -> None:
    bucket = client.bucket(BUCKET)
    for blob in client.list_blobs(BUCKET, prefix=source + "/"):
        bucket.copy_blob(blob, bucket, target + blob.name[len(source):])


def delete_prefix(client, prefix: str) -> None:
    for blob in client.list_blobs(BUCKET, prefix=prefix + "/"):
        blob.delete()


def remote_hashes(client, prefix: str) -> dict[str, str]:
    return {blob.name[len(prefix) + 1:]: hashlib.sha256(blob.download_as_bytes()).hexdigest()
            for blob in client.list_blobs(BUCKET, prefix=prefix + "/")}


def local_hashes(root: str) -> dict[str, str]:
    found = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return found


def converted(path: str, data_format: str, root: str) -> str:
    """`path` (zarr3 in the reference layout) as another format in `root`: zarr v2 (32^3 chunks,
    one object each) or zarr3 without shards; the same voxels, properties and group metadata."""
    if data_format == "zarr3":
        return path
    import tensorstore as ts  # pylint: disable=import-outside-toplevel

    from beam_downsample import demo  # pylint: disable=import-outside-toplevel
    from beam_downsample.store.properties import load_dataset  # pylint: disable=import-outside-toplevel

    target = os.path.join(root, f"{os.path.basename(path.rstrip('/'))}-{data_format}")
    if os.path.exists(target):
        return target
    dataset = load_dataset(path)
    layers = []
    for layer in dataset.layers:
        source = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": layer.mag_path(path, (1, 1, 1))}},
                         open=True).result()
        box = layer.bbox
        data = source[:, box.start[0]:box.stop[0], box.start[1]:box.stop[1], box.start[2]:box.stop[2]].read().result()
        layers.append({"name": layer.name, "category": layer.category, "data": data, "top_left": box.start,
                       "element_class": dataset.raw["dataLayers"][len(layers)]["elementClass"],
                       "largest_segment_id": dataset.raw["dataLayers"][len(layers)].get("largestSegmentId")})
    demo.write_dataset(target, layers, dataset.voxel_size, data_format="zarr" if data_format == "zarr" else "zarr3")
    del layers
    if data_format == "zarr3-unsharded":
        for layer in dataset.layers:
            mag = os.path.join(target, layer.name, "1")
            sharded = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": mag}}, open=True).result()
            metadata = sharded.spec().to_json()["metadata"]
            inner = metadata["codecs"][0]["configuration"]
            data = sharded.read().result()
            shutil.rmtree(mag)
            ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": mag}, "create": True, "metadata": dict(
                metadata, codecs=inner["codecs"],
                chunk_grid={"name": "regular", "configuration": {"chunk_shape": inner["chunk_shape"]}})}
                    ).result().write(data).result()
    return target


def run_tool(src: str, target: str, args: list, env: dict) -> tuple[float, str, int]:
    """(wall s, stdout, peak RSS of the process tree in bytes) of one run of the tool from source
    tree `src`; raises on failure."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, "-c", "from beam_downsample.launch.cli import run; run()", target, *args],
            env=dict(env, PYTHONPATH=src), cwd=src, stdout=out, stderr=err, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, ab.tree_rss(proc.pid))
            time.sleep(0.05)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode < 0 and "\ndone" in "\n" + stdout:
        # numba's LLVM can abort at interpreter exit after the run is done (design notes, 2026-12-04)
        print(f"{target}: finished, then exit {proc.returncode} at interpreter exit", file=sys.stderr)
    elif proc.returncode != 0:
        raise RuntimeError(f"{target}: exit {proc.returncode}: {stderr[-2000:]}")
    return wall, stdout, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="/work/bench/bench-512,/work/bench/bench-full")
    parser.add_argument("--formats", default="zarr3",
                        help="zarr3 (the datasets as they are), zarr (v2) and zarr3-unsharded (converted copies)")
    parser.add_argument("--delays", default="0,40", help="ms per request, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], help="NAME=SRC (default: this tree)")
    parser.add_argument("--args", default="", help="flags for every run (split on spaces)")
    parser.add_argument("--warmup", action="store_true", help="one untimed local run per variant first (numba cache)")
    parser.add_argument("--json", default=None)
    options = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    variants = [(v.split("=", 1)[0], os.path.abspath(v.split("=", 1)[1])) for v in options.variant] or [("this", here)]
    delays = [float(d) for d in options.delays.split(",")]
    extra = options.args.split()

    root = tempfile.mkdtemp(prefix="cloud-bench-")
    counter = gcs_requests.Counter()
    current = {"prefix": ""}
    delay = {"seconds": 0.0}
    upstream: dict = {"url": None}
    proxy = gcs_requests.make_proxy(upstream, counter, lambda: current["prefix"], delay)
    proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
    emulator, upstream["url"] = gcs_requests.start_emulator(os.path.join(root, "data"), os.path.join(root, "server.log"),
                                                            proxy_url)
    serving = threading.Thread(target=proxy.serve_forever, daemon=True)
    serving.start()
    env = {k: v for k, v in os.environ.items() if k not in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
    env["STORAGE_EMULATOR_HOST"] = proxy_url
    client = direct_client(upstream["url"])
    client.create_bucket(BUCKET)
    datasets = [converted(d, f, root) for d in options.datasets.split(",") if d for f in options.formats.split(",")]
    rows: dict = collections.defaultdict(lambda: {"walls": [], "peaks": [], "counts": None, "identical": [],
                                                  "done": ""})
    ratios: dict = collections.defaultdict(list)
    try:
        for number, path in enumerate(datasets):
            upload_tree(client, path, f"pristine{number}")
        if options.warmup:
            for name, src in variants:
                copy = os.path.join(root, "warmup")
                shutil.copytree(datasets[0], copy)
                run_tool(src, copy, extra, env)
                shutil.rmtree(copy)
        for round_index in range(options.rounds):
            order = delays if round_index % 2 == 0 else delays[::-1]
            for number, path in enumerate(datasets):
                name_of = os.path.basename(path.rstrip("/"))
                for name, src in variants:
                    copy = os.path.join(root, "local")
                    shutil.copytree(path, copy)
                    wall, _, peak = run_tool(src, copy, extra, env)
                    expected = local_hashes(copy)
                    shutil.rmtree(copy)
                    rows[(name_of, name, "local")]["walls"].append(wall)
                    rows[(name_of, name, "local")]["peaks"].append(peak)
                    walls = {}
                    for ms in order:
                        prefix = f"run{round_index}-{number}-{name}-{int(ms)}"
                        copy_prefix(client, f"pristine{number}", prefix)
                        current["prefix"] = prefix
                        counter.counts.clear()
                        delay["seconds"] = ms / 1000
                        wall, out, peak = run_tool(src, f"gs://{BUCKET}/{prefix}", extra, env)
                        delay["seconds"] = 0.0
                        counts = collections.Counter()
                        for (_, method_kind, role), value in counter.counts.items():
                            counts[kind_of(method_kind, role)] += value
                        identical = remote_hashes(client, prefix) == expected
                        delete_prefix(client, prefix)
                        row = rows[(name_of, name, f"gs:// {ms:g} ms")]
                        row["walls"].append(wall)
                        row["peaks"].append(peak)
                        row["counts"] = dict(counts)
                        row["identical"].append(identical)
                        row["done"] = next((line for line in out.splitlines() if line.startswith("done")), "")
                        walls[ms] = wall
                        print(f"round {round_index} {name_of} {name} {ms:g} ms: wall {wall:.2f} s, "
                              f"{sum(counts.values())} requests {dict(counts)}, identical {identical}, "
                              f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
                    if len(delays) == 2:
                        ratios[(name_of, name)].append(walls[max(delays)] / walls[min(delays)])
    finally:
        proxy.shutdown()
        emulator.terminate()
        emulator.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)
    report(rows, ratios, delays)
    if options.json:
        with open(options.json, "w", encoding="utf-8") as handle:
            json.dump({"rows": {" | ".join(k): v for k, v in rows.items()},
                       "ratios": {" | ".join(k): v for k, v in ratios.items()}}, handle, indent=1)


def report(rows: dict, ratios: dict, delays) -> None:
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}")
    print("| dataset | variant | where | " + " | ".join(KINDS)
          + " | total | wall s min / median | peak RSS GB | identical to local |")
    print("|---|---|---|" + "---|" * (len(KINDS) + 4))
    for (dataset, variant, where), row in rows.items():
        counts = row["counts"]
        cells = [str(counts.get(k, 0)) for k in KINDS] + [str(sum(counts.values()))] if counts else ["–"] * (len(KINDS) + 1)
        identical = "–" if where == "local" else ("yes" if all(row["identical"]) else "NO")
        walls = row["walls"]
        print(f"| {dataset} | {variant} | {where} | " + " | ".join(cells)
              + f" | {min(walls):.2f} / {statistics.median(walls):.2f} | {max(row['peaks']) / 1e9:.2f} | {identical} |")
    if ratios:
        print(f"\n| dataset | variant | wall {max(delays):g} ms / {min(delays):g} ms (median of paired rounds) | rounds |")
        print("|---|---|---|---|")
        for (dataset, variant), values in ratios.items():
            print(f"| {dataset} | {variant} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    dones = {(d, v): r["done"] for (d, v, w), r in rows.items() if r["done"]}
    for (dataset, variant), line in dones.items():
        print(f"\n{dataset} {variant}: {line}")


if __name__ == "__main__":
    main()
