"""What a plan will cost in storage requests on an object store: an estimate per pass, for `--dry-run`.

The model (docs/cloud-requests.md has it as formulas per format):

- a unit fetches its source box in `ceil(unit bytes / prefetch_bytes)` boxes
  (store.prefetch). Sharded zarr3: per box and stored shard it touches one
  GET (a shard's part in the reference storage order is one byte range;
  a box holding a shard's whole part of the layer reads index and data in
  one GET), plus the shard's index once per worker. Unsharded zarr3 and
  zarr v2: one GET per chunk of the box (fewer where chunks are not stored);
- each level of a unit writes every target shard it touches (zarr3: one
  GET of the shard as it is, one upload) or every chunk (zarr v2: one
  upload each);
- per unit one done-marker and one worker-state upload, and the marker's
  deletion at the end;
- per pass and layer the launcher lists the pass's state when it creates
  the mags and at the pass's end, updates the NGFF metadata (a GET and an upload) and, once per
  pass, the properties; passes after the first list their source and read
  up to `units.PLAN_INDEX_BYTES` of its shard indices;
- the first pass also pays for planning and creating the mags (the
  properties, each source's metadata, listing and shard indices, a lock per
  layer, a listing per layer and a GET and an upload per new mag).

Workers open the arrays with the metadata the launcher knows (a `--bbox`
refresh's existing mags: 1 + levels GETs per worker and pass, counted here
for one worker) and write a progress tally now and then, which the launcher
reads (not counted: the number of workers is the runner's choice). Units
planned as an upper bound
(`LayerPlan.exact`) make the estimate one too.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from beam_downsample.core.grid import CHUNK, SHARD
from beam_downsample.core.mags import factor_between
from beam_downsample.plan.job import LayerPlan, each_pass
from beam_downsample.plan.units import PLAN_INDEX_BYTES
from beam_downsample.store import arrays, prefetch, stored

KINDS = ("reads", "writes", "lists", "deletes")
REFERENCE_INDEX_BYTES = (SHARD // CHUNK) ** 3 * 16 + 4


def remote(plans: Sequence[LayerPlan]) -> bool:
    return any(prefetch.is_remote(c.source_spec) for p in plans for c in p.configs)


def estimate(plans: Sequence[LayerPlan]) -> list[dict[str, int]]:
    """Per pass (all layers together): estimated requests by kind, and `units`."""
    layouts = {id(p): _source_layout(p) for p in plans if p.passes}
    result = []
    for index, active, configs in each_pass(plans):
        counts = dict.fromkeys(KINDS, 0)
        counts["units"] = 0
        for plan in active:
            for kind, value in _layer_pass(plan, index, layouts[id(plan)]).items():
                counts[kind] += value
        counts["reads"] += 1  # the properties, read for their update
        counts["writes"] += 1
        if index == 0:
            _first_pass(plans, counts, layouts)
        result.append(counts)
    return result


def describe(plans: Sequence[LayerPlan]) -> str:
    """The dry run's lines: `requests of pass 1: about 1,234 (800 reads, 300 writes, 20 lists, 114 deletes)`."""
    if not remote(plans):
        return ""
    lines = []
    for index, counts in enumerate(estimate(plans)):
        bound = "at most about" if not all(p.exact[index] for p in plans if index < len(p.passes) and p.exact) \
            else "about"
        total = sum(counts[k] for k in KINDS)
        lines.append(f"requests of pass {index + 1}: {bound} {total:,} ("
                     + ", ".join(f"{counts[k]:,} {k}" for k in KINDS) + f") for {counts['units']:,} work units")
    return "\n".join(lines)


def _source_layout(plan: LayerPlan) -> tuple[tuple[int, int, int], bool, tuple[int, int, int]]:
    """(spatial shape of one stored key, sharded, of one chunk) of pass 1's source (one metadata read)."""
    spec = plan.configs[0].source_spec
    if spec["driver"] == "wkw":
        return (1024, 1024, 1024), False, (32, 32, 32)
    array = arrays.open_array(spec, open=True)
    shape, _, _ = stored.chunk_layout(array)
    found = prefetch.layout(array)
    chunk = tuple(found.chunk[1:]) if found is not None else tuple(shape[1:])
    return tuple(shape[1:]), stored.shard_index_bytes(array) is not None, chunk  # type: ignore[return-value]


def _target_layout(plan: LayerPlan) -> tuple[tuple[int, int, int], bool, tuple[int, int, int]]:
    """New mags use the reference layout: zarr3 shards of 32^3 chunks, zarr v2 chunks."""
    return arrays.shard_shape(plan.layer), plan.layer.data_format == "zarr3", (CHUNK,) * 3


def _runs(grid, key, chunk, boxes: int) -> int:
    """Contiguous runs of one shard in one fetched box (slabs across x) of a unit of the grid's
    shape: one if the unit spans the shard's stored z and y (the storage order is x, y, z with
    z fastest), one per chunk column across x if it spans z, else one per x-y chunk column."""
    span = [min(k, r) for k, r in zip(key, grid.region.shape)]
    z_full, y_full = grid.shape[2] >= span[2], grid.shape[1] >= span[1]
    cells_x = max(1, -(-min(-(-grid.shape[0] // boxes), key[0]) // chunk[0]))
    cells_y = max(1, -(-min(grid.shape[1], key[1]) // chunk[1]))
    return 1 if z_full and y_full else cells_x if z_full else cells_x * cells_y


def _touched(starts: np.ndarray, stops: np.ndarray, size) -> np.ndarray:
    """Per box, the cells of a grid of `size` it overlaps."""
    size = np.asarray(size, dtype=np.int64)
    return np.prod(-(-stops // size) - starts // size, axis=1) if len(starts) else np.zeros(0, dtype=np.int64)


def _layer_pass(plan: LayerPlan, index: int, source_layout) -> dict[str, int]:
    config, grid, planned = plan.configs[index], plan.grids[index], plan.planned[index]
    counts = dict.fromkeys(KINDS, 0)
    counts["units"] = len(planned)
    starts, stops = grid.boxes(planned)
    bytes_per_voxel = plan.layer.dtype.itemsize * plan.layer.num_channels
    if config.prefetch_bytes > 0:
        key, sharded, chunk = source_layout if index == 0 else _target_layout(plan)
        unit_bytes = np.prod(stops - starts, axis=1) * bytes_per_voxel
        boxes = -(-unit_bytes // config.prefetch_bytes)
        touched = _touched(starts, stops, key)
        if sharded:  # per box and shard its contiguous runs, plus the shard's index (once per worker: at most
            # once a unit); a unit in one box that holds whole shards (or all of the layer) reads each in one GET
            whole = grid.count == 1 or all(s >= k for s, k in zip(grid.shape, key))
            runs = _runs(grid, key, chunk, int(boxes.max()) if len(boxes) else 1)
            counts["reads"] += int((touched * np.where((boxes == 1) & whole, 1, boxes * runs + 1)).sum())
        else:
            counts["reads"] += int(touched.sum())
    target_key, target_sharded, _ = _target_layout(plan)
    a_pass = plan.passes[index]
    for level in config.levels:
        factor = np.array(factor_between(a_pass.source_mag, level.mag), dtype=np.int64)
        level_starts, level_stops = starts // factor, -(-stops // factor)
        touched = int(_touched(level_starts, level_stops, target_key).sum())
        counts["writes"] += touched
        if target_sharded:
            counts["reads"] += touched
    counts["writes"] += 2 * len(planned) + 1  # done-marker and worker state per unit, a worker's tally
    counts["deletes"] += len(planned) + 2  # the markers, a worker's state and tally, at the end
    if config.refresh:  # a worker opens the existing mags (other arrays it opens with the launcher's metadata)
        counts["reads"] += 1 + len(config.levels)
    counts["lists"] += max(1, math.ceil(len(planned) / 1000))  # the pass's state at its end (its start: created)
    counts["reads"] += 1  # NGFF metadata
    counts["writes"] += 1
    if index > 0:  # the source just written: listed, and its shard indices read where few
        counts["lists"] += 1
        counts["reads"] += min(len(planned), PLAN_INDEX_BYTES // REFERENCE_INDEX_BYTES)
    return counts


def _first_pass(plans: Sequence[LayerPlan], counts: dict, layouts: dict) -> None:
    """Planning, locks and the new mags, paid before pass 1."""
    counts["reads"] += 2  # the properties, and the bucket (does it exist)
    for plan in plans:
        if not plan.passes:
            continue
        counts["reads"] += 1  # the source's metadata
        counts["lists"] += 1  # its listing
        grid = plan.grids[0]
        key, sharded, _ = layouts[id(plan)]
        refined = grid.count > 1 and not all(s >= k for s, k in zip(grid.shape, key))
        if sharded and refined and plan.exact and plan.exact[0] and plan.dense_reason is None:
            starts, stops = grid.boxes(plan.planned[0])  # shard indices read to find the units holding data
            counts["reads"] += min(int(_touched(starts, stops, key).sum()), PLAN_INDEX_BYTES // REFERENCE_INDEX_BYTES)
        counts["writes"] += 1  # the lock
        counts["deletes"] += 1
        counts["lists"] += 2 + len(plan.passes)  # the layer's state and mags, each pass's state
        mags = sum(len(p.target_mags) for p in plan.passes)
        counts["reads"] += mags  # creating a mag: is there metadata, then write it
        counts["writes"] += mags
        counts["lists"] += 1  # the layer's state, listed for the cleanup
