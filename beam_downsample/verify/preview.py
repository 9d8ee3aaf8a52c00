"""`--preview FILE.png`: the central z-slice of every mag of every layer, side by
side at the same physical size, so a pyramid can be looked at without WEBKNOSSOS.

One row per layer, one panel per mag (finest first), each labelled. Every panel
covers the layer's bounding box in x and y at one pixel size (nanometres per
pixel, the same for all layers), so coarser mags show as larger blocks. Color
layers are grey (three channels: RGB), their contrast set from the finest
mag's slice; segmentation ids get stable random colours (a hash of the id,
the same in every mag and every run; 0 is black).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from beam_downsample.core.box import Box, region_in_mag
from beam_downsample.core.mags import mag_name
from beam_downsample.store.properties import Layer
from beam_downsample.verify.metadata import MagArray
from beam_downsample.verify.recompute import read_boxes

PANEL = 256  # pixels of a panel's longer side, for the layer with the largest physical extent
GAP = 8  # pixels between panels and around the image
LABEL = 14  # pixels of the label line above each panel
MAX_SLICE_VOXELS = 4096 * 4096  # a mag's slice larger than this is not read (a grey panel says so)
BACKGROUND = (48, 48, 48)
TOO_LARGE = (96, 96, 96)


def pixel_size(layers: Sequence[Layer], voxel_size: Sequence[float]) -> float:
    """Nanometres per pixel: the largest layer's longer side fills `PANEL` pixels."""
    return max(max(s * v for s, v in zip(layer.bbox.shape[:2], voxel_size[:2])) for layer in layers) / PANEL


def panel_shape(layer: Layer, voxel_size: Sequence[float], pixel: float) -> tuple[int, int]:
    """(width, height) in pixels of the layer's panels."""
    return tuple(max(1, math.ceil(s * v / pixel - 1e-9)) for s, v in zip(layer.bbox.shape[:2], voxel_size[:2]))  # type: ignore[return-value]


def image_shape(rows: Sequence[tuple[Layer, int]], voxel_size: Sequence[float]) -> tuple[int, int]:
    """(width, height) of the preview of `rows` (layer, number of mags)."""
    pixel = pixel_size([layer for layer, _ in rows], voxel_size)
    shapes = [panel_shape(layer, voxel_size, pixel) for layer, _ in rows]
    cell_width = max(w for w, _ in shapes)
    width = GAP + max(count for _, count in rows) * (cell_width + GAP)
    height = GAP + sum(LABEL + h + GAP for _, h in shapes)
    return width, height


def render(path: str, rows: Sequence[tuple[Layer, Sequence[MagArray]]], voxel_size: Sequence[float],
           done=lambda n: None) -> tuple[int, int]:
    """Writes the preview PNG; returns its (width, height). `done(1)` after each panel."""
    from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel

    rows = [(layer, mags) for layer, mags in rows if mags]
    width, height = image_shape([(layer, len(mags)) for layer, mags in rows], voxel_size)
    pixel = pixel_size([layer for layer, _ in rows], voxel_size)
    cell_width = max(panel_shape(layer, voxel_size, pixel)[0] for layer, _ in rows)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    top = GAP
    for layer, mags in rows:
        shape = panel_shape(layer, voxel_size, pixel)
        contrast = None
        for column, mag in enumerate(mags):
            left = GAP + column * (cell_width + GAP)
            draw.text((left, top), f"{layer.name} {mag_name(mag.mag)}", fill=(230, 230, 230))
            values = central_slice(layer, mag, shape, voxel_size, pixel)
            if values is None:
                image.paste(TOO_LARGE, (left, top + LABEL, left + shape[0], top + LABEL + shape[1]))
                draw.text((left + 4, top + LABEL + 4), "too large", fill=(230, 230, 230))
            else:
                if contrast is None:
                    contrast = value_range(values)
                image.paste(Image.fromarray(colours(layer, values, contrast)), (left, top + LABEL))
            done(1)
        top += LABEL + shape[1] + GAP
    image.save(path, format="PNG")
    return width, height


def central_slice(layer: Layer, mag: MagArray, shape: tuple[int, int], voxel_size: Sequence[float],
                  pixel: float) -> Optional[np.ndarray]:
    """(channels, height, width) values of the mag's central z-slice, resampled (nearest) to the
    panel's pixels; None if the slice is too large to read."""
    region = region_in_mag(layer.bbox, mag.mag)
    z = ((layer.bbox.start[2] + layer.bbox.stop[2] - 1) // 2) // mag.mag[2]
    box = Box((region.start[0], region.start[1], z), (region.stop[0], region.stop[1], z + 1))
    if box.voxels > MAX_SLICE_VOXELS:
        return None
    (data,) = read_boxes(mag.array, [box], layer.num_channels)
    if isinstance(data, Exception):
        data = np.zeros((layer.num_channels, *box.shape), dtype=layer.dtype)
    index = []
    for axis in range(2):  # panel pixel centre -> mag-1 voxel -> this mag's voxel in the slice
        centres = layer.bbox.start[axis] * voxel_size[axis] + (np.arange(shape[axis]) + 0.5) * pixel
        mag1 = np.clip(np.floor(centres / voxel_size[axis]).astype(np.int64), layer.bbox.start[axis],
                       layer.bbox.stop[axis] - 1)
        index.append(mag1 // mag.mag[axis] - region.start[axis])
    return data[:, index[0][:, None], index[1][None, :], 0].transpose(0, 2, 1)


def value_range(values: np.ndarray) -> tuple[float, float]:
    """The grey range of a color layer: its dtype's for uint8, else the 0.5 and 99.5 percentiles."""
    if values.dtype == np.uint8:
        return 0.0, 255.0
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if not finite.size:
        return 0.0, 1.0
    low, high = np.percentile(finite.astype(np.float64), [0.5, 99.5])
    return float(low), float(high if high > low else low + 1)


def colours(layer: Layer, values: np.ndarray, contrast: tuple[float, float]) -> np.ndarray:
    """(height, width, 3) uint8 of a panel."""
    if layer.category == "segmentation":
        return id_colours(values[0])
    low, high = contrast
    grey = np.nan_to_num((values.astype(np.float64) - low) / (high - low) * 255)
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    if values.shape[0] == 3:
        return np.ascontiguousarray(grey.transpose(1, 2, 0))
    return np.repeat(grey[0][:, :, None], 3, axis=2)


def id_colours(ids: np.ndarray) -> np.ndarray:
    """A stable random colour per id (splitmix64 of the id's 64 bits), black for 0."""
    if ids.dtype.kind == "f":
        bits = ids.astype(np.float64).view(np.uint64)
    else:
        bits = ids.astype(np.int64 if ids.dtype.kind == "i" else np.uint64).view(np.uint64)
    z = bits + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    rgb = np.stack([(z >> np.uint64(shift)) & np.uint64(0xFF) for shift in (0, 8, 16)], axis=-1)
    rgb = (64 + rgb * 192 // 256).astype(np.uint8)  # never too dark to tell from the background
    rgb[bits == 0] = 0
    return rgb
