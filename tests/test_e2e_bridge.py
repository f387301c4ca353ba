"""A regional Mosquitto bridged to the central one (packaging/mosquitto-region-bridge.conf):
the controller on the central broker, the device on the regional one (docs/scaling.md)."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from support.infra import Mosquitto, region_bridge_conf, wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, wait_online

pytestmark = [pytest.mark.e2e, pytest.mark.mosquitto]

STACK = 'services:\n  s:\n    command: ["sh", "-c", "echo {v} > version; exec sleep 600"]\n'


def bridge_state(broker: Mosquitto, region: str) -> str:
    """The retained bridge notification on ``broker``: "1" (up), "0" (down) or "" (none)."""
    topic = f"$SYS/broker/connection/tether-bridge-{region}/state"
    result = subprocess.run(
        ["mosquitto_sub", "-p", str(broker.port), "-t", topic, "-C", "1", "-W", "2"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return result.stdout.strip()


def test_device_behind_a_bridged_regional_broker(tmp_path: Path, mosquitto: Mosquitto) -> None:
    central = mosquitto
    run = uuid.uuid4().hex[:6]
    (tmp_path / "regional").mkdir()
    with Mosquitto(
        tmp_path / "regional", extra_conf=region_bridge_conf(central.port, run, "1 2")
    ) as regional:
        wait_until(
            lambda: f"as tether-bridge-{run}" in central.log_text(), 15, message="bridge connected to central"
        )
        if shutil.which("mosquitto_sub"):
            wait_until(lambda: bridge_state(central, run) == "1", 15, message="bridge state 1 on central")
        controller = ControllerProcess(tmp_path / "controller", broker=central.url)
        device = f"br-{run}"
        agent = AgentProcess(regional.url, device, tmp_path / "agent", labels={"region": run})
        try:
            # Presence crosses the bridge outwards; the desired state and the stack
            # definition inwards; the reported state back out.
            assert wait_online(central.url, device)["labels"] == {"region": run}
            assert (
                cli(
                    central.url,
                    "groups",
                    "create",
                    "region",
                    "--select",
                    f"region={run}",
                    "--trust-device-labels",
                ).returncode
                == 0
            )
            stack = tmp_path / "s.yml"
            stack.write_text(STACK.format(v="v1"))
            deploy = cli(
                central.url, "stacks", "deploy", str(stack), "--name", "s", "--group", "region",
                "--wait", "--min-healthy-time", "1s", "--timeout", "60",
            )  # fmt: skip
            assert deploy.returncode == 0, deploy.stdout + deploy.stderr
            assert (tmp_path / "agent" / "work" / "s" / "s" / "version").read_text().strip() == "v1"

            # A remote operation: the request goes in, the device's reply comes out.
            facts = cli_json(central.url, "devices", "facts", device)
            assert facts["driver"] == "process"

            # The will is published by the regional broker and bridged to the controller.
            agent.kill()
            wait_until(
                lambda: cli_json(central.url, "devices", "show", device)["status"] == "offline",
                30,
                interval=0.2,
                message="offline through the bridge",
            )
            # Retained in the regional broker: a restarted agent gets its state from it.
            agent = AgentProcess(regional.url, device, tmp_path / "agent", labels={"region": run})
            wait_online(central.url, device)
            wait_until(
                lambda: (
                    (d := cli_json(central.url, "devices", "show", device))["applied_generation"]
                    == d["desired_generation"]
                ),
                30,
                message="applied after the restart",
            )
        finally:
            agent.stop()
            controller.stop()
    # The regional broker is gone: the central one says so (the bridge's will).
    if shutil.which("mosquitto_sub"):
        wait_until(lambda: bridge_state(central, run) == "0", 15, message="bridge state 0 on central")
