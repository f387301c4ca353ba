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
of the shortest allowance), and only those still silent, at a pace that grows with their
number (:func:`ask_rate`): all within half of what is then left of the shortest allowance,
the other half left for the answers; no slower than :data:`ASK_RATE_MIN` and no faster than
:data:`ASK_RATE_MAX` a second (the cap protecting the broker and the controller's worker).
Beyond the cap asking outlasts the allowance: a device's lost will then waits until it has
had :data:`ANSWER_S` to answer since its turn to be asked. One that does neither within
its allowance (the broker's 1.5 x keepalive for a dead link plus the agent's longest reconnect backoff)
gets the will the broker lost: the controller publishes its ``offline`` presence (retained,
the same session), which the controller then handles like any will. An agent that is in
fact connected publishes ``online`` again when it sees it (agents before this one: at their
next connection).

None is asked, and no will published, while the controller's inbox holds a burst of messages
(:meth:`~.ingesting.Ingestor.ask_unconfirmed`): the presences that show life may wait in it.

Pure bookkeeping: :class:`~.ingesting.Ingestor` does the I/O.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable

from tether.protocol.backoff import Backoff

__all__ = ["ANSWER_S", "ASK_AFTER_S", "ASK_RATE_MAX", "ASK_RATE_MIN", "Reconfirm", "ask_rate"]

ASK_AFTER_S = Backoff().cap
"""How long after the reconnection the devices still silent are asked: by then an agent whose
connection broke with the broker's restart has reconnected, unless it cannot."""
ASK_RATE_MIN = 1000
"""Devices asked a second at least (those to ask permitting): 10,000 within 10 s, the
requests and their answers spread out rather than all queued at once."""
ASK_RATE_MAX = 10_000
"""Devices asked a second at most, however many and however short their allowance. A request
and its answer are two messages through the broker and two handled by the controller's one
worker (some 30 us each): the cap keeps asking to about half of that worker, and far below
what a broker relays (Mosquitto: some 100,000 messages a second on one core). 100,000
devices with the shortest allowance (keepalive 5 s: 37.5 s) need 8,000 a second."""
ANSWER_S = 10.0
"""How long an asked device has to answer, at least, before its lost will is published
(when asking outlasts its allowance: more devices than :data:`ASK_RATE_MAX` allows in time)."""


def ask_rate(count: int, window: float) -> int:
    """Devices to ask a second so that ``count`` are all asked within ``window`` seconds,
    within :data:`ASK_RATE_MIN` and :data:`ASK_RATE_MAX`."""
    if window <= 0 or count > ASK_RATE_MAX * window:
        return ASK_RATE_MAX
    return max(ASK_RATE_MIN, math.ceil(count / window))


class Reconfirm:
    """Devices waiting to show life since the controller reconnected, and the requests asking them."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[int, float]] = {}  # device -> (session shown online, deadline)
        self._unasked: list[str] = []  # devices to ask (if still waiting), in order, from _ask_from
        self._ask_from = 0.0
        self._rate = ASK_RATE_MIN  # devices asked a second (see ask_rate)
        self._turns = 0  # devices of the list whose turn is past (asked, or heard before it)
        self._asked: dict[str, str] = {}  # request id -> device

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def rate(self) -> int:
        """Devices asked a second since the last :meth:`start`."""
        return self._rate

    def start(self, devices: Iterable[tuple[str, int, float]], now: float) -> int:
        """Wait for ``(device, session, deadline)`` (what was waited for before is dropped);
        those still silent :data:`ASK_AFTER_S` after ``now`` (at most a third of the way to
        the earliest deadline) are to be asked (:meth:`asks`), all within half of the time
        then left to that deadline if :data:`ASK_RATE_MAX` allows. Returns how many are
        waited for."""
        listed = list(devices)
        earliest = min((deadline for _, _, deadline in listed), default=now)
        self._ask_from = now + min(ASK_AFTER_S, max(0.0, earliest - now) / 3)
        self._rate = ask_rate(len(listed), (earliest - self._ask_from) / 2)
        self._waiting = {}
        for i, (device, session, deadline) in enumerate(listed):
            # Never due before it has had ANSWER_S to answer since its turn (see asks).
            turn = self._ask_from + i // self._rate
            self._waiting[device] = (session, max(deadline, turn + ANSWER_S))
        self._unasked = list(reversed(self._waiting))  # popped from the end: asked in order
        self._turns = 0
        self._asked = {}
        return len(self._waiting)

    def wait(self, device: str, session: int, deadline: float) -> None:
        """Wait for one more device shown online in ``session`` (unless it is waited for
        already): asked after those listed before it, at once if their turns are past."""
        if device not in self._waiting:
            self._waiting[device] = (session, deadline)
            self._unasked.insert(0, device)  # popped from the end: the last to ask

    def asks(self, now: float) -> list[tuple[str, str]]:
        """The next ``(request id, device)`` pairs to ask: devices still waited for whose turn
        has come (none before the wait is over; then :attr:`rate` a second, a second's worth
        at once, turns missed by a late call caught up)."""
        if now < self._ask_from:
            return []
        due_turns = (math.floor(now - self._ask_from + 1e-9) + 1) * self._rate  # 1e-9: float sums
        out: list[tuple[str, str]] = []
        while self._unasked and self._turns < due_turns:
            device = self._unasked.pop()
            self._turns += 1
            waiting = self._waiting.get(device)
            if waiting is not None:
                request_id = uuid.uuid4().hex
                self._asked[request_id] = device
                self._waiting[device] = (waiting[0], max(waiting[1], now + ANSWER_S))
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
