"""Wills, client ids and packet sizes on the embedded broker, attacked with independent clients.

Issue 13: a client's last will was published without any ACL check, so a device (or a
token holder) could publish anything, retained too, by connecting with a will and
dropping TCP: a forged desired state for another device, requests to the controller.
Here every attack runs against the real broker process on the three listeners `tether up`
offers: plain, ``--tls`` and ``--require-client-cert`` (the certificate's CN is the user).

A denied message is simply absent, so negative checks end with a barrier: a message the
same watcher must get first if nothing forged came before it.
"""

from __future__ import annotations

import queue
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.infra import wait_until
from tether.broker import BrokerTable, EmbeddedBroker
from tether.controller.tls import client_files, quickstart
from tether.protocol import codec
from tether.protocol.credentials import Credential, TokenGrant, hash_password, hash_token
from tether.protocol.models import DesiredState

R = "tether/v1"
NOT_AUTHORIZED = 135  # paho 2's reason code for MQTT 3.1.1 CONNACK 5
IDENTIFIER_REJECTED = 133  # CONNACK 2
PASSWORDS = {
    "dev-a": "pw-a",
    "dev-b": "pw-b",
    "admin": "pw-admin",
    "ctl": "pw-ctl",
    "enroll:dev-n": "fleet-token",
}


@dataclass
class Fleet:
    broker: EmbeddedBroker
    table: BrokerTable
    mode: str
    tmp: Path
    ca: Path | None


class Client:
    """A paho 2 client (MQTT 3.1.1) that records CONNACK, SUBACK codes and messages."""

    def __init__(
        self,
        fleet: Fleet,
        client_id: str,
        user: str,
        will: tuple[str, bytes, bool] | None = None,
    ) -> None:
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311
        )
        if fleet.mode == "mtls":  # the certificate names the user; no password
            cert, key = client_files(fleet.tmp, user)
            context = ssl.create_default_context(cafile=str(fleet.ca))
            context.load_cert_chain(str(cert), str(key))
            self.client.tls_set_context(context)
        else:
            self.client.username_pw_set(user, PASSWORDS[user])
            if fleet.mode == "tls":
                self.client.tls_set_context(ssl.create_default_context(cafile=str(fleet.ca)))
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=will[2])
        self.connack: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[int] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.disconnected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.put(rc.value)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(rcs[0].value)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload), m.retain))
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.connect("127.0.0.1", fleet.broker.port, keepalive=30)
        self.client.loop_start()
        self.rc = self.connack.get(timeout=10)

    def subscribe(self, topic_filter: str) -> int:
        self.client.subscribe(topic_filter, 1)
        return self.subacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def next_message(self) -> tuple[str, bytes, bool]:
        return self.messages.get(timeout=10)

    def vanish(self) -> None:
        """Drop the TCP connection without DISCONNECT: the broker's cue to publish the will."""
        self.client.loop_stop()  # no reconnect
        sock = self.client.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(params=["plain", "tls", "mtls"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    table = BrokerTable(
        [
            Credential("dev-a", "device", "dev-a", hash_password("pw-a", iterations=1000)),
            Credential("dev-b", "device", "dev-b", hash_password("pw-b", iterations=1000)),
            Credential("admin", "operator", "admin", hash_password("pw-admin", iterations=1000)),
            Credential("ctl", "controller", "controller", hash_password("pw-ctl", iterations=1000)),
        ]
    )
    mode = request.param
    ca: Path | None = None
    tls: tuple[str, str] | None = None
    client_ca: str | None = None
    if mode != "plain":
        files = quickstart(tmp_path)
        ca = files.ca
        tls = (str(files.cert), str(files.key))
        client_ca = str(ca) if mode == "mtls" else None
    broker = EmbeddedBroker("127.0.0.1", 0, table=table, tls=tls, client_ca=client_ca)
    broker.start()
    yield Fleet(broker, table, mode, tmp_path, ca)
    broker.stop()


@pytest.fixture
def connect(fleet: Fleet) -> Iterator[object]:
    opened: list[Client] = []

    def make(client_id: str, user: str, will: tuple[str, bytes, bool] | None = None) -> Client:
        c = Client(fleet, client_id, user, will)
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


def _forged_desired(device_id: str) -> bytes:
    return codec.encode(DesiredState(device_id=device_id, generation=2**53 - 1))


def _nothing_before_barrier(watcher: Client, ctl: Client, topic: str) -> None:
    """The watcher's next message on ``topic`` is the controller's barrier (nothing forged first)."""
    ctl.publish(topic, b"barrier")
    assert watcher.next_message() == (topic, b"barrier", False)


def test_will_on_another_devices_desired_state_is_refused(connect, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    """A device's CONNECT with a (retained) will on another device's desired state gets CONNACK 5,
    and no forged desired state reaches that device, live or retained."""
    ctl = connect("tether-controller-1", "ctl")
    watcher = connect("tether-controller-2", "ctl")
    assert watcher.subscribe(f"{R}/#") == 1
    target = f"{R}/devices/dev-b/desired"
    attacker = connect("tether-dev-a", "dev-a", will=(target, _forged_desired("dev-b"), True))
    assert attacker.rc == NOT_AUTHORIZED
    assert attacker.disconnected.wait(10)
    _nothing_before_barrier(watcher, ctl, target)
    b = connect("tether-dev-b", "dev-b")  # what B gets when it subscribes: nothing retained
    assert b.subscribe(target) == 1
    _nothing_before_barrier(b, ctl, target)


def test_will_on_controller_requests_is_refused(connect, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    """A device or a fleet token holder may not send the controller a request through its will; the
    device with a will on its own presence topic is accepted and that will is published."""
    ctl = connect("tether-controller-1", "ctl")
    watcher = connect("tether-controller-2", "ctl")
    assert watcher.subscribe(f"{R}/#") == 1
    requests = f"{R}/controller/requests"
    attacker = connect("tether-dev-a", "dev-a", will=(requests, b"\x81\xa4kind\xadgroups.create", False))
    assert attacker.rc == NOT_AUTHORIZED
    for topic in (f"{R}/#", "#", "$SYS/broker/x", f"{R}/devices/+/desired"):  # no filter is a will topic
        assert connect("tether-dev-a", "dev-a", will=(topic, b"x", False)).rc == NOT_AUTHORIZED
    if fleet.mode != "mtls":  # a fleet token holder (enrollment needs a broker without mTLS)
        fleet.table.set_tokens({hash_token("fleet-token"): TokenGrant("t1")})
        assert (
            connect("tether-enroll-dev-n", "enroll:dev-n", will=(requests, b"x", False)).rc == NOT_AUTHORIZED
        )
        assert connect("tether-enroll-dev-n", "enroll:dev-n").rc == 0
    _nothing_before_barrier(watcher, ctl, requests)
    presence = f"{R}/devices/dev-a/presence"
    honest = connect("tether-dev-a", "dev-a", will=(presence, b"offline", True))
    assert honest.rc == 0
    honest.vanish()
    assert watcher.next_message() == (presence, b"offline", False)


def test_will_is_checked_again_when_it_is_sent(connect, fleet: Fleet) -> None:  # type: ignore[no-untyped-def]
    """A will accepted at CONNECT is dropped if its owner may no longer publish it (revoked) when it
    goes out; a device that was not revoked still gets its will published."""
    ctl = connect("tether-controller-1", "ctl")
    watcher = connect("tether-controller-2", "ctl")
    assert watcher.subscribe(f"{R}/devices/+/presence") == 1
    a = connect("tether-dev-a", "dev-a", will=(f"{R}/devices/dev-a/presence", b"offline-a", True))
    b = connect("tether-dev-b", "dev-b", will=(f"{R}/devices/dev-b/presence", b"offline-b", True))
    assert a.rc == b.rc == 0
    cred = fleet.table.get("dev-a")
    assert cred is not None
    fleet.table.put(Credential(cred.username, cred.role, cred.name, cred.password_hash, revoked=True))
    a.vanish()
    wait_until(
        lambda: fleet.broker.session_state("tether-dev-a") is None, 10, message="dev-a's session ended"
    )
    _nothing_before_barrier(watcher, ctl, f"{R}/devices/dev-a/presence")
    b.vanish()
    assert watcher.next_message() == (f"{R}/devices/dev-b/presence", b"offline-b", False)


def test_client_id_that_is_not_one_topic_level_is_rejected(connect) -> None:  # type: ignore[no-untyped-def]
    """An operator connecting with client id '+' (or any id with '/', '+', '#' or a control character)
    gets CONNACK 2 and so never reads another client's replies; a plain id still works."""
    for client_id in ("+", "#", "tether-cli-1/x", "a+b", "cli\x07", "cli\n"):
        assert connect(client_id, "admin").rc == IDENTIFIER_REJECTED, client_id
    op = connect("tether-cli-1", "admin")
    assert op.rc == 0
    assert op.subscribe(f"{R}/clients/tether-cli-1/replies") == 1
    assert op.subscribe(f"{R}/clients/+/replies") == 0x80
    assert op.subscribe(f"{R}/clients/tether-cli-2/replies") == 0x80
