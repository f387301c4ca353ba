"""End to end on a real Docker engine: three stacks shaped like the IoT stacks people run
(a home-automation hub on the host network, a Zigbee bridge with its broker, a telemetry
stack), written for this test with the constructs found in public Compose files, deployed
with `tether stacks deploy` to a real agent through a real controller, checked with
`docker inspect` and from inside the containers."""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.infra import remove_tether_containers, wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, wait_online

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

# A hub that wants the host's network and network powers; its published ports mean nothing
# there. (Such hubs often ask for privileged: the engine these tests run on cannot start a
# privileged container, so capabilities stand for it here.)
HUB = """
services:
  hub:
    image: ${IMAGE}
    container_name: homehub
    network_mode: host
    cap_add: [NET_ADMIN, NET_RAW]
    restart: unless-stopped
    ports: ["18123:8123"]
    environment:
      TZ: ${HUB_TIMEZONE:-Europe/Paris}
    volumes:
      - ./config:/config
      - /etc/hostname:/host/hostname:ro
    command: ["sh", "-c", "cat /config/settings.yaml > /config/seen.yaml; exec sleep 3600"]
"""

# A serial-radio bridge and the broker it talks to by name once the broker is healthy.
ZIGBEE = """
services:
  mqtt:
    image: ${IMAGE}
    container_name: mosquitto
    restart: unless-stopped
    command: ["httpd", "-f", "-p", "1883", "-h", "/mosquitto/config"]
    volumes:
      - ./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro
      - mqtt-data:/mosquitto/data
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://localhost:1883/mosquitto.conf"]
      interval: 1s
      retries: 30
  bridge:
    image: ${IMAGE}
    container_name: zigbee2mqtt
    restart: unless-stopped
    depends_on:
      mqtt: {condition: service_healthy}
    devices: ["/dev/null:/dev/ttyACM0"]
    group_add: ["20"]
    environment:
      - TZ=Europe/Berlin
      - BRIDGE_MQTT_SERVER=mqtt://mosquitto:1883
    volumes:
      - ./data:/app/data
    command: ["sh", "-c", "wget -q -O /app/data/broker.conf http://mosquitto:1883/mosquitto.conf; exec sleep 3600"]
volumes:
  mqtt-data:
"""

# Shared settings through an extension field and merge keys; a database with an env_file and
# a healthcheck; a flow engine that waits for it; a dashboard whose provisioning bind mount
# is shadowed by its named volume at the same target (as docker compose loads it).
TELEMETRY = """
x-common: &common
  image: ${IMAGE}
  restart: unless-stopped
  logging:
    options: {max-size: 1m}
services:
  influxdb:
    <<: *common
    env_file: influx.env
    command: ["sh", "-c", "echo ok > /www/ping; exec httpd -f -p 8086 -h /www"]
    volumes: ["influx-data:/var/lib/influxdb"]
    healthcheck:
      test: ["CMD-SHELL", "[ \\"$$(wget -q -O - http://localhost:8086/ping)\\" = ok ]"]
      interval: 1s
      retries: 30
  nodered:
    <<: *common
    user: "0"
    depends_on:
      influxdb: {condition: service_healthy}
    environment:
      TZ: ${TZ_UNUSED_BY_ANYONE:-Etc/UTC}
      FLOWS: flows.json
    ports: ["1880"]
    volumes: ["./nodered:/data"]
    command: ["sh", "-c", "wget -q -O /data/influx-ping http://influxdb:8086/ping; exec sleep 3600"]
  grafana:
    <<: *common
    command: ["sleep", "3600"]
    volumes:
      - ./grafana:/var/lib/grafana
      - grafana-data:/var/lib/grafana
volumes:
  influx-data:
  grafana-data:
"""


@pytest.fixture
def procs(docker_engine: Any) -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for proc in reversed(started):
        proc.stop()
    remove_tether_containers(docker_engine, "iot-")


def _project(root: Path, compose: str, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "compose.yaml").write_text(textwrap.dedent(compose))
    return root / "compose.yaml"


def _deploy(url: str, compose: Path, name: str, image: str, *extra: str) -> Any:
    result = cli(
        url,
        "stacks",
        "deploy",
        str(compose),
        "--name",
        name,
        "--group",
        "home",
        "-e",
        f"IMAGE={image}",
        *extra,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_three_iot_stacks_run_as_written(
    docker_engine: Any, busybox_image: str, tmp_path: Path, procs: list[Any]
) -> None:
    """A host-network hub, a Zigbee bridge with its broker and a telemetry stack run
    unchanged: capabilities + host network (published ports ignored, with a warning), a host
    device and a group, relative config files shipped and data directories created, names
    resolved by container_name and service, service_healthy order, env_file, merge keys,
    logging options on the engine's default driver, and the later of two volumes at one
    target; --dry-run first says the same warnings and deploys nothing."""
    device = f"iot-{uuid.uuid4().hex[:6]}"
    controller = ControllerProcess(tmp_path / "controller")
    procs.append(controller)
    url = controller.url
    agent_dir = tmp_path / device
    procs.append(AgentProcess(url, device, agent_dir, driver="docker"))
    wait_online(url, device)
    assert cli(url, "groups", "create", "home", "--device", device).returncode == 0

    hub = _project(tmp_path / "hub", HUB, {"config/settings.yaml": "homeassistant:\n  name: Home\n"})
    zigbee = _project(
        tmp_path / "zigbee", ZIGBEE, {"mosquitto.conf": "listener 1883\nallow_anonymous true\n"}
    )
    (tmp_path / "zigbee" / "data").mkdir()
    (tmp_path / "zigbee" / "data" / "configuration.yaml").write_text("serial:\n  port: /dev/ttyACM0\n")
    telemetry = _project(tmp_path / "telemetry", TELEMETRY, {"influx.env": "INFLUXDB_DB=sensors\n"})

    plan = cli_json(url, "stacks", "deploy", str(hub), "--name", "hub", "--group", "home", "--dry-run",
                    "-e", f"IMAGE={busybox_image}")  # fmt: skip
    assert plan["warnings"] == [
        "service 'hub': ports are ignored with network_mode: host (the service listens on the "
        "device's own ports; Docker discards them too)"
    ]
    assert cli_json(url, "stacks", "ls") == []

    deployed = _deploy(
        url, hub, "hub", busybox_image, "--wait", "--min-healthy-time", "1s", "--timeout", "120"
    )
    assert "warning" in deployed.stderr and "ports are ignored with network_mode: host" in deployed.stderr
    _deploy(url, zigbee, "zigbee", busybox_image, "--wait", "--min-healthy-time", "1s", "--timeout", "120")
    deployed = _deploy(
        url, telemetry, "telemetry", busybox_image, "--wait", "--min-healthy-time", "1s", "--timeout", "120"
    )
    assert "volumes.1 replaces volumes.0: both are mounted at '/var/lib/grafana'" in deployed.stderr

    def inspect(stack: str, service: str) -> dict[str, Any]:
        return docker_engine.api.inspect_container(f"tether-{device}-{stack}-{service}")  # type: ignore[no-any-return]

    volumes = (agent_dir / "volumes").absolute()

    # The hub: host network and privileged, no port bindings, its config directory shipped.
    h = inspect("hub", "hub")
    assert h["HostConfig"]["NetworkMode"] == "host" and h["HostConfig"]["CapAdd"] == ["NET_ADMIN", "NET_RAW"]
    assert not h["HostConfig"]["PortBindings"]
    assert "TZ=Europe/Paris" in h["Config"]["Env"]
    mounts = {m["Destination"]: m for m in h["Mounts"]}
    assert mounts["/config"]["Source"] == str(volumes / "hub" / "config")
    assert mounts["/host/hostname"]["Source"] == "/etc/hostname" and mounts["/host/hostname"]["RW"] is False
    seen = volumes / "hub" / "config" / "seen.yaml"
    assert wait_until(lambda: seen.is_file() and seen.read_text(), 30) == "homeassistant:\n  name: Home\n"

    # The bridge: the serial device and group, the broker found by its container_name once healthy.
    b = inspect("zigbee", "bridge")
    assert b["HostConfig"]["Devices"] == [
        {"PathOnHost": "/dev/null", "PathInContainer": "/dev/ttyACM0", "CgroupPermissions": "rwm"}
    ]
    assert b["HostConfig"]["GroupAdd"] == ["20"]
    fetched = volumes / "zigbee" / "data" / "broker.conf"
    assert wait_until(lambda: fetched.is_file() and fetched.read_text(), 30) == (
        "listener 1883\nallow_anonymous true\n"
    )
    assert (
        volumes / "zigbee" / "data" / "configuration.yaml"
    ).read_text() == "serial:\n  port: /dev/ttyACM0\n"
    m = inspect("zigbee", "mqtt")
    assert {x["Destination"]: x["RW"] for x in m["Mounts"]}["/mosquitto/config/mosquitto.conf"] is False
    assert m["State"]["Health"]["Status"] == "healthy"

    # Telemetry: env_file, merge keys, logging options on the engine's default driver, the flow
    # engine's data from the database reached by service name, a random host port, and the
    # dashboard's named volume in place of the bind mount at the same target.
    i, n, g = (
        inspect("telemetry", "influxdb"),
        inspect("telemetry", "nodered"),
        inspect("telemetry", "grafana"),
    )
    assert "INFLUXDB_DB=sensors" in i["Config"]["Env"]
    driver = docker_engine.info()["LoggingDriver"]
    for c in (i, n, g):
        assert c["HostConfig"]["LogConfig"] == {"Type": driver, "Config": {"max-size": "1m"}}
    assert n["Config"]["User"] == "0" and "TZ=Etc/UTC" in n["Config"]["Env"]
    ping = volumes / "telemetry" / "nodered" / "influx-ping"
    assert wait_until(lambda: ping.is_file() and ping.read_text(), 30) == "ok\n"
    (binding,) = n["NetworkSettings"]["Ports"]["1880/tcp"][:1]
    assert int(binding["HostPort"]) > 0
    (grafana_mount,) = [x for x in g["Mounts"] if x["Destination"] == "/var/lib/grafana"]
    assert grafana_mount["Type"] == "volume" and grafana_mount["Name"].endswith("grafana-data")

    rows = {s["name"]: s for s in cli_json(url, "stacks", "ls")}
    assert sorted(rows) == ["hub", "telemetry", "zigbee"]
    for stack in rows:
        status = cli_json(url, "stacks", "status", stack)["devices"]
        assert [r["state"] for r in status] == ["running"], status
