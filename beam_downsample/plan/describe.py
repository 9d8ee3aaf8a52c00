"""What a plan tells the user: the dry-run text, each pass's size, interrupted refreshes."""

from __future__ import annotations

import functools
from typing import Sequence

from beam_downsample.core.mags import mag_name
from beam_downsample.plan import refresh
from beam_downsample.plan.job import LayerPlan, each_pass, pass_units
from beam_downsample.plan.units import unit_memory, units_work
from beam_downsample.store import storage
from beam_downsample.store.arrays import STATE_DIR
from beam_downsample.store.properties import Dataset


def describe(plans: Sequence[LayerPlan]) -> str:
    lines = []
    for plan in plans:
        if not plan.target_mags:
            lines.append(f"{plan.layer.name}: nothing to do (already at the coarsest mag)")
            continue
        passes = "; ".join(
            f"pass {i + 1}: {mag_name(p.source_mag)} -> {', '.join(mag_name(m) for m in p.target_mags)} "
            f"in {len(indices):,} work units of up to {unit_memory(plan, i) / (1 << 20):.1f} MiB"
            + _sparse_note(plan, i)
            for i, (p, indices) in enumerate(zip(plan.passes, plan.planned))
        )
        lines.append(f"{plan.layer.name}{_reduction_note(plan)}: {passes}")
    return "\n".join(lines)


def _reduction_note(plan: LayerPlan) -> str:
    """` (mode over non-zero voxels)` with `--ignore-background`, else nothing."""
    config = plan.configs[0]
    return f" ({config.interpolation} over non-zero voxels)" if config.reduction != config.interpolation else ""


def pass_sizes(plans: Sequence[LayerPlan]) -> list[tuple[int, float]]:
    """(work units, estimated CPU-s) of each pass as planned, all layers together (a pass runs every layer's units)."""
    sizes = []
    for index, active, _ in each_pass(plans):
        planned = pass_units(plans, index, listed=False)
        sizes.append((sum(map(len, planned)), units_work(active, index, planned)))
    return sizes


def _sparse_note(plan: LayerPlan, index: int) -> str:
    """`(6 of 1,048,576 work units hold data)`; later passes are an upper bound until pass 1 ran."""
    if plan.configs[index].refresh:
        return f" (refreshing {refresh.boxes_text(plan.refresh_boxes)} of existing mags)"
    if index == 0 and plan.dense_reason:
        return f" (planned densely: {plan.dense_reason})"
    count, total = len(plan.planned[index]), plan.grids[index].count
    if count == total:
        return ""
    if plan.exact and plan.exact[index]:
        return f" ({count:,} of {total:,} work units hold data)"
    listed = index == 0 or plan.configs[index - 1].refresh  # planned from a listing of a complete mag
    why = "their shards or files do; the workers skip the empty ones" if listed else "mapped from the pass before"
    return f" (at most {count:,} of {total:,} work units hold data: {why})"


def interrupted_refreshes(dataset: Dataset, plans: Sequence[LayerPlan]) -> list[str]:
    """Warnings for refreshes of these layers that were interrupted and not rerun: their
    mags are partly refreshed until the same boxes run again (from the listing of each layer's
    state that planning made, else one listing per layer; and one read per interrupted refresh
    of several boxes)."""
    warnings = []
    listed = storage.concurrently([(lambda names=plan.state_names: list(names)) if plan.state_names is not None
                                   else functools.partial(storage.list_names, storage.join_inside(
                                       dataset.path, STATE_DIR, plan.layer.name)) for plan in plans], dataset.path)
    for plan, names in zip(plans, listed):
        state = storage.join_inside(dataset.path, STATE_DIR, plan.layer.name)
        found: dict[tuple, str] = {}  # boxes -> the file that lists them (several boxes)
        for name in sorted(names):
            boxes, path = refresh.refresh_dir(name), ""
            if boxes == ():  # several boxes: they are listed in the pass directory
                path = storage.join_inside(state, name, refresh.BOXES_FILE)
                try:
                    boxes = refresh.normalised(refresh.parse_box_file(storage.read_text(path) or "", path))
                except refresh.RefreshError:
                    boxes = ()
            if boxes is not None:
                found.setdefault(boxes, path)
        for boxes, path in found.items():
            if boxes == plan.refresh_boxes:
                continue
            if 0 < len(boxes) <= 3:
                what, rerun = f"a {refresh.boxes_text(boxes)} refresh", refresh.boxes_text(boxes)
            else:
                what, rerun = f"a refresh of {len(boxes) or 'several'} boxes", f"--bbox-file {path}"
            warnings.append(f"layer {plan.layer.name!r}: {what} was interrupted, so its mags are partly "
                            f"refreshed; rerun it: {rerun}")
    return warnings
