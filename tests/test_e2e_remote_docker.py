"""Remote operations on a real Docker engine: container logs, --since, --follow, restart, facts, metrics."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.infra import Mosquitto, remove_tether_containers, wait_until
from support.procs import PY, AgentProcess, ControllerProcess, _Proc, cli, cli_json, wait_online

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

STACK = """
services:
  app:
    image: tether-test/busybox:1
    command: ["sh", "-c", "echo alpha; echo beta; echo gamma; while true; do if [ -e /t/trigger ]; then echo \\"mark-$$(cat /t/trigger)\\"; rm -f /t/trigger; fi; sleep 0.1; done"]
    volumes: ["{shared}:/t"]
    restart: always
    stop_grace_period: 1s
"""


@pytest.fixture
def cleanup(docker_engine: Any) -> Iterator[list[Any]]:
    procs: list[Any] = []
    yield procs
    for proc in reversed(procs):
        proc.stop()
    remove_tether_containers(docker_engine)


def _container(docker: Any, device_id: str) -> Any:
    found = docker.containers.list(
        all=True, filters={"label": ["io.tether.managed=true", f"io.tether.device={device_id}"]}
    )
    return found[0] if len(found) == 1 else None


def test_container_logs_restart_facts_and_metrics(
    docker_engine: Any, busybox_image: str, mosquitto: Mosquitto, tmp_path: Path, cleanup: list[Any]
) -> None:
    """With Mosquitto and the docker driver: a container's output comes back through the CLI
    (--tail, --since, --follow), restart replaces the container, facts name the Docker
    version, and the container's CPU and memory reach `tether devices top`."""
    device = f"rdock-{uuid.uuid4().hex[:6]}"
    shared = tmp_path / "shared"
    shared.mkdir()
    trigger = shared / "trigger"
    controller = ControllerProcess(tmp_path / "controller", broker=mosquitto.url)
    cleanup.append(controller)
    url = controller.url
    cleanup.append(
        AgentProcess(url, device, tmp_path / "agent", driver="docker", extra=["--metrics-interval", "1"])
    )
    wait_online(url, device)
    assert cli(url, "groups", "create", "dock", "--device", device).returncode == 0
    stack = tmp_path / "web.yml"
    stack.write_text(STACK.format(shared=shared))
    deploy = cli(
        url,
        "stacks",
        "deploy",
        str(stack),
        "--name",
        "web",
        "--group",
        "dock",
        "--wait",
        "--min-healthy-time",
        "1s",
        "--timeout",
        "90",
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    container = wait_until(lambda: _container(docker_engine, device), 30)

    wait_until(lambda: "gamma" in cli(url, "logs", device, "web").stdout, 30, 0.2, "gamma logged")
    tail = cli(url, "logs", device, "web", "app", "--tail", "2")
    assert tail.returncode == 0 and tail.stdout == "beta\ngamma\n", tail.stdout + tail.stderr
    assert cli(url, "logs", device, "web", "--tail", "all").stdout == "alpha\nbeta\ngamma\n"

    # --since: lines older than the window are left out.
    wait_until(lambda: "gamma" in container.logs().decode(), 10)
    printed_before = time.time()
    wait_until(lambda: time.time() > printed_before + 6, 10, message="time to pass the first lines")
    marked = time.time()
    trigger.write_text("since")
    wait_until(lambda: "mark-since" in cli(url, "logs", device, "web", "--tail", "1").stdout, 20, 0.2)
    window = time.time() - marked + 3.5  # the device reads it on arrival: room for a slow CLI
    recent = cli(url, "logs", device, "web", "--since", f"{window:.1f}s", "--tail", "all")
    assert recent.returncode == 0 and recent.stdout == "mark-since\n", recent.stdout + recent.stderr
    assert "alpha" in cli(url, "logs", device, "web", "--since", "10m", "--tail", "all").stdout

    # --follow: a line printed after the command started comes through.
    argv = [PY, "-m", "tether.cli.main", "logs", device, "web", "--tail", "1", "--follow", "--broker", url]
    streaming = _Proc(argv, tmp_path / "follow.log")
    try:
        streaming.wait_for_line(r"^mark-since$", 20)
        trigger.write_text("live")
        streaming.wait_for_line(r"^mark-live$", 20)
        streaming.signal(signal.SIGINT)
        assert streaming.proc.wait(20) == 130
    finally:
        streaming.stop()

    # Restart: a new container.
    restarted = cli(url, "devices", "restart", device, "web", "app")
    assert restarted.returncode == 0, restarted.stderr
    assert f"{container.id[:12]} -> " in restarted.stdout
    fresh = wait_until(
        lambda: (c := _container(docker_engine, device)) is not None and c.id != container.id and c, 30
    )
    wait_until(lambda: fresh.reload() or fresh.status == "running", 30)
    wait_until(lambda: "gamma" in cli(url, "logs", device, "web").stdout, 30, 0.2, "new container logs")

    # Facts: the engine's version; addresses and sizes are there.
    facts = cli_json(url, "devices", "facts", device)
    assert facts["docker_version"] == docker_engine.version()["Version"]
    assert facts["driver"] == "docker" and facts["memory_total"] > 0 and facts["disk_total"] > 0
    shown = cli(url, "devices", "show", device)
    assert f"docker:     {facts['docker_version']}" in shown.stdout, shown.stdout

    # Metrics: the container's CPU and memory, from the Docker engine.
    sample = wait_until(
        lambda: (
            (s := cli_json(url, "devices", "top", device)[0]["sample"])
            and (s.get("containers") or {}).get("web/app", [None, None])[1]
            and s
        ),
        30,
        0.3,
        "the container's usage",
    )
    cpu, mem = sample["containers"]["web/app"]
    assert mem > 0 and (cpu is None or 0.0 <= cpu <= 100.0)
    table = cli(url, "devices", "top", device)
    assert "web/app" in table.stdout, table.stdout
