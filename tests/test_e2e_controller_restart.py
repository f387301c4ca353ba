"""A controller restart loses nothing and republishes nothing that has not changed."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.infra import Mosquitto, wait_until
from support.procs import AgentProcess, ControllerProcess, cli_json, wait_online

pytestmark = [pytest.mark.e2e, pytest.mark.store]


class Sniffer:
    """Records live (non-retained) publishes under tether/v1/ in arrival order."""

    def __init__(self, port: int) -> None:
        self.live: list[str] = []
        self.lock = threading.Lock()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("tether/v1/#", 1)
        self.client.loop_start()

    def _on_message(self, client: object, userdata: object, msg: paho.MQTTMessage) -> None:
        if not msg.retain:
            with self.lock:
                self.live.append(msg.topic)

    def topics(self) -> list[str]:
        with self.lock:
            return list(self.live)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_restart_keeps_state_and_publishes_only_changes(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """After a restart the stored groups/stacks are there and only new changes are published."""
    device, other = f"rs-{uuid.uuid4().hex[:6]}", f"rs-{uuid.uuid4().hex[:6]}"
    stack = tmp_path / "s.yml"
    stack.write_text('services:\n  s:\n    command: ["sleep", "600"]\n')
    controller = ControllerProcess(tmp_path / "controller", broker=mosquitto.url)
    agent = AgentProcess(mosquitto.url, device, tmp_path / "agent")
    sniffer = None
    try:
        wait_online(mosquitto.url, device)
        cli_json(mosquitto.url, "groups", "create", "one", "--device", device)
        cli_json(mosquitto.url, "groups", "create", "two", "--device", other)
        cli_json(
            mosquitto.url,
            "stacks",
            "deploy",
            str(stack),
            "--name",
            "s",
            "--group",
            "one",
            "--wait",
            "--min-healthy-time",
            "1s",
            "--timeout",
            "60",
        )
        assert controller.stop() == 0

        sniffer = Sniffer(mosquitto.port)
        controller = ControllerProcess(tmp_path / "controller", broker=mosquitto.url)
        assert [g["name"] for g in cli_json(mosquitto.url, "groups", "ls")] == ["one", "two"]
        assert [(s["name"], s["version"], s["running"]) for s in cli_json(mosquitto.url, "stacks", "ls")] == [
            ("s", 1, 1)
        ]
        # A change after the restart is published; it is our barrier for "nothing else was".
        cli_json(mosquitto.url, "stacks", "deploy", str(stack), "--name", "t", "--group", "two")
        wait_until(lambda: f"tether/v1/devices/{other}/desired" in sniffer.topics(), 15)
        published = [t for t in sniffer.topics() if t.endswith("/desired") or "/stacks/" in t]
        assert f"tether/v1/devices/{device}/desired" not in published
        assert published.count(f"tether/v1/devices/{other}/desired") == 1
    finally:
        if sniffer is not None:
            sniffer.close()
        agent.stop()
        controller.stop()


def test_definition_is_published_once_for_many_devices(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Deploying to N devices publishes the stack definition once and N small desired states."""
    devices = [f"many-{i}-{uuid.uuid4().hex[:4]}" for i in range(25)]
    stack = tmp_path / "s.yml"
    stack.write_text(
        'services:\n  s:\n    command: ["sleep", "600"]\n    environment: {BIG: "' + "x" * 2000 + '"}\n'
    )
    sniffer = Sniffer(mosquitto.port)
    controller = ControllerProcess(tmp_path / "controller", broker=mosquitto.url)
    try:
        group = ["groups", "create", "many"] + [arg for d in devices for arg in ("--device", d)]
        cli_json(mosquitto.url, *group)
        result = cli_json(mosquitto.url, "stacks", "deploy", str(stack), "--name", "s", "--group", "many")
        spec_hash = result["stack"]["spec_hash"]
        wait_until(lambda: sum(t.endswith("/desired") for t in sniffer.topics()) == len(devices), 15)
        assert sniffer.topics().count(f"tether/v1/stacks/{spec_hash}") == 1
    finally:
        sniffer.close()
        controller.stop()


def test_controller_state_older_than_the_device(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A controller whose state is older than what a device applied (a restored backup)
    jumps past the device's generation, so the device follows it instead of ignoring it."""
    device = f"old-{uuid.uuid4().hex[:6]}"
    stack = tmp_path / "s.yml"
    version = tmp_path / "agent" / "work" / "s" / "s" / "version"
    controller = ControllerProcess(tmp_path / "c1")
    agent = AgentProcess(controller.url, device, tmp_path / "agent")
    try:
        wait_online(controller.url, device)
        cli_json(controller.url, "groups", "create", "g", "--device", device)
        for v in ("v1", "v2", "v3"):
            stack.write_text(
                f'services:\n  s:\n    command: ["sh", "-c", "echo {v} > version; exec sleep 600"]\n'
            )
            cli_json(controller.url, "stacks", "deploy", str(stack), "--name", "s", "--group", "g")
        wait_until(lambda: version.exists() and version.read_text().strip() == "v3", 30)
        agent.stop()
        controller.stop()

        # A fresh controller (an empty store stands in for an old backup) on a new broker.
        fresh_db = None
        if os.environ.get("TETHER_TEST_DB") == "postgres":
            fresh_db = request.getfixturevalue("postgres_server").create_database(
                f"t_{uuid.uuid4().hex[:12]}"
            )
        controller = ControllerProcess(tmp_path / "c2", db=fresh_db)
        agent = AgentProcess(controller.url, device, tmp_path / "agent")
        wait_online(controller.url, device)
        cli_json(controller.url, "groups", "create", "g", "--device", device)
        stack.write_text('services:\n  s:\n    command: ["sh", "-c", "echo v4 > version; exec sleep 600"]\n')
        cli_json(controller.url, "stacks", "deploy", str(stack), "--name", "s", "--group", "g")
        wait_until(
            lambda: version.read_text().strip() == "v4", 30, message="device follows the older controller"
        )
        shown = cli_json(controller.url, "devices", "show", device)
        assert shown["desired_generation"] == shown["applied_generation"] > 3
    finally:
        agent.stop()
        controller.stop()
