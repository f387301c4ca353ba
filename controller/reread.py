"""Presence read again from the broker: what the controller shows checked against its retained copy.

A device's presence is a retained message whose last word the broker keeps true (the agent's
``online``, then its will): the broker's copy is the truth. The controller learns it from the
messages the broker forwards, and a message lost on the way is never sent again: a broker
whose queue for the controller is full drops what comes next (Mosquitto past
``max_queued_messages``: "Outgoing messages are being dropped"), and the devices whose
``online`` (or will) was dropped stay shown as they were until they change again. MQTT says
nothing of such a loss to the client that missed it.

So the controller reads the retained presence again, by subscribing to devices' own presence
topics (a subscription gets the topic's retained message; the controller's subscription to
every device's stays as it is) a batch at a time and unsubscribing them at the next step:

* every :data:`EVERY_S` (``tether up --presence-reread``), the devices not shown online
  (offline, unknown, never seen; the Ingestor counts devices with a credential but no record
  yet among them, their first presence dropped): a device shown offline while it is online is the loss seen
  in practice (its new session's ``online`` dropped); in a healthy fleet they are few;
* every :data:`FULL_EVERY_S`, and after a sign of loss (:meth:`Reread.suspect`: the controller
  connected again, its subscriptions renewed and the broker's whole retained presence sent
  at once; a probe it sent itself through the broker never came back), every device, those
  not shown online first: a device shown online whose will was dropped too.

At most :data:`RATE` devices a second, none while the controller's inbox holds a burst (a
re-read adds to the broker's queue for it, the very queue that overflowed), and the next
sweep of devices not online waits at least three times as long as the last one takes at
that pace, so that a large part of the fleet offline for good costs at most a quarter of :data:`RATE`.
At 50,000 devices a full sweep takes 250 s, every 15 minutes (some 0.6 % of a core).

A retained word equal to what the controller shows changes nothing (the session number
rules of :meth:`~.ingesting.Ingestor.on_presence` apply as to any presence message); one that
turns a device shown offline or unknown online in the same session is shown, and that device
must show life as after a reconnection (:mod:`.reconfirm`): a broker restarted from its
persistence file may hold an ``online`` with no will behind it. Pure
bookkeeping: :class:`~.ingesting.Ingestor` does the I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

__all__ = ["EVERY_S", "FULL_EVERY_S", "RATE", "Reread"]

EVERY_S = 60.0
"""Seconds between two re-reads of the devices not shown online (the default)."""
FULL_EVERY_S = 900.0
"""Seconds between two re-reads of every device, without a sign of loss."""
RATE = 200
"""Devices re-read a second at most: a subscription, its retained presence and an
unsubscription each (some 100 us of the controller's CPU together: 2 % of a core)."""


class Reread:
    """Which devices' retained presence to read again, and when (see the module docstring)."""

    def __init__(self, every: float = EVERY_S, full_every: float = FULL_EVERY_S, rate: int = RATE) -> None:
        self.every = every
        self.full_every = full_every
        self.rate = rate
        self._todo: list[str] = []  # this sweep's devices still to read, popped from the end
        self._full = False  # this sweep reads every device
        self._size = 0  # how many devices this sweep reads
        self._reading: list[str] = []  # subscribed at the last step: unsubscribed at the next
        self._last: float | None = None  # the last step
        self._next: float | None = None  # when the next sweep of devices not online is due
        self._next_full: float | None = None  # and of every device
        self._suspected = False

    @property
    def sweeping(self) -> bool:
        """Whether a sweep is under way (devices still to read)."""
        return bool(self._todo)

    def suspect(self) -> None:
        """A sign that messages may have been lost: every device is read again, from the next
        step (after the sweep of every device under way, if one is)."""
        self._suspected = True

    def step(
        self, now: float, status: Callable[[], Mapping[str, str]], busy: bool
    ) -> tuple[list[str], list[str]]:
        """``(devices to subscribe, devices to unsubscribe)`` now. ``status``: every device's
        presence status (``online``, ``offline``, ``unknown``, ``never seen``), asked only when
        a sweep begins; ``busy``: the inbox holds a burst (nothing is read meanwhile)."""
        done, self._reading = self._reading, []
        if self._next is None or self._next_full is None:  # the first step: the subscriptions just read all
            self._next, self._next_full, self._last = now + self.every, now + self.full_every, now
            return [], done
        elapsed, self._last = now - self._last if self._last is not None else 0.0, now
        if not self._todo or (self._suspected and not self._full):
            self._begin(now, status)  # a sign of loss ends a sweep of devices not online: all now
        if busy or not self._todo:
            return [], done
        count = min(len(self._todo), self.rate, max(1, math.ceil(self.rate * elapsed - 1e-9)))
        batch = self._todo[-count:]
        del self._todo[-count:]
        batch.reverse()
        self._reading = batch
        if not self._todo:
            self._ended(now)
        return batch, done

    def _begin(self, now: float, status: Callable[[], Mapping[str, str]]) -> None:
        assert self._next is not None and self._next_full is not None
        full = self._suspected or now >= self._next_full
        if not full and now < self._next:
            return
        shown = status()
        todo = [d for d, s in shown.items() if s != "online"]
        if full:
            todo += [d for d, s in shown.items() if s == "online"]
            self._suspected = False
            self._next_full = now + self.full_every
        self._todo = todo[::-1]  # popped from the end: read in order
        self._full = full
        self._size = len(todo)
        if not todo:
            self._ended(now)

    def _ended(self, now: float) -> None:
        """The sweep's last batch is out: the next one of devices not online waits at least
        three times as long as this one takes at the full pace."""
        self._next = now + max(self.every, 3 * self._size / self.rate)
        self._full = False
