"""Fleet events: what changed in the fleet, as it happens, for whoever listens.

The controller's worker thread emits a :class:`FleetEvent` at each real transition it
handles (a device going on- or offline, a report that changes what a device runs, a
deployment that starts or ends, a crash loop, a full disk, a stuck download, a job's
result) on its :class:`EventBus` (``controller.bus``), once the store transaction that
made the change is committed. Subscribers are the HTTP API's server-sent events stream
(``GET /api/v1/events``) and the webhook notifier (:mod:`.notify`); each has a bounded
queue of its own, so a slow one never holds the controller back: when its queue is full
the oldest event is dropped, and the next :meth:`Subscription.get` returns an
``events.lost`` event saying how many were lost (the subscriber must then re-read state).

An event is small and JSON-serialisable (:meth:`FleetEvent.to_json`); it carries ids,
states and short reasons, never secrets, variables' values or whole reports. The kinds and
their ``data`` are documented in docs/architecture.md ("Fleet events") and
docs/notifications.md. Detecting a transition from two reports is pure
(:func:`report_events`, :func:`disk_event`, :func:`deployment_event`).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tether.protocol.heap import MadeOnce, Shared
from tether.protocol.models import DownloadStatus, ReportedState, StackStatus

from .fleet import Seen
from .rollout import Deployment

KINDS = (
    "device.online",
    "device.offline",
    "device.pending",
    "device.changed",
    "device.disk_low",
    "service.crashloop",
    "download.stuck",
    "job.result",
    "deployment.started",
    "deployment.running",
    "deployment.paused",
    "deployment.awaiting_promotion",
    "deployment.staged",
    "deployment.succeeded",
    "deployment.failed",
    "deployment.reverted",
    "deployment.superseded",
)
"""Every kind the controller emits (a subscriber may also get ``events.lost``)."""
LOST = "events.lost"
CRASH_LOOP_RESTARTS = 5
"""Restarts after which the agent reports a service ``failed`` (agent/reconcile.py): a crash loop."""
DISK_LOW = 0.90
"""Used share of the agent's filesystem at which ``device.disk_low`` fires ..."""
DISK_OK = 0.85
"""... and under which it may fire again (hysteresis: a disk hovering at 90% fires once)."""
REASON_CHARS = 300
"""The longest device-supplied text an event carries (it is remote, attacker-controlled text)."""


def clip(text: str | None, limit: int = REASON_CHARS) -> str | None:
    """One line of at most ``limit`` characters (None stays None)."""
    if text is None:
        return None
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def device_subject(device_id: str) -> str:
    return f"devices/{device_id}"


def stack_subject(stack: str) -> str:
    return f"stacks/{stack}"


@dataclass(frozen=True, slots=True)
class FleetEvent:
    """One transition. ``subject``: what it is about, ``devices/{id}`` or ``stacks/{name}``;
    ``at``: the controller's wall clock; ``data``: a small JSON object (per kind);
    ``seq``: numbered by the bus, increasing (0 until emitted)."""

    kind: str
    subject: str
    at: float
    data: dict[str, Any] = field(default_factory=dict)
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "subject": self.subject, "at": self.at, "data": self.data}


class Subscription:
    """A bounded queue of events for one subscriber (see :meth:`EventBus.subscribe`)."""

    def __init__(self, maxsize: int, kinds: Collection[str] | None, clock: Callable[[], float]) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.kinds = frozenset(kinds) if kinds is not None else None
        self._clock = clock
        self._queue: deque[FleetEvent] = deque()
        self._lost = 0
        self._cond = threading.Condition()
        self.closed = False

    def wants(self, event: FleetEvent) -> bool:
        return self.kinds is None or event.kind in self.kinds

    def _put(self, event: FleetEvent) -> None:
        with self._cond:
            if self.closed:
                return
            if len(self._queue) >= self.maxsize:
                self._queue.popleft()
                self._lost += 1
            self._queue.append(event)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> FleetEvent | None:
        """The next event (waiting at most ``timeout`` seconds; None if none came or closed).

        After the queue overflowed, first an ``events.lost`` event (``data.count``: how many
        were dropped, the oldest first), then the events kept."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._queue or self._lost or self.closed, timeout):
                return None
            if self._lost:
                lost, self._lost = self._lost, 0
                return FleetEvent(LOST, "", self._clock(), {"count": lost})
            if self._queue:
                return self._queue.popleft()
            return None

    def drain(self) -> list[FleetEvent]:
        """Every event waiting now (an ``events.lost`` first if some were dropped), without waiting."""
        out = []
        while (event := self.get(timeout=0)) is not None:
            out.append(event)
        return out

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class EventBus:
    """Fans events out to subscribers; thread-safe, never blocks the emitter."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._subscribers: tuple[Subscription, ...] = ()
        self._seq = itertools.count(1)

    @property
    def listening(self) -> bool:
        """Someone subscribed (the controller skips work whose only use is an event)."""
        return bool(self._subscribers)

    def wants(self, kind: str) -> bool:
        """Whether a subscriber would get an event of ``kind`` emitted now."""
        return any(s.kinds is None or kind in s.kinds for s in self._subscribers)

    def subscribe(self, maxsize: int = 1000, kinds: Collection[str] | None = None) -> Subscription:
        """A new subscription to events emitted from now on (of ``kinds``, or all)."""
        sub = Subscription(maxsize, kinds, self._clock)
        with self._lock:
            self._subscribers = (*self._subscribers, sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers = tuple(s for s in self._subscribers if s is not sub)
        sub.close()

    def emit(self, event: FleetEvent) -> FleetEvent:
        """Number ``event`` and queue it for every subscriber that wants it; returns it numbered."""
        with self._lock:
            # Not dataclasses.replace (twice the cost: one event per report of a deploy).
            event = FleetEvent(event.kind, event.subject, event.at, event.data, next(self._seq))
            subscribers = self._subscribers
        for sub in subscribers:
            if sub.wants(event):
                sub._put(event)
        return event


# --- detecting transitions (pure) ---


def _crash_looping(name: str, status: StackStatus) -> Iterator[tuple[str, str, int, str | None]]:
    """(stack, service, restarts, reason) of each of stack ``name``'s services in a crash loop."""
    return (
        (name, svc_name, svc.restarts, clip(svc.last_error))
        for svc_name, svc in status.services.items()
        if svc.state == "failed" and svc.restarts >= CRASH_LOOP_RESTARTS
    )


def _stuck(downloads: dict[str, DownloadStatus]) -> tuple[tuple[str, str, str, str | None], ...]:
    """(stack, spec_hash, state, reason) of every download retrying or failed, sorted."""
    return tuple(
        sorted(
            (n, d.spec_hash, d.state, clip(d.reason))
            for n, d in downloads.items()
            if d.state in ("retrying", "failed")
        )
    )


StacksParts = tuple[tuple[tuple[str, str, str], ...], tuple[tuple[str, str, int, str | None], ...]]


def _make_stacks_parts(stacks: dict[str, StackStatus]) -> StacksParts:
    return (
        tuple(sorted((name, status.spec_hash, status.state) for name, status in stacks.items())),
        tuple(sorted(f for name, status in stacks.items() for f in _crash_looping(name, status))),
    )


_STACKS_PARTS: MadeOnce[dict[str, StackStatus], StacksParts] = MadeOnce(_make_stacks_parts, size=1024)
"""What :meth:`ReportSummary.of` takes of a report's stacks: (name, version, state) of each,
sorted, and every service in a crash loop, sorted. Made once per stacks dict (by identity:
``codec.FieldMemo`` gives the reports of a fleet that report alike the very same dict), not
per report."""


_SUMMARIES: Shared[tuple[Any, ...], ReportSummary] = Shared()
"""One of each equal summary kept (a fleet's devices mostly report alike: 136 bytes per device)."""


@dataclass(frozen=True, slots=True)
class ReportSummary:
    """What of a report events are about (kept per device by the controller: small)."""

    generation: int
    held: bool
    error: str | None
    storage_error: str | None
    stacks: tuple[tuple[str, str, str], ...]
    """(stack, spec_hash, state), sorted."""
    failing: tuple[tuple[str, str, int, str | None], ...]
    """(stack, service, restarts, reason) of every service in a crash loop, sorted."""
    stuck: tuple[tuple[str, str, str, str | None], ...]
    """(stack, spec_hash, state, reason) of every download retrying or failed, sorted."""

    @classmethod
    def of(cls, reported: ReportedState) -> ReportSummary:
        """The summary of ``reported``: one kept per distinct summary (shared: frozen), made
        without building a new one for every report (a deploy brings two per device)."""
        stacks, failing = _STACKS_PARTS.get(reported.stacks) if reported.stacks else ((), ())
        fields = (
            reported.generation,
            reported.held,
            clip(reported.error),
            clip(reported.storage_error),
            stacks,
            failing,
            _stuck(reported.downloads) if reported.downloads else (),
        )
        return _SUMMARIES.get(fields, lambda: cls(*fields))

    @classmethod
    def of_seen(cls, seen: Seen) -> ReportSummary:
        """The summary of the report a device is seen with in the fleet view: the same as
        :meth:`of` that report, without parsing it again (every service in a crash loop has
        restarted, so its stack's status is kept: see :class:`~.fleet.StackSeen`)."""
        stacks = tuple(sorted((n, s.spec_hash, s.state) for n, s in seen.stacks.items()))
        failing = tuple(
            sorted(
                f for n, s in seen.stacks.items() if s.status is not None for f in _crash_looping(n, s.status)
            )
        )
        return cls(
            seen.generation,
            seen.held,
            clip(seen.error),
            clip(seen.storage_error),
            stacks,
            failing,
            _stuck(seen.downloads),
        )

    def changed_from(self, before: ReportSummary | None) -> bool:
        """What a device runs, its health or its errors differ (restart counts alone do not)."""
        if before is None:
            return True
        return (
            self.generation != before.generation
            or self.held != before.held
            or self.error != before.error
            or self.storage_error != before.storage_error
            or self.stacks != before.stacks
            or {f[:2] for f in self.failing} != {f[:2] for f in before.failing}
            or {s[:3] for s in self.stuck} != {s[:3] for s in before.stuck}
        )


def _changed_data(after: ReportSummary) -> dict[str, Any]:
    return {
        "generation": after.generation,
        "stacks": {name: {"spec_hash": h, "state": state} for name, h, state in after.stacks},
        "held": after.held,
        "error": after.error,
    }


_CHANGED: MadeOnce[ReportSummary, dict[str, Any]] = MadeOnce(_changed_data, size=1024)
"""The data of ``device.changed`` of each summary seen lately: all in the summary, which
devices reporting alike share (:meth:`ReportSummary.of`), so one dict for their events (an
event's data is never written to: subscribers and webhooks only read it)."""


class DeviceChanged(NamedTuple):
    """``device.changed`` as :func:`report_events` gives it: a :class:`FleetEvent`'s fields but
    its data, made of ``summary`` when read (:attr:`data`), and the event itself made only
    when it is emitted to someone who wants it (:meth:`made`, :meth:`EventBus.wants`). One
    comes of every report that changed something (two per device and deploy), and mostly
    nobody reads it: no webhook takes the kind, and a fleet event stream is seldom open."""

    kind: str
    device_id: str
    at: float
    summary: ReportSummary
    seq: int = 0

    @property
    def subject(self) -> str:
        return device_subject(self.device_id)

    @property
    def data(self) -> dict[str, Any]:
        return _CHANGED.get(self.summary)

    def made(self) -> FleetEvent:
        return FleetEvent(self.kind, self.subject, self.at, self.data)

    def to_json(self) -> dict[str, Any]:
        return self.made().to_json()


def report_events(
    device_id: str, before: ReportSummary | None, after: ReportSummary, now: float
) -> list[FleetEvent | DeviceChanged]:
    """The events a new report brings (``before``: the device's previous one, None if unknown);
    its ``device.changed`` is a :class:`DeviceChanged` (made when emitted)."""
    if not after.changed_from(before):
        return []
    events: list[FleetEvent | DeviceChanged] = [DeviceChanged("device.changed", device_id, now, after)]
    if not (after.failing or after.stuck or after.storage_error):
        return events  # the common case: nothing else to look for
    subject = device_subject(device_id)
    looping = {f[:2] for f in before.failing} if before else set()
    for stack, service, restarts, reason in after.failing:
        if (stack, service) not in looping:
            events.append(
                FleetEvent(
                    "service.crashloop",
                    subject,
                    now,
                    {"stack": stack, "service": service, "restarts": restarts, "reason": reason},
                )
            )
    stuck = {s[:3] for s in before.stuck} if before else set()
    for stack, spec_hash, state, reason in after.stuck:
        if (stack, spec_hash, state) not in stuck:
            events.append(
                FleetEvent(
                    "download.stuck",
                    subject,
                    now,
                    {"stack": stack, "spec_hash": spec_hash, "state": state, "reason": reason},
                )
            )
    if after.storage_error and (before is None or not before.storage_error):
        events.append(FleetEvent("device.disk_low", subject, now, {"storage_error": after.storage_error}))
    return events


def disk_event(
    device_id: str, low_before: bool, used: int | None, total: int | None, now: float
) -> tuple[bool, FleetEvent | None]:
    """Whether the device's disk counts as low now, and the event if it just became so.

    Low from :data:`DISK_LOW` of the total used; it stays low until under :data:`DISK_OK`."""
    if used is None or not total:
        return low_before, None
    share = used / total
    if low_before:
        return share >= DISK_OK, None
    if share < DISK_LOW:
        return False, None
    data = {"used": used, "total": total, "percent": round(100 * share, 1)}
    return True, FleetEvent("device.disk_low", device_subject(device_id), now, data)


def deployment_event(before: Deployment | None, after: Deployment, now: float) -> FleetEvent | None:
    """``deployment.started`` for a new deployment, ``deployment.{state}`` when its state changed."""
    if before is not None and before.state == after.state:
        return None
    kind = "deployment.started" if before is None else "deployment." + after.state.replace("-", "_")
    data: dict[str, Any] = {
        "id": after.id,
        "stack": after.stack,
        "state": after.state,
        "from_hash": after.from_hash,
        "to_hash": after.to_hash,
        "strategy": after.strategy.kind,
        "devices": len(after.devices),
    }
    if after.message:
        data["message"] = clip(after.message)
    return FleetEvent(kind, stack_subject(after.stack), now, data)


class DueEvents:
    """The fleet events emitted while the worker handles something, held until it is committed
    (the :class:`~.service.Controller` then hands them to its :class:`EventBus`, and drops
    those of a command that failed)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.due: list[FleetEvent | DeviceChanged] = []
        """Emitted, not yet on the bus (changed in place only: the ingestor appends to it)."""

    def emit(self, kind: str, subject: str, data: dict[str, Any]) -> None:
        """Emit a fleet event (one of :data:`KINDS`) once the current change is committed."""
        self.due.append(FleetEvent(kind, subject, self.clock(), data))

    def deployment(self, before: Deployment | None, after: Deployment) -> None:
        """Emit the event of a deployment that started or changed state (none otherwise)."""
        event = deployment_event(before, after, self.clock())
        if event is not None:
            self.due.append(event)

    def take(self) -> list[FleetEvent | DeviceChanged]:
        """The events due, in order; none are due after."""
        due = self.due[:]
        self.due.clear()
        return due
