"""Argument checks that several parts of the package share, with one wording of their errors."""

from __future__ import annotations

import math


def check_temperature(value: float, name: str = "temperature") -> float:
    """``value`` as a float, or ValueError (naming ``name``) unless it is finite and > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)
