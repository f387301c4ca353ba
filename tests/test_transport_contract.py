"""The transport contract (protocol/transport.py), held by every implementation alike.

The same tests run against the in-memory broker (tests/support/memory_broker.py), the paho
client (protocol/mqtt.py) and the simulator's asyncio session (sim/mqtt.py, what every
simulated device's core talks through) on the embedded broker and on Mosquitto, so the fake
cannot drift from the real ones and simulated devices keep real devices' semantics. A message that must not arrive is checked with a barrier: a
later message to the same watcher that arrives first if nothing else was coming.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.infra import Mosquitto, wait_until
from support.memory_broker import MemoryBroker, MemoryTransport, matches
from tether.broker import EmbeddedBroker
from tether.protocol.mqtt import BrokerAddress, MqttClient
from tether.protocol.transport import Delivery, MessageHandler, Transport, Will
from tether.sim.mqtt import Counters, MqttSession


@dataclass
class Inbox:
    """What one client received: (topic, payload, retained)."""

    items: list[tuple[str, bytes, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, topic: str, payload: bytes, retained: bool) -> None:
        with self.lock:
            self.items.append((topic, payload, retained))

    def on(self, topic: str) -> list[tuple[bytes, bool]]:
        with self.lock:
            return [(p, r) for t, p, r in self.items if t == topic]


class Harness:
    """Makes connected transports of one kind; ``settle`` lets the memory broker deliver."""

    def __init__(
        self,
        make: Callable[[str, Callable[[], Will | None] | None, Inbox], Transport],
        drop: Callable[[Transport], None],
        settle: Callable[[], None] = lambda: None,
    ) -> None:
        self._make, self._drop, self.settle = make, drop, settle
        self.made: list[Transport] = []
        self.prefix = f"contract/{uuid.uuid4().hex[:8]}"

    def client(self, will: Callable[[], Will | None] | None = None) -> tuple[Transport, Inbox]:
        inbox = Inbox()
        transport = self._make(f"c-{uuid.uuid4().hex[:10]}", will, inbox)
        transport.start()
        assert transport.wait_connected(15), "the transport did not connect"
        self.made.append(transport)
        return transport, inbox

    def drop(self, transport: Transport) -> None:
        """Lose the connection without DISCONNECT."""
        self._drop(transport)

    def wait(self, inbox: Inbox, topic: str, count: int = 1) -> list[tuple[bytes, bool]]:
        def got() -> list[tuple[bytes, bool]] | None:
            self.settle()
            found = inbox.on(topic)
            return found if len(found) >= count else None

        result: list[tuple[bytes, bool]] = wait_until(got, 15, message=f"{count} message(s) on {topic}")
        return result

    def barrier(self, transport: Transport, inbox: Inbox) -> None:
        """Return once everything sent to ``inbox`` before now has arrived."""
        topic = f"{self.prefix}/barrier/{uuid.uuid4().hex[:6]}"
        transport.subscribe(topic)
        self.settle()

        def poll() -> list[tuple[bytes, bool]]:
            transport.publish(topic, b"b")  # the SUBACK is not awaited: publish until one arrives
            self.settle()
            return inbox.on(topic)

        wait_until(poll, 15, message="the barrier")

    def close(self) -> None:
        for transport in self.made:
            transport.stop()


def _paho_harness(port: int) -> Harness:
    def make(client_id: str, will: Callable[[], Will | None] | None, inbox: Inbox) -> Transport:
        return MqttClient(
            [BrokerAddress("127.0.0.1", port)], client_id, reconnect=False, will=will, on_message=inbox.put
        )

    def drop(transport: Transport) -> None:
        assert isinstance(transport, MqttClient)
        sock = transport._paho.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)  # no DISCONNECT: the broker sees the connection die

    return Harness(make, drop)


class SimTransport:
    """The simulator's :class:`MqttSession`, driven from the test's thread: every call runs on
    the session's event loop (a thread of its own), as the fleet runs it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        port: int,
        client_id: str,
        will: Callable[[], Will | None] | None,
        on_message: MessageHandler,
    ) -> None:
        self.loop, self.port = loop, port
        self.session = MqttSession(
            client_id, counters=Counters(), keepalive=30, clean_session=True, will=will, on_message=on_message
        )

    def _call(self, fn: Callable[[], object]) -> object:
        async def run() -> object:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(15)

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self.session.open("127.0.0.1", self.port, 10), self.loop).result(15)

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self.connected

    @property
    def connected(self) -> bool:
        return bool(self._call(lambda: self.session.connected))

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        return bool(self._call(lambda: self.session.publish(topic, payload, qos, retain)))

    def publish_tracked(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> Delivery | None:
        check = self._call(lambda: self.session.publish_tracked(topic, payload, qos, retain))
        if check is None:
            return None
        return lambda: bool(self._call(check))  # type: ignore[arg-type]

    def publish_confirmed(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> bool:
        return self.publish_many([(topic, payload, qos, retain)], timeout)[0]

    def publish_many(self, messages: list[tuple[str, bytes, int, bool]], timeout: float = 30.0) -> list[bool]:
        checks = [self.publish_tracked(*m) for m in messages]
        deadline = time.monotonic() + timeout
        while any(c is not None and not c() for c in checks) and time.monotonic() < deadline:
            time.sleep(0.02)  # polling the acknowledgements, as a caller of publish_tracked does
        return [c is not None and c() for c in checks]

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._call(lambda: self.session.subscribe(topic_filter, qos))

    def unsubscribe(self, topic_filter: str) -> None:
        self._call(lambda: self.session.unsubscribe(topic_filter))

    def stop(self, publish_first: tuple[str, bytes, int, bool] | None = None) -> None:
        self._call(lambda: self.session.close(publish_first))

    def drop(self) -> None:
        self._call(self.session.abort)


def _sim_harness(port: int) -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sim-loop", daemon=True)
    thread.start()

    def make(client_id: str, will: Callable[[], Will | None] | None, inbox: Inbox) -> Transport:
        return SimTransport(loop, port, client_id, will, inbox.put)  # type: ignore[return-value]

    def drop(transport: Transport) -> None:
        assert isinstance(transport, SimTransport)
        transport.drop()

    h = Harness(make, drop)
    try:
        yield h
    finally:
        h.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.fixture(
    params=[
        "memory",
        "embedded",
        pytest.param("mosquitto", marks=pytest.mark.mosquitto),
        "sim-embedded",
        pytest.param("sim-mosquitto", marks=pytest.mark.mosquitto),
    ]
)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    kind = request.param
    if kind == "memory":
        broker = MemoryBroker()

        def make(client_id: str, will: Callable[[], Will | None] | None, inbox: Inbox) -> Transport:
            return MemoryTransport(broker, client_id, will=will, on_message=inbox.put)

        def drop(transport: Transport) -> None:
            assert isinstance(transport, MemoryTransport)
            transport.drop()

        h = Harness(make, drop, lambda: None if broker.pump() else None)
        yield h
        h.close()
    elif kind in ("embedded", "sim-embedded"):
        embedded = EmbeddedBroker("127.0.0.1", 0)
        port = embedded.start()
        try:
            if kind == "sim-embedded":
                yield from _sim_harness(port)
            else:
                h = _paho_harness(port)
                try:
                    yield h
                finally:
                    h.close()
        finally:
            embedded.stop()
    else:
        mosquitto: Mosquitto = request.getfixturevalue("mosquitto")
        if kind == "sim-mosquitto":
            yield from _sim_harness(mosquitto.port)
        else:
            h = _paho_harness(mosquitto.port)
            try:
                yield h
            finally:
                h.close()


def test_retained_messages_reach_later_subscribers_flagged(harness: Harness) -> None:
    """A retained message reaches a later subscriber with the retain flag set, a live one without;
    an empty retained payload deletes it (MQTT 3.1.1 section 3.3.1.3)."""
    publisher, _ = harness.client()
    topic = f"{harness.prefix}/retained"
    assert publisher.publish_tracked(topic, b"kept", 1, True) is not None
    harness.barrier(publisher, _)
    late, inbox = harness.client()
    late.subscribe(topic)
    assert harness.wait(inbox, topic) == [(b"kept", True)]
    publisher.publish(topic, b"live", 1, False)
    assert harness.wait(inbox, topic, 2)[1] == (b"live", False)
    publisher.publish(topic, b"", 1, True)  # deletes the retained message
    harness.wait(inbox, topic, 3)
    later, later_inbox = harness.client()
    later.subscribe(topic)
    harness.barrier(later, later_inbox)
    assert later_inbox.on(topic) == []


def test_a_topic_subscribed_under_a_wildcard_gets_its_retained_message_again(harness: Harness) -> None:
    """A subscriber to a wildcard that also subscribes to one topic under it gets that topic's
    retained message again (the controller's presence re-read, controller/reread.py), and
    after unsubscribing that topic still gets its messages through the wildcard."""
    publisher, _ = harness.client()
    kept, other = f"{harness.prefix}/d-1/presence", f"{harness.prefix}/d-2/presence"
    assert publisher.publish_confirmed(kept, b"online", 1, True)
    assert publisher.publish_confirmed(other, b"offline", 1, True)
    reader, inbox = harness.client()
    reader.subscribe(f"{harness.prefix}/+/presence")
    assert harness.wait(inbox, kept) == [(b"online", True)]
    reader.subscribe(kept)
    assert harness.wait(inbox, kept, 2)[1] == (b"online", True)
    reader.unsubscribe(kept)
    harness.barrier(reader, inbox)
    publisher.publish(kept, b"live", 1, False)
    assert harness.wait(inbox, kept, 3)[2] == (b"live", False)
    assert inbox.on(other) == [(b"offline", True)], "only the topic subscribed is sent again"


def test_tracked_publish_completes_and_nothing_is_handed_over_while_away(harness: Harness) -> None:
    """publish_tracked returns a check that turns true once the broker acknowledged the message; a
    stopped transport hands nothing over (publish False, publish_tracked None)."""
    sender, _ = harness.client()
    watcher, inbox = harness.client()
    topic = f"{harness.prefix}/tracked"
    watcher.subscribe(topic)
    harness.barrier(watcher, inbox)
    check = sender.publish_tracked(topic, b"one", 1, False)
    assert check is not None
    wait_until(lambda: (harness.settle(), check())[1], 15, message="the PUBACK")
    assert harness.wait(inbox, topic) == [(b"one", False)]
    assert sender.publish_confirmed(topic, b"two", 1, False)
    assert sender.publish_many([(topic, b"three", 1, False), (topic, b"four", 1, False)]) == [True, True]
    assert [p for p, _r in harness.wait(inbox, topic, 4)] == [b"one", b"two", b"three", b"four"]
    sender.stop()
    assert not sender.connected
    assert sender.publish(topic, b"late", 1, False) is False
    assert sender.publish_tracked(topic, b"late", 1, False) is None


def test_will_on_an_abrupt_drop_and_none_on_a_clean_stop(harness: Harness) -> None:
    """The will (asked for before CONNECT) is published, retained, when the connection dies
    without DISCONNECT; a clean stop discards it (3.1.2.5, 3.14.4)."""
    topic = f"{harness.prefix}/presence"
    watcher, inbox = harness.client()
    watcher.subscribe(topic)
    harness.barrier(watcher, inbox)
    asked: list[int] = []

    def will() -> Will:
        asked.append(1)
        return Will(topic, f"gone {len(asked)}".encode(), qos=1, retain=True)

    clean, _ = harness.client(will)
    clean.stop()
    harness.barrier(watcher, inbox)
    assert inbox.on(topic) == []
    dying, _ = harness.client(will)
    harness.drop(dying)
    assert harness.wait(inbox, topic) == [(b"gone 2", False)]
    late, late_inbox = harness.client()
    late.subscribe(topic)
    assert harness.wait(late_inbox, topic) == [(b"gone 2", True)]


def test_unsubscribe_stops_delivery_and_wildcards_match(harness: Harness) -> None:
    """``+`` and ``#`` filters match as MQTT 3.1.1 section 4.7 says; after unsubscribe nothing more
    arrives on that filter."""
    sender, _ = harness.client()
    watcher, inbox = harness.client()
    watcher.subscribe(f"{harness.prefix}/+/state")
    harness.barrier(watcher, inbox)
    sender.publish(f"{harness.prefix}/a/state", b"1")
    sender.publish(f"{harness.prefix}/a/other", b"no")
    harness.wait(inbox, f"{harness.prefix}/a/state")
    watcher.unsubscribe(f"{harness.prefix}/+/state")
    harness.barrier(watcher, inbox)
    sender.publish(f"{harness.prefix}/b/state", b"2")
    harness.barrier(watcher, inbox)
    assert inbox.on(f"{harness.prefix}/b/state") == []
    assert inbox.on(f"{harness.prefix}/a/other") == []


@pytest.mark.unit
def test_memory_topic_matching_follows_the_spec() -> None:
    """The in-memory broker's filter matching: levels, ``+``, ``#`` (also the parent level) and
    ``$`` topics hidden from first-level wildcards (4.7.1, 4.7.2)."""
    assert matches("a/+/c", "a/b/c") and not matches("a/+/c", "a/b/d")
    assert matches("a/#", "a") and matches("a/#", "a/b/c") and matches("#", "a/b")
    assert not matches("+", "$SYS") and not matches("#", "$SYS/x") and matches("$SYS/#", "$SYS/x")
    assert not matches("a/b", "a/b/c") and not matches("a/b/c", "a/b")
