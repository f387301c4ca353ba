"""End to end on a real Docker engine: controller, broker and agents as real processes."""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.infra import Mosquitto, remove_tether_containers, wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, wait_online

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

WEB = """
services:
  web:
    image: tether-test/busybox:1
    command: ["sh", "-c", "mkdir -p /www && echo {version} > /www/index.html && exec httpd -f -p 8080 -h /www"]
    ports: ["127.0.0.1::8080"]
    restart: always
    labels:
      example.owner: e2e
"""


def _containers(docker: Any, device_id: str) -> list[Any]:
    """The device's containers now (a container removed while listing makes the list empty: poll again)."""
    import docker.errors as errors

    try:
        return docker.containers.list(
            all=True, filters={"label": ["io.tether.managed=true", f"io.tether.device={device_id}"]}
        )
    except errors.NotFound:
        return []


def _get(docker: Any, device_id: str) -> str | None:
    """The body served by the device's web container, or None while it is not answering."""
    running = [c for c in _containers(docker, device_id) if c.status == "running"]
    if len(running) != 1:
        return None
    ports = running[0].ports.get("8080/tcp") or []
    if not ports:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]['HostPort']}/", timeout=2) as resp:
            return resp.read().decode().strip()
    except OSError:
        return None


@pytest.fixture
def cleanup(docker_engine: Any) -> Iterator[list[Any]]:
    procs: list[Any] = []
    yield procs
    for proc in reversed(procs):
        proc.stop()
    remove_tether_containers(docker_engine, "dock-")


def lifecycle(broker: str, docker: Any, tmp_path: Path, procs: list[Any]) -> None:
    """Deploy to a selector group, reach the port, update, self-heal, remove."""
    run = uuid.uuid4().hex[:6]
    devices = [f"dock-{run}-a", f"dock-{run}-b"]
    for device_id in devices:
        procs.append(
            AgentProcess(broker, device_id, tmp_path / device_id, driver="docker", labels={"site": run})
        )
    for device_id in devices:
        wait_online(broker, device_id)

    assert (
        cli(broker, "groups", "create", "lab", "--select", f"site={run}", "--trust-device-labels").returncode
        == 0
    )
    stack_file = tmp_path / "web.yml"
    stack_file.write_text(WEB.format(version="v1"))
    deploy = cli(
        broker,
        "stacks",
        "deploy",
        str(stack_file),
        "--name",
        "web",
        "--group",
        "lab",
        "--wait",
        "--min-healthy-time",
        "1s",
        "--timeout",
        "90",
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert f"is running on all {len(devices)} device(s)" in deploy.stdout
    for device_id in devices:
        assert wait_until(lambda d=device_id: _get(docker, d), 30, message="v1 answers") == "v1"
        (container,) = _containers(docker, device_id)
        assert container.labels["io.tether.stack"] == "web"
        assert container.labels["example.owner"] == "e2e"
    first = {d: _containers(docker, d)[0] for d in devices}

    # An update: new spec hash, the container is replaced.
    stack_file.write_text(WEB.format(version="v2"))
    update = cli(
        broker,
        "stacks",
        "deploy",
        str(stack_file),
        "--name",
        "web",
        "--group",
        "lab",
        "--wait",
        "--min-healthy-time",
        "1s",
        "--timeout",
        "90",
    )
    assert update.returncode == 0, update.stdout + update.stderr
    for device_id in devices:
        assert wait_until(lambda d=device_id: _get(docker, d) == "v2" and "v2", 30) == "v2"
        (container,) = _containers(docker, device_id)
        assert container.id != first[device_id].id
        assert container.labels["io.tether.spec-hash"] != first[device_id].labels["io.tether.spec-hash"]

    # A container removed by hand comes back.
    victim = _containers(docker, devices[0])[0]
    victim.remove(force=True)
    wait_until(
        lambda: (
            _get(docker, devices[0]) == "v2"
            and (c := _containers(docker, devices[0]))
            and c[0].id != victim.id
        ),
        60,
        message="container recreated after removal by hand",
    )

    status = cli_json(broker, "stacks", "status", "web")
    assert sorted(r["device"] for r in status["devices"]) == devices
    assert {r["state"] for r in status["devices"]} == {"running"}

    removal = cli(broker, "stacks", "rm", "web", "--wait", "--timeout", "90")
    assert removal.returncode == 0, removal.stdout + removal.stderr
    for device_id in devices:
        assert _containers(docker, device_id) == []


def test_docker_lifecycle_embedded_broker(
    docker_engine: Any, busybox_image: str, tmp_path: Path, cleanup: list[Any]
) -> None:
    """With the embedded amqtt broker: deploy, serve HTTP, update, self-heal, remove."""
    controller = ControllerProcess(tmp_path / "controller")
    cleanup.append(controller)
    lifecycle(controller.url, docker_engine, tmp_path, cleanup)


def test_docker_lifecycle_mosquitto(
    docker_engine: Any, busybox_image: str, mosquitto: Mosquitto, tmp_path: Path, cleanup: list[Any]
) -> None:
    """With Mosquitto as the external broker: the same lifecycle."""
    controller = ControllerProcess(tmp_path / "controller", broker=mosquitto.url)
    cleanup.append(controller)
    lifecycle(controller.url, docker_engine, tmp_path, cleanup)
