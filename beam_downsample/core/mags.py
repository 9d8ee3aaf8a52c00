"""Magnifications: parsing, naming and comparison of x-y-z mag triples."""

from __future__ import annotations

from typing import Iterable, Sequence, Tuple

from beam_downsample.core.errors import UsageError

Mag = Tuple[int, int, int]


class MagError(UsageError):
    """A mag written by a user (flag or properties) that is not valid."""


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def parse_mag(text: str | int | Sequence[int]) -> Mag:
    """Parses `8`, `"8"`, `"16-16-8"` or `[16, 16, 8]` into a mag triple.

    Every component must be a positive power of two, as in WEBKNOSSOS.
    """
    if isinstance(text, int):
        parts: list = [text] * 3
    elif isinstance(text, str):
        pieces = text.strip().split("-")
        if len(pieces) not in (1, 3):
            raise MagError(f"{text!r} must be one number or three joined by '-', e.g. 8 or 16-16-8")
        try:
            parts = [int(piece) for piece in pieces]
        except ValueError:
            raise MagError(f"{text!r} is not a mag: use a number or x-y-z, e.g. 8 or 16-16-8") from None
        if len(parts) == 1:
            parts = parts * 3
    else:
        parts = list(text)
        if len(parts) != 3:
            raise MagError(f"{text!r} must have three components")
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, int) or not _is_power_of_two(part):
            raise MagError(f"{text!r}: every component must be a positive power of two, got {part!r}")
    return (parts[0], parts[1], parts[2])


def mag_name(mag: Mag) -> str:
    """Directory name of a mag: `1`, `2` for isotropic mags, `2-2-1` otherwise."""
    if mag[0] == mag[1] == mag[2]:
        return str(mag[0])
    return "-".join(str(m) for m in mag)


def max_dim(mag: Mag) -> int:
    return max(mag)


def factor_between(finer: Mag, coarser: Mag) -> Mag:
    """Per-axis reduction factor from `finer` to `coarser` (each a power of two)."""
    factor = tuple(c // f for f, c in zip(finer, coarser))
    if any(c % f for f, c in zip(finer, coarser)) or any(f < 1 for f in factor):
        raise MagError(f"mag {mag_name(coarser)} is not a multiple of {mag_name(finer)}")
    return factor  # type: ignore[return-value]


def sort_mags(mags: Iterable[Mag]) -> list[Mag]:
    """Finest first, as WEBKNOSSOS lists them."""
    return sorted(set(mags), key=lambda m: (max(m), m))
