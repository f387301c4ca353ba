"""The paho client wrapper itself (protocol/mqtt.py) against real brokers, embedded and Mosquitto.

What the agents, the controller and the CLI rely on and no fake can show: the session comes
back by itself after the broker restarts, with its subscriptions and a fresh will; the will
reaches others when the connection dies; the batched socket I/O (one ``recv`` split into
many packets, queued packets joined into one ``send``) loses, reorders and corrupts nothing;
and the CLI's round trip keeps one deadline however many unrelated replies arrive.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.infra import Mosquitto, wait_until
from tether.broker import EmbeddedBroker
from tether.protocol import codec
from tether.protocol.backoff import Backoff
from tether.protocol.client import ControllerClient
from tether.protocol.commands import DevicesList
from tether.protocol.errors import RequestTimeout
from tether.protocol.models import Reply
from tether.protocol.mqtt import MAX_INFLIGHT, RECV_SIZE, BrokerAddress, MqttClient
from tether.protocol.transport import Will


class Broker:
    """A broker process on a fixed port once started, restartable on the same port."""

    def __init__(self, port: int, restart: Callable[[], None], stop: Callable[[], None]) -> None:
        self.port = port
        self.restart = restart
        self.stop = stop


@pytest.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    if request.param == "embedded":
        holder = [EmbeddedBroker("127.0.0.1", 0)]
        port = holder[0].start()

        def restart() -> None:
            holder[0].stop()
            holder[0] = EmbeddedBroker("127.0.0.1", port)
            holder[0].start()

        b = Broker(port, restart, lambda: holder[0].stop())
        try:
            yield b
        finally:
            b.stop()
    else:
        mosquitto: Mosquitto = request.getfixturevalue("mosquitto")

        def restart_mosquitto() -> None:
            mosquitto.stop()
            assert mosquitto._launch(), mosquitto.log_text()  # the same port again

        yield Broker(mosquitto.port, restart_mosquitto, mosquitto.stop)


class Received:
    """Messages one client got, in order."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        with self.lock:
            self.items.append((topic, payload))

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.items if t == topic]


def client(port: int, **kwargs: object) -> MqttClient:
    c = MqttClient([BrokerAddress("127.0.0.1", port)], f"t-{uuid.uuid4().hex[:10]}", **kwargs)  # type: ignore[arg-type]
    return c


def counted_sends(sender: MqttClient) -> list[int]:
    """The sizes of the sender's socket writes from now on, appended as they happen."""
    sends: list[int] = []
    plain_send = sender._paho._sock_send

    def counting_send(buf: bytes | bytearray) -> int:
        sends.append(len(buf))
        return plain_send(buf)

    sender._paho._sock_send = counting_send  # type: ignore[method-assign]
    return sends


def connected_pair(port: int, topic: str, got: Received) -> tuple[MqttClient, MqttClient]:
    """A receiver subscribed to ``topic`` (what it gets goes to ``got``) and a sender, both connected."""
    receiver = client(port, on_message=got)
    receiver.subscribe(topic)
    receiver.connect(10)
    sender = client(port)
    sender.connect(10)
    return receiver, sender


def test_reconnects_resubscribes_and_renews_the_will_after_a_broker_restart(broker: Broker) -> None:
    """After the broker restarts (losing every session), the client connects again by itself,
    subscribes again, asks for a fresh will, and that will is what others get when it dies."""
    topic = f"t/{uuid.uuid4().hex[:8]}"
    presence = f"{topic}/presence"
    wills: list[int] = []
    connects: list[float] = []

    def will() -> Will:
        wills.append(len(wills) + 1)
        return Will(presence, f"offline {len(wills)}".encode(), qos=1, retain=True)

    got = Received()
    device = client(
        broker.port,
        clean_session=True,
        backoff=Backoff(0.05, 0.3),
        will=will,
        on_message=got,
        on_connect=lambda: connects.append(time.monotonic()),
    )
    device.subscribe(topic)
    device.connect(10)
    try:
        broker.restart()
        wait_until(lambda: len(connects) >= 2 and device.connected, 30, message="the reconnect")
        assert len(wills) >= 2  # one per CONNECT, the failed attempts while it was down included
        current = wills[-1]
        watcher_got = Received()
        watcher = client(broker.port, on_message=watcher_got)
        watcher.subscribe(presence)
        watcher.connect(10)
        try:
            # The subscription was renewed: a message published now arrives (the SUBACK of the
            # renewal is not awaited, so publish until one does).
            wait_until(
                lambda: watcher.publish(topic, b"after the restart") and got.on(topic), 15, message="delivery"
            )
            sock = device._paho.socket()
            assert sock is not None
            device.reconnect = False  # stay down: the will is what remains
            sock.shutdown(socket.SHUT_RDWR)  # dies without DISCONNECT
            assert wait_until(lambda: watcher_got.on(presence), 15, message="the will") == [
                f"offline {current}".encode()
            ]
        finally:
            watcher.stop()
    finally:
        device.stop()


def test_publishes_fail_while_the_broker_is_down_and_work_once_it_is_back(broker: Broker) -> None:
    """While the connection is lost, publish says False (the caller publishes again later, nothing is
    queued for the dead connection); after the reconnect it says True again."""
    sender = client(broker.port, backoff=Backoff(0.05, 0.3))
    sender.connect(10)
    try:
        broker.stop()
        wait_until(lambda: not sender.connected, 15, message="the loss")
        assert sender.publish("t/down", b"x") is False
        assert sender.publish_tracked("t/down", b"x") is None
        assert sender.publish_confirmed("t/down", b"x", timeout=0.5) is False
        broker.restart()
        wait_until(lambda: sender.connected, 30, message="the reconnect")
        assert sender.publish_confirmed("t/up", b"y", timeout=10)
    finally:
        sender.stop()


def test_large_payloads_cross_the_read_buffer_intact(broker: Broker) -> None:
    """Payloads around and far above the read buffer (one recv of RECV_SIZE bytes split into
    packets, a packet spread over many recvs) arrive byte for byte and in order."""
    topic = f"t/{uuid.uuid4().hex[:8]}/big"
    got = Received()
    receiver, sender = connected_pair(broker.port, topic, got)
    try:
        sizes = [1, RECV_SIZE - 20, RECV_SIZE, RECV_SIZE + 1, 3 * RECV_SIZE + 7, 1024 * 1024]
        payloads = [os.urandom(n) for n in sizes]
        wait_until(lambda: sender.publish(topic, b"ready") and got.on(topic), 15, message="the subscription")
        results = sender.publish_many([(topic, p, 1, False) for p in payloads], timeout=30)
        assert results == [True] * len(payloads)

        def arrived() -> list[bytes]:
            return [p for p in got.on(topic) if p != b"ready"]  # "ready" went until one arrived

        wait_until(lambda: len(arrived()) >= len(payloads), 30, message="every payload")
        assert len(arrived()) == len(payloads)
        assert [len(p) for p in arrived()] == sizes
        assert arrived() == payloads
    finally:
        sender.stop()
        receiver.stop()


def test_many_small_messages_are_batched_and_arrive_in_order(broker: Broker) -> None:
    """Thousands of small QoS 1 messages published in a burst go out in fewer sends than
    messages (queued packets joined), are all acknowledged, and arrive complete and in order."""
    topic = f"t/{uuid.uuid4().hex[:8]}/small"
    got = Received()
    receiver, sender = connected_pair(broker.port, topic, got)
    sends = counted_sends(sender)
    try:
        wait_until(lambda: sender.publish(topic, b"ready") and got.on(topic), 15, message="the subscription")
        before = len(sends)
        messages = [(topic, f"{i}:".encode() + b"x" * (i % 97), 1, False) for i in range(3000)]
        assert sender.publish_many(messages, timeout=60) == [True] * len(messages)
        assert len(sends) - before < len(messages), "every packet was sent on its own"

        def arrived() -> list[bytes]:
            return [p for p in got.on(topic) if p != b"ready"]

        wait_until(lambda: len(arrived()) >= len(messages), 60, message="every message")
        assert arrived() == [m[1] for m in messages]
    finally:
        sender.stop()
        receiver.stop()


def test_the_cli_reply_deadline_is_not_restarted_by_unrelated_replies(broker: Broker) -> None:
    """Replies to other requests keep arriving on the CLI's reply topic: its request still times
    out after its own timeout (one deadline for the round trip), not never."""
    with ControllerClient(f"mqtt://127.0.0.1:{broker.port}", timeout=10) as cli:
        noise = client(broker.port)
        noise.connect(10)
        stop = threading.Event()

        def chatter() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                noise.publish(cli.reply_topic, codec.encode(Reply(id=f"other-{n}", ok=True)), qos=1)
                stop.wait(0.05)

        thread = threading.Thread(target=chatter, daemon=True)
        thread.start()
        try:
            wait_until(lambda: not cli._replies.empty(), 15, message="the unrelated replies")
            started = time.monotonic()
            with pytest.raises(RequestTimeout):
                cli.request(DevicesList(), timeout=1.0)  # nobody answers on topics.REQUESTS
            elapsed = time.monotonic() - started
            assert 1.0 <= elapsed < 4.0, elapsed
            started = time.monotonic()
            assert cli.receive("never", 0.5, Reply) is None
            assert time.monotonic() - started < 3.0
        finally:
            stop.set()
            thread.join(5)
            noise.stop()


class Recorded:
    """Messages one client got, with their retained flag, in order."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        with self.lock:
            self.items.append((topic, payload, retained))

    def copy(self) -> list[tuple[str, bytes, bool]]:
        with self.lock:
            return list(self.items)


def counting_fast_path(c: MqttClient) -> list[int]:
    """Counts what ``c``'s fast read path (``_Paho._read_publishes``) handles, per call."""
    counts: list[int] = []
    plain = c._paho._read_publishes

    def counting(deliver: Callable[[str, bytes, bool], None]) -> tuple[int, object]:
        n, rc = plain(deliver)
        counts.append(n)
        return n, rc

    c._paho._read_publishes = counting  # type: ignore[method-assign]
    return counts


def test_every_kind_of_publish_arrives_exactly_through_the_fast_read_path(broker: Broker) -> None:
    """QoS 0 and 1, topics in multi-byte UTF-8, empty and largest payloads, a retained message
    arrive byte for byte, in order, with their retained flag, and mostly by the fast path."""
    base = f"t/{uuid.uuid4().hex[:8]}"
    sender = client(broker.port)
    sender.connect(10)
    got = Recorded()
    receiver = client(broker.port, on_message=got)
    fast = counting_fast_path(receiver)
    try:
        assert sender.publish_confirmed(f"{base}/kept/ü", b"retained", qos=1, retain=True)
        receiver.subscribe(f"{base}/#", 1)
        receiver.connect(10)
        wait_until(lambda: got.copy(), 15, message="the retained message")
        assert got.copy()[0] == (f"{base}/kept/ü", b"retained", True)
        wait_until(lambda: sender.publish(f"{base}/ready", b"", qos=0) and len(got.copy()) > 1, 15)
        largest = codec.MAX_PACKET_SIZE - 5 - 2 - len(f"{base}/big".encode()) - 2
        messages = [
            (f"{base}/dévice-€-😀/状態", b"multi-byte topic", 1),
            (f"{base}/q0", b"qos 0", 0),
            (f"{base}/empty", b"", 1),
            (f"{base}/big", os.urandom(largest), 1),
            *[(f"{base}/n/{i}/ß", f"{i}".encode() * (i % 50), i % 2) for i in range(2000)],
        ]
        before = len(got.copy())
        assert sender.publish_many([(t, p, q, False) for t, p, q in messages], timeout=60) == [True] * len(
            messages
        )
        wait_until(lambda: len(got.copy()) >= before + len(messages), 60, message="every message")
        arrived = got.copy()[before:]
        qos_of = {t: q for t, _, q in messages}
        for qos in (0, 1):  # a broker keeps the order of each QoS (MQTT 3.1.1 section 4.6), not across them
            assert [m for m in arrived if qos_of[m[0]] == qos] == [
                (t, p, False) for t, p, q in messages if q == qos
            ]
        assert len(arrived) == len(messages)
        assert sum(fast) > len(messages) // 2, f"the fast path read {sum(fast)} of {len(messages)}"
    finally:
        sender.stop()
        receiver.stop()


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish_packet(
    topic: bytes, payload: bytes, qos: int, mid: int = 0, retain: bool = False, dup: bool = False
) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"") + payload
    return bytes([0x30 | dup << 3 | qos << 1 | retain]) + _remaining_length(len(body)) + body


class ScriptedBroker:
    """One end of a TCP connection that plays the broker with bytes chosen by the test: what no
    real broker sends on purpose (packets cut anywhere, invalid topics). It answers the CONNECT
    and records the packet id of every PUBACK it reads, in order. A client that connects again
    (after :meth:`drop`) is served the same way."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.acks: list[int] = []
        self.published: list[tuple[int, bytes]] = []
        self.dup: list[bool] = []  # per PUBLISH received, its DUP flag
        self.connections = 0
        self.lock = threading.Lock()
        self.conn: socket.socket | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self._serve(conn)

    def _read(self, n: int) -> bytes:
        assert self.conn is not None
        data = b""
        while len(data) < n:
            chunk = self.conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _serve(self, conn: socket.socket) -> None:
        self.conn = conn
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.connections += 1
        try:
            while True:
                header = self._read(1)[0]
                length, shift = 0, 0
                while True:
                    byte = self._read(1)[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = self._read(length)
                if header & 0xF0 == 0x10:  # CONNECT
                    self.conn.sendall(b"\x20\x02\x00\x00")
                elif header & 0xF0 == 0x40:  # PUBACK
                    with self.lock:
                        self.acks.append(int.from_bytes(body, "big"))
                elif header & 0xF0 == 0x30:  # PUBLISH (QoS 1 in these tests): packet id, payload
                    at = 2 + int.from_bytes(body[:2], "big")
                    with self.lock:
                        self.published.append((int.from_bytes(body[at : at + 2], "big"), body[at + 2 :]))
                        self.dup.append(bool(header & 0x08))
        except (EOFError, OSError):
            pass

    def received(self) -> list[tuple[int, bytes]]:
        with self.lock:
            return list(self.published)

    def acked(self) -> list[int]:
        with self.lock:
            return list(self.acks)

    def send(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(data)

    def drop(self) -> None:
        """Close the client's connection (as a broker that goes away would)."""
        assert self.conn is not None
        self.conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


def test_publishes_cut_anywhere_across_reads_arrive_exactly_and_are_acknowledged_after_delivery() -> None:
    """PUBLISH packets whose bytes come in pieces cut inside every field (fixed header, a 1-
    and a 3-byte remaining length, topic, packet id, payload) are delivered whole and in order
    (QoS 0 and 1, duplicate and retained flags, multi-byte UTF-8 topics, other packets between
    them); each QoS 1 message is acknowledged once, after its handler returned; a topic that is
    not UTF-8 is dropped with the connection kept."""
    peer = ScriptedBroker()
    delivered: list[tuple[str, bytes, bool]] = []
    acked_at_delivery: list[list[int]] = []

    def handler(topic: str, payload: bytes, retained: bool) -> None:
        acked_at_delivery.append(peer.acked())
        delivered.append((topic, payload, retained))

    c = MqttClient([BrokerAddress("127.0.0.1", peer.port)], "cut", on_message=handler)
    fast = counting_fast_path(c)
    try:
        c.connect(10)
        big = os.urandom(20_000)  # a 3-byte remaining length
        script = [  # (packet, what is delivered or None, the packet id acknowledged or None)
            (_publish_packet("a/ü/€/😀".encode(), b"one", 1, mid=1), ("a/ü/€/😀", b"one", False), 1),
            (_publish_packet(b"a/q0", b"zero", 0), ("a/q0", b"zero", False), None),
            (_publish_packet(b"a/r", b"kept", 1, mid=2, retain=True), ("a/r", b"kept", True), 2),
            (b"\xd0\x00", None, None),  # a PINGRESP between them: paho's own
            (_publish_packet(b"a/dup", b"again", 1, mid=3, dup=True), ("a/dup", b"again", False), 3),
            (_publish_packet("b/状態".encode(), big, 1, mid=65535), ("b/状態", big, False), 65535),
            (_publish_packet(b"a/\xff\xfe", b"bad topic", 1, mid=4), None, 4),
            (_publish_packet(b"a/e", b"", 0), ("a/e", b"", False), None),
            (_publish_packet(b"a/last", b"end", 1, mid=5, retain=True), ("a/last", b"end", True), 5),
        ]
        stream = b"".join(packet for packet, _, _ in script)
        starts = [sum(len(p) for p, _, _ in script[:i]) for i in range(len(script) + 1)]
        # Cut inside: the first packet's header (1), its remaining length and topic length (2, 4),
        # its topic (8), packet id (starts[1] - 5), the big packet's remaining length and
        # payload, the invalid topic's, and right at a packet's end.
        cuts = sorted(
            {
                1,
                2,
                4,
                8,
                starts[1] - 5,
                starts[2],
                starts[5] + 2,
                starts[5] + 3,
                starts[5] + 9_000,
                starts[6] + 5,
                len(stream) - 2,
            }
        )

        def expected_before(offset: int) -> list[tuple[str, bytes, bool]]:
            return [
                d
                for (p, d, _), end in zip(script, starts[1:], strict=True)
                if d is not None and end <= offset
            ]

        sent = 0
        for cut in [*cuts, len(stream)]:
            peer.send(stream[sent:cut])
            sent = cut
            want = expected_before(cut)
            wait_until(lambda want=want: len(delivered) >= len(want), 10, message=f"what precedes byte {cut}")  # type: ignore[misc]
            assert delivered == want
        acks = [mid for _, _, mid in script if mid is not None]
        wait_until(lambda: len(peer.acked()) >= len(acks), 10, message="every PUBACK")
        assert peer.acked() == acks
        delivered_acks = [mid for _, d, mid in script if d is not None and mid is not None]
        for mid, seen in zip([mid for _, d, mid in script if d is not None], acked_at_delivery, strict=True):
            assert mid is None or mid not in seen, f"packet {mid} was acknowledged before its delivery"
        assert set(delivered_acks) < set(acks)
        assert sum(fast) > 0, "the fast path read nothing"
        assert c.connected
    finally:
        c.stop()
        peer.close()


def test_acknowledgements_cut_across_reads_complete_publishes_and_refill_the_inflight_window() -> None:
    """PUBACKs for the client's QoS 1 messages, in pieces cut anywhere and mixed with incoming
    PUBLISH packets, mark exactly those messages published and let the queued ones go: never
    more than MAX_INFLIGHT unacknowledged, every message sent once and in order."""
    peer = ScriptedBroker()
    delivered: list[tuple[str, bytes, bool]] = []
    c = MqttClient(
        [BrokerAddress("127.0.0.1", peer.port)],
        "acks",
        on_message=lambda t, p, r: delivered.append((t, p, r)),
    )
    fast = counting_fast_path(c)
    try:
        c.connect(10)
        total = MAX_INFLIGHT + 500
        checks = [c.publish_tracked("out/x", f"{i}".encode(), qos=1) for i in range(total)]
        assert all(check is not None for check in checks)
        wait_until(lambda: len(peer.received()) >= MAX_INFLIGHT, 10, message="the first window")
        assert len(peer.received()) == MAX_INFLIGHT  # the rest waits for acknowledgements
        acked = 0
        incoming = 0
        while acked < total:
            sent = peer.received()
            window = [pid for pid, _ in sent[acked:]]
            assert len(window) <= MAX_INFLIGHT
            batch = window[:300]
            stream = b"".join(b"\x40\x02" + pid.to_bytes(2, "big") for pid in batch)
            stream += _publish_packet(b"in/y", f"{incoming}".encode(), 0)
            incoming += 1
            for cut in (3, 6, len(stream) // 2 + 1):  # inside a PUBACK's packet id and length
                peer.send(stream[:cut])
                stream = stream[cut:]
            peer.send(stream)
            acked += len(batch)
            wait_until(lambda n=incoming: len(delivered) == n, 10, message="the incoming message")  # type: ignore[misc]
            assert all(check() for check in checks[:acked])  # type: ignore[misc]
            assert not any(check() for check in checks[acked:])  # type: ignore[misc]
            if acked < total:
                want = min(total, acked + MAX_INFLIGHT)
                wait_until(lambda want=want: len(peer.received()) >= want, 10, message="refill")  # type: ignore[misc]
        assert [p for _, p in peer.received()] == [f"{i}".encode() for i in range(total)]
        assert len({pid for pid, _ in peer.received()}) == total
        assert delivered == [("in/y", f"{i}".encode(), False) for i in range(incoming)]
        assert sum(fast) > 0 and c.connected
    finally:
        c.stop()
        peer.close()


def test_a_batch_interrupted_by_a_lost_connection_is_redelivered_with_dup_and_acknowledged() -> None:
    """publish_many's batch (more than MAX_INFLIGHT QoS 1 messages): after the connection is
    lost with some acknowledged, some in flight and some queued, the client connects again and
    sends every unacknowledged one again in order, those in flight with DUP set and their packet
    ids, the queued ones for the first time; once the broker acknowledges them (PUBACKs cut
    across reads: paho's own reading too), publish_many reports every message acknowledged."""
    peer = ScriptedBroker()
    c = MqttClient([BrokerAddress("127.0.0.1", peer.port)], "redeliver", backoff=Backoff(0.05, 0.2))
    try:
        c.connect(10)
        total = MAX_INFLIGHT + 500
        messages = [(f"out/{i % 7}", f"{i}".encode(), 1, True) for i in range(total)]
        results: list[list[bool]] = []
        worker = threading.Thread(target=lambda: results.append(c.publish_many(messages, timeout=30)))
        worker.start()
        wait_until(lambda: len(peer.received()) >= MAX_INFLIGHT, 10, message="the first window")
        first = peer.received()
        assert len(first) == MAX_INFLIGHT and not any(peer.dup)
        peer.send(b"".join(b"\x40\x02" + pid.to_bytes(2, "big") for pid, _ in first[:300]))
        wait_until(lambda: len(peer.received()) >= MAX_INFLIGHT + 300, 10, message="the refill")
        sent = peer.received()
        assert len(sent) == MAX_INFLIGHT + 300  # 200 still queued
        peer.drop()
        wait_until(lambda: len(peer.received()) >= total + 1000, 15, message="the resend")
        again = peer.received()[len(sent) :]
        with peer.lock:
            dup = peer.dup[len(sent) :]
        assert peer.connections == 2
        assert [p for _, p in again] == [m[1] for m in messages[300:]]  # in order, none lost
        assert [pid for pid, _ in again[:1000]] == [pid for pid, _ in sent[300:]]  # same ids
        assert dup == [True] * 1000 + [False] * 200  # sent before: DUP; queued: first time
        assert not results  # nothing acknowledged yet
        stream = b"".join(b"\x40\x02" + pid.to_bytes(2, "big") for pid, _ in again)
        for cut in (3, 1001, 2402):  # inside PUBACKs: paho reads those
            peer.send(stream[:cut])
            stream = stream[cut:]
        peer.send(stream)
        worker.join(30)
        assert results == [[True] * total]
        assert c.connected
    finally:
        c.stop()
        peer.close()


def test_publish_many_survives_a_connection_lost_mid_batch_on_a_real_broker(broker: Broker) -> None:
    """A burst of retained QoS 1 messages (publish_many, as the controller publishes desired
    states) whose connection breaks while it is being written is sent again after the client
    reconnects: every message is reported acknowledged, each arrives (at least once), and the
    broker retains the last of each topic byte for byte."""
    topic = f"t/{uuid.uuid4().hex[:8]}"
    got = Received()
    receiver = client(broker.port, on_message=got)
    receiver.subscribe(f"{topic}/+")
    receiver.connect(10)
    sender = client(broker.port, backoff=Backoff(0.05, 0.2))
    sender.connect(10)
    plain_send = sender._paho._sock_send
    written, cut = [0], [False]

    def breaking_send(buf: bytes | bytearray) -> int:
        if written[0] > 50_000 and not cut[0]:  # once, inside the batch
            cut[0] = True
            raise ConnectionResetError("cut by the test")
        n = plain_send(buf)
        written[0] += n
        return n

    try:
        wait_until(lambda: sender.publish(f"{topic}/ready", b"r") and got.on(f"{topic}/ready"), 15)
        sender._paho._sock_send = breaking_send  # type: ignore[method-assign]
        messages = [(f"{topic}/{i % 500}", f"{i}:".encode() + os.urandom(100), 1, True) for i in range(3000)]
        assert sender.publish_many(messages, timeout=60) == [True] * len(messages)
        assert cut[0], "the connection was not cut"
        wait_until(lambda: sender.connected, 15)
        for t, p, _, _ in messages[-500:]:
            wait_until(lambda t=t, p=p: p in got.on(t), 30, message=f"the last message on {t}")  # type: ignore[misc]
        late = Received()
        reader = client(broker.port, on_message=late)
        reader.subscribe(f"{topic}/+")
        reader.connect(10)
        try:
            want = {t: p for t, p, _, _ in messages}
            wait_until(
                lambda: len({t for t, _ in late.items}) >= len(want), 30, message="every retained message"
            )
            assert dict(late.items) == want
        finally:
            reader.stop()
    finally:
        sender.stop()
        receiver.stop()


def test_qos0_publishes_from_another_thread_are_joined_arrive_in_order_and_wake_the_loop(
    broker: Broker,
) -> None:
    """QoS 0 messages published one at a time from the caller's thread (the controller's event
    acknowledgements) go out in fewer sends than messages and arrive complete and in order;
    each one published alone wakes the client's loop at once (one wake-up per loop pass, not
    per packet: 40 round trips take far less than the 0.5 s select timeout each)."""
    topic = f"t/{uuid.uuid4().hex[:8]}/q0"
    got = Received()
    receiver, sender = connected_pair(broker.port, topic, got)
    sends = counted_sends(sender)
    try:
        wait_until(
            lambda: sender.publish(topic, b"ready", qos=0) and got.on(topic), 15, message="the subscription"
        )
        before = len(sends)
        payloads = [f"{i}:".encode() + b"a" * (i % 50) for i in range(3000)]
        assert all(sender.publish(topic, p, qos=0) for p in payloads)

        def arrived() -> list[bytes]:
            return [p for p in got.on(topic) if p != b"ready"]

        wait_until(lambda: len(arrived()) >= len(payloads), 60, message="every message")
        assert arrived() == payloads
        assert len(sends) - before < len(payloads), "every packet was sent on its own"
        start = time.monotonic()
        for i in range(40):
            assert sender.publish(topic, f"alone {i}".encode(), qos=0, retain=True)
            wait_until(lambda i=i: f"alone {i}".encode() in got.on(topic), 10, interval=0.002)  # type: ignore[misc]
        assert time.monotonic() - start < 10, "publishes waited for the loop's select timeout"
    finally:
        sender.stop()
        receiver.stop()
