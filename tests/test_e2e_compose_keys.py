"""End to end on a real Docker engine: a stack with container_name, custom networks and a
service_healthy dependency deployed to two devices on one engine runs on both without
colliding, and a locked-down device refuses a stack with host devices, capabilities and host
paths while its other stack runs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.infra import remove_tether_containers, wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, wait_online

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

FILES = Path(__file__).resolve().parent / "compose_files"

POWER = """
services:
  ha:
    image: tether-test/busybox:1
    command: ["sleep", "3600"]
    devices: ["/dev/null:/dev/zigbee"]
    cap_add: [NET_ADMIN]
    volumes: ["/etc/hostname:/host-hostname:ro"]
"""


@pytest.fixture
def procs(docker_engine: Any) -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for proc in reversed(started):
        proc.stop()
    remove_tether_containers(docker_engine, "ck-")
    for net in docker_engine.networks.list(filters={"label": "io.tether.managed=true"}):
        if (net.attrs.get("Labels") or {}).get("io.tether.device", "").startswith("ck-"):
            net.remove()


def _when(stamp: str) -> float:
    """Docker's RFC 3339 time (nanoseconds) as epoch seconds."""
    from datetime import datetime

    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float(f"0.{frac or 0}")


def _status(broker: str, stack: str) -> dict[str, Any]:
    return {row["device"]: row for row in cli_json(broker, "stacks", "status", stack)["devices"]}


def test_two_devices_one_engine_and_a_locked_device(
    docker_engine: Any, busybox_image: str, tmp_path: Path, procs: list[Any]
) -> None:
    """container_name and networks stay per device; service_healthy orders the start; the
    locked device refuses the privileged stack alone, with one error naming the keys."""
    controller = ControllerProcess(tmp_path / "controller")
    procs.append(controller)
    broker = controller.url
    run = uuid.uuid4().hex[:6]
    open_dev, locked_dev = f"ck-{run}-open", f"ck-{run}-locked"
    config = tmp_path / "locked.toml"
    config.write_text('host_access = "locked"\n')
    procs.append(AgentProcess(broker, open_dev, tmp_path / open_dev, driver="docker", labels={"site": run}))
    procs.append(
        AgentProcess(
            broker,
            locked_dev,
            tmp_path / locked_dev,
            driver="docker",
            labels={"site": run},
            extra=["--config", str(config)],
        )
    )
    for device in (open_dev, locked_dev):
        wait_online(broker, device)
    group = cli(broker, "groups", "create", "lab", "--select", f"site={run}", "--trust-device-labels")
    assert group.returncode == 0, group.stderr

    iot = tmp_path / "iot.yml"
    text = (FILES / "two-devices.yml").read_text().replace("busybox:latest", busybox_image)
    text = text.replace(
        "    depends_on: [broker]\n",
        "    depends_on: {broker: {condition: service_healthy}}\n",
    ).replace(
        "        aliases: [broker.local]\n",
        "        aliases: [broker.local]\n    healthcheck: {test: [CMD, 'true'], interval: 5s}\n",
    )
    iot.write_text(text)
    deploy = cli(
        broker,
        "stacks",
        "deploy",
        str(iot),
        "--name",
        "iot",
        "--group",
        "lab",
        "--wait",
        "--min-healthy-time",
        "1s",
        "--timeout",
        "120",
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    for device in (open_dev, locked_dev):
        broker_c = docker_engine.api.inspect_container(f"tether-{device}-iot-broker")
        client_c = docker_engine.containers.get(f"tether-{device}-iot-client")
        address = broker_c["NetworkSettings"]["Networks"][f"tether-{device}-iot_iot"]["IPAddress"]
        out = client_c.exec_run(["/bin/busybox", "ping", "-c1", "-W2", "mqtt"]).output.decode()
        assert f"({address})" in out, out  # its own device's broker, by container_name
        # service_healthy: the first check runs 5 s after the broker starts; without the
        # condition both would be created in the same reconcile, a moment apart.
        started = _when(broker_c["State"]["StartedAt"])
        assert _when(client_c.attrs["Created"]) - started >= 4.5

    power = tmp_path / "power.yml"
    power.write_text(POWER)
    deploy = cli(broker, "stacks", "deploy", str(power), "--name", "power", "--group", "lab")
    assert deploy.returncode == 0, deploy.stderr

    def refused() -> str | None:
        rows = _status(broker, "power")
        row = rows.get(locked_dev)
        error = (row or {}).get("services", {}).get("ha", {}).get("last_error") if row else None
        return error if error and rows.get(open_dev, {}).get("state") == "running" else None

    try:
        error = wait_until(refused, 60, interval=0.5, message="the locked device refuses, the open one runs")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {_status(broker, 'power')}") from None
    assert "refused on this device" in error
    assert "devices '/dev/null' (host_access.devices)" in error and "cap_add NET_ADMIN" in error
    assert "volumes '/etc/hostname' (host_access.bind_mounts)" in error
    assert not docker_engine.containers.list(all=True, filters={"name": f"tether-{locked_dev}-power-ha"})
    opened = docker_engine.api.inspect_container(f"tether-{open_dev}-power-ha")["HostConfig"]
    assert opened["CapAdd"] == ["NET_ADMIN"] and opened["Devices"][0]["PathInContainer"] == "/dev/zigbee"
    assert _status(broker, "iot")[locked_dev]["state"] == "running"  # nothing else disturbed
