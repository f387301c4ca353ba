"""End to end with the process driver: host processes, agent restarts, offline operation."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.infra import wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, wait_online

pytestmark = pytest.mark.e2e

SERVICE = """
services:
  worker:
    command: ["sh", "-c", "echo $$$$ > {pidfile}; echo {version} > {pidfile}.version; exec sleep 600"]
    restart: always
    environment:
      GREETING: hello
"""


def _pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for proc in reversed(started):
        proc.stop()


def _kill_workload(pidfile: Path) -> None:
    pid = _pid(pidfile)
    if pid and _alive(pid):
        os.kill(pid, 9)


def test_process_driver_lifecycle_and_offline_autonomy(tmp_path: Path, procs: list[Any]) -> None:
    """Deploy, update and remove host processes; the agent re-attaches after a restart and
    brings the stack back from its saved desired state while the broker is unreachable."""
    device = f"proc-{uuid.uuid4().hex[:6]}"
    pidfile = tmp_path / "worker.pid"
    controller = ControllerProcess(tmp_path / "controller")
    procs.append(controller)
    agent = AgentProcess(controller.url, device, tmp_path / "agent", driver="process")
    procs.append(agent)
    wait_online(controller.url, device)
    assert cli(controller.url, "groups", "create", "solo", "--device", device).returncode == 0

    stack = tmp_path / "worker.yml"
    stack.write_text(SERVICE.format(pidfile=pidfile, version="v1"))
    deploy = cli(
        controller.url,
        "stacks",
        "deploy",
        str(stack),
        "--name",
        "worker",
        "--group",
        "solo",
        "--wait",
        "--min-healthy-time",
        "1s",
        "--timeout",
        "60",
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    first = wait_until(lambda: _pid(pidfile), 10)
    assert _alive(first)
    # The agent's data directory is its own (0700); service output is not world-readable.
    assert stat.S_IMODE((tmp_path / "agent").stat().st_mode) == 0o700
    logs = list((tmp_path / "agent" / "processes").glob("*.log"))
    assert logs and {stat.S_IMODE(p.stat().st_mode) for p in logs} == {0o600}

    # Update: the process is replaced by one running the new version.
    stack.write_text(SERVICE.format(pidfile=pidfile, version="v2"))
    update = cli(
        controller.url,
        "stacks",
        "deploy",
        str(stack),
        "--name",
        "worker",
        "--group",
        "solo",
        "--wait",
        "--min-healthy-time",
        "1s",
        "--timeout",
        "60",
    )
    assert update.returncode == 0, update.stdout + update.stderr
    wait_until(lambda: Path(f"{pidfile}.version").read_text().strip() == "v2", 20, message="v2 running")
    second = wait_until(lambda: (p := _pid(pidfile)) != first and p, 10)
    assert not _alive(first) and _alive(second)

    # Agent restart: the running process is adopted, not duplicated or restarted.
    session = cli_json(controller.url, "devices", "show", device)["session"]
    assert agent.stop() == 0
    agent = AgentProcess(controller.url, device, tmp_path / "agent", driver="process")
    procs.append(agent)
    wait_until(lambda: cli_json(controller.url, "devices", "show", device)["session"] > session, 30)
    status = cli_json(controller.url, "stacks", "status", "worker")
    assert status["devices"][0]["state"] == "running"
    assert _pid(pidfile) == second and _alive(second)

    # Offline: controller (and its embedded broker) gone, agent restarted, workload killed.
    assert agent.stop() == 0
    assert controller.stop() == 0
    _kill_workload(pidfile)
    offline = AgentProcess(controller.url, device, tmp_path / "agent", driver="process")
    procs.append(offline)
    third = wait_until(
        lambda: (p := _pid(pidfile)) != second and _alive(p) and p, 30, message="restarted offline"
    )
    assert Path(f"{pidfile}.version").read_text().strip() == "v2"
    assert "cannot connect" in offline.output(), "the agent was expected to be offline"
    assert "connected to" not in offline.output()

    # Broker back (same data dir): the agent reconnects by itself and the stack is removed.
    offline.stop()
    controller = ControllerProcess(tmp_path / "controller")
    procs.append(controller)
    agent = AgentProcess(controller.url, device, tmp_path / "agent", driver="process")
    procs.append(agent)
    wait_online(controller.url, device)
    removal = cli(controller.url, "stacks", "rm", "worker", "--wait", "--timeout", "60")
    assert removal.returncode == 0, removal.stdout + removal.stderr
    wait_until(lambda: not _alive(third), 20, message="process stopped after removal")
