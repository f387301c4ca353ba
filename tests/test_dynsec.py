"""Mosquitto's dynamic security (controller/dynsec.py): the same rules as acl.py, the seed
file from the store's hashes, and the controller's sync against a real Mosquitto 2.0."""

from __future__ import annotations

import json
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from support.infra import MOSQUITTO_BIN, Mosquitto, wait_until
from support.procs import mosquitto_dynsec_conf
from tether.controller.dynsec import (
    CONTROLLER_ROLE,
    ENROLLING_ROLE,
    DynsecAdmin,
    DynsecTable,
    client_roles,
    device_role,
    role_acls,
    seed_config,
)
from tether.controller.mosquitto import write_dynsec_files
from tether.protocol.acl import Identity, may_publish, may_subscribe
from tether.protocol.credentials import Credential, TokenGrant, hash_password, hash_token
from tether.protocol.mqtt import MqttClient, parse_broker_url

R = "tether/v1"
H1, H2 = "1" * 64, "2" * 64
TOPICS = [
    f"{R}/devices/{d}/{k}"
    for d in ("d1", "d2")
    for k in ("desired", "reported", "presence", "events", "requests", "metrics")
] + [
    f"{R}/stacks/{H1}",
    f"{R}/stacks/{H2}",
    f"{R}/controller/requests",
    f"{R}/controller/requests/admin",
    f"{R}/controller/requests/ann",
    f"{R}/controller/requests/bob",
    f"{R}/clients/tether-cli-1/replies",
    f"{R}/enroll/d1/request",
    f"{R}/enroll/d1/response",
]


def _allows(acls: set[tuple[str, str]], kind: str, topic: str) -> bool:
    for acl_kind, pattern in acls:
        if acl_kind == kind and paho.topic_matches_sub(pattern, topic):
            return True
        if acl_kind == "subscribeLiteral" and kind == "subscribePattern" and pattern == topic:
            return True
    return False


@pytest.mark.parametrize(
    ("identity", "roles"),
    [
        (Identity("device", "d1", "tether-d1"), [device_role("d1")]),
        (
            Identity("operator", "admin", "tether-cli-1"),
            client_roles(Credential("admin", "operator", "admin", "h")),
        ),
        (
            Identity("operator", "bob", "tether-cli-1"),
            client_roles(Credential("bob", "operator", "bob", "h")),
        ),
        (Identity("viewer", "ann", "tether-cli-1"), client_roles(Credential("ann", "viewer", "ann", "h"))),
        (Identity("controller", "c", "tether-controller-1"), [CONTROLLER_ROLE]),
    ],
    ids=["device", "admin", "operator", "viewer", "controller"],
)
def test_roles_say_what_acl_py_says(identity: Identity, roles: list[str]) -> None:
    """On every sample topic, a client's roles allow publishing and subscribing exactly where
    tether/protocol/acl.py does (the embedded broker's rules): a user sends requests on its own
    topic only, a viewer to no device; users read every client's replies on Mosquitto (its
    plugin has no %c)."""
    acls = set().union(*(role_acls(role, [H1]) for role in roles))
    for topic in TOPICS:
        assert _allows(acls, "publishClientSend", topic) == may_publish(identity, topic), topic
        expected = may_subscribe(identity, topic, [H1])
        if identity.role in ("operator", "viewer") and topic.endswith("/replies"):
            expected = True
        assert _allows(acls, "subscribePattern", topic) == expected, topic
        assert _allows(acls, "publishClientReceive", topic) == expected, topic


def test_enrolling_role_and_device_role_literals() -> None:
    """Enrolling clients (one per token) send requests and read sealed answers only; a device's
    subscriptions are literal topics (no wildcard can reach another device)."""
    acls = role_acls(ENROLLING_ROLE)
    assert {t for t in TOPICS if _allows(acls, "publishClientSend", t)} == {f"{R}/enroll/d1/request"}
    assert {t for t in TOPICS if _allows(acls, "subscribePattern", t)} == {f"{R}/enroll/d1/response"}
    device = role_acls(device_role("d1"), [H1, "bad\n"])
    assert all(kind != "subscribePattern" for kind, _ in device)
    assert ("subscribeLiteral", f"{R}/stacks/{H1}") in device
    assert not any("bad" in topic for _, topic in device)


def test_seed_keeps_the_stored_hashes() -> None:
    """The seed carries each usable user's stored $7$ hash as the plugin's password, salt and
    iterations; revoked, enrolling and malformed users are left out; devices get their client id."""
    h = hash_password("pw", iterations=1000)
    creds = [
        Credential("d1", "device", "d1", h),
        Credential("gone", "device", "gone", h, revoked=True),
        Credential("pi-9\n", "device", "pi-9\n", h),
        Credential("admin", "operator", "admin", h),
    ]
    seed = seed_config(creds, {"d1": [H1]})
    clients = {c["username"]: c for c in seed["clients"]}
    assert set(clients) == {"d1", "admin"}
    _, _, iterations, salt, key = h.split("$")
    assert clients["d1"]["password"] == key and clients["d1"]["salt"] == salt
    assert clients["d1"]["iterations"] == int(iterations) and clients["d1"]["clientid"] == "tether-d1"
    assert "clientid" not in clients["admin"]
    roles = {r["rolename"]: r for r in seed["roles"]}
    assert {"acltype": "subscribeLiteral", "topic": f"{R}/stacks/{H1}", "allow": True} in roles[
        device_role("d1")
    ]["acls"]
    assert not any(
        seed["defaultACLAccess"][k] for k in ("publishClientSend", "publishClientReceive", "subscribe")
    )


@pytest.mark.mosquitto
def test_sync_mends_mosquitto_and_updates_apply_at_once(tmp_path: Path) -> None:
    """Against a real Mosquitto 2.0 with the plugin: the sync deletes a stale Tether client,
    creates one the store has (without a password: it logs so), and restores a device's role;
    then new credentials, stacks, tokens and a revocation apply at once (a live session is
    cut within seconds)."""
    if not Path(MOSQUITTO_BIN).exists():
        pytest.skip("mosquitto not installed")
    ctl = Credential("controller-1", "controller", "controller", hash_password("pw-ctl"))
    d1 = Credential("d1", "device", "d1", hash_password("pw-d1"))
    out = tmp_path / "mosq"
    write_dynsec_files(out, [ctl, d1], {"d1": [H1]})
    seed = json.loads((out / "dynamic-security.json").read_text())
    seed["clients"].append({"username": "stale", "textname": "tether", "roles": []})
    seed["clients"].append({"username": "theirs", "roles": []})  # not Tether's: left alone
    seed["roles"] = [r for r in seed["roles"] if r["rolename"] != device_role("d1")]
    (out / "dynamic-security.json").write_text(json.dumps(seed))
    with Mosquitto(tmp_path, extra_conf=mosquitto_dynsec_conf(out)) as broker:
        client = MqttClient(
            [parse_broker_url(broker.url)],
            "tether-controller-admin-t",
            username=ctl.username,
            password="pw-ctl",
        )
        admin = DynsecAdmin(client)
        client.connect(10)
        try:
            d2 = Credential("d2", "device", "d2", hash_password("x"))
            table = DynsecTable([ctl, d1, d2])
            table.set_stacks({"d1": [H1]})
            table.attach(admin)
            table.sync(time.time())
            listed = admin.request([{"command": "listClients", "verbose": True, "count": -1}])[0]["data"][
                "clients"
            ]
            names = {c["username"] for c in listed}
            assert "stale" not in names and {"theirs", "d1", "d2", "controller-1"} <= names
            role = admin.request([{"command": "getRole", "rolename": device_role("d1")}])[0]["data"]["role"]
            assert {"acltype": "subscribeLiteral", "topic": f"{R}/stacks/{H1}"} in [
                {k: a[k] for k in ("acltype", "topic")} for a in role["acls"]
            ]

            def login(client_id: str, username: str, password: str) -> MqttClient | None:
                c = MqttClient(
                    [parse_broker_url(broker.url)],
                    client_id,
                    username=username,
                    password=password,
                    reconnect=False,
                )
                try:
                    c.connect(5)
                except Exception:
                    return None
                return c

            table.new_secret("d2", "pw-d2")  # rotated: the password is sent once, in plain text
            table.replace([ctl, d1, d2])
            live = login("tether-d2", "d2", "pw-d2")
            assert live is not None
            table.set_tokens({hash_token("tet_0a1b2c3d_s"): TokenGrant("0a1b2c3d", expires=time.time() + 2)})
            assert table.token_grant("tet_0a1b2c3d_s") is not None
            table.new_secret("enroll-0a1b2c3d", "tet_0a1b2c3d_s")
            table.set_tokens({hash_token("tet_0a1b2c3d_s"): TokenGrant("0a1b2c3d", expires=time.time() + 2)})
            enrolling = login("tether-enroll-new", "enroll-0a1b2c3d", "tet_0a1b2c3d_s")
            assert enrolling is not None
            enrolling.stop()
            started = time.monotonic()
            table.replace([ctl, d1, Credential("d2", "device", "d2", d2.password_hash, revoked=True)])
            wait_until(lambda: not live.connected, 5, message="revoked session cut")
            assert time.monotonic() - started < 5
            live.stop()
            assert login("tether-d2", "d2", "pw-d2") is None
            wait_until(lambda: time.time() > table._tokens[hash_token("tet_0a1b2c3d_s")].expires, 5)  # type: ignore[operator]
            table.expire(time.time())
            assert login("tether-enroll-new", "enroll-0a1b2c3d", "tet_0a1b2c3d_s") is None
        finally:
            client.stop()
