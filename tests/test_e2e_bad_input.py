"""Bad input anywhere gets one clear error, and the previous state stays in force."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.infra import Mosquitto, free_port, wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, wait_online
from tether.protocol import codec
from tether.protocol.models import DeviceFacts, Event, Presence

pytestmark = pytest.mark.e2e

GOOD = """
services:
  app:
    command: ["sh", "-c", "echo $$$$ > {pidfile}; exec sleep 600"]
    restart: always
"""


def _publish(url: str, topic: str, payload: bytes, retain: bool = False) -> None:
    port = int(url.rsplit(":", 1)[1])
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _one_line_error(result: Any, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("bad-input")
    device = f"bad-{uuid.uuid4().hex[:6]}"
    db = None
    if os.environ.get("TETHER_TEST_DB") == "postgres":
        db = request.getfixturevalue("postgres_server").create_database(f"t_{uuid.uuid4().hex[:12]}")
    controller = ControllerProcess(tmp / "controller", db=db)
    agent = AgentProcess(controller.url, device, tmp / "agent", driver="process")
    try:
        wait_online(controller.url, device)
        assert cli(controller.url, "groups", "create", "g1", "--device", device).returncode == 0
        pidfile = tmp / "app.pid"
        good = tmp / "good.yml"
        good.write_text(GOOD.format(pidfile=pidfile))
        deploy = cli(
            controller.url,
            "stacks",
            "deploy",
            str(good),
            "--name",
            "app",
            "--group",
            "g1",
            "--wait",
            "--min-healthy-time",
            "1s",
            "--timeout",
            "60",
        )
        assert deploy.returncode == 0, deploy.stderr
        yield {
            "url": controller.url,
            "device": device,
            "tmp": tmp,
            "pidfile": pidfile,
            "agent": agent,
            "controller": controller,
        }
    finally:
        agent.stop()
        controller.stop()


def _unchanged(fleet: dict[str, Any]) -> None:
    """The good stack is still version 1, applied, and its process still runs."""
    stacks = cli_json(fleet["url"], "stacks", "ls")
    assert [(s["name"], s["version"]) for s in stacks] == [("app", 1)]
    device = cli_json(fleet["url"], "devices", "show", fleet["device"])
    assert device["desired_generation"] == device["applied_generation"] == 1
    pid = int(fleet["pidfile"].read_text())
    assert Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize(
    ("compose", "needles"),
    [
        ("services:\n  app:\n    build: .\n", ["bad.yml: ", "service 'app'", "build without image"]),
        (
            "services:\n  app:\n    image: x\n    volumes_from: [db]\n",
            ["service 'app'", "volumes_from", "named volume"],
        ),
        ("services:\n  app:\n    image: x\n    env_file: .env\n", ["service 'app'", "env_file"]),
        ("services:\n  app:\n    image: [unclosed\n", ["not valid YAML"]),
        ("services:\n  app:\n    image: x\n    depends_on: [db]\n", ["unknown service 'db'"]),
        ("services: {}\n", ["no services"]),
    ],
)
def test_invalid_compose_is_rejected_and_nothing_changes(
    fleet: dict[str, Any], compose: str, needles: list[str]
) -> None:
    """An invalid Compose file gets one clear error and leaves the deployed stack in force."""
    bad = fleet["tmp"] / "bad.yml"
    bad.write_text(compose)
    result = cli(fleet["url"], "stacks", "deploy", str(bad), "--name", "app", "--group", "g1")
    _one_line_error(result, *needles)
    _unchanged(fleet)


def test_unknown_names_and_duplicates(fleet: dict[str, Any]) -> None:
    """Unknown group, device or stack, and a duplicate group, are refused by name."""
    good = fleet["tmp"] / "good.yml"
    _one_line_error(
        cli(fleet["url"], "stacks", "deploy", str(good), "--name", "other", "--group", "nope"),
        "unknown group 'nope'",
    )
    _one_line_error(cli(fleet["url"], "devices", "show", "ghost"), "unknown device 'ghost'")
    _one_line_error(cli(fleet["url"], "stacks", "status", "ghost"), "unknown stack 'ghost'")
    _one_line_error(cli(fleet["url"], "groups", "create", "g1", "--device", "x"), "already exists")
    _one_line_error(cli(fleet["url"], "groups", "create", "g2", "--select", "a=b=c"), "invalid selector")
    _one_line_error(cli(fleet["url"], "groups", "create", "g3", "--device", "bad/id"), "invalid device id")
    _one_line_error(cli(fleet["url"], "groups", "rm", "g1"), "still has stacks")
    assert cli(fleet["url"], "groups", "create", "g4", "--device", "x").returncode == 0
    _one_line_error(
        cli(fleet["url"], "stacks", "deploy", str(good), "--name", "app", "--group", "g4"),
        "already deployed to group 'g1'",
    )
    _unchanged(fleet)


def test_malformed_payloads_do_no_harm(fleet: dict[str, Any]) -> None:
    """Garbage on the request, presence and desired topics changes nothing that runs."""
    url, device = fleet["url"], fleet["device"]
    _publish(url, "tether/v1/controller/requests", b"\xc1 not msgpack")
    _publish(
        url,
        "tether/v1/controller/requests",
        codec.encode(Presence(device_id="x", status="online", session=1)),
    )
    _publish(url, f"tether/v1/devices/{device}/presence", b"\x93\x01\x02\x03")
    _publish(url, f"tether/v1/devices/{device}/reported", b"garbage")
    assert cli_json(url, "devices", "show", device)["status"] == "online"

    # A malformed desired state: the agent keeps running what it has and says why.
    _publish(url, f"tether/v1/devices/{device}/desired", b"\x81\xa1v\xa3bad", retain=True)
    shown = wait_until(
        lambda: (d := cli_json(url, "devices", "show", device))["reported"]["error"] and d, 30, interval=0.2
    )
    assert "malformed desired state" in shown["reported"]["error"]
    assert any(e["kind"] == "desired.rejected" for e in shown["events"])
    _unchanged(fleet)


def test_unreachable_broker_and_missing_controller(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """No broker, or a broker without a controller: a one-line error, not a hang or a traceback."""
    dead = f"mqtt://127.0.0.1:{free_port()}"
    _one_line_error(cli(dead, "devices", "ls"), "cannot connect to broker")
    result = cli(mosquitto.url, "devices", "ls", "--request-timeout", "1")
    _one_line_error(result, "no reply from the controller")
    _one_line_error(cli("not a url:::", "devices", "ls"), "invalid broker URL")


def test_agent_rejects_bad_configuration(tmp_path: Path) -> None:
    """The agent refuses a bad config file or flag with one line naming the problem."""
    import subprocess
    import sys

    conf = tmp_path / "agent.toml"
    conf.write_text('brokers = ["mqtt://127.0.0.1:1"]\ndevcie_id = "typo"\n')
    result = subprocess.run(
        [sys.executable, "-m", "tether.agent.main", "--config", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    _one_line_error(result, "devcie_id")
    result = subprocess.run(
        [sys.executable, "-m", "tether.agent.main", "--device-id", "no/slash", "--driver", "process"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    _one_line_error(result, "invalid device id")


def test_absurd_durations_and_counts_are_refused(fleet: dict[str, Any]) -> None:
    """Out-of-bounds durations and counts get one error naming the field (CLI and raw request); nothing is stored."""
    from tether.protocol.client import ControllerClient
    from tether.protocol.commands import JobsSchedule, TokensCreate
    from tether.protocol.errors import TetherError

    url = fleet["url"]
    _one_line_error(cli(url, "tokens", "create", "--expires", "99999999999d"), "expires_s", "less than")
    _one_line_error(cli(url, "tokens", "create", "--uses", "99999999999"), "uses", "less than")
    _one_line_error(
        cli(url, "jobs", "schedule", "fast", "--group", "g1", "--every", "0.000000001s", "--", "true"),
        "every_s",
        "greater than",
    )
    _one_line_error(cli(url, "deployments", "status", str(2**70)), "id", "less than")
    # The controller refuses them too, whoever builds the request.
    with ControllerClient(url) as client:
        for command in (
            TokensCreate.model_construct(expires_s=1e308),
            JobsSchedule.model_construct(name="fast", group="g1", command=("true",), every_s=1e-9),
        ):
            with pytest.raises(TetherError, match="invalid request"):
                client.request(command)
    assert cli_json(url, "tokens", "ls") == []
    assert cli_json(url, "jobs", "ls") == []
    assert cli(url, "tokens", "ls").returncode == 0
    _unchanged(fleet)


def test_a_stack_too_large_to_send_is_refused_at_deploy(fleet: dict[str, Any]) -> None:
    """22 KB of Compose whose aliases expand to a 4.4 MB definition (sent as a raw request; the CLI
    refuses it itself) is refused with one error: it could never reach a device."""
    from tether.protocol.client import ControllerClient
    from tether.protocol.commands import StacksDeploy
    from tether.protocol.errors import TetherError

    compose = "services:\n  app:\n    image: x\n    environment:\n      K0: &big " + "x" * 4000 + "\n"
    compose += "".join(f"      K{i}: *big\n" for i in range(1, 1100))
    with ControllerClient(fleet["url"]) as client, pytest.raises(TetherError, match="message limit"):
        client.request(StacksDeploy(name="app", group="g1", compose=compose))
    _unchanged(fleet)


def test_remote_strings_cannot_forge_log_lines_or_drive_the_terminal(fleet: dict[str, Any]) -> None:
    """A device's newline stays inside one escaped controller log line; its ESC[2K label is shown escaped."""
    url = fleet["url"]
    ghost, marker = f"ghost-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    facts = DeviceFacts(
        agent_version="0", driver="process", arch="x", os="Linux", labels={"x": "\x1b[2K\rfake healthy"}
    )
    presence = Presence(device_id=ghost, status="online", session=1, facts=facts)
    _publish(url, f"tether/v1/devices/{ghost}/presence", codec.encode(presence))
    forged = (
        f"{marker}\n2025-01-01 00:00:00,000 WARNING tether.controller.security: FORGED device devB revoked"
    )
    event = Event(device_id=ghost, seq=1, kind="note", message=forged, level="warning")
    _publish(url, f"tether/v1/devices/{ghost}/events", codec.encode(event))
    log = fleet["controller"].log_path
    wait_until(lambda: marker in log.read_text(), 30, message="the event was logged")
    lines = [line for line in log.read_text().splitlines() if marker in line or "FORGED" in line]
    assert len(lines) == 1 and "\\x0a2025-01-01" in lines[0], lines
    listed = wait_until(lambda: ghost in (r := cli(url, "devices", "ls")).stdout and r, 30)
    assert "\x1b" not in listed.stdout and "\r" not in listed.stdout
    assert "x=\\x1b[2K\\x0dfake healthy" in listed.stdout
    shown = cli(url, "devices", "show", ghost)
    assert "\x1b" not in shown.stdout and "\\x0a2025" in shown.stdout
    assert cli(url, "devices", "rm", ghost).returncode == 0
    _unchanged(fleet)


def test_a_static_group_naming_an_unknown_device_warns_and_deploys_say_what_they_reach(
    fleet: dict[str, Any],
) -> None:
    """A static group with a device id never seen (a typo) is created with a warning naming
    it; a deploy to it says it reaches 0 devices and, with --wait, that it runs nowhere,
    instead of "on every available device"; a deploy that reaches the real device counts it."""
    url = fleet["url"]
    typo = f"nosuch-{uuid.uuid4().hex[:6]}"
    created = cli(url, "groups", "create", "typo", "--device", typo)
    assert created.returncode == 0, created.stderr
    assert typo in created.stderr and "never connected" in created.stderr, created.stderr
    good = fleet["tmp"] / "good.yml"
    args = (
        "stacks",
        "deploy",
        str(good),
        "--name",
        "nowhere",
        "--group",
        "typo",
        "--wait",
        "--timeout",
        "20",
    )
    deploy = cli(url, *args)
    assert "reaches 0 device(s) (1 never connected: " + typo in deploy.stdout, deploy.stdout
    assert "every" not in deploy.stdout and "running on" not in deploy.stdout, deploy.stdout
    assert "runs on no device" in deploy.stdout or deploy.returncode != 0, deploy.stdout + deploy.stderr
    both = cli(url, "groups", "create", "both", "--device", fleet["device"], "--device", typo)
    assert both.returncode == 0 and typo in both.stderr and fleet["device"] not in both.stderr, both.stderr
    shown = cli(url, "stacks", "deploy", str(good), "--name", "app", "--group", "g1")
    assert "reaches 1 device(s)" in shown.stdout, shown.stdout
    for name in ("nowhere",):
        cli(url, "stacks", "rm", name)
    for group in ("typo", "both"):
        cli(url, "groups", "rm", group)
