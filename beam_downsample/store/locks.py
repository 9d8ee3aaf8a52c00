"""One run at a time per layer: a lock file per layer in the dataset's state directory."""

from __future__ import annotations

import functools
import json
import os
import socket
import time
from typing import Callable, Sequence

from beam_downsample.core.errors import DatasetError
from beam_downsample.core.machine import pid_alive
from beam_downsample.store import storage
from beam_downsample.store.arrays import STATE_DIR
from beam_downsample.store.properties import Dataset


def lock_path(dataset_path: str, layer_name: str) -> str:
    return storage.join_inside(dataset_path, STATE_DIR, f"{layer_name}.lock")


class LockError(DatasetError):
    """Another run holds the layer (nothing was touched)."""


class LayerLocks:
    """One run at a time per layer: `.beam-downsample/<layer>.lock` holds pid and host.

    A lock whose process is gone (same host, pid not alive) is stale and taken over.
    """

    def __init__(self, dataset: Dataset, layer_names: Sequence[str], log: Callable[[str], None] = print):
        self._paths = [lock_path(dataset.path, name) for name in layer_names]
        self._held: list[str] = []
        self._log = log

    def __enter__(self):
        try:  # every layer's lock at once (one round trip on a bucket); any refusal releases the others
            if self._paths:
                storage.concurrently([functools.partial(self._acquire, path) for path in self._paths], self._paths[0])
        except BaseException:
            self.__exit__()
            raise
        return self

    def _acquire(self, path: str) -> None:
        storage.makedirs(os.path.dirname(path))
        content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        for _ in range(2):
            if not storage.create_exclusive(path, content):
                holder = _read_lock(path)
                if holder == json.loads(content):  # ours: a retried GCS create whose first try got through
                    self._held.append(path)
                    return
                if holder.get("host") == socket.gethostname() and not pid_alive(holder.get("pid")):
                    self._log(f"removing stale lock {path} (pid {holder.get('pid')} is gone)")
                    storage.delete(path)
                    continue
                raise LockError(
                    f"layer {os.path.basename(path)[:-5]!r} is being downsampled by pid {holder.get('pid')} on "
                    f"{holder.get('host')} (lock {path}); if that run is gone, delete the lock file"
                )
            self._held.append(path)
            return

    def __exit__(self, *exc):
        storage.delete_all(self._held)
        if self._held:
            storage.remove_dir_if_empty(os.path.dirname(self._held[0]))
        self._held = []


def _read_lock(path: str) -> dict:
    try:
        return json.loads(storage.read_text(path) or "{}")
    except (OSError, ValueError):
        return {}
