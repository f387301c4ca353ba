"""Each device's recent usage, downsampled, in memory (the dashboard's charts; ``devices.metrics``).

Pure: no I/O, no clock of its own (the caller passes the controller's receive time). Per device
a fixed-size ring of ``SLOTS`` buckets of ``STEP_S`` seconds (6 hours of 5-minute points), three
series (CPU %, memory in use % of total, disk in use % of total), each point the mean of the
samples received in its bucket, stored as an unsigned 16-bit integer in hundredths of a percent
(0xFFFF: no sample in that bucket). Nothing grows with time: a device costs the same after a year.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping
from typing import Any

STEP_S = 300
"""Seconds a point covers."""
SLOTS = 72
"""Points kept per series: 72 x 5 minutes = 6 hours."""
SERIES = ("cpu", "mem", "disk")
"""The series kept, each in % (memory and disk: of their totals)."""
CARRY = 3
"""Empty buckets a point carries over to (the agent sends nothing while nothing moved beyond
its threshold, and a full sample at least every 900 s): a longer silence shows as a gap."""
NONE = 0xFFFF
SCALE = 100  # hundredths of a percent


def percents(sample: Mapping[str, Any]) -> tuple[float | None, float | None, float | None]:
    """CPU, memory and disk in % from what the controller knows of a device (merge_sample's map)."""

    def ratio(used: Any, total: Any) -> float | None:
        if isinstance(used, int | float) and isinstance(total, int | float) and total > 0:
            return 100.0 * used / total
        return None

    cpu = sample.get("cpu")
    return (
        float(cpu) if isinstance(cpu, int | float) else None,
        ratio(sample.get("mem"), sample.get("mem_total")),
        ratio(sample.get("disk"), sample.get("disk_total")),
    )


class Ring:
    """One device's series: the latest bucket's index, the samples counted in it, the points."""

    __slots__ = ("bucket", "count", "points")

    def __init__(self) -> None:
        self.bucket = -1
        self.count = 0
        self.points = array("H", [NONE]) * (SLOTS * len(SERIES))

    def add(self, at: float, values: tuple[float | None, ...]) -> None:
        """Count a sample received at ``at`` (seconds); one older than the latest bucket is dropped."""
        bucket = int(at // STEP_S)
        if bucket < self.bucket:
            return
        if bucket > self.bucket:
            for b in range(max(self.bucket + 1, bucket - SLOTS + 1), bucket + 1):
                base = (b % SLOTS) * len(SERIES)
                self.points[base : base + len(SERIES)] = array("H", [NONE]) * len(SERIES)
            self.bucket, self.count = bucket, 0
        self.count += 1
        base = (bucket % SLOTS) * len(SERIES)
        for i, value in enumerate(values):
            if value is None:
                continue
            new = min(100.0, max(0.0, value))
            old = self.points[base + i]
            mean = new if old == NONE else old / SCALE + (new - old / SCALE) / self.count
            self.points[base + i] = round(mean * SCALE)

    def series(self, now: float) -> tuple[float, dict[str, list[float | None]]]:
        """The start of the oldest point and each series' ``SLOTS`` points ending at ``now``'s
        bucket, oldest first (None: no sample; a point carried over at most ``CARRY`` buckets)."""
        last = int(now // STEP_S)
        first = last - SLOTS + 1
        out: dict[str, list[float | None]] = {name: [] for name in SERIES}
        for i, name in enumerate(SERIES):
            held: float | None = None
            age = 0
            for b in range(first - CARRY, last + 1):
                kept = self.bucket - SLOTS < b <= self.bucket
                raw = self.points[(b % SLOTS) * len(SERIES) + i] if kept else NONE
                if raw != NONE:
                    held, age = raw / SCALE, 0
                else:
                    age += 1
                if b >= first:
                    out[name].append(held if age <= CARRY else None)
        return float(first * STEP_S), out


class MetricsHistory:
    """Every device's ring (``MAX`` devices at most: metrics topics are device-writable)."""

    def __init__(self, max_devices: int) -> None:
        self.max_devices = max_devices
        self.rings: dict[str, Ring] = {}

    def add(self, device_id: str, at: float, sample: Mapping[str, Any]) -> None:
        ring = self.rings.get(device_id)
        if ring is None:
            if len(self.rings) >= self.max_devices:
                return
            ring = self.rings[device_id] = Ring()
        ring.add(at, percents(sample))

    def series(self, device_id: str, now: float) -> tuple[float, dict[str, list[float | None]]] | None:
        ring = self.rings.get(device_id)
        return None if ring is None else ring.series(now)

    def forget(self, device_id: str) -> None:
        self.rings.pop(device_id, None)
