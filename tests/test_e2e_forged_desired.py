"""A forged desired state cannot wedge a device (issue 13).

Before, device A's will put a desired state for device B with generation 2^64-1 naming an
unknown definition on the broker; B's agent held it as pending and every later deploy
stayed pending until B restarted. The broker now refuses such wills (test_broker_will.py);
this is the agent's own line of defence, with a real controller, agent and embedded
broker: whoever manages to publish a desired state (here an anonymous client, which
`--allow-anonymous` lets do anything), later real deploys are still applied.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.infra import wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, wait_online

pytestmark = pytest.mark.e2e

COMPOSE = """
services:
  app:
    command: ["sh", "-c", "exec sleep 600"]
    environment:
      VERSION: "{version}"
"""


class Forger:
    """An anonymous MQTT client (allowed everything by `--allow-anonymous`)."""

    def __init__(self, url: str) -> None:
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        self.messages: queue.Queue[bytes] = queue.Queue()
        self.client.on_message = lambda c, u, m: self.messages.put(bytes(m.payload))
        self.client.connect("127.0.0.1", int(url.rsplit(":", 1)[1]))
        self.client.loop_start()

    def retained(self, topic: str) -> dict[str, Any]:
        """The retained message of ``topic``, decoded."""
        self.client.subscribe(topic, 1)
        payload = self.messages.get(timeout=10)
        self.client.unsubscribe(topic)
        decoded: dict[str, Any] = msgpack.unpackb(payload)
        return decoded

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        self.client.publish(topic, msgpack.packb(body), qos=1, retain=True).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict[str, Any]]:
    device = f"forged-{uuid.uuid4().hex[:6]}"
    controller = ControllerProcess(tmp_path / "controller")
    agent = AgentProcess(controller.url, device, tmp_path / "agent", driver="process")
    forger = Forger(controller.url)
    try:
        wait_online(controller.url, device)
        assert cli(controller.url, "groups", "create", "g1", "--device", device).returncode == 0
        yield {"url": controller.url, "device": device, "tmp": tmp_path, "agent": agent, "forger": forger}
    finally:
        forger.close()
        agent.stop()
        controller.stop()


def _deploy(fleet: dict[str, Any], version: int) -> dict[str, Any]:
    """Deploy version ``version`` and wait until the device runs it; the device as shown."""
    path = fleet["tmp"] / f"v{version}.yml"
    path.write_text(COMPOSE.format(version=version))
    result = cli(
        fleet["url"],
        "stacks",
        "deploy",
        str(path),
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
    assert result.returncode == 0, result.stderr
    shown: dict[str, Any] = cli_json(fleet["url"], "devices", "show", fleet["device"])
    assert shown["applied_generation"] == shown["desired_generation"]
    assert shown["reported"]["stacks"]["app"]["state"] == "running"
    return shown


def test_forged_desired_states_do_not_wedge_the_device(fleet: dict[str, Any]) -> None:
    """An absurd generation is rejected; a huge one naming a definition nobody publishes does not
    hold back the next deploy; one the device accepts is overtaken by the controller."""
    url, device, forger = fleet["url"], fleet["device"], fleet["forger"]
    topic = f"tether/v1/devices/{device}/desired"
    _deploy(fleet, 1)
    real = forger.retained(topic)

    # 2^64-1, as in the attack: refused and reported; the device keeps running what it has.
    forger.publish(
        topic, {**real, "generation": 2**64 - 1, "stacks": [{"name": "app", "spec_hash": "f" * 64}]}
    )
    shown = wait_until(
        lambda: (d := cli_json(url, "devices", "show", device))["reported"]["error"] and d, 30, interval=0.3
    )
    assert "generation" in shown["reported"]["error"]
    assert shown["applied_generation"] == real["generation"]

    # Plausible but forged: pending on a definition that never comes. The next deploy applies.
    forger.publish(
        topic,
        {**real, "generation": real["generation"] + 1000, "stacks": [{"name": "app", "spec_hash": "e" * 64}]},
    )
    fleet["agent"].wait_for_line(rf"generation {real['generation'] + 1000} waits for 1 stack definition")
    v2 = _deploy(fleet, 2)
    assert v2["reported"]["error"] is None

    # Forged with the definitions the device has: it applies it (it cannot tell), reports a
    # generation the controller never issued, and the controller publishes past it.
    current = forger.retained(topic)
    forger.publish(topic, {**current, "generation": current["generation"] + 1000})
    wait_until(
        lambda: cli_json(url, "devices", "show", device)["desired_generation"] > current["generation"] + 1000,
        30,
        interval=0.3,
        message="the controller to publish past the forged generation",
    )
    v3 = _deploy(fleet, 3)
    assert v3["applied_generation"] > current["generation"] + 1000
