"""Users over HTTP: passwords, API tokens, lockout, cookie sessions with CSRF, roles and the audit log."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from tether.controller.http import auth, create_app
from tether.controller.service import Controller
from tether.protocol.commands import AuditList, UsersAdd, UsersPasswd, UsersRemove, UsersRevoke, UsersToken
from tether.protocol.errors import ForbiddenError
from tether.protocol.principals import Principal

COMPOSE = "services:\n  web:\n    image: busybox:1.36\n"


@pytest.fixture(autouse=True)
def _fresh_auth_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "LOCKOUT", type(auth.LOCKOUT)())
    monkeypatch.setattr(auth, "_sessions", {})
    monkeypatch.setattr(auth, "VERIFIED", type(auth.VERIFIED)(64))


def _http(controller: Controller) -> TestClient:
    return TestClient(create_app(controller), base_url="http://127.0.0.1")


def test_a_viewer_reads_but_changes_nothing_over_http(controller: Controller, tmp_path: Path) -> None:
    """A viewer's password lists groups and is refused (403 forbidden) every write; the audit log has the refusal."""
    password = controller.execute(UsersAdd(name="ann", role="viewer")).password
    client = _http(controller)
    client.auth = ("ann", password)
    assert client.get("/api/v1/groups").status_code == 200
    refused = client.post("/api/v1/groups", json={"name": "edge", "selector": "x=1"})
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    assert client.post("/api/v1/users", json={"name": "eve", "role": "admin"}).status_code == 403
    assert controller.store.get_group("edge") is None and controller.store.get_user("eve") is None
    records = controller.execute(AuditList(user="ann")).records
    assert [(r.command, r.via, r.outcome, r.address) for r in records] == [
        ("groups.create", "http", "forbidden", "testclient"),
        ("users.add", "http", "forbidden", "testclient"),
    ]


def test_api_tokens_scoped_expiring_revocable(controller: Controller) -> None:
    """A Bearer token acts as its user within its scope, stops at expiry and at revocation; it is stored hashed."""
    controller.execute(UsersAdd(name="ci", role="operator"))
    made = controller.execute(UsersToken(name="ci", expires_s=60))
    assert made.token.startswith("tta_") and all(
        made.token not in t.model_dump_json() for t in controller.store.list_api_tokens()
    )
    client = _http(controller)
    headers = {"Authorization": f"Bearer {made.token}"}
    created = client.post("/api/v1/groups", json={"name": "edge", "selector": "x=1"}, headers=headers)
    assert created.status_code == 201
    assert (
        client.post("/api/v1/users", json={"name": "eve", "role": "admin"}, headers=headers).status_code
        == 403
    )
    viewer_only = controller.execute(UsersToken(name="ci", scope="viewer")).token
    scoped = client.delete("/api/v1/groups/edge", headers={"Authorization": f"Bearer {viewer_only}"})
    assert scoped.status_code == 403
    wrong = client.get("/api/v1/groups", headers={"Authorization": f"Bearer {made.token}x"})
    assert wrong.status_code == 401
    controller.clock.now += 61  # type: ignore[attr-defined]
    assert client.get("/api/v1/groups", headers=headers).status_code == 401  # expired
    assert client.get("/api/v1/groups", headers={"Authorization": f"Bearer {viewer_only}"}).status_code == 200
    controller.execute(UsersRevoke(token_id=viewer_only.split("_")[1]))
    assert client.get("/api/v1/groups", headers={"Authorization": f"Bearer {viewer_only}"}).status_code == 401
    audit = controller.execute(AuditList(user="ci")).records
    assert ("groups.create", "ok") in [(r.command, r.outcome) for r in audit]
    assert made.token not in str([r.model_dump() for r in audit])


def test_failed_passwords_lock_the_user_out(controller: Controller) -> None:
    """After 5 wrong passwords even the right one is refused for a while; another user is unaffected;
    /metrics counts the lockout once."""
    password = controller.execute(UsersAdd(name="bob", role="operator")).password
    other = controller.execute(UsersAdd(name="ann", role="viewer")).password
    client = _http(controller)
    for _ in range(5):
        assert client.get("/api/v1/groups", auth=("bob", "guess")).status_code == 401
    locked = client.get("/api/v1/groups", auth=("bob", password))
    assert locked.status_code == 401 and "too many failed logins" in locked.json()["detail"]
    assert client.get("/api/v1/groups", auth=("ann", other)).status_code == 200
    assert 'tether_login_lockouts_total{door="http"} 1.0' in client.get("/metrics").text


def test_a_removed_or_demoted_user_loses_its_session_and_rights_at_once(controller: Controller) -> None:
    """A cookie session follows the stored role: demoted, its writes are refused; removed, it ends; writes need CSRF."""
    password = controller.execute(UsersAdd(name="bob", role="operator")).password
    who = auth.check_password(controller, "bob", password, "10.0.0.1")
    assert who == Principal(user="bob", role="operator", via="http", address="10.0.0.1")
    cookie, csrf = auth.create_session(controller, who)
    live = auth.session(controller, cookie, "10.0.0.1")
    assert live == auth.Session(cookie, who, csrf)  # its user and its CSRF token, in one look-up
    assert auth.csrf_ok(live, csrf) and not auth.csrf_ok(live, "forged") and not auth.csrf_ok(None, csrf)
    assert auth.session(controller, "nope", "") is None and auth.session(controller, None, "") is None
    client = _http(controller)
    client.cookies.set(auth.SESSION_COOKIE, cookie)
    body = {"name": "edge", "selector": "x=1"}
    assert client.post("/api/v1/groups", json=body).status_code == 403  # no CSRF header
    assert client.post("/api/v1/groups", json=body, headers={"X-Tether-CSRF": csrf}).status_code == 201
    controller.execute(UsersPasswd(name="bob", role="viewer"))
    demoted = auth.session(controller, cookie)
    assert demoted is not None and demoted.principal.role == "viewer" and demoted.csrf == csrf
    with pytest.raises(ForbiddenError):
        controller.execute(UsersRemove(name="admin"), demoted.principal)
    controller.execute(UsersRemove(name="bob"))
    assert auth.session(controller, cookie) is None
    with pytest.raises(HTTPException):
        auth.authenticate(controller, None, cookie, "")


def test_a_password_of_ones_own_travels_sealed_and_is_checked(controller: Controller) -> None:
    """users.passwd with a sealed password: the reply never holds it, the slow KDF keeps it, a short one is refused."""
    import json

    from tether.protocol.commands import VarsKey
    from tether.protocol.enrollment import seal_text
    from tether.protocol.errors import CommandError

    controller.execute(UsersAdd(name="bob", role="operator"))
    key = controller.execute(VarsKey()).public_key
    chosen = "correct horse battery staple"
    result = controller.execute(
        UsersPasswd(name="bob", sealed=seal_text(key, json.dumps({"password": chosen})))
    )
    assert result.password == "" and chosen not in result.model_dump_json()
    assert controller.store.get_credential("bob").password_hash.startswith("$7$210000$")  # type: ignore[union-attr]
    assert auth.check_password(controller, "bob", chosen, "") is not None
    with pytest.raises(CommandError, match="12 to 1024 characters"):
        controller.execute(UsersPasswd(name="bob", sealed=seal_text(key, json.dumps({"password": "short"}))))
    assert auth.check_password(controller, "bob", chosen, "") is not None  # the refusal changed nothing
    audit = controller.execute(AuditList(user="tether")).records
    assert chosen not in str([r.model_dump() for r in audit])


def test_a_password_is_hashed_off_the_controllers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """users.add (as HTTP and the UI submit it) and users.passwd (over MQTT) derive the hash on
    another thread: the controller answers other commands while the KDF runs, then stores it."""
    import threading
    import time
    import uuid

    from support.memory_broker import MemoryBroker
    from tether.controller import users
    from tether.controller.security import ensure_operator_credentials
    from tether.controller.store import Store
    from tether.controller.variables import SecretsKey
    from tether.protocol import codec, topics
    from tether.protocol.commands import UsersList
    from tether.protocol.credentials import verify_password
    from tether.protocol.models import Reply, Request
    from tether.protocol.mqtt import BrokerAddress

    hashing, release, threads = threading.Event(), threading.Event(), []
    real_hash = users.hash_password

    def held_hash(password: str, **kwargs: int) -> str:  # the KDF, held until the test lets it go
        threads.append(threading.current_thread().name)
        hashing.set()
        assert release.wait(30)
        return real_hash(password, **kwargs)

    monkeypatch.setattr(users, "hash_password", held_hash)
    broker = MemoryBroker()
    store = Store(tmp_path / "tether.db")
    ensure_operator_credentials(store, tmp_path, "mqtt://127.0.0.1:1883", 0.0)
    controller = Controller(store, secrets=SecretsKey.load_or_create(tmp_path))
    controller.start(BrokerAddress("memory", 0), fresh_broker=True, transport=broker.client("controller"))
    admin = Principal(user="admin", role="admin", via="http")
    try:
        added = controller.submit(UsersAdd(name="ann", role="viewer"), admin)
        assert hashing.wait(10)
        assert [u.name for u in controller.submit(UsersList(), admin).result(5).users] == ["admin"]
        assert not added.done()
        release.set()
        password = added.result(10).password
        stored = controller.call(lambda: store.get_credential("ann")).result(10)
        assert stored is not None and verify_password(password, stored.password_hash)

        hashing.clear()
        release.clear()
        replies: list[Reply] = []
        cli = broker.client("tether-cli-test")
        cli.on_message = lambda topic, payload, retained: replies.append(codec.decode(payload, Reply))
        cli.subscribe(topics.replies("tether-cli-test"))
        cli.start()
        request = Request(
            id=uuid.uuid4().hex,
            reply_to=topics.replies("tether-cli-test"),
            command=UsersPasswd(name="ann").model_dump(mode="json"),
        )
        cli.publish(topics.user_requests("admin"), codec.encode(request))
        deadline = time.monotonic() + 10
        while not hashing.is_set():
            assert time.monotonic() < deadline, "users.passwd never reached the KDF"
            broker.pump()
            time.sleep(0.01)
        assert controller.submit(UsersList(), admin).result(5).users  # answered meanwhile
        release.set()
        while not replies:
            assert time.monotonic() < deadline + 10, "no reply to users.passwd"
            broker.pump()
            time.sleep(0.01)
        assert replies[0].ok and replies[0].id == request.id, replies[0]
        new_password = replies[0].result["password"]  # type: ignore[index]
        stored = controller.call(lambda: store.get_credential("ann")).result(10)
        assert stored is not None and verify_password(new_password, stored.password_hash)
        assert threads and "controller" not in threads, threads
    finally:
        release.set()
        controller.stop()
        store.close()


def test_a_remembered_http_password_stops_at_a_new_password_or_removal(
    controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP Basic runs the KDF once per verified password; a new password refuses the old one at
    once, a revoked or removed user is refused though its password was remembered."""
    from tether.protocol import credentials

    runs: list[str] = []
    real = credentials.verify_password
    monkeypatch.setattr(credentials, "verify_password", lambda p, h: runs.append(p) or real(p, h))
    old = controller.execute(UsersAdd(name="bob", role="operator")).password
    client = _http(controller)
    for _ in range(3):
        assert client.get("/api/v1/groups", auth=("bob", old)).status_code == 200
    assert runs == [old]
    new = controller.execute(UsersPasswd(name="bob")).password
    assert client.get("/api/v1/groups", auth=("bob", old)).status_code == 401
    assert client.get("/api/v1/groups", auth=("bob", new)).status_code == 200
    assert client.get("/api/v1/groups", auth=("bob", new)).status_code == 200
    assert runs == [old, old, new]
    stored = controller.store.get_credential("bob")
    assert stored is not None
    controller.store.put_credential(stored.__class__(**{**stored.__dict__, "revoked": True}), 0.0)
    assert client.get("/api/v1/groups", auth=("bob", new)).status_code == 401
    controller.store.put_credential(stored, 0.0)
    assert client.get("/api/v1/groups", auth=("bob", new)).status_code == 200
    controller.execute(UsersRemove(name="bob"))
    assert client.get("/api/v1/groups", auth=("bob", new)).status_code == 401
    assert runs == [old, old, new]
