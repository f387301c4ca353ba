"""Remote operations on one device, and its metrics (docs/topics.md, "Remote operations").

A device has no inbound port, so a client reaches it through the broker: it publishes a
:class:`~.models.Request` (QoS 1, never retained) on ``tether/v1/devices/{id}/requests``
whose ``command`` is one of the :data:`DeviceCommand` models below, and the agent answers
on the request's ``reply_to`` (which must be a ``tether/v1/clients/{client_id}/replies``
topic; the agent publishes nowhere else) with a :class:`DeviceReply`.

Most commands get one reply. ``logs`` with ``follow`` gets a stream: successive replies
with the request's ``id``, ``more: true`` and an increasing ``seq`` (QoS 1 may duplicate:
drop a ``seq`` already seen), each carrying a :class:`LogChunk`, and a last one with
``more: false`` carrying a :class:`StreamEnd` (or ``ok: false`` and an ``error``). A stream
is a lease: it ends after ``duration`` seconds unless the client extends it with a
``stream`` command (``action: extend``); ``action: cancel`` ends it at once. While a stream
has nothing to say it sends an empty chunk every :data:`HEARTBEAT_S` seconds, so a client
can tell a quiet service from a device that went away.

Metrics: the agent publishes a :class:`MetricsSample` (QoS 0, not retained) on
``tether/v1/devices/{id}/metrics``: a full sample at most every ``metrics_full_interval``
seconds, and in between only the fields that moved beyond its threshold.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter

from .models import NAME_PATTERN, Message, Reply, WireModel

MAX_TAIL = 10_000
"""Most lines one ``logs`` request may ask for."""
MAX_LOG_BYTES = 512 * 1024
"""Most bytes of log text in one reply; older output beyond this is cut (``truncated``)."""
DEFAULT_STREAM_S = 60.0
"""How long a stream lasts unless extended."""
MAX_STREAM_S = 3600.0
"""Longest lease a ``logs`` follow or a ``stream`` extension may ask for."""
MAX_LIVE_S = 300.0
"""Longest ``metrics.live`` period."""
LIVE_INTERVAL_S = 1.0
"""Seconds between live samples."""
HEARTBEAT_S = 10.0
"""A stream with nothing to send sends an empty chunk this often."""
CHUNK_BYTES = 32 * 1024
"""Most bytes of text in one stream chunk."""


# --- commands (the ``command`` map of a Request on .../requests) --------------------------


class LogsCommand(WireModel):
    """Output of a stack's services (or one service): the last ``tail`` lines, or all
    (``tail: null``, up to :data:`MAX_LOG_BYTES`), written in the last ``since`` seconds
    (on the device's clock; ``null``: any time); with ``follow``, then what they write
    until the stream ends."""

    kind: Literal["logs"] = "logs"
    stack: str = Field(pattern=NAME_PATTERN)
    service: str | None = Field(default=None, pattern=NAME_PATTERN)
    tail: int | None = Field(default=100, ge=0, le=MAX_TAIL)
    since: float | None = Field(default=None, gt=0)
    follow: bool = False
    duration: float = Field(default=DEFAULT_STREAM_S, gt=0, le=MAX_STREAM_S)


class RestartCommand(WireModel):
    """Replace the running instances of a stack (or one of its services) with new ones."""

    kind: Literal["restart"] = "restart"
    stack: str = Field(pattern=NAME_PATTERN)
    service: str | None = Field(default=None, pattern=NAME_PATTERN)


class FactsCommand(WireModel):
    """What the device is: OS, CPU, memory, disk, Docker version, addresses (:class:`HostFacts`)."""

    kind: Literal["facts"] = "facts"


class MetricsLiveCommand(WireModel):
    """Publish a full sample every :data:`LIVE_INTERVAL_S` for ``duration`` seconds (a
    later request extends the period; it never shortens it)."""

    kind: Literal["metrics.live"] = "metrics.live"
    duration: float = Field(default=30.0, gt=0, le=MAX_LIVE_S)


class StreamCommand(WireModel):
    """Extend (to ``duration`` seconds from now) or cancel the stream of request ``request_id``.
    Only the client the stream replies to can control it (same ``reply_to``)."""

    kind: Literal["stream"] = "stream"
    request_id: str = Field(min_length=1, max_length=128)
    action: Literal["extend", "cancel"]
    duration: float = Field(default=DEFAULT_STREAM_S, gt=0, le=MAX_STREAM_S)


DeviceCommand = Annotated[
    LogsCommand | RestartCommand | FactsCommand | MetricsLiveCommand | StreamCommand,
    Field(discriminator="kind"),
]
# Built on first use (see WireModel): only the agent validates an arbitrary device command.
DEVICE_COMMAND_ADAPTER: TypeAdapter[Any] = TypeAdapter(DeviceCommand, config=ConfigDict(defer_build=True))


# --- replies --------------------------------------------------------------------------------


class DeviceReply(Reply):
    """A :class:`~.models.Reply` that may be one message of a stream (``more``, ``seq``)."""

    more: bool = False
    seq: int = Field(default=0, ge=0)


class LogText(WireModel):
    """The output of one service."""

    service: str
    text: str


class LogsResult(WireModel):
    """Result of ``logs`` without ``follow``; services in the stack's start order."""

    logs: tuple[LogText, ...] = ()
    truncated: bool = False


class LogChunk(WireModel):
    """One message of a ``logs`` stream: text a service wrote (``service`` None and ``text``
    empty: a heartbeat). The stream's first message is such an empty chunk that lists the
    ``services`` followed."""

    service: str | None = None
    text: str = ""
    services: tuple[str, ...] | None = None


StreamEndReason = Literal["duration", "cancelled", "exited", "stopped"]


class StreamEnd(WireModel):
    """The last message of a stream: ``duration`` (the lease ran out), ``cancelled``,
    ``exited`` (every followed instance stopped), ``stopped`` (the agent is shutting down)."""

    end: StreamEndReason
    dropped: int = 0
    """Bytes of output left out because the service wrote faster than the stream may send."""


class RestartedService(WireModel):
    """One service of a ``restart``: the instance it had and the one it has now."""

    service: str
    old: str | None = None
    new: str | None = None
    error: str | None = None


class RestartResult(WireModel):
    stack: str
    services: tuple[RestartedService, ...] = ()


class HostFacts(WireModel):
    """Result of ``facts``: read from /proc, ``os.statvfs`` and the network interfaces."""

    hostname: str
    os: str
    kernel: str
    arch: str
    cpu_count: int | None = None
    cpu_model: str | None = None
    memory_total: int | None = None
    memory_available: int | None = None
    disk_path: str = ""
    """The agent's data directory: ``disk_*`` are of the filesystem holding it."""
    disk_total: int | None = None
    disk_free: int | None = None
    docker_version: str | None = None
    """The Docker engine's version, with the docker driver."""
    addresses: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    """Interface name to its IPv4 and IPv6 addresses (loopback left out)."""
    uptime_s: float | None = None
    agent_version: str = ""
    driver: str = ""
    at: float = 0.0


class LiveResult(WireModel):
    """Result of ``metrics.live``: live samples go out until ``until`` (device clock)."""

    interval: float = LIVE_INTERVAL_S
    until: float


# --- metrics --------------------------------------------------------------------------------

ContainerUsage = tuple[float | None, int | None]
"""(CPU %, memory bytes) of one service instance; CPU % of the whole device (all CPUs)."""


class MetricsSample(Message):
    """Payload of ``tether/v1/devices/{id}/metrics`` (QoS 0, not retained, fields that are
    None left out on the wire).

    ``full``: every field is present. Otherwise only those that moved beyond the device's
    threshold since it last sent them are; the others keep the value last sent.
    ``containers``, when present, is complete (a service missing from it has stopped).
    """

    at: float
    full: bool = False
    cpu: float | None = None
    """CPU busy, % of all CPUs, since the previous sample."""
    mem: int | None = None
    """Memory in use (total - available), bytes."""
    mem_total: int | None = None
    disk: int | None = None
    """Bytes used on the filesystem of the agent's data directory."""
    disk_total: int | None = None
    containers: dict[str, ContainerUsage] | None = None
    """``"stack/service"`` to (CPU %, memory bytes)."""


SAMPLE_FIELDS = ("cpu", "mem", "mem_total", "disk", "disk_total", "containers")


def merge_sample(latest: dict[str, Any] | None, sample: MetricsSample, received: float) -> dict[str, Any]:
    """What a receiver knows after ``sample``: a full sample replaces, a partial one updates. Pure."""
    merged: dict[str, Any] = {} if sample.full or latest is None else dict(latest)
    for name in SAMPLE_FIELDS:
        value = getattr(sample, name)
        if value is not None:
            merged[name] = {k: list(v) for k, v in value.items()} if name == "containers" else value
        else:
            merged.setdefault(name, None)
    merged["at"] = sample.at
    merged["received"] = received
    if sample.full:
        merged["full_at"] = sample.at
    else:
        merged.setdefault("full_at", None)
    return merged
