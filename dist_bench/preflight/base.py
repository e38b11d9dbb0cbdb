"""What every check returns or raises."""

from __future__ import annotations

from dataclasses import dataclass


class PreflightError(ValueError):
    """A bad input, phrased as the one line the user sees: the field, file and line, URI or option first."""


@dataclass
class Check:
    name: str  # the field, option or resource checked
    detail: str  # what was found
