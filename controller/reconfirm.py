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
agents answer it too, if only with a refusal). One that does neither within its allowance
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

__all__ = ["Reconfirm"]


class Reconfirm:
    """Devices waiting to show life since the controller reconnected, and the requests asking them."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[int, float]] = {}  # device -> (session shown online, deadline)
        self._asked: dict[str, str] = {}  # request id -> device

    def __len__(self) -> int:
        return len(self._waiting)

    def start(self, devices: Iterable[tuple[str, int, float]]) -> list[tuple[str, str]]:
        """Wait for ``(device, session, deadline)`` (what was waited for before is dropped);
        the ``(request id, device)`` pairs to ask."""
        self._waiting = {device: (session, deadline) for device, session, deadline in devices}
        self._asked = {uuid.uuid4().hex: device for device in self._waiting}
        return list(self._asked.items())

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
        return True

    def due(self, now: float) -> list[tuple[str, int]]:
        """``(device, session)`` of the devices whose allowance ran out (forgotten from now on)."""
        expired = [(d, session) for d, (session, deadline) in self._waiting.items() if now >= deadline]
        for device, _ in expired:
            del self._waiting[device]
        if not self._waiting:
            self._asked = {}
        return expired
