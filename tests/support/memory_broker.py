"""An in-memory MQTT broker and its :class:`~tether.protocol.transport.Transport`, for fast tests.

Why here and not in ``protocol/``: only tests use it, and the device install carries
nothing it never runs. It is held to the same contract as the paho client and the
simulator's session by tests/test_transport_contract.py, so it cannot drift from them.

Semantics kept from MQTT 3.1.1 (sections cited):

* topic filters with ``+`` and ``#``; wildcards at the first level do not match topics
  starting with ``$`` (4.7.2);
* retained messages: the last retained message per topic is kept, an empty retained payload
  deletes it (3.3.1.3); a new subscription receives the matching retained messages with the
  retain flag set, live deliveries carry it cleared;
* wills: asked for before every CONNECT (:attr:`MemoryTransport.will`), published by the
  broker when the connection drops without DISCONNECT (:meth:`MemoryTransport.drop`), and
  discarded on a clean :meth:`MemoryTransport.stop` (3.1.2.5, 3.14.4);
* subscriptions are renewed by the client after every CONNACK, as the real transports do.

Delivery is not synchronous: messages wait in each client's queue until :meth:`MemoryBroker.pump`
hands them to ``on_message`` on the caller's thread (like the transports' own threads, a
publisher is never re-entered from inside ``publish``). Nothing here sleeps or spawns threads.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from tether.protocol.transport import Delivery, MessageHandler, Will

__all__ = ["MemoryBroker", "MemoryTransport", "matches"]


def matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (MQTT 3.1.1 section 4.7)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    fparts = topic_filter.split("/")
    tparts = topic.split("/")
    for i, part in enumerate(fparts):
        if part == "#":
            return True
        if i >= len(tparts):
            return False
        if part != "+" and part != tparts[i]:
            return False
    return len(fparts) == len(tparts)


class MemoryBroker:
    """Retained messages, subscriptions and wills of every :class:`MemoryTransport` on it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.retained: dict[str, bytes] = {}
        self._clients: dict[str, MemoryTransport] = {}
        self.published: list[tuple[str, bytes, bool]] = []
        """Every message the broker accepted, wills included: (topic, payload, retain)."""

    def client(self, client_id: str, **kwargs: object) -> MemoryTransport:
        """A new (not yet started) transport on this broker."""
        return MemoryTransport(self, client_id, **kwargs)  # type: ignore[arg-type]

    def pump(self, limit: int = 100_000) -> int:
        """Deliver queued messages (and what their handlers publish) until none are left."""
        delivered = 0
        while delivered < limit:
            with self._lock:
                ready = [c for c in self._clients.values() if c._queue]
            if not ready:
                return delivered
            for client in ready:
                delivered += client._deliver_one()
        raise RuntimeError(f"more than {limit} messages delivered: a publish loop?")

    def restart(self, keep_retained: bool = True) -> None:
        """A broker restart: every connection drops (no will is published: the broker that
        held them is gone) and, unless ``keep_retained``, the retained messages are forgotten (a
        broker without persistence). Clients reconnect with :meth:`MemoryTransport.start`."""
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
            if not keep_retained:
                self.retained.clear()
        for client in clients:
            client._lost(publish_will=False)

    # --- what clients call ---

    def _connect(self, client: MemoryTransport) -> None:
        with self._lock:
            old = self._clients.get(client.client_id)
            self._clients[client.client_id] = client
        if old is not None and old is not client:
            old._lost(publish_will=True)  # a client id taken over (3.1.4)

    def _disconnect(self, client: MemoryTransport, will: Will | None) -> None:
        with self._lock:
            if self._clients.get(client.client_id) is client:
                del self._clients[client.client_id]
        if will is not None:
            self._publish(will.topic, will.payload, will.retain)

    def _subscribe(self, client: MemoryTransport, topic_filter: str) -> None:
        with self._lock:
            found = sorted((t, p) for t, p in self.retained.items() if matches(topic_filter, t))
        for topic, payload in found:
            client._enqueue(topic, payload, True)

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish to {topic!r}: not a topic name")
        with self._lock:
            self.published.append((topic, payload, retain))
            if retain:
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)
            receivers = [c for c in self._clients.values() if any(matches(f, topic) for f in c.subscriptions)]
        for client in receivers:
            client._enqueue(topic, payload, False)


class MemoryTransport:
    """A :class:`~tether.protocol.transport.Transport` on a :class:`MemoryBroker`."""

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        *,
        will: Callable[[], Will | None] | None = None,
        on_message: MessageHandler | None = None,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self.on_message = on_message
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.subscriptions: dict[str, int] = {}
        self.session_present = False  # every connection starts a clean session here
        self._connected = False
        self._will_now: Will | None = None
        self._queue: deque[tuple[str, bytes, bool]] = deque()

    # --- lifecycle ---

    def start(self) -> None:
        """Connect: take a fresh will, renew the subscriptions, then ``on_connect``."""
        if self._connected:
            return
        self._will_now = self.will() if self.will else None
        self.broker._connect(self)
        self._connected = True
        for topic_filter in list(self.subscriptions):
            self.broker._subscribe(self, topic_filter)
        if self.on_connect is not None:
            self.on_connect()

    def connect(self, timeout: float = 10.0) -> None:
        self.start()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected

    def stop(self, publish_first: tuple[str, bytes, int, bool] | None = None) -> None:
        """Disconnect cleanly: ``publish_first`` goes out, the will is discarded."""
        if not self._connected:
            return
        if publish_first is not None:
            topic, payload, qos, retain = publish_first
            self.publish(topic, payload, qos, retain)
        self._connected = False
        self.broker._disconnect(self, None)
        self._queue.clear()

    def drop(self) -> None:
        """Lose the connection without DISCONNECT: the broker publishes the will."""
        if self._connected:
            self.broker._disconnect(self, self._will_now)
            self._lost(publish_will=False)

    @property
    def connected(self) -> bool:
        return self._connected

    # --- messaging ---

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        if not self._connected:
            return False
        self.broker._publish(topic, payload, retain)
        return True

    def publish_tracked(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> Delivery | None:
        """Acknowledged at once: the broker has it when :meth:`publish` returns."""
        return (lambda: True) if self.publish(topic, payload, qos, retain) else None

    def publish_confirmed(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> bool:
        return self.publish(topic, payload, qos, retain)

    def publish_many(self, messages: list[tuple[str, bytes, int, bool]], timeout: float = 30.0) -> list[bool]:
        return [self.publish(t, p, q, r) for t, p, q, r in messages]

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.subscriptions[topic_filter] = qos
        if self._connected:
            self.broker._subscribe(self, topic_filter)

    def unsubscribe(self, topic_filter: str) -> None:
        self.subscriptions.pop(topic_filter, None)

    # --- internals ---

    def _enqueue(self, topic: str, payload: bytes, retained: bool) -> None:
        self._queue.append((topic, payload, retained))

    def _deliver_one(self) -> int:
        if not self._queue:
            return 0
        topic, payload, retained = self._queue.popleft()
        if not self._connected:
            return 0
        if not any(matches(f, topic) for f in self.subscriptions):
            return 0  # unsubscribed meanwhile
        if self.on_message is not None:
            self.on_message(topic, payload, retained)
        return 1

    def _lost(self, publish_will: bool) -> None:
        was = self._connected
        self._connected = False
        self._queue.clear()
        if publish_will and self._will_now is not None:
            self.broker._publish(self._will_now.topic, self._will_now.payload, self._will_now.retain)
        if was and self.on_disconnect is not None:
            self.on_disconnect()
