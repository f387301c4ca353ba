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
from tether.protocol.mqtt import RECV_SIZE, BrokerAddress, MqttClient
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
    sends: list[int] = []
    plain_send = sender._paho._sock_send

    def counting_send(buf: bytes | bytearray) -> int:
        sends.append(len(buf))
        return plain_send(buf)

    sender._paho._sock_send = counting_send  # type: ignore[method-assign]
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
