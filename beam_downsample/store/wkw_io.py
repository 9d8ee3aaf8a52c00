"""wkw mags (the original WEBKNOSSOS format) behind the same small interface
as the tensorstore arrays: open, read a box, write a box.

tensorstore has no wkw driver, so this uses the maintained `wkw` package.
New mags get the reference's layout: blocks of 32^3 voxels in files of
32^3 blocks (1024^3 voxels), LZ4HC-compressed (verified byte for byte
against files the reference writes).

A compressed wkw file can only be written whole, which would make every
work unit hold 1024^3 voxels per level. Instead, units write their
(block-aligned) boxes into an uncompressed *staging* copy of the mag, where
partial writes are allowed, and `compress_staged` turns each finished
staging file into the final LZ4HC file after the pass (atomic rename).
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
from typing import Iterator, Sequence

import numpy as np
import wkw
from wkw.wkw import WKWException

from beam_downsample.core.box import Box, split_box

BLOCK_LEN = 32  # voxels per block edge
FILE_LEN = 32  # blocks per file edge: files of 1024^3 voxels
# wkw addresses voxels with uint32 offsets from 0.
DOMAIN = Box((0, 0, 0), (2**31, 2**31, 2**31))


class Written:
    """A finished write, shaped like tensorstore's future."""

    @staticmethod
    def result() -> None:
        return None


class WkwMag:
    """One wkw mag: reads come from `path`, writes go to the staging copy (if any)."""

    def __init__(self, path: str, staging: str | None = None):
        """Raises ValueError (like tensorstore's open) if `path` holds no readable wkw mag."""
        for root in (path, staging) if staging else (path,):
            if not os.path.isfile(os.path.join(root, "header.wkw")):
                raise ValueError(f"no wkw header at {os.path.join(root, 'header.wkw')}")
        try:
            self._dataset = wkw.Dataset.open(path)
            self._staging = wkw.Dataset.open(staging) if staging else None
        except WKWException as error:
            raise ValueError(f"{path}: {error}") from None
        self.dtype = np.dtype(self._dataset.header.voxel_type)
        self.channels = self._dataset.header.num_channels
        self.block_len = self._dataset.header.block_len  # a block's cube edge (what is compressed alone)
        self.file_voxels = self.block_len * self._dataset.header.file_len  # a file's cube edge
        self.path = path

    def stored_files(self, box: Box) -> bool:
        """True if any data file of this mag overlaps `box` (files that do not exist read as 0)."""
        side = self.file_voxels
        ranges = [range(a // side, -(-b // side)) for a, b in zip(box.start, box.stop)]
        return any(os.path.exists(os.path.join(self.path, f"z{z}", f"y{y}", f"x{x}.wkw"))
                   for x in ranges[0] for y in ranges[1] for z in ranges[2])

    def read(self, box: Box) -> np.ndarray:
        """(c, x, y, z) in Fortran order; voxels of files that do not exist read as 0."""
        return self._dataset.read(box.start, box.shape)

    def write(self, box: Box, data: np.ndarray) -> Written:
        if self._staging is None:
            raise ValueError("this wkw mag was opened for reading only")
        self._staging.write(box.start, np.asfortranarray(data))
        return Written()


def header(dtype: np.dtype, channels: int, block_type: int) -> wkw.Header:
    return wkw.Header(
        voxel_type=np.dtype(dtype).type,
        num_channels=channels,
        block_len=BLOCK_LEN,
        file_len=FILE_LEN,
        block_type=block_type,
    )


def create(path: str, dtype: np.dtype, channels: int, staging: str) -> None:
    """The final (LZ4HC) mag with only its header, and an empty uncompressed staging copy."""
    wkw.Dataset.create(path, header(dtype, channels, wkw.Header.BLOCK_TYPE_LZ4HC)).close()
    create_staging(staging, dtype, channels)


def create_staging(staging: str, dtype: np.dtype, channels: int) -> None:
    wkw.Dataset.create(staging, header(dtype, channels, wkw.Header.BLOCK_TYPE_RAW)).close()


def create_staging_files(staging: str, region: Box, files=None) -> None:
    """Creates every staging file that `region` touches, or only `files` ((N, 3) file
    indices x, y, z), one zero block each, before any worker runs: concurrent units
    then only write blocks into existing files and never race to create one. Only
    for a fresh staging copy (see io)."""
    dataset = wkw.Dataset.open(staging)
    try:
        file_voxels = BLOCK_LEN * FILE_LEN
        if files is None:
            first = [a // file_voxels for a in region.start]
            last = [-(-b // file_voxels) for b in region.stop]
            files = [(fx, fy, fz) for fz in range(first[2], last[2]) for fy in range(first[1], last[1])
                     for fx in range(first[0], last[0])]
        zeros = np.zeros((dataset.header.num_channels, BLOCK_LEN, BLOCK_LEN, BLOCK_LEN),
                         dtype=dataset.header.voxel_type, order="F")
        for fx, fy, fz in (tuple(int(v) for v in f) for f in files):
            if os.path.exists(os.path.join(staging, f"z{fz}", f"y{fy}", f"x{fx}.wkw")):
                continue
            file_box = Box((fx * file_voxels, fy * file_voxels, fz * file_voxels),
                           ((fx + 1) * file_voxels, (fy + 1) * file_voxels, (fz + 1) * file_voxels))
            corner = [a // BLOCK_LEN * BLOCK_LEN for a in file_box.intersect(region).start]
            dataset.write(corner, zeros)
    finally:
        dataset.close()


def stage_existing(path: str, staging: str, region: Box, files) -> None:
    """Copies the region's part of each of `files` ((N, 3) file indices) from the compressed
    mag at `path` into the (fresh) uncompressed staging copy, in block-aligned slabs of at
    most STAGE_VOXELS; a file that does not exist yet gets one zero block, as a new one does."""
    side = BLOCK_LEN * FILE_LEN
    files = [tuple(int(v) for v in f) for f in files]
    existing = {(fx, fy, fz) for fx, fy, fz in files
                if os.path.exists(os.path.join(path, f"z{fz}", f"y{fy}", f"x{fx}.wkw"))}
    create_staging_files(staging, region, [f for f in files if f not in existing])
    with wkw.Dataset.open(path) as final, wkw.Dataset.open(staging) as staged:
        for fx, fy, fz in existing:
            box = Box((fx * side, fy * side, fz * side), ((fx + 1) * side, (fy + 1) * side, (fz + 1) * side))
            for slab in split_box(box.intersect(region), (BLOCK_LEN,) * 3, STAGE_VOXELS):
                staged.write(slab.start, final.read(slab.start, slab.shape))


def layout(path: str) -> tuple[int, int]:
    """(voxels per block edge, blocks per file edge) of the wkw mag at `path`."""
    with wkw.Dataset.open(path) as dataset:
        return dataset.header.block_len, dataset.header.file_len


def staged_files(staging: str) -> Iterator[str]:
    """Relative paths (`z0/y0/x0.wkw`) of the staging copy's data files."""
    for directory, _, files in os.walk(staging):
        for name in files:
            if name.endswith(".wkw") and name != "header.wkw":
                yield os.path.relpath(os.path.join(directory, name), staging)


# A file whose data (the region's part of it) is at most this big is compressed
# from memory: a zero-filled numpy array costs nothing where it is not touched,
# whereas the library's file-to-file compression reads every byte of the
# staging file (1 GiB of sparse zeros per uint8 file: seconds of system time).
# A thread holds about twice this; see COMPRESS_THREADS.
IN_MEMORY_BYTES = 128 << 20
STAGE_VOXELS = 8 << 20  # a refresh copies existing files into staging in slabs of at most this
COMPRESS_THREADS = 4  # at most: 4 x 2 x 128 MiB stays inside the default 2G budget


def compress_staged(mags: Sequence[tuple[str, str, Box]], threads: int = 1) -> int:
    """Compresses every staging file of every `(staging, path, region)` mag into its
    final place and deletes it; returns the file count. A staging file that holds
    only zeros becomes no file (nothing is stored for empty space). All files of all mags share
    one thread pool (the wkw library releases the GIL while compressing).

    Each file is compressed into a temp copy inside the staging area and renamed,
    so a crash leaves the mag with the old or the new file and no debris; a
    rerun compresses what is still staged.
    """
    files = [(staging, path, region, relative)
             for staging, path, region in mags for relative in sorted(staged_files(staging))]
    for staging, path, _ in mags:
        temp_root = staging + ".lz4hc"
        if not os.path.isdir(temp_root):
            with wkw.Dataset.open(path) as final:
                wkw.Dataset.create(temp_root, final.header).close()

    def compress(staging: str, path: str, region: Box, relative: str) -> None:
        temp = os.path.join(staging + ".lz4hc", relative)
        if os.path.exists(temp):
            os.unlink(temp)  # left by a crashed compression
        target = os.path.join(path, relative)
        if not holds_data(os.path.join(staging, relative)):  # all zero: no file, as a missing file reads as 0
            if os.path.exists(target):
                os.unlink(target)
            os.unlink(os.path.join(staging, relative))
            return
        compress_file(staging, relative, region)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(temp, target)
        os.unlink(os.path.join(staging, relative))

    with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
        for future in [pool.submit(compress, *item) for item in files]:
            future.result()
    return len(files)


def holds_data(path: str) -> bool:
    """True if the raw (staging) wkw file at `path` holds a byte other than 0 after its header.

    A staging file is sparse on disk: units write only the tiles that hold
    data, so only its data extents (SEEK_DATA / SEEK_HOLE) are read; holes read
    as zeros. Where the file system cannot tell, the whole file is read.
    """
    fd = os.open(path, os.O_RDONLY)  # pread only: lseek(SEEK_DATA) moves the offset under any buffered reader
    try:
        data_offset = int.from_bytes(os.pread(fd, 16, 0)[8:16], "little")
        size = os.fstat(fd).st_size
        offset = data_offset
        while offset < size:
            try:
                start = max(os.lseek(fd, offset, os.SEEK_DATA), data_offset)
                stop = os.lseek(fd, start, os.SEEK_HOLE)
            except OSError as error:
                if error.errno == errno.ENXIO:  # nothing but a hole is left
                    return False
                start, stop = offset, size  # no SEEK_DATA here: read it all
            while start < stop:
                piece = os.pread(fd, min(stop - start, 64 << 20), start)
                if not piece:
                    break
                if np.frombuffer(piece, dtype=np.uint8).any():
                    return True
                start += len(piece)
            offset = max(stop, offset + 1)
    finally:
        os.close(fd)
    return False


def compress_file(staging: str, relative: str, region: Box) -> None:
    """Staging file `relative` -> the same file, compressed, in `staging + ".lz4hc"`."""
    part = file_box(relative).intersect(region)
    with wkw.Dataset.open(staging) as staged:
        item_bytes = np.dtype(staged.header.voxel_type).itemsize * staged.header.num_channels
        if part.voxels * item_bytes > IN_MEMORY_BYTES:
            os.makedirs(os.path.dirname(os.path.join(staging + ".lz4hc", relative)), exist_ok=True)
            wkw.File.compress(os.path.join(staging, relative), os.path.join(staging + ".lz4hc", relative))
            return
        whole = file_box(relative)
        data = np.zeros((staged.header.num_channels, *whole.shape), dtype=staged.header.voxel_type, order="F")
        inside = (slice(None),) + tuple(slice(a - s, b - s) for a, b, s in zip(part.start, part.stop, whole.start))
        data[inside] = staged.read(part.start, part.shape)
    with wkw.Dataset.open(staging + ".lz4hc") as compressed:
        compressed.write(whole.start, data)


def file_box(relative: str) -> Box:
    """The voxels of the file `z{z}/y{y}/x{x}.wkw`."""
    z, y, x = (int(part[1:].split(".")[0]) for part in relative.split(os.sep))
    size = BLOCK_LEN * FILE_LEN
    return Box((x * size, y * size, z * size), ((x + 1) * size, (y + 1) * size, (z + 1) * size))
