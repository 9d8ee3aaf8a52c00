"""Shared fixtures: tiny dataset builders, tree hashing, array reading."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts

from beam_downsample import demo

PROPERTIES = "datasource-properties.json"


# ---------------------------------------------------------------------------
# trees


def tree_digest(root) -> dict[str, str]:
    """Every file and directory under `root`: relative path -> sha256 of the content ("dir" for dirs)."""
    root = os.fspath(root)
    digest = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames:
            digest[os.path.relpath(os.path.join(directory, name), root) + "/"] = "dir"
        for name in filenames:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                digest[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return digest


def tree_bytes(root) -> dict[str, bytes]:
    """Every file under `root`: relative path -> bytes."""
    root = os.fspath(root)
    result = {}
    for directory, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                result[os.path.relpath(path, root)] = handle.read()
    return result


# ---------------------------------------------------------------------------
# datasets


def read_properties(path) -> dict:
    with open(os.path.join(os.fspath(path), PROPERTIES), encoding="utf-8") as handle:
        return json.load(handle)


def write_properties(path, raw: dict) -> None:
    with open(os.path.join(os.fspath(path), PROPERTIES), "w", encoding="utf-8") as handle:
        json.dump(raw, handle, indent=4)


def open_array(path) -> ts.TensorStore:
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.fspath(path)}}).result()


def tiny_layers(shape=(40, 36, 12), top_left=(3, 5, 7), seed=0) -> list[dict]:
    """A uint8 color and a uint32 segmentation layer of a few thousand voxels."""
    rng = np.random.default_rng(seed)
    return [
        {"name": "color", "category": "color", "data": rng.integers(0, 256, shape, dtype=np.uint8),
         "top_left": top_left},
        {"name": "segmentation", "category": "segmentation",
         "data": rng.integers(0, 4, shape, dtype=np.uint32), "top_left": top_left},
    ]


@pytest.fixture
def make_dataset(tmp_path):
    """`make_dataset(name="ds", layers=None, voxel_size=...)` -> path of a fresh dataset under tmp_path."""

    def make(name="ds", layers=None, voxel_size=(11.24, 11.24, 28.0)):
        path = tmp_path / name
        demo.write_dataset(str(path), layers if layers is not None else tiny_layers(), voxel_size)
        return path

    return make


@pytest.fixture
def tiny_dataset(make_dataset):
    return make_dataset()


@pytest.fixture(scope="session")
def segmentation() -> np.ndarray:
    """The bundled real 512^3 uint32 segmentation (loaded once; do not modify)."""
    data = demo.load_segmentation()
    data.setflags(write=False)
    return data


# ---------------------------------------------------------------------------
# skips that CI does not allow


def skip_or_fail(reason: str) -> None:
    """Skips the test here, but fails it under CI (the CI variable set): CI provides
    everything the suite needs, so a skip there would hide an untested path."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: this test must run)")
    pytest.skip(reason)


def require_module(name: str):
    """`pytest.importorskip`, failing under CI (see `skip_or_fail`)."""
    try:
        return __import__(name)
    except ImportError as error:
        skip_or_fail(f"{name} is not installed: {error}")


# ---------------------------------------------------------------------------
# running the CLI as a separate process


def run_cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "beam_downsample", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------
# a real one-node SLURM cluster (tests/slurm_cluster.py)


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running one-node cluster, set in os.environ for the CLIs the tests start.

    Skipped with the reason where the packages are missing, but under CI (CI set) that fails:
    CI installs them (.ci/run)."""
    import slurm_cluster as cluster  # pylint: disable=import-outside-toplevel

    reason = cluster.missing_reason()
    if reason:
        skip_or_fail(reason)
    with cluster.one_node_cluster() as env:
        previous = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = env["SLURM_CONF"]
        try:
            yield env
        finally:
            if previous is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = previous
