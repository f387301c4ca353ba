"""The embedded broker's fixes to amqtt 0.12.1, each shown against the stock broker.

Every bug test runs twice: on Tether's broker ("fixed"), where it must pass, and on
amqtt's own Broker ("stock"), where it is expected to fail (strict xfail). If an amqtt
upgrade fixes a bug upstream, the stock case starts passing and the suite says so.

Clients are real paho 2 clients speaking MQTT 3.1.1. Negative checks ("received
nothing else") end with a barrier: an UNSUBSCRIBE whose UNSUBACK the broker sends from
the session's message loop, after anything it sends on connect or for earlier packets.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.infra import wait_until
from tether.broker import EmbeddedBroker
from tether.broker.version import AMQTT_VERSION, UnsupportedAmqttVersion, check_amqtt_version

BARRIER_TOPIC = "tether/test/barrier"


def desired(device: str) -> str:
    return f"tether/v1/devices/{device}/desired"


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool


class Probe:
    """A paho 2 MQTT 3.1.1 client on its own thread that records everything it receives."""

    def __init__(
        self,
        port: int,
        client_id: str = "",
        *,
        clean_session: bool = True,
        keepalive: int = 60,
        manual_ack: bool = False,
        subscribe_on_connect: tuple[str, int] | None = None,
    ) -> None:
        self.port = port
        self.keepalive = keepalive
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
            manual_ack=manual_ack,
        )
        self.client.reconnect_delay_set(0.2, 1)
        self.subscribe_on_connect = subscribe_on_connect
        self.messages: list[Received] = []
        self.raw: list[paho.MQTTMessage] = []
        self.connacks: list[bool] = []  # session-present flag of every CONNACK
        self.disconnects = 0
        self.acks: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_ack
        self.client.on_unsubscribe = self._on_ack

    # --- callbacks (paho's thread) ---

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._lock:
            self.connacks.append(bool(flags.session_present))
        if self.subscribe_on_connect is not None and not rc.is_failure:
            client.subscribe(*self.subscribe_on_connect)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._lock:
            self.disconnects += 1

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.raw.append(msg)
            self.messages.append(
                Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), bool(msg.dup))
            )

    def _on_ack(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._lock:
            self.acks[mid] = [int(getattr(c, "value", c)) for c in codes]

    # --- actions (test thread) ---

    def start(self) -> Probe:
        """Connect in the background (for storms); see :meth:`connect`."""
        self.client.connect_async("127.0.0.1", self.port, keepalive=self.keepalive)
        self.client.loop_start()
        return self

    def connect(self, timeout: float = 10.0) -> Probe:
        self.start()
        wait_until(lambda: self.connacks, timeout, message="CONNACK")
        return self

    def _wait_ack(self, mid: int, timeout: float) -> list[int]:
        return wait_until(lambda: self.acks.get(mid), timeout, message=f"ack of mid {mid}")

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 10.0) -> int:
        """Subscribe and wait for the SUBACK; the granted QoS (or 128)."""
        rc, mid = self.client.subscribe(topic_filter, qos)
        assert rc == paho.MQTT_ERR_SUCCESS
        return self._wait_ack(mid, timeout)[0]

    def barrier(self, timeout: float = 10.0) -> None:
        """Round trip through the broker's session loop (UNSUBSCRIBE of a filter never used)."""
        rc, mid = self.client.unsubscribe(BARRIER_TOPIC)
        assert rc == paho.MQTT_ERR_SUCCESS
        wait_until(lambda: mid in self.acks, timeout, message="UNSUBACK")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published()

    def topics(self) -> list[str]:
        with self._lock:
            return [m.topic for m in self.messages]

    def received(self, topic: str | None = None) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if topic is None or m.topic == topic]

    def close(self) -> None:
        """Disconnect cleanly (DISCONNECT: no will)."""
        self.client.disconnect()
        self.client.loop_stop()

    def vanish(self) -> None:
        """Drop the connection without DISCONNECT, as a crashed device would."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def __enter__(self) -> Probe:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()


class SilentClient:
    """A paho client that connects, then never sends again (its loop is never run)."""

    def __init__(self, port: int, client_id: str, keepalive: int, will: tuple[str, bytes, int, bool]) -> None:
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311
        )
        self.client.will_set(will[0], will[1], qos=will[2], retain=will[3])
        self.connected = False
        self.client.on_connect = lambda *a: setattr(self, "connected", True)
        self.client.connect("127.0.0.1", port, keepalive=keepalive)
        deadline = time.monotonic() + 10
        while not self.connected and time.monotonic() < deadline:
            self.client.loop(timeout=0.05)
        assert self.connected, "no CONNACK"
        self.connacked_at = time.monotonic()

    def close(self) -> None:
        sock = self.client.socket()
        if sock is not None:
            sock.close()


def stock_bug(reason: str) -> Any:
    return pytest.param(
        True, id="stock", marks=pytest.mark.xfail(strict=True, reason=f"amqtt 0.12.1: {reason}")
    )


FIXED = pytest.param(False, id="fixed")


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[EmbeddedBroker]:
    embedded = EmbeddedBroker("127.0.0.1", 0, stock=request.param)
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()


def settle(broker: EmbeddedBroker, client_id: str) -> None:
    """Wait until the broker has processed the disconnect of ``client_id``.

    Stock amqtt also forgets every anonymous client's session on its next one-second
    housekeeping pass; a real device reconnects after seconds, so wait for that too.
    """
    wait_until(lambda: broker.session_state(client_id) != "connected", 10, message="disconnect processed")
    if broker.stock:
        wait_until(lambda: broker.session_state(client_id) is None, 5, message="stock housekeeping")


# --- bug 1: retained messages of other sessions' subscriptions, sent on connect -------


@pytest.mark.parametrize(
    "broker", [FIXED, stock_bug("retained messages of all subscriptions sent on connect")], indirect=True
)
def test_client_that_subscribed_to_nothing_receives_nothing(broker: EmbeddedBroker) -> None:
    with Probe(broker.port, "controller") as ctrl, Probe(broker.port, "tether-dev-a") as dev_a:
        ctrl.publish(desired("dev-a"), b"secret state of dev-a", retain=True)
        ctrl.subscribe("tether/v1/devices/+/reported")
        dev_a.subscribe(desired("dev-a"))
        wait_until(lambda: dev_a.received(desired("dev-a")), 10, message="dev-a's own retained state")
        with Probe(broker.port, "nosy") as nosy:
            nosy.barrier()
            assert nosy.topics() == []


@pytest.mark.parametrize(
    "broker", [FIXED, stock_bug("other devices' retained topics leak on reconnect")], indirect=True
)
def test_device_never_receives_other_devices_retained_topics(broker: EmbeddedBroker) -> None:
    with Probe(broker.port, "controller") as ctrl:
        ctrl.subscribe("tether/v1/devices/+/reported")
        devices = ["dev-a", "dev-b", "dev-c"]
        for d in devices:
            ctrl.publish(desired(d), f"desired of {d}".encode(), retain=True)
            ctrl.publish(f"tether/v1/devices/{d}/reported", f"reported of {d}".encode(), retain=True)
        probes = [Probe(broker.port, f"tether-{d}", clean_session=False).connect() for d in devices]
        try:
            for d, p in zip(devices, probes, strict=True):
                p.subscribe(desired(d))
            # dev-b restarts, as an agent does: same client id, persistent session, resubscribe
            probes[1].close()
            settle(broker, "tether-dev-b")
            probes[1] = Probe(broker.port, "tether-dev-b", clean_session=False).connect()
            probes[1].subscribe(desired("dev-b"))
            for d, p in zip(devices, probes, strict=True):
                p.barrier()
                assert set(p.topics()) == {desired(d)}, f"{d} received {p.topics()}"
        finally:
            for p in probes:
                p.close()


# --- bug 2: concurrent connects dropped right after CONNACK -----------------------


@pytest.mark.parametrize(
    "broker", [FIXED, stock_bug("'dictionary changed size during iteration' drops clients")], indirect=True
)
def test_200_clients_connecting_at_once_are_all_accepted(broker: EmbeddedBroker) -> None:
    n = 200
    with Probe(broker.port, "controller") as ctrl:
        for i in range(n):
            ctrl.publish(desired(f"storm-{i}"), b"x" * 1024, retain=True)
    probes = [
        Probe(
            broker.port,
            f"tether-storm-{i}",
            clean_session=False,
            subscribe_on_connect=(desired(f"storm-{i}"), 1),
        )
        for i in range(n)
    ]
    try:
        for p in probes:
            p.start()

        def settled() -> bool:
            return any(p.disconnects for p in probes) or all(
                p.received(p.subscribe_on_connect[0]) for p in probes
            )  # type: ignore[index]

        wait_until(settled, 60, message="every client subscribed and got its retained message")
        dropped = [p.client._client_id.decode() for p in probes if p.disconnects]
        assert dropped == [], f"{len(dropped)} of {n} connections dropped by the broker"
        assert all(len(p.connacks) == 1 for p in probes)
        for p in probes:
            p.barrier()
            assert p.topics() == [p.subscribe_on_connect[0]]  # type: ignore[index]
    finally:
        for p in probes:
            p.close()


# --- bug 5: sessions and wills -----------------------------------------------------


@pytest.mark.parametrize(
    "broker", [FIXED, stock_bug("session-present never set for anonymous clients")], indirect=True
)
def test_session_present_is_reported(broker: EmbeddedBroker) -> None:
    first = Probe(broker.port, "tether-dev-p", clean_session=False).connect()
    assert first.connacks == [False]
    first.subscribe(desired("dev-p"))
    first.close()
    settle(broker, "tether-dev-p")
    with Probe(broker.port, "tether-dev-p", clean_session=False) as again:
        assert again.connacks == [True]
    settle(broker, "tether-dev-p")
    with Probe(broker.port, "tether-dev-p", clean_session=True) as clean:
        assert clean.connacks == [False]  # a clean session discards the stored one


@pytest.mark.parametrize(
    "broker", [FIXED, stock_bug("nothing queued for an offline persistent session")], indirect=True
)
def test_messages_for_offline_persistent_session_are_queued(broker: EmbeddedBroker) -> None:
    device = Probe(broker.port, "tether-dev-q", clean_session=False).connect()
    device.subscribe(desired("dev-q"), qos=1)
    device.close()
    settle(broker, "tether-dev-q")
    with Probe(broker.port, "controller") as ctrl:
        for i in range(3):
            ctrl.publish(desired("dev-q"), f"update {i}".encode(), qos=1)
        ctrl.publish(desired("dev-q"), b"qos 0 is not queued", qos=0)
        ctrl.barrier()
    with Probe(broker.port, "tether-dev-q", clean_session=False) as again:  # no resubscribe
        wait_until(lambda: len(again.received()) >= 3, 10, message="queued messages")
        again.barrier()
        got = again.received()
        assert [m.payload for m in got] == [b"update 0", b"update 1", b"update 2"]
        assert all(m.qos == 1 and not m.retain for m in got)


@pytest.mark.parametrize(
    "broker", [FIXED, stock_bug("unacknowledged messages dropped on disconnect")], indirect=True
)
def test_unacknowledged_message_is_redelivered(broker: EmbeddedBroker) -> None:
    device = Probe(broker.port, "tether-dev-u", clean_session=False, manual_ack=True).connect()
    device.subscribe(desired("dev-u"), qos=1)
    with Probe(broker.port, "controller") as ctrl:
        ctrl.publish(desired("dev-u"), b"deploy v2", qos=1)
    wait_until(lambda: device.received(), 10, message="first delivery")
    device.vanish()  # crashed before it acknowledged
    settle(broker, "tether-dev-u")
    with Probe(broker.port, "tether-dev-u", clean_session=False) as again:
        wait_until(lambda: again.received(), 10, message="redelivery")
        again.barrier()
        (message,) = again.received()
        assert message.payload == b"deploy v2" and message.qos == 1 and message.dup


@pytest.mark.parametrize(
    "broker", [FIXED, stock_bug("keepalive expiry never detected, no will")], indirect=True
)
def test_will_is_published_when_keepalive_expires(broker: EmbeddedBroker) -> None:
    keepalive = 2
    will_topic = "tether/v1/devices/dev-k/presence"
    with Probe(broker.port, "watcher") as watcher:
        watcher.subscribe(will_topic, qos=1)
        silent = SilentClient(broker.port, "tether-dev-k", keepalive, (will_topic, b"offline", 1, False))
        try:
            bound = 1.5 * keepalive + 1
            wait_until(lambda: watcher.received(will_topic), bound, message=f"will within {bound:g} s")
            elapsed = time.monotonic() - silent.connacked_at
            assert elapsed <= bound
            assert elapsed >= keepalive, "disconnected before the keepalive expired"
            assert watcher.received(will_topic)[0].payload == b"offline"
        finally:
            silent.close()


# --- what the fixed broker adds, on the fixed broker only ----------------------------


@pytest.mark.parametrize("broker", [FIXED], indirect=True)
def test_takeover_closes_the_old_connection_without_a_will(broker: EmbeddedBroker) -> None:
    will_topic = "tether/v1/devices/dev-t/presence"
    with Probe(broker.port, "watcher") as watcher:
        watcher.subscribe(will_topic)
        old = Probe(broker.port, "tether-dev-t", clean_session=False)
        old.client.will_set(will_topic, b"offline", qos=1)
        old.client.reconnect_delay_set(30, 60)  # do not fight the new connection
        old.connect()
        old.subscribe(desired("dev-t"))
        with Probe(broker.port, "tether-dev-t", clean_session=False) as new:
            assert new.connacks == [True]
            wait_until(lambda: old.disconnects, 10, message="old connection closed")
            with Probe(broker.port, "controller") as ctrl:
                ctrl.publish(desired("dev-t"), b"to the new connection", qos=1)
            wait_until(lambda: new.received(desired("dev-t")), 10, message="delivery to the new connection")
            watcher.barrier()
            assert watcher.received(will_topic) == []
        old.client.loop_stop()


@pytest.mark.parametrize("broker", [FIXED], indirect=True)
def test_offline_queue_is_bounded(broker: EmbeddedBroker) -> None:
    from tether.broker.amqtt_fixes import TetherBroker

    # the broker runs in its own process with the default bound
    limit = inspect.signature(TetherBroker).parameters["max_queued_messages"].default
    device = Probe(broker.port, "tether-dev-b", clean_session=False).connect()
    device.subscribe(desired("dev-b"), qos=1)
    device.close()
    settle(broker, "tether-dev-b")
    with Probe(broker.port, "controller") as ctrl:
        for i in range(limit + 5):
            ctrl.client.publish(desired("dev-b"), str(i).encode(), qos=1)
        ctrl.publish(desired("dev-b"), b"last", qos=1)
    with Probe(broker.port, "tether-dev-b", clean_session=False) as again:
        wait_until(lambda: len(again.received()) >= limit, 20, message="queued messages")
        again.barrier()
        got = [m.payload for m in again.received()]
        assert got == [str(i).encode() for i in range(limit)]  # the oldest are kept, as Mosquitto does


def test_version_check() -> None:
    assert check_amqtt_version() == AMQTT_VERSION


def test_version_check_refuses_another_amqtt(monkeypatch: pytest.MonkeyPatch) -> None:
    import tether.broker.version as amqtt_version

    monkeypatch.setattr(amqtt_version, "version", lambda name: "0.13.0")
    with pytest.raises(UnsupportedAmqttVersion, match=r"amqtt==0\.12\.1"):  # checked before the child starts
        EmbeddedBroker("127.0.0.1", 0).start()
    assert EmbeddedBroker("127.0.0.1", 0, stock=True).stock  # the stock path does not check


def test_pinned_amqtt_version_matches() -> None:
    """pyproject pins exactly the version the overrides were written for."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert f"amqtt=={AMQTT_VERSION}" in pyproject["project"]["optional-dependencies"]["controller"]


def test_light_session_and_handler_have_every_attribute_amqtt_sets() -> None:
    """TetherSession and TetherHandler replace amqtt's __init__ (to skip unused queues)."""
    import asyncio

    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
    from amqtt.plugins.manager import PluginManager
    from amqtt.session import Session
    from tether.broker.amqtt_fixes import TetherHandler, TetherSession

    assert set(vars(Session())) <= set(vars(TetherSession()))

    async def handlers() -> tuple[set[str], set[str]]:
        manager: PluginManager[Any] = PluginManager("tether.test.none", None)
        stock = BrokerProtocolHandler(manager, Session())
        ours = TetherHandler(manager, TetherSession())
        return set(vars(stock)), set(vars(ours))

    stock_attrs, our_attrs = asyncio.run(handlers())
    assert stock_attrs <= our_attrs


def test_anonymous_clients_can_be_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The authentication override keeps amqtt's rule (here: AnonymousAuthPlugin, anonymous off).

    The configuration is patched, so the broker runs in this process (BrokerThread)."""
    import tether.broker.child as child

    original = child.broker_config

    def strict(*args: Any, **kwargs: Any) -> dict[str, Any]:
        config = original(*args, **kwargs)
        config["plugins"] = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False}}
        return config

    monkeypatch.setattr(child, "broker_config", strict)
    broker = child.BrokerThread("127.0.0.1", 0)
    broker.start()
    try:
        anonymous = Probe(broker.port, "anon")
        anonymous.client.connect("127.0.0.1", broker.port)
        anonymous.client.loop_start()
        wait_until(lambda: anonymous.disconnects, 10, message="refused")
        anonymous.client.loop_stop()
        assert broker.session_state("anon") is None
        named = Probe(broker.port, "named")
        named.client.username_pw_set("device-1")
        with named:
            assert named.subscribe("a/b") == 1
    finally:
        broker.stop()
