"""Rendering results: readable tables by default, JSON with ``-o json``."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from tether.protocol.logsafe import printable


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table; every cell printable only (remote strings cannot drive the terminal)."""
    cells = [[printable(h) for h in headers]] + [[printable(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def when(ts: float | None) -> str:
    if ts is None:
        return ""
    try:
        return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, ValueError, OSError):  # stored before durations were bounded
        return f"{ts:g}"


def labels(value: dict[str, str], sources: dict[str, str] | None = None) -> str:
    """``k=v,...``; with ``sources``, each label followed by where it comes from (``[operator]``)."""
    if sources is None:
        return printable(",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-")
    return printable(", ".join(f"{k}={v} [{sources.get(k, '?')}]" for k, v in sorted(value.items())) or "-")


def presence(device: dict[str, Any]) -> str:
    if device["status"] == "offline":
        return f"offline (since {when(device.get('since'))})"
    if device["status"] == "unknown":
        return f"unknown (not heard from since {when(device.get('since'))})"
    return str(device["status"])


def plural(n: int, word: str) -> str:
    """``1 device``, ``3 devices``."""
    return f"{n} {word}" + ("" if n == 1 else "s")
