"""MQTT 3.1.1 semantics of Tether's embedded broker, checked with independent clients:
paho 2 and Debian's mosquitto_sub / mosquitto_pub (mosquitto-clients).

These run on the fixed broker only; tests/test_broker.py compares it with stock amqtt.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest
from support.infra import wait_until
from test_broker import Probe, desired
from tether.broker import EmbeddedBroker
from tether.broker.child import BrokerThread

MOSQUITTO_SUB = "/usr/bin/mosquitto_sub"
MOSQUITTO_PUB = "/usr/bin/mosquitto_pub"


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    embedded = EmbeddedBroker("127.0.0.1", 0)
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture
def mosquitto_clients() -> None:
    if not (os.access(MOSQUITTO_SUB, os.X_OK) and os.access(MOSQUITTO_PUB, os.X_OK)):
        if os.environ.get("TETHER_REQUIRE_MOSQUITTO") == "1":
            pytest.fail("TETHER_REQUIRE_MOSQUITTO=1 but mosquitto_sub/mosquitto_pub are missing")
        pytest.skip("mosquitto-clients not installed (apt-get install mosquitto-clients)")


def mosquitto_sub(port: int, *args: str, count: int, timeout: int = 10) -> list[str]:
    """Run mosquitto_sub until it has ``count`` messages (it fails after ``timeout`` s otherwise)."""
    result = subprocess.run(
        [
            MOSQUITTO_SUB,
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-V",
            "mqttv311",
            "-C",
            str(count),
            "-W",
            str(timeout),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout + 5,
    )
    assert result.returncode == 0, f"mosquitto_sub failed ({result.returncode}): {result.stderr}"
    return result.stdout.splitlines()


def mosquitto_pub(port: int, *args: str) -> None:
    result = subprocess.run(
        [MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv311", "-q", "1", *args],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert result.returncode == 0, f"mosquitto_pub failed: {result.stderr}"


# --- retained messages -----------------------------------------------------------------


def test_late_subscriber_gets_the_retained_message_once(broker: EmbeddedBroker) -> None:
    topic = desired("dev-1")
    with Probe(broker.port, "controller") as ctrl:
        ctrl.publish(topic, b"v1", qos=1, retain=True)
    with Probe(broker.port, "late") as late:
        assert late.subscribe(topic, qos=1) == 1
        wait_until(lambda: late.received(topic), 10, message="retained message")
        late.barrier()
        assert [(m.payload, m.retain, m.qos) for m in late.received()] == [(b"v1", True, 1)]
        # an update reaches the established subscription as a normal message [MQTT-3.3.1-9]
        with Probe(broker.port, "controller") as ctrl:
            ctrl.publish(topic, b"v2", qos=1, retain=True)
        wait_until(lambda: len(late.received()) == 2, 10, message="update")
        late.barrier()
        assert [(m.payload, m.retain) for m in late.received()] == [(b"v1", True), (b"v2", False)]
        # subscribing again replaces the subscription and resends the retained message [MQTT-3.8.4-3]
        late.subscribe(topic, qos=1)
        wait_until(lambda: len(late.received()) == 3, 10, message="retained after resubscribe")
        assert (late.received()[-1].payload, late.received()[-1].retain) == (b"v2", True)


def test_late_subscriber_with_mosquitto_sub(broker: EmbeddedBroker, mosquitto_clients: None) -> None:
    mosquitto_pub(broker.port, "-t", desired("dev-m"), "-m", "hello", "-r")
    lines = mosquitto_sub(broker.port, "-t", desired("dev-m"), "-q", "1", "-F", "%r %q %t %p", count=1)
    assert lines == [f"1 1 {desired('dev-m')} hello"]


def test_wildcard_subscribers_get_every_match(broker: EmbeddedBroker, mosquitto_clients: None) -> None:
    devices = [f"dev-{i}" for i in range(5)]
    retained = {desired(d): f"desired {d}".encode() for d in devices}
    retained |= {f"tether/v1/devices/{d}/reported": f"reported {d}".encode() for d in devices[:2]}
    retained["tether/v1/stacks/" + "a" * 64] = b"stack"
    retained["other/topic"] = b"not tether"
    with Probe(broker.port, "controller") as ctrl:
        for topic, payload in retained.items():
            ctrl.publish(topic, payload, retain=True)

    def matching(prefix: str = "", suffix: str = "") -> set[str]:
        return {t for t in retained if t.startswith(prefix) and t.endswith(suffix)}

    cases = {
        "tether/v1/devices/+/desired": matching("tether/v1/devices/", "/desired"),
        "tether/v1/devices/dev-1/#": matching("tether/v1/devices/dev-1/"),
        "+/v1/devices/+/reported": matching(suffix="/reported"),
        "tether/v1/#": matching("tether/v1/"),
        "tether/#": matching("tether/"),
        "#": set(retained),
        "tether/v1/devices/+": set(),
    }
    for topic_filter, expected in cases.items():
        with Probe(broker.port, "wild") as probe:
            probe.subscribe(topic_filter, qos=1)
            count = len(expected)
            wait_until(
                lambda p=probe, n=count: len(p.received()) >= n, 10, message=f"matches of {topic_filter}"
            )
            probe.barrier()
            got = probe.received()
            assert sorted(m.topic for m in got) == sorted(expected), topic_filter
            assert all(m.retain and m.payload == retained[m.topic] for m in got)
    lines = mosquitto_sub(broker.port, "-t", "tether/v1/devices/+/desired", "-F", "%t", count=len(devices))
    assert sorted(lines) == sorted(matching("tether/v1/devices/", "/desired"))


def test_zero_length_retained_publish_clears(broker: EmbeddedBroker, mosquitto_clients: None) -> None:
    topic = desired("dev-z")
    with Probe(broker.port, "present") as present:
        present.subscribe(topic, qos=1)
        mosquitto_pub(broker.port, "-t", topic, "-m", "state", "-r")
        mosquitto_pub(broker.port, "-t", topic, "-n", "-r")  # zero-length, retained
        wait_until(lambda: len(present.received()) == 2, 10, message="both publishes")
        # current subscribers get the empty message as a normal one
        assert [(m.payload, m.retain) for m in present.received()] == [(b"state", False), (b"", False)]
    with Probe(broker.port, "late") as late:
        late.subscribe(topic, qos=1)
        late.subscribe("tether/v1/devices/+/desired", qos=1)
        late.barrier()
        assert late.received() == []
    # and a new retained message is stored again
    mosquitto_pub(broker.port, "-t", topic, "-m", "again", "-r")
    assert mosquitto_sub(broker.port, "-t", topic, "-F", "%r %p", count=1) == ["1 again"]


def test_last_will_with_retain(broker: EmbeddedBroker, mosquitto_clients: None) -> None:
    topic = "tether/v1/devices/dev-w/presence"
    with Probe(broker.port, "watcher") as watcher:
        watcher.subscribe(topic, qos=1)
        device = Probe(broker.port, "tether-dev-w")
        device.client.will_set(topic, b"offline", qos=1, retain=True)
        device.connect()
        device.publish(topic, b"online", qos=1, retain=True)
        device.vanish()
        wait_until(lambda: len(watcher.received()) == 2, 10, message="the will")
        assert [(m.payload, m.retain, m.qos) for m in watcher.received()] == [
            (b"online", False, 1),
            (b"offline", False, 1),
        ]
    # the will replaced the retained presence
    assert mosquitto_sub(broker.port, "-t", topic, "-q", "1", "-F", "%r %q %p", count=1) == ["1 1 offline"]


def test_will_is_not_published_after_disconnect(broker: EmbeddedBroker) -> None:
    topic = "tether/v1/devices/dev-d/presence"
    with Probe(broker.port, "watcher") as watcher:
        watcher.subscribe(topic, qos=1)
        device = Probe(broker.port, "tether-dev-d")
        device.client.will_set(topic, b"offline", qos=1, retain=True)
        device.connect()
        device.close()  # DISCONNECT: the will is discarded
        wait_until(lambda: broker.session_state("tether-dev-d") is None, 10, message="clean session gone")
        watcher.barrier()
        assert watcher.received() == []


def test_will_from_mosquitto_sub(broker: EmbeddedBroker, mosquitto_clients: None) -> None:
    topic = "tether/v1/devices/dev-ms/presence"
    with Probe(broker.port, "watcher") as watcher:
        watcher.subscribe(topic, qos=1)
        proc = subprocess.Popen(
            [MOSQUITTO_SUB, "-p", str(broker.port), "-i", "tether-dev-ms", "-t", "x/y", "-V", "mqttv311",
             "--will-topic", topic, "--will-payload", "gone", "--will-qos", "1", "--will-retain"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_until(lambda: broker.session_state("tether-dev-ms") == "connected", 10, message="connected")
        finally:
            proc.kill()  # no DISCONNECT
            proc.wait()
        wait_until(lambda: watcher.received(topic), 10, message="the will")
        assert watcher.received(topic)[0].payload == b"gone"


# --- QoS ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sub_qos", "pub_qos", "expected"), [(0, 1, 0), (1, 0, 0), (1, 1, 1), (2, 1, 1), (1, 2, 1)]
)
def test_qos_is_downgraded_to_the_lower_of_subscription_and_message(
    broker: EmbeddedBroker, sub_qos: int, pub_qos: int, expected: int
) -> None:
    topic = desired("dev-qos")
    with Probe(broker.port, "sub") as sub, Probe(broker.port, "pub") as pub:
        assert sub.subscribe(topic, qos=sub_qos) == sub_qos
        pub.publish(topic, b"live", qos=pub_qos)
        pub.publish(desired("dev-qos-retained"), b"kept", qos=pub_qos, retain=True)
        wait_until(lambda: sub.received(topic), 10, message="live message")
        assert sub.received(topic)[0].qos == expected
        sub.subscribe(desired("dev-qos-retained"), qos=sub_qos)
        wait_until(lambda: sub.received(desired("dev-qos-retained")), 10, message="retained message")
        assert sub.received(desired("dev-qos-retained"))[0].qos == expected


def test_overlapping_subscriptions_deliver_one_copy_at_the_highest_qos(broker: EmbeddedBroker) -> None:
    with Probe(broker.port, "sub") as sub, Probe(broker.port, "pub") as pub:
        sub.subscribe("tether/v1/devices/+/desired", qos=0)
        sub.subscribe(desired("dev-o"), qos=1)
        pub.publish(desired("dev-o"), b"once", qos=1)
        wait_until(lambda: sub.received(), 10, message="delivery")
        sub.barrier()
        assert [(m.payload, m.qos) for m in sub.received()] == [(b"once", 1)]


def test_messages_from_one_publisher_arrive_in_order(broker: EmbeddedBroker) -> None:
    with Probe(broker.port, "sub") as sub, Probe(broker.port, "pub") as pub:
        sub.subscribe("tether/v1/devices/+/events", qos=1)
        infos = [
            pub.client.publish("tether/v1/devices/dev-o/events", str(i).encode(), qos=1) for i in range(200)
        ]
        for info in infos:
            info.wait_for_publish(10)
        wait_until(lambda: len(sub.received()) == 200, 20, message="200 messages")
        assert [int(m.payload) for m in sub.received()] == list(range(200))


# --- subscriptions -----------------------------------------------------------------------


def test_invalid_filters_are_refused_and_valid_ones_granted(broker: EmbeddedBroker) -> None:
    """paho refuses to send invalid filters, so this client is a raw socket."""
    filters = [("a/#/b", 1), ("a+", 1), ("a/+/c", 1), ("a/b#", 1), ("#/a", 1), ("a/#", 2), ("", 1)]
    body = struct.pack("!H", 7) + b"".join(
        struct.pack("!H", len(f)) + f.encode() + bytes([q]) for f, q in filters
    )
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
        s.sendall(_connect_packet(4, b"raw-sub"))
        assert _recv_exactly(s, 4) == b"\x20\x02\x00\x00"
        s.sendall(bytes([0x82, len(body)]) + body)
        suback = _recv_exactly(s, 4 + len(filters))
    assert suback[:4] == bytes([0x90, 2 + len(filters), 0, 7])
    assert list(suback[4:]) == [0x80, 0x80, 1, 0x80, 0x80, 2, 0x80]


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def test_unsubscribe_stops_delivery(broker: EmbeddedBroker) -> None:
    with Probe(broker.port, "sub") as sub, Probe(broker.port, "pub") as pub:
        sub.subscribe("tether/v1/devices/+/desired", qos=1)
        pub.publish(desired("dev-x"), b"1")
        wait_until(lambda: sub.received(), 10, message="first")
        rc, mid = sub.client.unsubscribe("tether/v1/devices/+/desired")
        wait_until(lambda: mid in sub.acks, 10, message="UNSUBACK")
        pub.publish(desired("dev-x"), b"2")
        pub.barrier()
        sub.barrier()
        assert [m.payload for m in sub.received()] == [b"1"]


@pytest.fixture
def in_process() -> Iterator[BrokerThread]:
    """The same broker in this process, for tests that reach into it."""
    broker = BrokerThread("127.0.0.1", 0)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_dollar_topics_are_not_matched_by_leading_wildcards(in_process: BrokerThread) -> None:
    """[MQTT-4.7.2-1]: clients cannot publish to $ topics, so the broker itself publishes one."""
    broker = in_process
    with Probe(broker.port, "all") as everything, Probe(broker.port, "sys") as sys_sub:
        everything.subscribe("#", qos=0)
        everything.subscribe("+/uptime", qos=0)
        sys_sub.subscribe("$SYS/#", qos=0)
        assert broker._loop is not None and broker._broker is not None

        async def internal() -> None:
            assert broker._broker is not None
            await broker._broker.retain_message(None, "$SYS/uptime", b"42", 0)
            await broker._broker.internal_message_broadcast("$SYS/uptime", b"42", 0)

        asyncio.run_coroutine_threadsafe(internal(), broker._loop).result(5)
        wait_until(lambda: sys_sub.received(), 10, message="$SYS message")
        everything.barrier()
        assert everything.received() == []
    with Probe(broker.port, "late-all") as late:
        late.subscribe("#", qos=0)
        late.subscribe("+/uptime", qos=0)
        late.subscribe("$SYS/+", qos=0)
        wait_until(lambda: late.received(), 10, message="retained $SYS message")
        late.barrier()
        assert [m.topic for m in late.received()] == ["$SYS/uptime"]


# --- protocol ----------------------------------------------------------------------------


def _connect_packet(level: int, client_id: bytes = b"v5") -> bytes:
    body = struct.pack("!H", 4) + b"MQTT" + bytes([level, 0x02]) + struct.pack("!H", 60)
    if level == 5:
        body += b"\x00"  # no properties
    body += struct.pack("!H", len(client_id)) + client_id
    return bytes([0x10, len(body)]) + body


def test_mqtt5_connect_is_refused(broker: EmbeddedBroker) -> None:
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
        s.sendall(_connect_packet(5))
        assert s.recv(4) == b"\x20\x02\x00\x01"  # CONNACK: unacceptable protocol version


def test_empty_client_id_needs_a_clean_session(broker: EmbeddedBroker) -> None:
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
        body = (
            struct.pack("!H", 4) + b"MQTT" + bytes([4, 0x00]) + struct.pack("!H", 60) + struct.pack("!H", 0)
        )
        s.sendall(bytes([0x10, len(body)]) + body)
        assert s.recv(4) == b"\x20\x02\x00\x02"  # identifier rejected [MQTT-3.1.3-8]
    with Probe(broker.port, "") as anonymous:  # clean session: the broker assigns an id
        assert anonymous.subscribe("a/b") == 1


def test_garbage_before_connect_is_dropped_and_the_broker_keeps_serving(broker: EmbeddedBroker) -> None:
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        s.settimeout(5)
        assert s.recv(16) == b""  # closed
    with Probe(broker.port, "after") as probe:
        assert probe.subscribe("a/b") == 1


def test_a_connection_that_never_sends_connect_is_closed(
    in_process: BrokerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tether.broker.amqtt_fixes as fixes

    monkeypatch.setattr(fixes, "CONNECT_TIMEOUT", 1.0)
    with socket.create_connection(("127.0.0.1", in_process.port), timeout=10) as s:
        assert s.recv(16) == b""  # closed by the broker after CONNECT_TIMEOUT
