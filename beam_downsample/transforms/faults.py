"""A failed work unit in one line: which stored object failed, where, and what to do.

`describe` turns whatever a unit raised into a `UnitFault` whose message
names the layer, the mag, the object (a zarr chunk, a sharded zarr3 shard,
a wkw file: its path or gs:// URL) and the box (that object's part of the
unit, in the mag's voxels), the reason, and the remedy:

    reading gs://b/ds/color/1/c/0/0/0/0 failed (layer 'color', mag 1, box 0,4,6-156,140,78):
    OUT_OF_RANGE: ...; rerun to retry; if it persists the stored object is damaged

The object is taken from the error's text where tensorstore names it, else
found by reading the unit's source again object by object (only after a
failure); a unit that fails elsewhere is named by its layer, pass and box.
Plain Python, called at the unit's boundary (`DownsampleUnitFn`), so the
read and write paths of `work` stay free of it.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from beam_downsample.core.box import Box, split_box
from beam_downsample.core.config import PassConfig
from beam_downsample.core.grid import WorkUnit
from beam_downsample.core.mags import Mag, mag_name
from beam_downsample.store import arrays, stored

REMEDY = "rerun to retry; if it persists the stored object is damaged"
WRITE_REMEDY = "rerun to retry; if it persists the stored object is damaged or the target not writable"
REASON_CHARS = 400
REREAD_VOXELS = 1 << 24  # an object's part is read again in pieces of at most this many voxels


class UnitFault(RuntimeError):
    """A work unit failed; the message is one line (see the module's doc)."""


def describe(error: BaseException, config: PassConfig, unit: WorkUnit, source, targets: Sequence,
             reread: bool = True) -> UnitFault:
    """The one-line fault of `unit` that raised `error` (reading `source`, writing `targets`)."""
    if isinstance(error, UnitFault):
        return error
    reason = one_line(error)
    places = [(stored_base(config.source_spec), config.source_mag, unit.box, source, config.source_spec, "reading")]
    box = unit.box
    for level, target in zip(config.levels, targets):
        box = box.scaled_down(level.factor)
        places.append((stored_base(level.spec), level.mag, box, target, level.spec, "writing"))
    for base, mag, part, array, spec, verb in places:  # the error's text names the object
        found = re.search(re.escape(base) + r"[^\s\"'(),;]*", str(error)) if base else None
        if found:
            path = found.group(0).rstrip(":.")
            return _fault(verb, path, config.layer, mag, _part_of(array, spec, part, path), reason)
    if reread:  # find the source object that cannot be read
        for path, part, why in _unreadable(source, config, unit.box):
            return _fault("reading", path, config.layer, config.source_mag, part, why)
    return UnitFault(f"work unit {_box_text(unit.box)} of layer {config.layer!r} (pass {config.pass_index + 1}, "
                     f"mag {mag_name(config.source_mag)} to {', '.join(mag_name(l.mag) for l in config.levels)}) "
                     f"failed: {reason}; {REMEDY.split(';')[0]}")


def one_line(error: BaseException) -> str:
    """`Type: message` on one line, at most REASON_CHARS characters."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = re.sub(r"\s*\[while running .*?\]", "", text)
    text = re.sub(r"\s*\[[a-z_ ]+='.*?'\](?=\s*\[|\s*$|;)", "", text)  # tensorstore's payloads, in any order
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def stored_base(spec: dict) -> Optional[str]:
    """Where a mag's objects are, as tensorstore names them in errors."""
    if spec["driver"] == "wkw":
        return spec.get("path")
    return stored.kvstore_url(spec["kvstore"])


def _fault(verb: str, path: str, layer: str, mag: Mag, part: Box, reason: str) -> UnitFault:
    remedy = REMEDY if verb == "reading" else WRITE_REMEDY
    return UnitFault(f"{verb} {path} failed (layer {layer!r}, mag {mag_name(mag)}, box {_box_text(part)}): "
                     f"{reason}; {remedy}")


def _box_text(box: Box) -> str:
    return f"{','.join(map(str, box.start))}-{','.join(map(str, box.stop))}"


def _part_of(array, spec: dict, box: Box, path: str) -> Box:
    """The part of `box` that the object at `path` holds (all of `box` if unknown)."""
    try:
        for object_path, part in stored.storage_objects(array, spec, box):
            if object_path == path:
                return part
    except Exception:  # pylint: disable=broad-except
        pass
    return box


def _unreadable(source, config: PassConfig, box: Box):
    """(path, part, reason) of the first source object whose part of `box` cannot be read."""
    try:
        box = box.intersect(arrays.array_domain(source))
        objects = stored.storage_objects(source, config.source_spec, box)
    except Exception:  # pylint: disable=broad-except
        return
    for path, part in objects:
        if part.empty:
            continue
        for piece in split_box(part, config.tile_alignment, REREAD_VOXELS):
            try:
                arrays.read_box(source, piece, config.channels)
            except Exception as error:  # pylint: disable=broad-except
                yield path, part, one_line(error)
                break
