"""Errors of planning, shared by the pure arithmetic (`core`) and the planning steps (`plan`)."""

from __future__ import annotations


class PlanningError(ValueError):
    """The requested pyramid cannot be made (e.g. the coarsest mag is unreachable)."""
