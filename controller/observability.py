"""Operations: JSON logs and Prometheus metrics (served over HTTP by controller/http/).

``tether up --http 127.0.0.1:9100`` serves:

    /healthz   200 while the process runs (liveness)
    /readyz    200 once connected to the broker and the store answers, else 503 (readiness)
    /install.sh, /agent/..., /ca.pem, /wheels/   the device install (agent_install.py)
    /metrics   Prometheus text format: devices by presence, stacks, deployments by state, leadership,
               messages received by kind (and merged in the inbox), device messages dropped or trimmed by reason, requests by
               command and outcome, job runs by outcome, each device's CPU, memory and disk
               (DEVICE_GAUGES: one series per device and resource, no per-service series),
               login lockouts begun by door (http, mqtt on the embedded broker)

Gauges that need the store (devices, stacks) are refreshed by the controller's worker
thread every :data:`REFRESH_SECONDS`, so the HTTP thread never touches the database.
(The HTTP server itself: controller/http/, the JSON API beside these, see app.py there.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    pass

REFRESH_SECONDS = 15.0


# Per-device resource gauges, from the latest sample each agent sent (tether devices top):
# (metric, help, sample field, scale). Base units, as Prometheus' conventions ask: bytes, and
# CPU as a ratio (0-1). Labelled by `device` only: one series per device and resource (5 x the
# fleet: 50,000 series for 10,000 devices, scraped from memory). Per-service usage is left out
# on purpose: devices x services series would grow with every stack deployed; `tether devices
# top DEVICE` shows it. A device that sent no sample yet has no series.
DEVICE_GAUGES = (
    ("tether_device_cpu_ratio", "CPU busy, all CPUs, 0-1, as last reported", "cpu", 0.01),
    ("tether_device_memory_used_bytes", "Memory in use (total - available), as last reported", "mem", 1),
    ("tether_device_memory_bytes", "Memory of the device", "mem_total", 1),
    (
        "tether_device_disk_used_bytes",
        "Bytes used on the agent's data file system, as last reported",
        "disk",
        1,
    ),
    ("tether_device_disk_bytes", "Size of the agent's data file system", "disk_total", 1),
)


class DeviceCollector(Collector):
    """The per-device gauges, read at scrape time from the controller's in-memory samples."""

    def __init__(self, samples: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.samples = samples

    def collect(self) -> Iterator[Metric]:
        samples = dict(self.samples())  # a copy: the worker thread keeps updating the original
        for name, help_text, field, scale in DEVICE_GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=["device"])
            for device, sample in sorted(samples.items()):
                value = sample.get(field)
                if isinstance(value, int | float):
                    family.add_metric([device], value * scale)
            yield family


class LockoutCollector(Collector):
    """``tether_login_lockouts_total`` by door (http, mqtt): lockouts begun after failed logins
    (protocol/lockout.py), read at scrape time; a door whose count is unknown has no sample."""

    def __init__(self) -> None:
        self.doors: dict[str, Callable[[], int | None]] = {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "tether_login_lockouts", "Logins locked out after repeated failures, by door", labels=["door"]
        )
        for door, count in sorted(self.doors.items()):
            value = count()
            if value is not None:
                family.add_metric([door], value)
        yield family


class Metrics:
    """The controller's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.devices = Gauge("tether_devices", "Devices by presence", ["presence"], registry=self.registry)
        self.stacks = Gauge("tether_stacks", "Stacks deployed", registry=self.registry)
        self.leader = Gauge("tether_leader", "1 if this controller leads", registry=self.registry)
        self.deployments = Gauge(
            "tether_deployments",
            "Latest deployment of each stack (removed stacks not counted), by state",
            ["state"],
            registry=self.registry,
        )
        self.messages = Counter(
            "tether_messages_received", "MQTT messages received", ["kind"], registry=self.registry
        )
        self.merged = Counter(
            "tether_inbox_merged",
            "Device messages merged into a newer one of the same device while both waited (controller/inbox.py)",
            ["kind"],
            registry=self.registry,
        )
        self.dropped = Counter(
            "tether_device_messages_dropped",
            "Device messages not stored as sent (trimmed, or results of unknown jobs), by reason",
            ["reason"],
            registry=self.registry,
        )
        self.requests = Counter(
            "tether_requests", "Requests handled", ["command", "outcome"], registry=self.registry
        )
        # By outcome only: job names come and go (one-off runs), devices are many.
        self.job_runs = Counter(
            "tether_job_runs",
            "Job runs reported by devices, by outcome (succeeded, failed, timed_out, skipped)",
            ["outcome"],
            registry=self.registry,
        )
        self.published = Counter(
            "tether_desired_published", "Desired states acknowledged by the broker", registry=self.registry
        )
        self.lockouts = LockoutCollector()
        self.registry.register(self.lockouts)
        self.republished = Counter(
            "tether_desired_republished",
            "Desired states published again to devices that stayed behind (the broker lost them?)",
            registry=self.registry,
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)
