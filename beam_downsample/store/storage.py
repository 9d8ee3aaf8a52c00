"""Small files next to the arrays (properties, NGFF group metadata, locks,
done-markers) on a local disk or on Google Cloud Storage.

The arrays themselves go through tensorstore (`io.kvstore_spec`); this module
handles everything else with the same guarantees on both:

| | local directory | `gs://bucket/path` |
|---|---|---|
| atomic replace | temp file, fsync, rename | an object upload is atomic |
| read-modify-write | `flock` on the directory | `ifGenerationMatch` precondition, retried |
| create-exclusive | `O_CREAT | O_EXCL` | `ifGenerationMatch=0` |

A path is a local path or a `gs://bucket/key` URL; every function dispatches
on that prefix, so local callers keep plain file operations.
`STORAGE_EMULATOR_HOST` (google-cloud-storage's convention) points both
google-cloud-storage and tensorstore at an emulator.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import json
import os
import posixpath
import random
import shutil
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

from beam_downsample.core.errors import DatasetError, RunError

GCS_SCHEME = "gs://"
TEMP_PREFIX = ".beam-downsample-tmp-"
UPDATE_ATTEMPTS = 50  # read-modify-write retries when another writer wins the generation race


def is_gcs(path: str) -> bool:
    return path.startswith(GCS_SCHEME)


def split_gcs(url: str) -> tuple[str, str]:
    """(bucket, key) of `gs://bucket/key`; the key has no leading or trailing slash."""
    bucket, _, key = url[len(GCS_SCHEME):].partition("/")
    return bucket, key.strip("/")


def normpath(path: str) -> str:
    """os.path.normpath, but keeps `gs://` (normpath would fold its `//`)."""
    if not is_gcs(path):
        return os.path.normpath(path)
    bucket, key = split_gcs(path)
    key = posixpath.normpath(key) if key else ""
    return f"{GCS_SCHEME}{bucket}" + ("" if key in ("", ".") else f"/{key}")


class OutsideTargetError(DatasetError):
    """A path we would write resolves outside TARGET; the message says which and why."""


def join_inside(root: str, *parts: str) -> str:
    """`root` joined with `parts`, refused (OutsideTargetError) unless it stays inside `root`.

    Every path beam-downsample creates, replaces or deletes is built here
    (new mags, NGFF and properties files, temp files, locks, markers, wkw
    staging), so one function decides where we write. A part may not be
    absolute or empty, and the joined path, normalised, must be `root` or
    under it (on GCS: under its prefix). Locally both sides are also
    resolved through symlinks: a symlink inside TARGET that leads out of it
    is refused too, since writing through it would change another dataset.
    """
    for part in parts:
        if not isinstance(part, str) or not part or "\0" in part or part.startswith("/") or os.path.isabs(part):
            raise OutsideTargetError(f"refusing to write {part!r} under {root}: not a relative path inside it")
    if is_gcs(root):
        base = normpath(root)
        joined = normpath("/".join([base, *parts]))
        bucket, prefix = split_gcs(base)
        joined_bucket, key = split_gcs(joined)
        outside = key == ".." or key.startswith("../") or (prefix and key != prefix and not key.startswith(prefix + "/"))
        if joined_bucket != bucket or outside:
            raise OutsideTargetError(f"refusing to write {joined}: it is outside TARGET {base}")
        return joined
    joined = os.path.normpath(os.path.join(root, *parts))
    if not _within(os.path.abspath(joined), os.path.abspath(root)):
        raise OutsideTargetError(f"refusing to write {joined}: it is outside TARGET {root}")
    real_root, real = os.path.realpath(root), os.path.realpath(joined)
    if not _within(real, real_root):
        raise OutsideTargetError(
            f"refusing to write {joined}: through a symlink it resolves to {real}, outside TARGET {real_root}"
        )
    return joined


def _within(path: str, root: str) -> bool:
    return path == root or os.path.commonpath([path, root]) == root


def configure_emulator() -> None:
    """With `STORAGE_EMULATOR_HOST` set, sends tensorstore's gcs driver there too.

    tensorstore reads `TENSORSTORE_GCS_HTTP_URL` once, at its first GCS
    request, so this runs before any gs:// spec is built; worker processes
    inherit the environment. The placeholder token keeps real credentials
    away from the emulator (google-cloud-storage sends none there either).
    """
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "storage-emulator")


# ---------------------------------------------------------------------------
# local directories


class _Local:
    @staticmethod
    def read_bytes(path: str) -> Optional[bytes]:
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    @staticmethod
    def write_json_atomically(path: str, content: Any, indent: Optional[int]) -> None:
        """Temp file in the same directory, fsync, rename: readers see old or new, never half."""
        directory = os.path.dirname(os.path.abspath(path))
        handle, temp_path = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".json", dir=directory)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(content, out, indent=indent)
                out.flush()
                os.fsync(out.fileno())
            if os.path.exists(path):
                os.chmod(temp_path, os.stat(path).st_mode & 0o777)
            else:
                os.chmod(temp_path, 0o644)
            os.replace(temp_path, path)
        except BaseException:
            if os.path.exists(temp_path):
                os.unlink(temp_path)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @classmethod
    def update_json(cls, path: str, change: Callable[[Any], Any], indent: Optional[int], read=None) -> Any:
        """Serialised between processes by an flock on the file's directory (`read` is not needed)."""
        directory = os.path.dirname(os.path.abspath(path))
        handle = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            remove_stale_temp_files(directory)  # under the lock: no live writer owns them
            with open(path, encoding="utf-8") as source:
                updated = change(json.load(source))
            cls.write_json_atomically(path, updated, indent)
            return updated
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            os.close(handle)

    @staticmethod
    def write_text(path: str, text: str) -> None:
        """Temp file and rename, so a reader never sees a partial file."""
        temp = f"{path}.{os.getpid()}.tmp"
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, path)

    @staticmethod
    def create_exclusive(path: str, text: str) -> bool:
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(handle, "w") as out:
            out.write(text)
        return True

    @staticmethod
    def exists(path: str) -> bool:
        return os.path.exists(path)

    @staticmethod
    def list_names(directory: str) -> list[str]:
        return os.listdir(directory) if os.path.isdir(directory) else []

    @staticmethod
    def list_dirs(directory: str) -> list[str]:
        return [e.name for e in os.scandir(directory) if e.is_dir()] if os.path.isdir(directory) else []

    @staticmethod
    def list_tree(directory: str) -> list[str]:
        found = []
        for folder, _, files in os.walk(directory):
            relative = os.path.relpath(folder, directory)
            found.extend(name if relative == "." else f"{relative}/{name}" for name in files)
        return found

    @staticmethod
    def delete(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    @staticmethod
    def delete_tree(directory: str) -> None:
        shutil.rmtree(directory, ignore_errors=True)

    @staticmethod
    def makedirs(directory: str) -> None:
        os.makedirs(directory, exist_ok=True)

    @staticmethod
    def remove_dir_if_empty(directory: str) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def remove_stale_temp_files(directory: str) -> None:
    """A run killed between mkstemp and rename leaves its temp file; the caller holds the lock."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(TEMP_PREFIX) and name.endswith(".json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))


# ---------------------------------------------------------------------------
# Google Cloud Storage


_CLIENT = None


def gcs_client():
    """One client per process (Application Default Credentials, or the emulator)."""
    global _CLIENT  # pylint: disable=global-statement
    if _CLIENT is None:
        configure_emulator()
        from google.cloud import storage as gcs  # pylint: disable=import-outside-toplevel

        from beam_downsample.store import usage  # pylint: disable=import-outside-toplevel

        client = gcs.Client()
        client._http.hooks["response"].append(usage.count_response)  # pylint: disable=protected-access
        _CLIENT = client
    return _CLIENT


def _blob(url: str):
    bucket, key = split_gcs(url)
    return gcs_client().bucket(bucket).blob(key)


def _gcs_errors():
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel

    return exceptions


class _Gcs:
    @staticmethod
    def read_bytes(url: str) -> Optional[bytes]:
        try:
            return _blob(url).download_as_bytes()
        except _gcs_errors().NotFound:
            return None

    @staticmethod
    def write_json_atomically(url: str, content: Any, indent: Optional[int]) -> None:
        _blob(url).upload_from_string(json.dumps(content, indent=indent), content_type="application/json")

    @staticmethod
    def read_versioned(url: str) -> tuple[Any, int]:
        blob = _blob(url)
        current = json.loads(blob.download_as_bytes())  # sets blob.generation
        return current, blob.generation

    @staticmethod
    def update_json(url: str, change: Callable[[Any], Any], indent: Optional[int], read=None) -> Any:
        """Read with its generation (or take `read`, made earlier), change, write only if the
        generation is still the same.

        A writer that lost the race (412) reads the winner's version and applies
        its change again, so concurrent updates of different layers all survive.
        """
        errors = _gcs_errors()
        for attempt in range(UPDATE_ATTEMPTS):
            current, generation = read if attempt == 0 and read is not None else _Gcs.read_versioned(url)
            updated = change(current)
            try:
                _blob(url).upload_from_string(
                    json.dumps(updated, indent=indent),
                    content_type="application/json",
                    if_generation_match=generation,
                )
                return updated
            except errors.PreconditionFailed:
                time.sleep(random.uniform(0, min(0.05 * 2**attempt, 2.0)))
        raise RunError(f"{url}: gave up after {UPDATE_ATTEMPTS} concurrent updates in a row")

    @staticmethod
    def write_text(url: str, text: str) -> None:
        _blob(url).upload_from_string(text, content_type="text/plain")

    @staticmethod
    def create_exclusive(url: str, text: str) -> bool:
        try:
            _blob(url).upload_from_string(text, content_type="text/plain", if_generation_match=0)
        except _gcs_errors().PreconditionFailed:
            return False
        return True

    @staticmethod
    def exists(url: str) -> bool:
        return _blob(url).exists()

    @staticmethod
    def list_names(directory: str) -> list[str]:
        """Object names directly under `directory` (no 'subdirectories')."""
        bucket, key = split_gcs(directory)
        prefix = f"{key}/" if key else ""
        blobs = gcs_client().list_blobs(bucket, prefix=prefix, delimiter="/")
        return [blob.name[len(prefix):] for blob in blobs]

    @staticmethod
    def list_dirs(directory: str) -> list[str]:
        bucket, key = split_gcs(directory)
        prefix = f"{key}/" if key else ""
        pages = gcs_client().list_blobs(bucket, prefix=prefix, delimiter="/")
        for _ in pages:  # the prefixes are known once every page is read
            pass
        return [name[len(prefix):].rstrip("/") for name in pages.prefixes]

    @staticmethod
    def list_tree(directory: str) -> list[str]:
        """Every object name under `directory`, relative to it (one request per 1,000)."""
        bucket, key = split_gcs(directory)
        prefix = f"{key}/" if key else ""
        return [blob.name[len(prefix):] for blob in gcs_client().list_blobs(bucket, prefix=prefix)]

    @staticmethod
    def delete(url: str) -> None:
        with contextlib.suppress(_gcs_errors().NotFound):
            _blob(url).delete()

    @staticmethod
    def delete_tree(directory: str) -> None:
        """One listing, then every object deleted, all at once (GCS has no directories)."""
        delete_all([f"{directory}/{name}" for name in _Gcs.list_tree(directory)])

    @staticmethod
    def makedirs(directory: str) -> None:
        """Object stores have no directories."""

    @staticmethod
    def remove_dir_if_empty(directory: str) -> None:
        """Object stores have no directories."""


def _backend(path: str):
    return _Gcs if is_gcs(path) else _Local


# ---------------------------------------------------------------------------
# the interface


def read_bytes(path: str) -> Optional[bytes]:
    """The file's content, None if it does not exist."""
    return _backend(path).read_bytes(path)


def read_text(path: str) -> Optional[str]:
    content = read_bytes(path)
    return None if content is None else content.decode("utf-8")


def read_json(path: str) -> Any:
    """The parsed file, None if it does not exist (json.JSONDecodeError if it is not JSON)."""
    content = read_bytes(path)
    return None if content is None else json.loads(content)


def write_json_atomically(path: str, content: Any, indent: Optional[int] = 4) -> None:
    """Readers see the old or the new content, never a partial file."""
    _backend(path).write_json_atomically(path, content, indent)


def update_json(path: str, change: Callable[[Any], Any], indent: Optional[int] = 4, read=None) -> Any:
    """Atomic read-modify-write of an existing JSON file, safe against concurrent updaters.

    `change` gets the current content and returns the new one; it may be
    called more than once (on GCS, after losing a race), so it must not
    have side effects. `read`: what `read_for_update` returned a moment ago
    (so the read could go out with other requests); stale, it costs a retry.
    """
    return _backend(path).update_json(path, change, indent, read)


def read_for_update(path: str) -> Any:
    """On GCS the file's content and generation, for `update_json(read=...)`; locally None (the
    update reads under its lock)."""
    return _Gcs.read_versioned(path) if is_gcs(path) else None


def write_text(path: str, text: str) -> None:
    _backend(path).write_text(path, text)


def create_exclusive(path: str, text: str) -> bool:
    """Creates the file with `text` unless it exists; False if it did."""
    return _backend(path).create_exclusive(path, text)


def exists(path: str) -> bool:
    return _backend(path).exists(path)


def list_names(directory: str) -> list[str]:
    """Names of the files in `directory` ([] if there is none)."""
    return _backend(directory).list_names(directory)


def list_tree(directory: str) -> list[str]:
    """Paths (relative, '/'-separated) of every file below `directory`: one listing, however deep."""
    return _backend(directory).list_tree(directory)


def delete(path: str) -> None:
    """Deletes the file if it exists."""
    _backend(path).delete(path)


def delete_tree(directory: str, names: Optional[Sequence[str]] = None) -> None:
    """Deletes the directory and everything under it, if it exists. `names`: its `list_tree`,
    if the caller listed it already (on GCS the listing is then not repeated)."""
    if names is not None and is_gcs(directory):
        delete_all([f"{directory}/{name}" for name in names])
        return
    _backend(directory).delete_tree(directory)


def list_dirs(directory: str) -> list[str]:
    """Names of the subdirectories of `directory` (on GCS: the prefixes one level down)."""
    return _backend(directory).list_dirs(directory)


def delete_all(paths: Sequence[str]) -> None:
    """Deletes the files that exist (on GCS all at once)."""
    if paths:
        concurrently([functools.partial(delete, path) for path in paths], paths[0])


CONCURRENT_REQUESTS = 32  # small-file requests in flight at once (the gcs driver of tensorstore allows 32 too)


def concurrently(calls: Sequence[Callable[[], Any]], path: str) -> list:
    """The results of `calls`, in order. Independent requests to an object store wait on its
    latency, not on us: where `path` is on GCS they run at once, on up to CONCURRENT_REQUESTS
    threads that end before this returns; local ones run one after another. The first
    exception is raised once every call has ended."""
    calls = list(calls)
    if len(calls) < 2 or not is_gcs(path):
        return [call() for call in calls]
    with concurrent.futures.ThreadPoolExecutor(min(len(calls), CONCURRENT_REQUESTS),
                                               thread_name_prefix="beam-downsample-io") as pool:
        futures = [pool.submit(call) for call in calls]
        concurrent.futures.wait(futures)
    return [future.result() for future in futures]


def makedirs(directory: str) -> None:
    _backend(directory).makedirs(directory)


def remove_dir_if_empty(directory: str) -> None:
    _backend(directory).remove_dir_if_empty(directory)
