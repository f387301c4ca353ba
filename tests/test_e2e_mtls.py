"""Client certificates as device identity (mTLS): `tether up --tls --require-client-cert`.

Every client presents a certificate from the quick-start CA and its common name is its
username: the controller, the operator (operator.json names its certificate), the local
agent and devices with a certificate from `tether devices credentials ID --cert`. A
device with a valid certificate may do what its ACL allows and nothing more; no
certificate, a certificate from another CA or for an unknown user, and a revoked device's
certificate are refused.
"""

from __future__ import annotations

import json
import queue
import ssl
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.infra import wait_until
from support.procs import PY, AgentProcess, ControllerProcess, cli, cli_json, device_view, wait_online
from tether.controller.tls import issue_client, quickstart
from tether.protocol.errors import TransportError
from tether.protocol.mqtt import MqttClient, parse_broker_url

pytestmark = pytest.mark.e2e
R = "tether/v1"


class Probe:
    """A raw paho client over TLS that records CONNACK, SUBACK codes and messages."""

    def __init__(self, url: str, client_id: str, ca: Path, cert: tuple[Path, Path] | None) -> None:
        address = parse_broker_url(url)
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311
        )
        context = ssl.create_default_context(cafile=str(ca))
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        self.client.tls_set_context(context)
        self.events: queue.Queue[tuple[str, object]] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client.on_connect = lambda c, u, f, rc, p: self.events.put(("connack", rc.value))
        self.client.on_disconnect = lambda c, u, f, rc, p: self.events.put(("disconnect", rc))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.events.put(("suback", rcs[0].value))
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.connect(address.host, address.port, keepalive=30)
        self.client.loop_start()
        kind, value = self.events.get(timeout=10)
        self.connected = kind == "connack" and value == 0

    def subscribe(self, topic_filter: str) -> int:
        self.client.subscribe(topic_filter, 1)
        kind, value = self.events.get(timeout=10)
        assert kind == "suback", (kind, value)
        return int(value)  # type: ignore[call-overload]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def refused(url: str, client_id: str, ca: Path, cert: tuple[Path, Path] | None) -> bool:
    """Whether the broker refuses this client (in the TLS handshake or at CONNECT)."""
    client = MqttClient(
        [parse_broker_url(url)],
        client_id,
        reconnect=False,
        ca_file=str(ca),
        client_cert=(str(cert[0]), str(cert[1])) if cert else None,
    )
    try:
        client.connect(10)
    except TransportError:
        return True
    client.stop()
    return False


@pytest.fixture
def controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    ctl = ControllerProcess(tmp_path / "ctl", auth=True, extra=["--tls", "--require-client-cert"])
    monkeypatch.setenv("TETHER_CREDENTIALS", str(ctl.operator_file))
    yield ctl
    ctl.stop()


def issue(url: str, device_id: str, out: Path) -> tuple[Path, Path, Path]:
    written = cli_json(url, "devices", "credentials", device_id, "--cert", "--out", str(out))
    cert, key, ca = Path(written["certificate"]), Path(written["key"]), Path(written["ca"])
    assert key.stat().st_mode & 0o077 == 0
    assert "PRIVATE KEY" in key.read_text() and "CERTIFICATE" in cert.read_text()
    return cert, key, ca


def test_device_certificate_is_its_identity(controller: ControllerProcess, tmp_path: Path) -> None:
    url = controller.url
    saved = json.loads(controller.operator_file.read_text())
    assert Path(saved["tls_cert"]).is_file() and Path(saved["tls_key"]).is_file()
    cert, key, ca = issue(url, "dev-a", tmp_path / "certs")
    issue(url, "dev-b", tmp_path / "certs")

    probes: list[Probe] = []
    agent = None
    try:
        # dev-a's certificate can do what dev-a may, nothing more.
        a = Probe(url, "tether-dev-a", ca, (cert, key))
        probes.append(a)
        assert a.connected
        assert a.subscribe(f"{R}/devices/dev-a/desired") in (0, 1)
        assert a.subscribe(f"{R}/devices/dev-b/desired") == 0x80
        assert a.subscribe(f"{R}/devices/+/reported") == 0x80
        assert a.subscribe("#") == 0x80
        watcher = Probe(url, "tether-cli-watch", ca, (Path(saved["tls_cert"]), Path(saved["tls_key"])))
        probes.append(watcher)
        assert watcher.connected
        assert watcher.subscribe(f"{R}/devices/+/events") in (0, 1)
        a.publish(f"{R}/devices/dev-b/events", b"forged")  # dropped by the broker
        a.publish(f"{R}/devices/dev-a/events", b"barrier")
        assert watcher.messages.get(timeout=10) == (f"{R}/devices/dev-a/events", b"barrier")
        assert watcher.messages.empty()
        a.close()
        probes.remove(a)

        # The agent: certificate and key, no username or password.
        agent = AgentProcess(
            url,
            "dev-a",
            tmp_path / "dev-a",
            extra=["--tls-cert", str(cert), "--tls-key", str(key), "--ca-file", str(ca)],
        )
        wait_online(url, "dev-a")

        # dev-a's certificate cannot take dev-b's (or the controller's) client id.
        assert refused(url, "tether-dev-b", ca, (cert, key))
        assert refused(url, "tether-controller-x", ca, (cert, key))

        # Revoked: the live session ends, and the still valid certificate no longer gets in.
        seen = len(agent.lines)
        assert cli_json(url, "devices", "revoke", "dev-a")["closed"] >= 1
        wait_until(lambda: (d := device_view(url, "dev-a")) and d["status"] == "offline", 15)
        assert refused(url, "tether-dev-a", ca, (cert, key))
        # The agent keeps trying with its certificate and is refused each time.
        wait_until(
            lambda: any("cannot connect" in x and "refused" in x for x in agent.lines[seen:]),
            30,
            message="the revoked agent refused",
        )
        assert (device_view(url, "dev-a") or {}).get("status") == "offline"

        # A new certificate admits the device again (revocation is per device id, see security.md).
        agent.stop()
        cert2, key2, _ = issue(url, "dev-a", tmp_path / "certs2")
        assert not refused(url, "tether-dev-a", ca, (cert2, key2))
    finally:
        for p in probes:
            p.close()
        if agent is not None:
            agent.stop()


def test_clients_without_a_fleet_certificate_are_refused(
    controller: ControllerProcess, tmp_path: Path
) -> None:
    url = controller.url
    tls = controller.operator_file.parent / "tls"
    ca = tls / "ca.pem"
    saved = json.loads(controller.operator_file.read_text())

    # A password is not enough, even the operator's.
    plain = MqttClient(
        [parse_broker_url(url)],
        "tether-cli-pw",
        reconnect=False,
        ca_file=str(ca),
        username=saved["username"],
        password=saved["password"],
    )
    with pytest.raises(TransportError):
        plain.connect(10)

    # No certificate, a certificate from another CA, one for a user the controller never made.
    other = tmp_path / "other"
    quickstart(other)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for name, (pem, key) in (
        ("dev-x", issue_client(other, "dev-x")),
        ("nobody", issue_client(tls.parent, "nobody")),
    ):
        (foreign / f"{name}.pem").write_text(pem)
        (foreign / f"{name}.key").write_text(key)
    assert refused(url, "tether-dev-x", ca, None)
    assert refused(url, "tether-dev-x", ca, (foreign / "dev-x.pem", foreign / "dev-x.key"))
    assert refused(url, "tether-nobody", ca, (foreign / "nobody.pem", foreign / "nobody.key"))

    # The CLI: its certificate from operator.json works; a wrong one gets one clear line.
    assert cli_json(url, "devices", "ls") == []
    wrong = cli(url, "devices", "ls", "--tls-cert", str(foreign / "dev-x.pem"), "--tls-key", str(ca))
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert f"client key {ca} is not a PEM private key" in wrong.stderr, wrong.stderr
    missing = cli(url, "devices", "ls", "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(ca))
    assert "client certificate" in missing.stderr and "nope.pem" in missing.stderr, missing.stderr


def test_bad_certificate_files_are_named(tmp_path: Path) -> None:
    """The agent says which file is wrong, once, and exits 2."""
    import subprocess

    files = quickstart(tmp_path / "ca")
    cert_pem, key_pem = issue_client(tmp_path / "ca", "dev-a")
    _, other_key = issue_client(tmp_path / "ca", "dev-a")
    (tmp_path / "dev-a.pem").write_text(cert_pem)
    (tmp_path / "other.key").write_text(other_key)
    base = [PY, "-m", "tether.agent.main", "--device-id", "dev-a", "--data-dir", str(tmp_path / "d")]
    base += ["--broker", "mqtts://127.0.0.1:1", "--ca-file", str(files.ca)]
    cases = [
        (["--tls-cert", str(tmp_path / "dev-a.pem")], "tls_cert and tls_key go together"),
        (
            ["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tmp_path / "other.key")],
            f"client certificate {tmp_path / 'missing.pem'}: No such file or directory",
        ),
        (
            ["--tls-cert", str(tmp_path / "dev-a.pem"), "--tls-key", str(tmp_path / "other.key")],
            f"client key {tmp_path / 'other.key'} does not belong to client certificate",
        ),
        (
            ["--tls-cert", str(files.key), "--tls-key", str(tmp_path / "other.key")],
            f"client certificate {files.key} is not a PEM certificate",
        ),
    ]
    for extra, message in cases:
        result = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_local_agent_and_switching_mtls_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--with-agent` gets device `local` a certificate; without the flag again, operator.json
    no longer names a client certificate (the broker would refuse one it cannot verify)."""
    data = tmp_path / "ctl"
    ctl = ControllerProcess(
        data, auth=True, extra=["--tls", "--require-client-cert", "--with-agent", "--agent-driver", "process"]
    )
    monkeypatch.setenv("TETHER_CREDENTIALS", str(ctl.operator_file))
    try:
        wait_online(ctl.url, "local")
    finally:
        ctl.stop()
    ctl = ControllerProcess(data, auth=True, extra=["--tls"])
    try:
        saved = json.loads(ctl.operator_file.read_text())
        assert "tls_cert" not in saved and "tls_key" not in saved
        assert cli_json(ctl.url, "devices", "ls")[0]["id"] == "local"
    finally:
        ctl.stop()
