"""Credentials and the topic ACL on the embedded broker (broker/auth.py over protocol/acl.py).

Clients are real paho 2 clients speaking MQTT 3.1.1. A denied PUBLISH is dropped without
telling the client, so negative checks end with a barrier: the same client publishes an
allowed message afterwards, and once the watcher has that one, the denied one would have
arrived before it (one client's messages are routed in order).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.infra import wait_until
from tether.broker import BrokerTable, EmbeddedBroker
from tether.protocol.credentials import Credential, CredentialTable, TokenGrant, hash_password, hash_token
from tether.protocol.lockout import LockoutPolicy

R = "tether/v1"
HASH_A = "a" * 64
HASH_B = "b" * 64
REFUSED = {134, 135}  # paho 2's reason codes for MQTT 3.1.1 CONNACK 4 (bad credentials) and 5
PASSWORDS = {"dev-a": "pw-a", "dev-b": "pw-b", "admin": "pw-admin", "ctl": "pw-ctl"}


def _table() -> BrokerTable:
    """The controller's side of the table; the broker's process keeps a copy up to date."""
    table = BrokerTable(
        [
            Credential("dev-a", "device", "dev-a", hash_password("pw-a", iterations=1000)),
            Credential("dev-b", "device", "dev-b", hash_password("pw-b", iterations=1000)),
            Credential("admin", "operator", "admin", hash_password("pw-admin", iterations=1000)),
            Credential("ctl", "controller", "controller", hash_password("pw-ctl", iterations=1000)),
        ]
    )
    table.set_stacks({"dev-a": {HASH_A}, "dev-b": {HASH_B}})
    return table


class Client:
    """A paho client that records CONNACK, SUBACK codes and messages."""

    def __init__(
        self, port: int, client_id: str, username: str | None, password: str | None, bind: str = ""
    ) -> None:
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connack: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.disconnected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.put(rc.value)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([r.value for r in rcs])
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.connect("127.0.0.1", port, keepalive=30, bind_address=bind)
        self.client.loop_start()
        self.rc = self.connack.get(timeout=10)

    def subscribe(self, topic_filter: str) -> int:
        self.client.subscribe(topic_filter, 1)
        return self.subacks.get(timeout=10)[0]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def next_message(self) -> tuple[str, bytes]:
        return self.messages.get(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker() -> Iterator[tuple[EmbeddedBroker, int, CredentialTable]]:
    table = _table()
    embedded = EmbeddedBroker("127.0.0.1", 0, table=table)
    port = embedded.start()
    yield embedded, port, table
    embedded.stop()


@pytest.fixture
def connect(broker: tuple[EmbeddedBroker, int, CredentialTable]) -> Iterator[object]:
    port = broker[1]
    opened: list[Client] = []

    def make(client_id: str, username: str | None = None, password: str | None = None) -> Client:
        c = Client(
            port, client_id, username, password if password is not None else PASSWORDS.get(username or "")
        )
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


def test_anonymous_and_wrong_password_refused(connect) -> None:  # type: ignore[no-untyped-def]
    """No username, a wrong password, an unknown user or another role's client id: CONNACK refused."""
    assert connect("tether-dev-a").rc in REFUSED
    assert connect("tether-dev-a", "dev-a", "wrong").rc in REFUSED
    assert connect("tether-nobody", "nobody", "pw").rc in REFUSED
    assert connect("tether-dev-b", "dev-a").rc in REFUSED  # dev-a may not take dev-b's session
    assert connect("tether-controller-x", "admin").rc in REFUSED
    assert connect("tether-dev-a", "dev-a").rc == 0


def test_device_cannot_read_another_device(connect) -> None:  # type: ignore[no-untyped-def]
    """Device A subscribes to its own desired state and stacks, not to B's or to wildcards."""
    ctl = connect("tether-controller-1", "ctl")
    ctl.publish(f"{R}/devices/dev-b/desired", b"secret-b", retain=True)
    a = connect("tether-dev-a", "dev-a")
    assert a.subscribe(f"{R}/devices/dev-b/desired") == 0x80
    assert a.subscribe(f"{R}/devices/+/desired") == 0x80
    assert a.subscribe("#") == 0x80
    assert a.subscribe(f"{R}/stacks/{HASH_B}") == 0x80
    assert a.subscribe(f"{R}/stacks/{HASH_A}") == 1
    assert a.subscribe(f"{R}/devices/dev-a/desired") == 1
    ctl.publish(f"{R}/devices/dev-a/desired", b"mine")
    assert a.next_message() == (f"{R}/devices/dev-a/desired", b"mine")  # and nothing of B's before it


def test_device_cannot_write_as_another_or_as_controller(connect) -> None:  # type: ignore[no-untyped-def]
    """Device A's publishes on B's reported/presence and on any desired state are dropped."""
    watcher = connect("tether-controller-1", "ctl")
    assert watcher.subscribe(f"{R}/#") == 1
    a = connect("tether-dev-a", "dev-a")
    a.publish(f"{R}/devices/dev-b/reported", b"forged")
    a.publish(f"{R}/devices/dev-b/presence", b"forged")
    a.publish(f"{R}/devices/dev-b/desired", b"forged")
    a.publish(f"{R}/devices/dev-a/desired", b"forged")
    a.publish(f"{R}/controller/requests", b"forged")
    a.publish(f"{R}/devices/dev-a/reported", b"barrier")
    assert watcher.next_message() == (f"{R}/devices/dev-a/reported", b"barrier")


def test_operator_cannot_write_device_state(connect) -> None:  # type: ignore[no-untyped-def]
    """An operator sends requests but cannot publish a device's desired, reported or presence."""
    watcher = connect("tether-controller-1", "ctl")
    assert watcher.subscribe(f"{R}/#") == 1
    op = connect("tether-cli-1", "admin")
    assert op.subscribe(f"{R}/devices/+/desired") == 0x80
    assert op.subscribe(f"{R}/clients/tether-cli-1/replies") == 1
    for kind in ("desired", "reported", "presence"):
        op.publish(f"{R}/devices/dev-a/{kind}", b"forged")
    op.publish(f"{R}/controller/requests", b"barrier")
    assert watcher.next_message() == (f"{R}/controller/requests", b"barrier")


def test_revoked_user_is_cut_off(broker, connect) -> None:  # type: ignore[no-untyped-def]
    """Revoking in the table and disconnecting ends the live session; the next CONNECT is refused."""
    embedded, _, table = broker
    a = connect("tether-dev-a", "dev-a")
    assert a.rc == 0
    cred = table.get("dev-a")
    assert cred is not None
    table.put(Credential(cred.username, cred.role, cred.name, cred.password_hash, revoked=True))
    assert embedded.disconnect_users({"dev-a"}) == 1
    assert a.disconnected.wait(10)
    assert connect("tether-dev-a", "dev-a").rc in REFUSED


def test_table_updates_are_in_force_in_the_broker_process_when_they_return(broker, connect) -> None:  # type: ignore[no-untyped-def]
    """Each update of the controller's BrokerTable reaches the broker's copy before it returns."""
    _, _, table = broker
    table.put(Credential("dev-c", "device", "dev-c", hash_password("pw-c", iterations=1000)))
    assert connect("tether-dev-c", "dev-c", "pw-c").rc == 0
    table.replace([c for c in table.credentials() if c.username != "dev-b"])
    assert connect("tether-dev-b", "dev-b").rc in REFUSED
    a = connect("tether-dev-a", "dev-a")
    assert a.subscribe(f"{R}/stacks/{HASH_B}") == 0x80
    table.set_stacks({"dev-a": {HASH_A, HASH_B}})
    assert a.subscribe(f"{R}/stacks/{HASH_B}") == 1
    assert connect("tether-enroll-dev-n", "enroll:dev-n", "fleet-token").rc in REFUSED
    table.set_tokens({hash_token("fleet-token"): TokenGrant("t1")})
    assert connect("tether-enroll-dev-n", "enroll:dev-n", "fleet-token").rc == 0
    table.remove("dev-c")
    assert connect("tether-dev-c", "dev-c", "pw-c").rc in REFUSED


def test_broker_process_logs_reach_the_controllers_logging(
    broker: tuple[EmbeddedBroker, int, CredentialTable], caplog: pytest.LogCaptureFixture
) -> None:
    """A refused CONNECT is logged in the broker's process and handed to this process's logging."""
    caplog.set_level(logging.WARNING, logger="tether.broker")
    c = Client(broker[1], "tether-dev-a", "dev-a", "wrong")
    c.close()
    assert c.rc in REFUSED
    wait_until(
        lambda: any(
            "refused connection" in r.getMessage() and r.name == "tether.broker.auth" for r in caplog.records
        ),
        10,
        message="the broker's warning, forwarded",
    )
    assert broker[0].pid is not None and broker[0].pid != os.getpid()


def test_allow_anonymous_keeps_the_open_broker() -> None:
    """With allow_anonymous, a client without a username may subscribe to '#'; a bad login still fails."""
    table = _table()
    table.allow_anonymous = True
    embedded = EmbeddedBroker("127.0.0.1", 0, table=table)
    port = embedded.start()
    clients = [Client(port, "anything", None, None), Client(port, "tether-dev-a", "dev-a", "wrong")]
    try:
        assert clients[0].rc == 0 and clients[0].subscribe("#") == 1
        assert clients[1].rc in REFUSED
    finally:
        for c in clients:
            c.close()
        embedded.stop()


def test_guessing_a_password_over_mqtt_is_throttled(caplog: pytest.LogCaptureFixture) -> None:
    """Failed CONNECTs lock a username out (even the right password is refused) until the window
    passes; the address that last logged in stays exempt; each lockout is logged once (escaped) and counted."""
    caplog.set_level(logging.WARNING, logger="tether.broker")
    policy = LockoutPolicy(limit=3, base=3.0, cap=6.0)
    embedded = EmbeddedBroker("127.0.0.1", 0, table=_table(), lockout=policy)
    port = embedded.start()

    def attempt(user: str, password: str, bind: str = "127.0.0.1", client_id: str = "tether-dev-a") -> int:
        c = Client(port, client_id, user, password, bind=bind)
        c.close()
        return c.rc

    try:
        assert attempt("dev-a", "pw-a", bind="127.0.0.2") == 0  # the device's own address, now trusted
        assert all(attempt("dev-a", f"guess-{i}") in REFUSED for i in range(3))
        assert attempt("dev-a", "pw-a") in REFUSED  # locked: the right password is refused too
        assert attempt("dev-a", "pw-a", bind="127.0.0.2") == 0  # but not from the device's address
        assert attempt("dev-a", "pw-a") in REFUSED  # and that did not lift the lockout for others
        assert attempt("dev-b", "pw-b", client_id="tether-dev-b") == 0  # other users are not affected
        wait_until(
            lambda: attempt("dev-a", "pw-a") == 0, 20, interval=0.5, message="accepted after the window"
        )
        evil = "nobody\r\nFAKE LOG LINE"
        assert all(attempt(evil, "guess", client_id="x") in REFUSED for _ in range(4))

        def lockouts() -> list[str]:
            return [r.getMessage() for r in caplog.records if "locked out MQTT logins" in r.getMessage()]

        wait_until(lambda: len(lockouts()) == 2, 10, message="one log line per lockout")
        assert embedded.lockouts() == 2  # what /metrics shows as tether_login_lockouts_total{door="mqtt"}
        assert "'dev-a'" in lockouts()[0] and "3 s" in lockouts()[0]
        assert "'nobody\\r\\nFAKE LOG LINE'" in lockouts()[1] and "\n" not in lockouts()[1]
    finally:
        embedded.stop()
