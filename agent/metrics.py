"""Device metrics: sampled off the agent's thread, sent only when they moved.

Theory of operation
-------------------
A :class:`Sampler` reads the host's CPU time (``/proc/stat``), memory (``/proc/meminfo``)
and the filesystem of the data directory (``os.statvfs``), and asks the driver for each
service instance's cumulative CPU time and memory (:meth:`Driver.usage`); CPU percentages
are computed from the difference to its previous reading, so they cover the time between
two samples, and are percentages of the whole device (all CPUs).

A :class:`Reporter` decides what to send (pure, clock passed in): a full sample when none
was sent yet, after a failed publish, or when ``full_interval`` has passed since the last
full one; otherwise only the fields that moved beyond ``threshold`` since they were last
*sent* (so a slow drift adds up and is sent once it passes the threshold), or nothing.
:func:`changes` is that comparison:

* CPU: more than ``threshold`` percentage points;
* memory and disk in use: more than ``threshold`` % of the total;
* totals: any change;
* per-instance usage: a service appeared or went, or one's CPU moved more than
  ``threshold`` points or its memory more than ``threshold`` % of the device's memory.

:class:`MetricsLoop` runs a sampler and a reporter on its own thread every ``interval``
seconds and publishes on ``tether/v1/devices/{id}/metrics`` at QoS 0 (a lost sample is
made good by the next full one). :class:`LiveMetrics` publishes a full sample every second
while someone asks for it (``metrics.live``). Both publish through the MQTT client, whose
``publish`` is thread-safe; neither touches the agent core.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tether.protocol import codec
from tether.protocol.device_api import LIVE_INTERVAL_S, ContainerUsage, MetricsSample

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, int, bool], bool]
Usage = Callable[[], dict[str, tuple[float | None, int | None]]]
"""``"stack/service"`` to (cumulative CPU seconds, memory bytes) of each running instance."""

FIRST_SAMPLE_S = 1.0
"""The first sample after start covers this long, so a device reports soon after it starts."""


# --- reading the host -----------------------------------------------------------------------


def read_meminfo(proc: str = "/proc") -> dict[str, int]:
    """``/proc/meminfo`` in bytes (empty if unreadable)."""
    out: dict[str, int] = {}
    try:
        with open(f"{proc}/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


def memory(proc: str = "/proc") -> tuple[int | None, int | None]:
    """(total, available) bytes."""
    info = read_meminfo(proc)
    total = info.get("MemTotal")
    available = info.get("MemAvailable", info.get("MemFree"))
    return total, available


def cpu_times(proc: str = "/proc") -> tuple[int, int] | None:
    """(total, idle) jiffies of all CPUs since boot, from the first line of ``/proc/stat``."""
    try:
        with open(f"{proc}/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    values += [0] * (8 - len(values))
    return sum(values), values[3] + values[4]


def disk(path: Path | str) -> tuple[int | None, int | None, int | None]:
    """(total, used, free for unprivileged users) bytes of the filesystem holding ``path``."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None, None, None
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize


def cpu_count() -> int:
    return os.cpu_count() or 1


# --- what to send (pure) --------------------------------------------------------------------


@dataclass(frozen=True)
class Values:
    """One reading of the device. None: unknown (not readable here)."""

    cpu: float | None = None
    mem: int | None = None
    mem_total: int | None = None
    disk: int | None = None
    disk_total: int | None = None
    containers: dict[str, ContainerUsage] | None = None


def _moved(old: float | None, new: float | None, scale: float | None, threshold: float) -> bool:
    """Whether ``new`` differs from ``old`` by more than ``threshold`` % of ``scale``."""
    if new is None:
        return False  # unknown now: keep what was sent
    if old is None:
        return True
    if not scale:
        return new != old
    return abs(new - old) * 100.0 / scale > threshold


def changes(sent: Values | None, now: Values, threshold: float) -> set[str]:
    """The fields of ``now`` to send, given what was last sent (pure). See the module docstring."""
    if sent is None:
        return {name for name in Values.__dataclass_fields__ if getattr(now, name) is not None}
    out = set()
    mem_scale = now.mem_total or sent.mem_total
    if _moved(sent.cpu, now.cpu, 100.0, threshold):
        out.add("cpu")
    if _moved(sent.mem, now.mem, mem_scale, threshold):
        out.add("mem")
    if _moved(sent.disk, now.disk, now.disk_total or sent.disk_total, threshold):
        out.add("disk")
    for total in ("mem_total", "disk_total"):
        if getattr(now, total) is not None and getattr(now, total) != getattr(sent, total):
            out.add(total)
    if now.containers is not None:
        before = sent.containers
        if before is None or set(before) != set(now.containers):
            out.add("containers")
        else:
            for key, (cpu, mem) in now.containers.items():
                old_cpu, old_mem = before[key]
                if _moved(old_cpu, cpu, 100.0, threshold) or _moved(old_mem, mem, mem_scale, threshold):
                    out.add("containers")
                    break
    return out


class Reporter:
    """Decides which samples to send: full ones at most ``full_interval`` apart, deltas between."""

    def __init__(self, threshold: float, full_interval: float) -> None:
        self.threshold = threshold
        self.full_interval = full_interval
        self.sent: Values | None = None
        self.last_full: float | None = None

    def decide(self, values: Values, at: float, now: float) -> MetricsSample | None:
        """The sample to publish for ``values`` (taken at wall time ``at``; ``now`` monotonic), or None."""
        if self.sent is None or self.last_full is None or now - self.last_full >= self.full_interval:
            self.sent = values
            self.last_full = now
            return _sample(values, set(Values.__dataclass_fields__), at, full=True)
        names = changes(self.sent, values, self.threshold)
        if not names:
            return None
        self.sent = replace(self.sent, **{name: getattr(values, name) for name in names})
        return _sample(values, names, at, full=False)

    def forget(self) -> None:
        """The last sample was not delivered: the next one is full."""
        self.sent = None


def _sample(values: Values, names: set[str], at: float, full: bool) -> MetricsSample:
    fields: dict[str, object] = {name: getattr(values, name) for name in names}
    if fields.get("cpu") is not None:
        fields["cpu"] = round(float(values.cpu or 0.0), 1)
    return MetricsSample(at=round(at, 3), full=full, **fields)


def full_sample(values: Values, at: float) -> MetricsSample:
    return _sample(values, set(Values.__dataclass_fields__), at, full=True)


# --- sampling -------------------------------------------------------------------------------


class Sampler:
    """Reads the host and the driver; CPU % over the time since its previous reading."""

    def __init__(
        self,
        data_dir: Path,
        usage: Usage | None = None,
        *,
        proc: str = "/proc",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.data_dir = data_dir
        self.usage = usage
        self.proc = proc
        self.clock = clock
        self.cpus = cpu_count()
        self._host = cpu_times(proc)
        self._containers: dict[str, tuple[float | None, float]] = {}
        self._read_containers()

    def _read_containers(self) -> dict[str, ContainerUsage] | None:
        if self.usage is None:
            return None
        try:
            usage = self.usage()
        except Exception as exc:  # noqa: BLE001 - a driver failing to report must not stop metrics
            log.debug("instance usage unavailable: %s", exc)
            return None
        now = self.clock()
        out: dict[str, ContainerUsage] = {}
        previous = self._containers
        self._containers = {}
        for key, (cpu_seconds, mem) in sorted(usage.items()):
            self._containers[key] = (cpu_seconds, now)
            percent = None
            before = previous.get(key)
            if cpu_seconds is not None and before is not None and before[0] is not None:
                elapsed = now - before[1]
                if elapsed > 0:
                    percent = round(max(0.0, cpu_seconds - before[0]) * 100.0 / (elapsed * self.cpus), 1)
            out[key] = (percent, mem)
        return out

    def sample(self) -> Values:
        cpu = None
        times = cpu_times(self.proc)
        if times is not None and self._host is not None:
            total = times[0] - self._host[0]
            idle = times[1] - self._host[1]
            if total > 0:
                cpu = round(max(0.0, min(100.0, (total - idle) * 100.0 / total)), 1)
        if times is not None:
            self._host = times
        mem_total, available = memory(self.proc)
        disk_total, disk_used, _free = disk(self.data_dir)
        return Values(
            cpu=cpu,
            mem=mem_total - available if mem_total is not None and available is not None else None,
            mem_total=mem_total,
            disk=disk_used,
            disk_total=disk_total,
            containers=self._read_containers(),
        )


# --- publishing threads ---------------------------------------------------------------------


class MetricsLoop:
    """Samples every ``interval`` seconds on its own thread and publishes what the reporter says."""

    def __init__(
        self,
        topic: str,
        publish: Publish,
        sampler: Callable[[], Sampler],
        *,
        interval: float,
        full_interval: float,
        threshold: float,
    ) -> None:
        self.topic = topic
        self.publish = publish
        self.make_sampler = sampler
        self.interval = interval
        self.reporter = Reporter(threshold, full_interval)
        self.stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval <= 0:
            return
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        sampler = self.make_sampler()
        delay = min(self.interval, FIRST_SAMPLE_S)
        while not self.stopped.wait(delay):
            started = time.monotonic()
            try:
                sample = self.reporter.decide(sampler.sample(), time.time(), time.monotonic())
                if sample is not None and not self.publish(
                    self.topic, codec.encode(sample, compact=True), 0, False
                ):
                    self.reporter.forget()
            except Exception:  # noqa: BLE001 - metrics must never take the agent down
                log.exception("metrics sample failed")
                self.reporter.forget()
            delay = max(0.0, self.interval - (time.monotonic() - started))


class LiveMetrics:
    """Full samples every :data:`LIVE_INTERVAL_S` until a deadline that requests push back."""

    def __init__(self, topic: str, publish: Publish, sampler: Callable[[], Sampler]) -> None:
        self.topic = topic
        self.publish = publish
        self.make_sampler = sampler
        self.until = 0.0
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def extend(self, duration: float) -> float:
        """Publish live samples for at least ``duration`` more seconds; return until when (wall clock)."""
        with self._lock:
            self.until = max(self.until, time.time() + duration)
            if self._thread is None and not self.stopped.is_set():
                self._thread = threading.Thread(target=self._run, name="metrics-live", daemon=True)
                self._thread.start()
            return self.until

    def stop(self) -> None:
        self.stopped.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout=5)

    def _run(self) -> None:
        sampler = self.make_sampler()
        while not self.stopped.wait(LIVE_INTERVAL_S):
            with self._lock:
                if time.time() >= self.until:
                    self._thread = None
                    return
            try:
                sample = full_sample(sampler.sample(), time.time())
                self.publish(self.topic, codec.encode(sample, compact=True), 0, False)
            except Exception:  # noqa: BLE001 - metrics must never take the agent down
                log.exception("live metrics sample failed")
        with self._lock:
            self._thread = None
