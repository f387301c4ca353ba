"""`tether mosquitto-config` against the real Mosquitto: per-device logins and the same ACL.

The controller's store gets credentials and desired states; the CLI writes the password
and ACL files from it; a private Mosquitto loads them. Checks end with a barrier: a
message the client may receive, published after the one it must not.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.infra import MOSQUITTO_BIN, Mosquitto
from support.procs import mosquitto_dynsec_conf
from tether.controller.models import DesiredRecord
from tether.controller.mosquitto import DYNSEC_FILE
from tether.controller.store import Store
from tether.protocol.credentials import Credential, hash_password
from tether.protocol.models import StackRef

pytestmark = pytest.mark.mosquitto
R = "tether/v1"
HASH_A = "a" * 64
HASH_B = "b" * 64
REFUSED = {134, 135}


class Client:
    """A paho client that records CONNACK, SUBACK codes and messages."""

    def __init__(self, port: int, client_id: str, username: str | None, password: str | None) -> None:
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connack: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.put(rc.value)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([r.value for r in rcs])
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        self.rc = self.connack.get(timeout=10)

    def subscribe(self, topic_filter: str) -> int:
        self.client.subscribe(topic_filter, 1)
        return self.subacks.get(timeout=10)[0]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(params=["dynsec", "files"])
def secured(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A store with controller, operator and two devices; Mosquitto running on its generated files.

    The store also holds a device whose id ends in a newline (written before ids were matched
    in full): it must be left out, or Mosquitto 2.0 runs without an ACL."""
    if not Path(MOSQUITTO_BIN).exists():
        pytest.skip("mosquitto not installed")
    data = tmp_path / "data"
    data.mkdir()
    store = Store(data / "tether.db")
    users = {
        "controller-1": ("controller", "controller"),
        "admin": ("operator", "admin"),
        "bob": ("operator", "bob"),
        "ann": ("viewer", "ann"),
        "dev-a": ("device", "dev-a"),
        "dev-b": ("device", "dev-b"),
        "dev-c": ("device", "dev-c"),
        "pi-9\n": ("device", "pi-9\n"),
    }
    for username, (role, name) in users.items():
        revoked = username == "dev-c"
        store.put_credential(Credential(username, role, name, hash_password(f"pw-{username}"), revoked))  # type: ignore[arg-type]
    for device, h in (("dev-a", HASH_A), ("dev-b", HASH_B)):
        store.put_desired(
            DesiredRecord(device_id=device, generation=1, stacks=(StackRef(name="s", spec_hash=h),))
        )
    store.close()
    out = tmp_path / "mosq"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tether.cli.main",
            "mosquitto-config",
            "--out",
            str(out),
            "--data-dir",
            str(data),
            *(["--files"] if request.param == "files" else []),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    written = ["passwords", "acl"] if request.param == "files" else [DYNSEC_FILE]
    for name in written:
        assert (out / name).stat().st_mode & 0o077 == 0
        assert "pi-9" not in (out / name).read_text()
    assert "left out of Mosquitto's files: invalid username 'pi-9\\n'" in result.stderr
    conf = (out / "mosquitto.conf").read_text()
    assert "listener 1883 127.0.0.1\n" in conf and "loopback" in conf  # clear text: not on the network
    if request.param == "files":
        conf = f"allow_anonymous false\npassword_file {out / 'passwords'}\nacl_file {out / 'acl'}\n"
    else:
        conf = mosquitto_dynsec_conf(out)
    opened: list[Client] = []
    with Mosquitto(tmp_path, extra_conf=conf) as broker:

        def connect(client_id: str, username: str | None, password: str | None = None) -> Client:
            c = Client(broker.port, client_id, username, password or f"pw-{username}")
            opened.append(c)
            return c

        connect.mode = request.param  # type: ignore[attr-defined]
        yield connect
        for c in opened:
            c.close()


def test_mosquitto_logins(secured) -> None:  # type: ignore[no-untyped-def]
    """Generated passwords: each user logs in with its own; anonymous, wrong and revoked are refused."""
    assert secured("tether-dev-a", "dev-a").rc == 0
    assert secured("tether-cli-1", "admin").rc == 0
    assert secured("anon", None).rc in REFUSED
    assert secured("tether-dev-a2", "dev-a", "wrong").rc in REFUSED
    assert secured("tether-dev-c", "dev-c").rc in REFUSED


def test_mosquitto_client_ids_are_bound_to_devices(secured) -> None:  # type: ignore[no-untyped-def]
    """With the dynamic security plugin a device may connect only as ``tether-{its id}``: it can
    take over neither another device's session nor the controller's."""
    if secured.mode != "dynsec":
        pytest.skip("Mosquitto's password and ACL files cannot bind client ids to users")
    assert secured("tether-dev-b", "dev-a").rc in REFUSED
    assert secured("tether-controller-1", "dev-a").rc in REFUSED
    assert secured("tether-dev-a", "dev-a").rc == 0


def test_mosquitto_users_send_requests_on_their_own_topic_only(secured) -> None:  # type: ignore[no-untyped-def]
    """On Mosquitto too (files and dynamic security) a user publishes controller requests only on
    its own topic, a viewer to no device, and only admin on the shared topic of older CLIs."""
    ctl = secured("tether-controller-1", "controller-1")
    assert ctl.subscribe(f"{R}/controller/#") in (0, 1)
    assert ctl.subscribe(f"{R}/devices/+/requests") in (0, 1)
    ann = secured("tether-cli-ann", "ann")
    for topic in (
        f"{R}/controller/requests/admin",
        f"{R}/controller/requests",
        f"{R}/devices/dev-a/requests",
    ):
        ann.publish(topic, b"forged")
    ann.publish(f"{R}/controller/requests/ann", b"ann")
    assert ctl.messages.get(timeout=10) == (f"{R}/controller/requests/ann", b"ann")
    bob = secured("tether-cli-bob", "bob")
    bob.publish(f"{R}/controller/requests", b"forged")
    bob.publish(f"{R}/controller/requests/admin", b"forged")
    bob.publish(f"{R}/devices/dev-a/requests", b"bob-device")
    bob.publish(f"{R}/controller/requests/bob", b"bob")
    assert ctl.messages.get(timeout=10) == (f"{R}/devices/dev-a/requests", b"bob-device")
    assert ctl.messages.get(timeout=10) == (f"{R}/controller/requests/bob", b"bob")
    admin = secured("tether-cli-admin", "admin")
    admin.publish(f"{R}/controller/requests", b"admin-legacy")
    assert ctl.messages.get(timeout=10) == (f"{R}/controller/requests", b"admin-legacy")
    assert ctl.messages.empty()


def test_mosquitto_device_cannot_read_or_write_another(secured) -> None:  # type: ignore[no-untyped-def]
    """On Mosquitto too, device A never receives B's desired state or stacks, nor replies, nor
    writes B's topics."""
    ctl = secured("tether-controller-1", "controller-1")
    ctl.publish(f"{R}/devices/dev-b/desired", b"secret-b", retain=True)
    ctl.publish(f"{R}/stacks/{HASH_B}", b"stack-b", retain=True)
    ctl.publish(f"{R}/clients/tether-dev-a/replies", b"an operator's reply", retain=True)
    assert ctl.subscribe(f"{R}/devices/+/reported") in (0, 1)
    a = secured("tether-dev-a", "dev-a")
    for topic in (
        f"{R}/devices/dev-b/desired",
        f"{R}/stacks/{HASH_B}",
        f"{R}/devices/+/desired",
        f"{R}/clients/tether-dev-a/replies",  # replies are the operator's, even to "its" client id
        "#",
    ):
        a.subscribe(topic)  # Mosquitto may grant and then deliver nothing; either way nothing comes
    assert a.subscribe(f"{R}/devices/dev-a/desired") in (0, 1)
    assert a.subscribe(f"{R}/stacks/{HASH_A}") in (0, 1)
    a.publish(f"{R}/devices/dev-b/reported", b"forged")
    a.publish(f"{R}/devices/dev-a/reported", b"barrier")
    assert ctl.messages.get(timeout=10) == (f"{R}/devices/dev-a/reported", b"barrier")
    ctl.publish(f"{R}/devices/dev-a/desired", b"mine")
    assert a.messages.get(timeout=10) == (f"{R}/devices/dev-a/desired", b"mine")
    assert a.messages.empty()


def test_a_malformed_generated_file_is_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files are checked before they are written: a malformed line (or users without an ACL
    block) raises and leaves the previous files in force (fail closed)."""
    from tether.controller import mosquitto

    creds = [Credential("dev-a", "device", "dev-a", hash_password("pw", iterations=1000))]
    mosquitto.write_mosquitto_files(tmp_path, creds, {"dev-a": [HASH_A]})
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    for bad_acl in ("user dev-a\ntopic read tether/v1/a b\n", "user dev-a\x00\n", "# fine\n"):
        monkeypatch.setattr(mosquitto, "render_acl", lambda c, s, text=bad_acl: text)
        with pytest.raises(mosquitto.MosquittoFileError):
            mosquitto.write_mosquitto_files(tmp_path, [*creds, creds[0]], {})
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before
    with pytest.raises(mosquitto.MosquittoFileError, match="password file, line 2"):
        mosquitto.check_files("dev-a:$7$1$AAAA$AAAA\nx\n", "user dev-a\n")


@pytest.mark.e2e
def test_controller_keeps_mosquitto_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tether up --mosquitto-dir` rewrites the files on a new device; after a reload it logs in.
    A device stored with a malformed id (a final newline) is left out and `devices rm` of it
    works without ever publishing on its (malformed) topics: the controller stays connected.
    On SQLite: the test writes the malformed row into the database file itself."""
    monkeypatch.delenv("TETHER_DB", raising=False)
    if not Path(MOSQUITTO_BIN).exists():
        pytest.skip("mosquitto not installed")
    from support.infra import wait_until
    from support.procs import AgentProcess, ControllerProcess, cli_json, device_view, wait_online

    data, out = tmp_path / "ctl", tmp_path / "mosq"
    setup = subprocess.run(
        [
            sys.executable,
            "-m",
            "tether.cli.main",
            "mosquitto-config",
            "--out",
            str(out),
            "--data-dir",
            str(data),
            "--files",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert setup.returncode == 0, setup.stderr
    store = Store(data / "tether.db")
    store.put_credential(Credential("pi-9\n", "device", "pi-9\n", hash_password("pw")))
    store.close()
    conf = f"allow_anonymous false\npassword_file {out / 'passwords'}\nacl_file {out / 'acl'}\n"
    with Mosquitto(tmp_path, extra_conf=conf) as broker:
        ctl = ControllerProcess(data, broker=broker.url, auth=True, extra=["--mosquitto-dir", str(out)])
        monkeypatch.setenv("TETHER_CREDENTIALS", str(ctl.operator_file))
        agent = None
        try:
            creds = tmp_path / "dev-a.json"
            cli_json(broker.url, "devices", "credentials", "dev-a", "--out", str(creds))
            assert "dev-a:$7$" in (out / "passwords").read_text()
            assert broker.proc is not None
            reloads = broker.log_text().count("Reloading config")
            broker.proc.send_signal(1)  # SIGHUP: Mosquitto reloads its password and ACL files
            wait_until(lambda: broker.log_text().count("Reloading config") > reloads, 15, message="reload")
            saved = json.loads(creds.read_text())
            agent = AgentProcess(
                broker.url,
                "dev-a",
                tmp_path / "dev-a",
                extra=["--username", saved["username"], "--password", saved["password"]],
            )
            wait_online(broker.url, "dev-a")
            logins = broker.log_text().count("u'controller-")
            assert logins == 1
            assert cli_json(broker.url, "devices", "rm", "pi-9\n") == {"removed": ["pi-9\n"], "cleared": True}
            assert device_view(broker.url, "dev-a") is not None
            assert broker.log_text().count("u'controller-") == logins  # never dropped and back
            assert "pi-9" not in (out / "acl").read_text()
        finally:
            if agent is not None:
                agent.stop()
            ctl.stop()
