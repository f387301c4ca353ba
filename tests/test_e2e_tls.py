"""TLS end to end: `tether up --tls` (quick-start CA), agents and the CLI over mqtts:// verifying
the server; clients with the wrong CA, or without TLS, are refused."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, credentialed_agent, wait_online
from tether.controller.tls import quickstart
from tether.protocol.errors import TransportError
from tether.protocol.mqtt import MqttClient, parse_broker_url

pytestmark = pytest.mark.e2e


@pytest.fixture
def controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    ctl = ControllerProcess(tmp_path / "ctl", auth=True, extra=["--tls"])
    monkeypatch.setenv("TETHER_CREDENTIALS", str(ctl.operator_file))
    yield ctl
    ctl.stop()


def test_agents_and_cli_over_tls(controller: ControllerProcess, tmp_path: Path) -> None:
    url = controller.url
    assert url.startswith("mqtts://")
    tls = controller.operator_file.parent / "tls"
    ca = tls / "ca.pem"
    assert stat.S_IMODE((tls / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tls / "ca.key").stat().st_mode) == 0o600
    assert json.loads(controller.operator_file.read_text())["ca_file"] == str(ca.resolve())
    assert cli_json(url, "devices", "ls") == []  # the CA from operator.json

    agent = credentialed_agent(url, "dev-a", tmp_path, ca)
    token = cli_json(url, "tokens", "create", "--auto-approve")["token"]
    config = tmp_path / "agent.toml"
    config.write_text(f'brokers = ["{url}"]\nenrollment_token = "{token}"\nca_file = "{ca}"\n')
    enrolling = AgentProcess(url, "dev-b", tmp_path / "dev-b", extra=["--config", str(config)])
    try:
        wait_online(url, "dev-a")
        wait_online(url, "dev-b")  # enrolled over TLS too
    finally:
        agent.stop()
        enrolling.stop()


def test_wrong_ca_and_plain_mqtt_are_refused(controller: ControllerProcess, tmp_path: Path) -> None:
    url = controller.url
    other = quickstart(tmp_path / "other")
    wrong = cli(url, "devices", "ls", "--ca-file", str(other.ca))
    assert wrong.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in wrong.stderr, wrong.stderr
    assert "Traceback" not in wrong.stderr
    client = MqttClient([parse_broker_url(url)], "tether-cli-wrongca", reconnect=False, ca_file=str(other.ca))
    with pytest.raises(TransportError):
        client.connect(5)
    plain = cli(url.replace("mqtts://", "mqtt://"), "devices", "ls", "--request-timeout", "3")
    assert plain.returncode != 0 and "Traceback" not in plain.stderr
    assert "closed before CONNACK" in plain.stderr and "use mqtts://" in plain.stderr, plain.stderr


def test_an_agent_given_mqtt_for_a_tls_broker_says_why_it_cannot_connect(
    controller: ControllerProcess, tmp_path: Path
) -> None:
    """An agent pointed with mqtt:// at a TLS-only broker logs, at the default level, that the
    connection closed before CONNACK and hints at mqtts://, once per reason, not silently forever."""
    plain = controller.url.replace("mqtts://", "mqtt://")
    agent = AgentProcess(plain, "dev-plain", tmp_path / "dev-plain")
    try:
        line = agent.wait_for_line(r"cannot connect: .*closed before CONNACK", 30).string
        assert "is the broker using TLS? use mqtts://" in line, line
        assert plain in line, line
    finally:
        agent.stop()


def test_certificates_need_require_client_cert(controller: ControllerProcess, tmp_path: Path) -> None:
    """Without --require-client-cert the controller signs no client certificate, and says so."""
    result = cli(controller.url, "devices", "credentials", "dev-a", "--cert", "--out", str(tmp_path / "c"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "does not sign client certificates" in result.stderr and "--require-client-cert" in result.stderr
    assert not (tmp_path / "c").exists()
    no_out = cli(controller.url, "devices", "credentials", "dev-a", "--cert")
    assert no_out.returncode != 0 and "--cert needs --out DIR" in no_out.stderr, no_out.stderr
