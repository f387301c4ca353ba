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
agents answer it too, if only with a refusal). In a broker restart the whole fleet
reconnects on its own, within the agent's longest backoff, and asking 10,000 devices then
is wasted work (requests, then replies carrying facts; those reconnected by the time they
are asked answer too): so devices are asked only after :data:`ASK_AFTER_S` (at most a third
of the shortest allowance, leaving the rest for the answers), and only those still silent,
at most :data:`ASK_CHUNK` a tick. One that does neither within its allowance
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

from tether.protocol.backoff import Backoff

__all__ = ["ASK_AFTER_S", "ASK_CHUNK", "Reconfirm"]

ASK_AFTER_S = Backoff().cap
"""How long after the reconnection the devices still silent are asked: by then an agent whose
connection broke with the broker's restart has reconnected, unless it cannot."""
ASK_CHUNK = 1000
"""Devices asked per tick at most: 10,000 are asked within 10 s, the requests and their
answers spread out rather than all queued at once."""


class Reconfirm:
    """Devices waiting to show life since the controller reconnected, and the requests asking them."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[int, float]] = {}  # device -> (session shown online, deadline)
        self._unasked: list[str] = []  # devices to ask (if still waiting), in order, from _ask_from
        self._ask_from = 0.0
        self._asked: dict[str, str] = {}  # request id -> device

    def __len__(self) -> int:
        return len(self._waiting)

    def start(self, devices: Iterable[tuple[str, int, float]], now: float) -> int:
        """Wait for ``(device, session, deadline)`` (what was waited for before is dropped);
        those still silent :data:`ASK_AFTER_S` after ``now`` (at most a third of the way to
        the earliest deadline) are to be asked (:meth:`asks`). Returns how many are waited for."""
        self._waiting = {device: (session, deadline) for device, session, deadline in devices}
        self._unasked = list(reversed(self._waiting))  # popped from the end: asked in order
        earliest = min((deadline for _, deadline in self._waiting.values()), default=now)
        self._ask_from = now + min(ASK_AFTER_S, max(0.0, earliest - now) / 3)
        self._asked = {}
        return len(self._waiting)

    def asks(self, now: float, limit: int = ASK_CHUNK) -> list[tuple[str, str]]:
        """The next ``(request id, device)`` pairs to ask, at most ``limit``: devices still
        waited for once the wait is over (none before)."""
        if now < self._ask_from:
            return []
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
