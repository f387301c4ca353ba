"""Each device's recent usage, downsampled, in memory (the dashboard's charts; ``devices.metrics``).

Pure: no I/O, no clock of its own (the caller passes the controller's receive time). Per device
a fixed-size ring of ``SLOTS`` buckets of ``STEP_S`` seconds (6 hours of 5-minute points), three
series (CPU %, memory in use % of total, disk in use % of total), each point the mean of the
samples received in its bucket, stored as one byte in half percents (``NONE``: no sample in that
bucket); the latest bucket's sums are kept exactly (8-byte floats), so that a bucket of many
samples (``devices top --follow`` asks for one a second) averages without rounding drift.
Every device's rings live in a few flat arrays (a slot each; a forgotten device's slot is
reused), so a device costs about 300 bytes, the same after a year.
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
NONE = 255
SCALE = 2  # half percents
WIDTH = SLOTS * len(SERIES)  # bytes of one device's points


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


class MetricsHistory:
    """Every device's ring (``max_devices`` at most: metrics topics are device-writable)."""

    def __init__(self, max_devices: int) -> None:
        self.max_devices = max_devices
        self.rings: dict[str, int] = {}  # device to its slot
        self._free: list[int] = []
        self._points = bytearray()  # WIDTH bytes a slot: bucket b's series i at (b % SLOTS) * 3 + i
        self._bucket = array("q")  # a slot's latest bucket (seconds // STEP_S)
        self._sums = array("d")  # its latest bucket's sum per series
        self._counts = array("L")  # its latest bucket's samples per series

    def add(self, device_id: str, at: float, sample: Mapping[str, Any]) -> None:
        """Count ``sample`` received at ``at`` (seconds); one older than the latest bucket is dropped."""
        slot = self.rings.get(device_id)
        if slot is None:
            if len(self.rings) >= self.max_devices:
                return
            slot = self.rings[device_id] = self._allocate()
        self._add(slot, at, percents(sample))

    def _allocate(self) -> int:
        if self._free:
            slot = self._free.pop()
            self._points[slot * WIDTH : (slot + 1) * WIDTH] = bytes([NONE]) * WIDTH
            self._bucket[slot] = -1
            return slot
        self._points += bytes([NONE]) * WIDTH
        self._bucket.append(-1)
        self._sums.extend((0.0,) * len(SERIES))
        self._counts.extend((0,) * len(SERIES))
        return len(self._bucket) - 1

    def _add(self, slot: int, at: float, values: tuple[float | None, ...]) -> None:
        bucket, latest = int(at // STEP_S), self._bucket[slot]
        if bucket < latest:
            return
        n = len(SERIES)
        if bucket > latest:
            for b in range(max(latest + 1, bucket - SLOTS + 1), bucket + 1):
                start = slot * WIDTH + (b % SLOTS) * n
                self._points[start : start + n] = bytes([NONE]) * n
            self._bucket[slot] = bucket
            for i in range(n):
                self._sums[slot * n + i], self._counts[slot * n + i] = 0.0, 0
        for i, value in enumerate(values):
            if value is None:
                continue
            j = slot * n + i
            self._sums[j] += min(100.0, max(0.0, value))
            self._counts[j] += 1
            self._points[slot * WIDTH + (bucket % SLOTS) * n + i] = round(
                self._sums[j] / self._counts[j] * SCALE
            )

    def series(self, device_id: str, now: float) -> tuple[float, dict[str, list[float | None]]] | None:
        """The start of the oldest point and each series' ``SLOTS`` points ending at ``now``'s
        bucket, oldest first (None: no sample; a point carried over at most ``CARRY`` buckets);
        None for a device without a ring."""
        slot = self.rings.get(device_id)
        if slot is None:
            return None
        latest, n = self._bucket[slot], len(SERIES)
        last = int(now // STEP_S)
        first = last - SLOTS + 1
        out: dict[str, list[float | None]] = {name: [] for name in SERIES}
        for i, name in enumerate(SERIES):
            held: float | None = None
            age = 0
            for b in range(first - CARRY, last + 1):
                kept = latest - SLOTS < b <= latest
                raw = self._points[slot * WIDTH + (b % SLOTS) * n + i] if kept else NONE
                if raw != NONE:
                    held, age = raw / SCALE, 0
                else:
                    age += 1
                if b >= first:
                    out[name].append(held if age <= CARRY else None)
        return float(first * STEP_S), out

    def forget(self, device_id: str) -> None:
        slot = self.rings.pop(device_id, None)
        if slot is not None:
            self._free.append(slot)
