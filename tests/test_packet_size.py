"""The message size limit (issue 13): one constant, enforced by both brokers at the packet header.

A single 64 MiB publish cost the embedded broker 234 MB before. Now the embedded broker
closes the connection as soon as a fixed header announces more than
:data:`~tether.protocol.codec.MAX_PACKET_SIZE`, before reading the body, and the Mosquitto
configuration Tether writes says ``max_packet_size`` with the same value. The largest
payload Tether itself may send (:data:`~tether.protocol.codec.MAX_PAYLOAD`) still passes.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest
from support.infra import Mosquitto, wait_until
from test_broker import Probe
from tether.broker import EmbeddedBroker
from tether.controller.mosquitto import render_conf
from tether.protocol import codec
from tether.protocol.mqtt import MqttClient, parse_broker_url

TOPIC = "tether/v1/devices/dev-x/events"
REPO = Path(__file__).resolve().parent.parent


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _connect_packet(client_id: bytes) -> bytes:
    body = struct.pack("!H", 4) + b"MQTT" + bytes([4, 0x02]) + struct.pack("!H", 60)
    body += struct.pack("!H", len(client_id)) + client_id
    return bytes([0x10, len(body)]) + body


def _send_huge_publish(port: int, size: int) -> int:
    """Connect with a raw socket and send a QoS 0 PUBLISH of ``size`` payload bytes, 1 MiB at a
    time, until the broker closes the connection; the payload bytes sent by then."""
    body = struct.pack("!H", len(TOPIC)) + TOPIC.encode()
    remaining = len(body) + size
    length = b""
    while True:  # MQTT's variable-length encoding of the remaining length
        byte, remaining = remaining % 128, remaining // 128
        length += bytes([byte | (0x80 if remaining else 0)])
        if not remaining:
            break
    chunk = b"x" * (1024 * 1024)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(_connect_packet(b"big"))
        assert s.recv(4) == b"\x20\x02\x00\x00"  # CONNACK accepted
        with pytest.raises(OSError):  # reset or broken pipe: the broker closed the connection
            s.sendall(b"\x30" + length + body)
            while sent < size:
                s.sendall(chunk)
                sent += len(chunk)
            if s.recv(1) == b"":  # everything was sent: closed now, or still open (a timeout)
                raise ConnectionResetError("closed after the whole packet")
    return sent


def _largest_allowed_passes(port: int, watcher: Probe) -> None:
    with Probe(port, "largest") as largest:
        payload = os.urandom(codec.MAX_PAYLOAD)
        largest.publish(TOPIC, payload)
    wait_until(lambda: watcher.received(TOPIC), 30, message="the largest allowed message")
    assert watcher.received(TOPIC)[0].payload == payload


def test_embedded_broker_refuses_an_oversized_publish_at_its_header() -> None:
    """A 64 MiB PUBLISH closes the connection at its header: the broker's memory does not grow by
    it and nobody gets it; a message with the largest allowed payload still goes through."""
    broker = EmbeddedBroker("127.0.0.1", 0)
    port = broker.start()
    try:
        assert broker.pid is not None
        with Probe(port, "watcher") as watcher:
            watcher.subscribe(TOPIC, qos=1)
            rss_before = _rss_kib(broker.pid)
            size = 64 * 1024 * 1024
            assert _send_huge_publish(port, size) < size  # it stopped reading long before the end
            grown = _rss_kib(broker.pid) - rss_before
            assert grown < 16 * 1024, f"broker RSS grew by {grown} KiB"
            watcher.barrier()
            assert watcher.received(TOPIC) == []
            _largest_allowed_passes(port, watcher)
    finally:
        broker.stop()


@pytest.mark.mosquitto
def test_mosquitto_with_tethers_configuration_refuses_an_oversized_publish(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The generated and the shipped mosquitto.conf set max_packet_size to MAX_PACKET_SIZE, and with
    it Mosquitto drops a 64 MiB PUBLISH and passes the largest allowed one."""
    wanted = f"max_packet_size {codec.MAX_PACKET_SIZE}"
    assert wanted in render_conf(tmp_path).splitlines()
    assert wanted in (REPO / "compose" / "mosquitto.conf").read_text().splitlines()
    mosquitto.stop()  # the fixture skips without mosquitto; this test needs its own configuration
    limited = Mosquitto(tmp_path / "limited", extra_conf=wanted)
    (tmp_path / "limited").mkdir()
    with limited, Probe(limited.port, "watcher") as watcher:
        watcher.subscribe(TOPIC, qos=1)
        size = 64 * 1024 * 1024
        assert _send_huge_publish(limited.port, size) < size
        watcher.barrier()
        assert watcher.received(TOPIC) == []
        _largest_allowed_passes(limited.port, watcher)


def test_client_never_sends_what_a_broker_would_close_it_for() -> None:
    """Tether's MQTT client refuses (False, logged) a message over the limit instead of sending it
    and being disconnected, and stays connected; the largest allowed payload is sent."""
    broker = EmbeddedBroker("127.0.0.1", 0)
    port = broker.start()
    client = MqttClient([parse_broker_url(f"mqtt://127.0.0.1:{port}")], "tether-cli-size")
    try:
        client.connect(10)
        assert not client.publish_confirmed(TOPIC, b"x" * codec.MAX_PACKET_SIZE)
        assert client.publish_many(
            [(TOPIC, b"x" * codec.MAX_PACKET_SIZE, 1, False), (TOPIC, b"ok", 1, False)]
        ) == [
            False,
            True,
        ]
        assert client.connected
        assert client.publish_confirmed(TOPIC, b"x" * codec.MAX_PAYLOAD)
    finally:
        client.stop()
        broker.stop()
