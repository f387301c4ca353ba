"""The controller's inbox: what the MQTT thread hands the worker, with each device's
outdated presence and reported state merged into its newer one while both wait.

Why: at a broker restart every device comes back at once and the controller receives
each one's retained presence and report, then its new ones, faster than its worker
handles them. A plain queue then holds every message of the burst (+90 MB at 20,000
devices). Bounding it would push the backlog back to the broker, which drops QoS 1
messages past its queue limit, and a lost presence would leave a device shown wrongly;
so the inbox stays unbounded, but a message that handling a newer one makes irrelevant
is not kept: the waiting presences and reports are at most one per device and kind.

What is merged (:func:`supersedes`, pure): a later message on the same device topic
replaces a waiting one, in the waiting one's place, when handling it alone does exactly
what handling both would (:mod:`.ingesting`):

* ``presence``: the same map but for ``at`` and a ``session`` not older (a reconnection:
  the stale retained ``online`` then the new one). Same status and facts, so the stored
  device ends the same and no status change is skipped; the status change the earlier one
  would have made (if any) is made at its place, naming the newer session.
* ``reported``: the same map but for ``at`` (the retained report then the same report sent
  again on reconnection): the same generation and stacks, so no event differs.

Anything else is never merged: events and jobs' results (each is history), metrics (each
sample counts in the history's mean and may start or end a low-disk event; an agent sends
one every 300 s by default, so two of a device rarely wait together),
requests and replies, messages of another shape, a later message whose changed fields
are not plainly valid (so a valid earlier one is never lost to an invalid later one).
Order is kept: a message takes the place of the first of the messages it merged, and
every other message keeps its own. Merged messages are counted (``on_merged``).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

from tether.protocol import codec, topics
from tether.protocol.errors import PayloadError
from tether.protocol.models import MAX_COUNTER
from tether.protocol.topics import DeviceTopic

MERGED = {DeviceTopic.PRESENCE.value: ("session", "at"), DeviceTopic.REPORTED.value: ("at",)}
"""Per device topic merged, the fields a later message may differ in (see :func:`supersedes`)."""


def _map(payload: bytes) -> dict[str, Any] | None:
    try:
        return codec.raw_map(payload)
    except PayloadError:
        return None


def _plain_at(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def supersedes(kind: str, earlier: bytes, later: bytes) -> bool:
    """Whether handling ``later`` alone, in ``earlier``'s place, does what handling both would
    (two messages of one device on its ``kind`` topic; see the module docstring)."""
    fields = MERGED.get(kind)
    if fields is None:
        return False
    if earlier == later:
        return True  # sent twice (QoS 1 is at least once): the second changes nothing
    old, new = _map(earlier), _map(later)
    if old is None or new is None:
        return False
    if "at" in new and not _plain_at(new["at"]):
        return False  # the later one might be refused where the earlier is not
    if "session" in fields:
        session, before = new.get("session"), old.get("session")
        if type(session) is not int or type(before) is not int or not before <= session <= MAX_COUNTER:
            return False
    for name in fields:
        old.pop(name, None)
        new.pop(name, None)
    return old == new


Message = tuple[str, DeviceTopic | None, bytes]
"""What the inbox holds and hands over: a device's message as ``(device id, kind, payload)``
(the id interned: the one string the controller keeps for that device, parsed by
:func:`.topics.parse_device` on the putting thread); any other as ``(topic, None, payload)``."""


def message(topic: str, payload: bytes) -> Message:
    """A received message as the inbox keeps it (see :data:`Message`)."""
    device = topics.parse_device(topic)
    if device is None:
        return topic, None, payload
    return device[0], device[1], payload


def topic_of(entry: Message) -> str:
    """The topic ``entry`` came on (for logs and tests; the worker does not rebuild it)."""
    key, kind, _ = entry
    return key if kind is None else topics.device(key, kind)


class Inbox:
    """A FIFO of received messages from the MQTT thread to the worker, merging (see the module
    docstring). ``put`` from any thread, ``get``/``get_nowait`` from the one worker; the subset
    of :class:`queue.SimpleQueue` the controller uses.

    Kept compact (a burst of 100,000 messages waits here while the worker is behind): each
    message is one tuple of its interned device id, its kind and its payload (no topic
    string); a message of a merged kind a list of the same, also in its kind's map of the
    device's waiting slot."""

    def __init__(self, on_merged: Callable[[str], None] | None = None) -> None:
        """``on_merged(kind)``: called (on the putting thread) for each message merged away."""
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._waiting: dict[DeviceTopic, dict[str, list[Any]]] = {DeviceTopic(kind): {} for kind in MERGED}
        """Per merged kind, device id -> its slot still in the queue: [device id, kind, payload]."""
        self._lock = threading.Lock()
        self._on_merged = on_merged

    def put(self, item: tuple[str, bytes]) -> None:
        """Queue a received ``(topic, payload)``."""
        key, kind, payload = message(*item)
        waiting = self._waiting.get(kind) if kind is not None else None
        if waiting is None or kind is None:
            self._queue.put((key, kind, payload))
            return
        with self._lock:
            slot = waiting.get(key)
            if slot is not None and supersedes(kind, slot[2], payload):
                slot[2] = payload
            else:
                slot = waiting[key] = [key, kind, payload]
                self._queue.put(slot)
                return
        if self._on_merged is not None:
            self._on_merged(kind)

    def _taken(self, entry: Any) -> Message:
        if type(entry) is tuple:
            return entry
        with self._lock:  # no later message merges into it from now on
            key, kind, payload = entry  # read here: until then a later one may replace its payload
            waiting = self._waiting[kind]
            if waiting.get(key) is entry:
                del waiting[key]
        return key, kind, payload

    def get(self, timeout: float | None = None) -> Message:
        """The next message; :class:`queue.Empty` after ``timeout`` seconds without one."""
        return self._taken(self._queue.get(timeout=timeout))

    def get_nowait(self) -> Message:
        return self._taken(self._queue.get_nowait())

    def empty(self) -> bool:
        return self._queue.empty()

    def qsize(self) -> int:
        return self._queue.qsize()


def merged(messages: Iterable[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """What the worker takes from an :class:`Inbox` given ``messages`` before it takes any
    (the pure view of the merge, for tests and benchmarks)."""
    inbox = Inbox()
    for message in messages:
        inbox.put(message)
    out = []
    while not inbox.empty():
        entry = inbox.get_nowait()
        out.append((topic_of(entry), entry[2]))
    return out
