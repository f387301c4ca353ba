"""Following a service's logs over the device API (docs/topics.md, "Remote operations"): the
one state machine behind ``tether logs -f`` and the dashboard's log page.

Pure: :class:`LogFollower` is told the time, each reply to its ``logs`` request and each
silence, and answers with what happened (:class:`Output`, :class:`Ended`, :class:`Failed`)
and what to send the device now (:meth:`LogFollower.due`: the lease's extension every third
of :data:`LEASE_S`, or the cancel when ``limit_s`` is up). The I/O around it, one request
session, is :class:`tether.protocol.client.LogStream`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .device_api import DeviceReply, StreamCommand

LEASE_S = 60.0
"""Seconds a stream lasts unless extended; a follower extends it every third of that."""


@dataclass(frozen=True)
class Output:
    """One message of the stream: the device's ``result`` (``text`` of a ``service``; the first
    one names the ``services`` followed)."""

    result: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return str(self.result.get("text") or "")

    @property
    def service(self) -> str:
        return str(self.result.get("service") or "")

    @property
    def services(self) -> list[str] | None:
        found = self.result.get("services")
        return [str(name) for name in found] if isinstance(found, list) else None


@dataclass(frozen=True)
class Ended:
    """The stream's last message (``result``: ``end``, the reason, and maybe ``dropped``); an
    empty ``result`` if it was ``cancelled`` and the device's last word never came."""

    result: dict[str, Any]
    cancelled: bool

    @property
    def reason(self) -> str:
        return str(self.result.get("end") or "ended")


@dataclass(frozen=True)
class Failed:
    """The device refused the stream (``timeout`` False) or went silent (``timeout`` True)."""

    message: str
    timeout: bool


Event = Output | Ended | Failed


class LogFollower:
    """One ``logs`` follow (request ``request_id`` to ``device_id``, sent at ``now``).

    ``answer_s``: how long the first message (and, once cancelled, the last) may take;
    ``idle_s``: the longest silence after it (the device sends a heartbeat meanwhile);
    ``limit_s``: cancel the stream after that long (None: never)."""

    def __init__(
        self,
        device_id: str,
        request_id: str,
        now: float,
        *,
        answer_s: float,
        idle_s: float,
        limit_s: float | None = None,
    ) -> None:
        self.device_id = device_id
        self.request_id = request_id
        self.answer_s, self.idle_s, self.limit_s = answer_s, idle_s, limit_s
        self.started = self.heard = now
        self.renew_at = now + LEASE_S / 3
        self.seen = 0
        self.first = True
        self.cancelled = False

    def due(self, now: float) -> StreamCommand | None:
        """What to send the device now (its reply is not awaited: the stream's own messages
        say whether it goes on), or None."""
        if self.cancelled:
            return None
        if self.limit_s is not None and now - self.started >= self.limit_s:
            self.cancelled = True
            return StreamCommand(request_id=self.request_id, action="cancel")
        if now >= self.renew_at:
            self.renew_at = now + LEASE_S / 3
            return StreamCommand(request_id=self.request_id, action="extend", duration=LEASE_S)
        return None

    def silence(self, now: float) -> Ended | Failed | None:
        """Nothing came: whether the follow is over (None: wait on)."""
        silent = now - self.heard
        if self.cancelled and silent >= self.answer_s:
            return Ended({}, cancelled=True)  # the device's last word got lost
        if self.first and silent >= self.answer_s:
            return Failed(f"device {self.device_id} did not answer within {self.answer_s:g}s", timeout=True)
        if silent >= self.idle_s:
            return Failed(
                f"device {self.device_id} stopped answering (nothing for {self.idle_s:g}s)", timeout=True
            )
        return None

    def take(self, reply: DeviceReply, now: float) -> Event | None:
        """A reply came: what it says (None: another request's, or a duplicate)."""
        if reply.id != self.request_id:
            return None
        self.heard = now
        self.first = False
        # Stream messages count from 1; a refusal (unknown stack or service, ...) is a plain
        # reply, seq 0, and ends the follow like any other error.
        if reply.seq and reply.seq <= self.seen:
            return None  # a duplicate (QoS 1)
        self.seen = max(self.seen, reply.seq)
        if not reply.ok:
            return Failed(reply.error or "the log stream failed", timeout=False)
        result = reply.result if isinstance(reply.result, dict) else {}
        if not reply.more:
            return Ended(result, cancelled=self.cancelled)
        return Output(result)
