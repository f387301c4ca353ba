"""Presence the broker may no longer vouch for, after the controller's connection to it broke.

A device's ``online`` presence is retained, and its ``offline`` last will keeps it true: but
only while the broker that holds the will keeps running. A broker that restarts (Mosquitto
after a crash, from its persistence file) restores every retained ``online`` and none of the
connections: a device that died meanwhile, or cannot reach it again, stays ``online`` there
for good, and no will is ever published for it.

The controller's own connection breaks whenever the broker restarts, so after it reconnects
every device shown online must show life again: a presence of a newer session (an agent
publishes one on every connection) or an answer to a ``facts`` request the controller sends
it (which a device still connected to a broker that did *not* restart answers at once; old
agents answer it too, if only with a refusal). In a broker restart most of a fleet
reconnects on its own within seconds, and asking 10,000 devices at that moment is wasted
work (requests, then replies carrying facts): devices are asked only once no device has
shown life for :data:`GRACE_S` (the storm is over), at the latest half-way through the
shortest allowance, and only those still silent, at most :data:`ASK_CHUNK` a tick. One that does neither within its allowance
(the broker's 1.5 x keepalive for a dead link plus the agent's longest reconnect backoff)
gets the will the broker lost: the controller publishes its ``offline`` presence (retained,
the same session), which the controller then handles like any will. An agent that is in
fact connected publishes ``online`` again when it sees it (agents before this one: at their
next connection).

Pure bookkeeping: :class:`~.ingesting.Ingestor` does the I/O.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

__all__ = ["ASK_CHUNK", "GRACE_S", "Reconfirm"]

GRACE_S = 5.0
"""How long no device must have shown life (none is reconnecting any more) before the silent
ones are asked."""
ASK_CHUNK = 1000
"""Devices asked per tick at most: 10,000 are asked within 10 s, the requests and their
answers spread out rather than all queued at once."""


class Reconfirm:
    """Devices waiting to show life since the controller reconnected, and the requests asking them."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[int, float]] = {}  # device -> (session shown online, deadline)
        self._unasked: list[str] = []  # devices to ask (if still waiting), in order, from _ask_from
        self._quiet_since = 0.0  # when the number waited for last changed (before asking)
        self._latest = 0.0  # when asking starts at the latest
        self._left = 0
        self._asking = False
        self._asked: dict[str, str] = {}  # request id -> device

    def __len__(self) -> int:
        return len(self._waiting)

    def start(self, devices: Iterable[tuple[str, int, float]], now: float) -> int:
        """Wait for ``(device, session, deadline)`` (what was waited for before is dropped);
        those still silent once no device showed life for :data:`GRACE_S` are to be asked
        (:meth:`asks`), at the latest half-way to the earliest deadline. Returns how many
        are waited for."""
        self._waiting = {device: (session, deadline) for device, session, deadline in devices}
        self._unasked = list(reversed(self._waiting))  # popped from the end: asked in order
        self._quiet_since = now
        earliest = min((deadline for _, deadline in self._waiting.values()), default=now)
        self._latest = now + max(0.0, earliest - now) / 2
        self._left = len(self._waiting)
        self._asking = False
        self._asked = {}
        return len(self._waiting)

    def asks(self, now: float, limit: int = ASK_CHUNK) -> list[tuple[str, str]]:
        """The next ``(request id, device)`` pairs to ask, at most ``limit``: devices still
        waited for once none showed life for :data:`GRACE_S` (none before). Called every tick:
        a device heard from between two calls restarts the grace."""
        if not self._asking:
            if len(self._waiting) != self._left:  # some showed life since the last look
                self._left = len(self._waiting)
                self._quiet_since = now
            if now < min(self._quiet_since + GRACE_S, self._latest):
                return []
            self._asking = True
        out: list[tuple[str, str]] = []
        while self._unasked and len(out) < limit:
            device = self._unasked.pop()
            if device in self._waiting:
                request_id = uuid.uuid4().hex
                self._asked[request_id] = device
                out.append((request_id, device))
        return out

    def heard(self, device_id: str, session: int) -> bool:
        """A presence of ``session``: life if it is newer than the one shown online. True
        when that was the last device waited for."""
        waiting = self._waiting.get(device_id)
        if waiting is None or session <= waiting[0]:
            return False
        del self._waiting[device_id]
        return self._done()

    def answered(self, request_id: str) -> bool:
        """An answer to request ``request_id``: its device is connected now. True when that
        was the last device waited for."""
        device = self._asked.pop(request_id, None)
        if device is None or self._waiting.pop(device, None) is None:
            return False
        return self._done()

    def _done(self) -> bool:
        if self._waiting:
            return False
        self._asked = {}
        self._unasked = []
        return True

    def due(self, now: float) -> list[tuple[str, int]]:
        """``(device, session)`` of the devices whose allowance ran out (forgotten from now on)."""
        expired = [(d, session) for d, (session, deadline) in self._waiting.items() if now >= deadline]
        for device, _ in expired:
            del self._waiting[device]
        if not self._waiting:
            self._asked = {}
            self._unasked = []
        return expired
