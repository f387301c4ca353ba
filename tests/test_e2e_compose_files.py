"""End to end: a Compose file as people write it (a `.env`, an `env_file`, a relative config
file and a relative data directory), resolved by the CLI, shipped with the stack and run by
real agents on the docker and process drivers. The Compose files are written for this test."""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.infra import remove_tether_containers, wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, wait_online

pytestmark = pytest.mark.e2e

DOCKER_STACK = """
services:
  app:
    image: ${IMAGE}
    command: ["sh", "-c", "echo $$GREETING > /data/greeting; exec sleep 3600"]
    environment:
      GREETING: ${GREETING:-unset}
    env_file: app.env
    volumes:
      - ./app.conf:/conf/app.conf:ro
      - ./data:/data
    restart: always
"""

PROCESS_STACK = """
services:
  worker:
    command: ["sh", "-c", "cat conf/app.conf > data/seen; echo \\"$$GREETING $$LEVEL\\" > data/greeting; exec sleep 600"]
    environment:
      GREETING: ${GREETING:?set it in .env}
    env_file: app.env
    volumes:
      - ./app.conf:/conf/app.conf
      - ./data:/data
    restart: always
"""


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for proc in reversed(started):
        proc.stop()


def _project(root: Path, stack: str, conf: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "compose.yaml").write_text(textwrap.dedent(stack))
    (root / ".env").write_text("GREETING=hello from .env\n")
    (root / "app.env").write_text("LEVEL=3\nPRICE='$5'\n")
    (root / "app.conf").write_text(conf)
    return root / "compose.yaml"


def _deploy(url: str, compose: Path, name: str, group: str, *extra: str) -> None:
    result = cli(
        url,
        "stacks",
        "deploy",
        str(compose),
        *extra,
        "--name",
        name,
        "--group",
        group,
        "--wait",
        "--min-healthy-time",
        "1s",
        "--timeout",
        "120",
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.docker
def test_relative_config_file_and_env_on_docker(
    docker_engine: Any, busybox_image: str, tmp_path: Path, procs: list[Any]
) -> None:
    """`.env` interpolation, env_file and a relative config file bind-mounted read-only reach
    the container (docker inspect, and the file read inside it); the data directory lives in
    the stack's directory on the device and survives an update that replaces the container
    because the shipped file changed."""
    device = f"cf-{uuid.uuid4().hex[:6]}"
    controller = ControllerProcess(tmp_path / "controller")
    procs.append(controller)
    agent_dir = tmp_path / device
    procs.append(AgentProcess(controller.url, device, agent_dir, driver="docker"))
    try:
        wait_online(controller.url, device)
        assert cli(controller.url, "groups", "create", "cf", "--device", device).returncode == 0
        compose = _project(tmp_path / "project", DOCKER_STACK, "listener 1883\nprice $5\n")
        _deploy(controller.url, compose, "app", "cf", "-e", f"IMAGE={busybox_image}")

        stack_dir = (agent_dir / "volumes" / "app").absolute()
        (container,) = docker_engine.containers.list(filters={"label": f"io.tether.device={device}"})
        container.reload()
        mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
        assert mounts["/conf/app.conf"]["Source"] == str(stack_dir / "app.conf")
        assert mounts["/conf/app.conf"]["RW"] is False
        assert mounts["/data"]["Source"] == str(stack_dir / "data") and mounts["/data"]["RW"] is True
        env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
        assert env["GREETING"] == "hello from .env" and env["LEVEL"] == "3" and env["PRICE"] == "$5"
        code, out = container.exec_run(["cat", "/conf/app.conf"])
        assert code == 0 and out.decode() == "listener 1883\nprice $5\n"
        greeting = stack_dir / "data" / "greeting"
        assert wait_until(lambda: greeting.is_file() and greeting.read_text(), 30) == "hello from .env\n"
        (stack_dir / "data" / "kept").write_text("written on the device")

        # The operator edits the config file: the new version ships, the container is replaced.
        (tmp_path / "project" / "app.conf").write_text("listener 1884\n")
        _deploy(controller.url, compose, "app", "cf", "-e", f"IMAGE={busybox_image}")
        (second,) = docker_engine.containers.list(filters={"label": f"io.tether.device={device}"})
        assert second.id != container.id
        code, out = second.exec_run(["cat", "/conf/app.conf"])
        assert code == 0 and out.decode() == "listener 1884\n"
        assert (stack_dir / "data" / "kept").read_text() == "written on the device"
    finally:
        for proc in reversed(procs):
            proc.stop()
        procs.clear()
        remove_tether_containers(docker_engine, "cf-")


def test_relative_config_file_and_env_on_the_process_driver(tmp_path: Path, procs: list[Any]) -> None:
    """The same on the process driver: the relative mounts are links in the working
    directory to the stack's directory, the environment comes from `.env` and env_file; an
    unset required variable is one clear error before anything is sent."""
    device = f"cfp-{uuid.uuid4().hex[:6]}"
    controller = ControllerProcess(tmp_path / "controller")
    procs.append(controller)
    agent_dir = tmp_path / device
    procs.append(AgentProcess(controller.url, device, agent_dir, driver="process"))
    wait_online(controller.url, device)
    assert cli(controller.url, "groups", "create", "cfp", "--device", device).returncode == 0
    compose = _project(tmp_path / "project", PROCESS_STACK, "threshold=42\n")
    _deploy(controller.url, compose, "worker", "cfp")

    data = agent_dir / "volumes" / "worker" / "data"
    assert wait_until(lambda: (data / "greeting").is_file() and (data / "greeting").read_text(), 30) == (
        "hello from .env 3\n"
    )
    assert (
        wait_until(lambda: (data / "seen").is_file() and (data / "seen").read_text(), 30) == "threshold=42\n"
    )
    assert (agent_dir / "volumes" / "worker" / "app.conf").read_text() == "threshold=42\n"

    (tmp_path / "project" / ".env").write_text("# GREETING is gone\n")
    refused = cli(controller.url, "stacks", "deploy", str(compose), "--name", "worker", "--group", "cfp")
    assert refused.returncode == 1 and "required variable GREETING is missing a value: set it in .env" in (
        refused.stderr
    )
    stacks = cli_json(controller.url, "stacks", "ls")
    assert [(s["name"], s["version"]) for s in stacks] == [("worker", 1)]


def test_deploy_dry_run_validates_on_the_controller_and_changes_nothing(
    tmp_path: Path, procs: list[Any]
) -> None:
    """`stacks deploy --dry-run`: every problem at once (file, group), else the version, the
    devices and what happens to each service; the stack stays as it was."""
    controller = ControllerProcess(tmp_path / "controller")
    procs.append(controller)
    url = controller.url
    assert cli(url, "groups", "create", "plan", "--device", "pi-1", "--device", "pi-2").returncode == 0
    v1 = tmp_path / "v1.yml"
    v1.write_text("services:\n  db: {image: db:1}\n  web: {image: web:1}\n  old: {image: old:1}\n")
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  web: {image: web:1, restart: sometimes}\n")
    refused = cli(url, "stacks", "deploy", str(bad), "--name", "shop", "--group", "nowhere", "--dry-run")
    assert refused.returncode == 1
    assert "restart" in refused.stderr and "unknown group 'nowhere'" in refused.stderr

    first = cli_json(url, "stacks", "deploy", str(v1), "--name", "shop", "--group", "plan", "--dry-run")
    assert first["version"] == 1 and first["changed"] and sorted(first["devices"]) == ["pi-1", "pi-2"]
    assert {s["name"]: s["change"] for s in first["services"]} == {
        "db": "added",
        "web": "added",
        "old": "added",
    }
    assert cli_json(url, "stacks", "ls") == []

    assert cli(url, "stacks", "deploy", str(v1), "--name", "shop", "--group", "plan").returncode == 0
    v2 = tmp_path / "v2.yml"
    v2.write_text("services:\n  db: {image: db:1}\n  web: {image: web:2}\n  cache: {image: cache:1}\n")
    plan = cli(url, "stacks", "deploy", str(v2), "--name", "shop", "--group", "plan", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "would deploy version 2" in plan.stdout and "2 device(s): pi-1, pi-2" in plan.stdout
    lines = plan.stdout.splitlines()[2:]
    table = lines[: lines.index("")] if "" in lines else lines  # then the diff against the deployed file
    changes = dict(line.split() for line in table)
    assert changes == {"db": "kept", "web": "replaced", "cache": "added", "old": "removed"}
    assert any(line.startswith("+") and "web:2" in line for line in lines), plan.stdout
    same = cli_json(url, "stacks", "deploy", str(v1), "--name", "shop", "--group", "plan", "--dry-run")
    assert not same["changed"] and {s["change"] for s in same["services"]} == {"kept"}
    assert [(s["name"], s["version"]) for s in cli_json(url, "stacks", "ls")] == [("shop", 1)]
