"""Durations as Compose writes them (``1m30s``, ``500ms``, ``10``), in seconds. Pure."""

from __future__ import annotations

import re
from typing import Any

from .errors import ComposeError

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")


class DurationError(ComposeError):
    """A duration could not be parsed."""


def parse_duration(value: Any, where: str) -> float:
    """Compose durations (``1m30s``, ``500ms``, ``10``) in seconds."""
    if isinstance(value, bool):
        raise DurationError(f"{where}: invalid duration {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise DurationError(f"{where}: negative duration")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise DurationError(f"{where}: invalid duration {value!r}")
    text = value.strip()
    pos = 0
    total = 0.0
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * scale[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise DurationError(f"{where}: invalid duration {value!r} (use e.g. 10s, 1m30s, 500ms)")
    return total


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1h2m``: the two largest units, whole seconds (for people, not parsers)."""
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            rest = seconds % size
            small = {"d": ("h", 3600), "h": ("m", 60), "m": ("s", 1)}[unit]
            return f"{seconds // size}{unit}" + (f"{rest // small[1]}{small[0]}" if rest // small[1] else "")
    return f"{seconds}s"
