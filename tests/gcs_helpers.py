"""fake-gcs-server for the gs:// tests (tests/test_gcs.py, tests/test_faults.py): started on a
free port, optionally behind a proxy that changes responses, with the environment pointing
google-cloud-storage and tensorstore at it; and copying trees to and from a bucket."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Iterator

import pytest

from beam_downsample.store import storage
from conftest import tree_bytes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gcs_requests  # noqa: E402  pylint: disable=wrong-import-position


@contextlib.contextmanager
def emulated_gcs(root, bucket: str, alter=None) -> Iterator[str]:
    """A fake-gcs-server process (data under `root`) holding `bucket`; with `alter`, clients talk
    to it through gcs_requests.make_proxy(alter=...). Yields the URL clients use."""
    proxy = serving = None
    if alter is not None:
        upstream: dict = {"url": None}
        proxy = gcs_requests.make_proxy(upstream, gcs_requests.Counter(), lambda: "", alter=alter)
        url = f"http://127.0.0.1:{proxy.server_address[1]}"
        process, upstream["url"] = gcs_requests.start_emulator(root / "data", root / "server.log", url)
        serving = threading.Thread(target=proxy.serve_forever, name="test-gcs-proxy")
        serving.start()
    else:
        process, url = gcs_requests.start_emulator(root / "data", root / "server.log")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
            patch.delenv(name, raising=False)
        patch.setenv("STORAGE_EMULATOR_HOST", url)
        patch.setattr(storage, "_CLIENT", None)
        try:
            storage.gcs_client().create_bucket(bucket)
            yield url
        finally:
            if proxy is not None:
                proxy.shutdown()
                serving.join()
            process.terminate()
            process.wait(timeout=10)


def upload(local_dir, bucket: str, prefix: str) -> str:
    """Copies every file of `local_dir` to gs://bucket/prefix; returns the URL."""
    blobs = storage.gcs_client().bucket(bucket)
    for rel, content in tree_bytes(local_dir).items():
        blobs.blob(f"{prefix}/{rel}").upload_from_string(content)
    return f"gs://{bucket}/{prefix}"


def download(bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under gs://bucket/prefix/: relative name -> bytes."""
    blobs = storage.gcs_client().list_blobs(bucket, prefix=f"{prefix}/")
    return {blob.name[len(prefix) + 1:]: blob.download_as_bytes() for blob in blobs}


def error_lines(stderr: str) -> list[str]:
    """stderr without tensorstore's own log lines (it logs which credentials it uses)."""
    return [line for line in stderr.splitlines() if line and not line.startswith(("I1", "W1", "E1"))]
