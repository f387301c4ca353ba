"""The container images of docker/, built on a Debian base made here (no registry needed) and run.

The base: ``debootstrap --variant=minbase`` with Debian's python3, imported as
tether-test/debian-python:12 (tests/support/images.py; cached across runs). The agent
image must come online against a test controller and report its facts; the controller
image must pass the health check of compose/production.yml and serve an agent container.
pip in the image builds reaches PyPI; the engine caches the layers, so a rebuild with
unchanged inputs takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.images import (
    DEBIAN_PYTHON_TAG,
    REPO_ROOT,
    build_image,
    ensure_debian_python_image,
    image_exists,
    skip_or_fail,
)
from support.infra import remove_tether_containers, wait_until
from support.procs import ControllerProcess, cli, cli_json, wait_online

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

AGENT_TAG = "tether-test/agent:dev"
CONTROLLER_TAG = "tether-test/controller:dev"
LABEL = "io.tether.test=images"
DEVICE_PREFIX = "img-"


@pytest.fixture(scope="session")
def debian_python_image(docker_engine: Any) -> str:
    if not image_exists(docker_engine, DEBIAN_PYTHON_TAG):
        if os.geteuid() != 0:
            skip_or_fail(f"making {DEBIAN_PYTHON_TAG} with debootstrap needs root")
        if shutil.which("debootstrap") is None and not os.access("/usr/sbin/debootstrap", os.X_OK):
            skip_or_fail(
                f"debootstrap is not installed, so {DEBIAN_PYTHON_TAG} cannot be made (apt-get install debootstrap)"
            )
    started = time.monotonic()
    tag = ensure_debian_python_image(docker_engine)
    print(f"\n{DEBIAN_PYTHON_TAG} ready in {time.monotonic() - started:.1f}s")
    return tag


def _build(client: Any, dockerfile: str, tag: str, base: str) -> str:
    _log, seconds = build_image(client, dockerfile, tag, {"BASE": base})
    print(f"\n{dockerfile} built as {tag} in {seconds:.1f}s")
    return tag


@pytest.fixture(scope="session")
def agent_image(docker_engine: Any, debian_python_image: str) -> str:
    return _build(docker_engine, "docker/Dockerfile.agent", AGENT_TAG, debian_python_image)


@pytest.fixture(scope="session")
def controller_image(docker_engine: Any, debian_python_image: str) -> str:
    return _build(docker_engine, "docker/Dockerfile.controller", CONTROLLER_TAG, debian_python_image)


@pytest.fixture
def containers(docker_engine: Any) -> Iterator[list[Any]]:
    """Containers a test starts: removed afterwards, with what their agents deployed."""
    started: list[Any] = []
    yield started
    import docker.errors

    for container in reversed(started):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
    remove_tether_containers(docker_engine, DEVICE_PREFIX)


def _run(client: Any, image: str, started: list[Any], **kwargs: Any) -> Any:
    name = f"tether-test-{uuid.uuid4().hex[:10]}"
    container = client.containers.run(image, name=name, detach=True, labels=[LABEL], **kwargs)
    started.append(container)
    return container


def _logs(container: Any) -> str:
    return str(container.logs().decode(errors="replace"))


def _exec(container: Any, argv: list[str], **kwargs: Any) -> tuple[int, str]:
    code, output = container.exec_run(argv, **kwargs)
    return code, output.decode(errors="replace")


def _one_shot(client: Any, image: str, argv: list[str], entrypoint: list[str] | None = None) -> str:
    output = client.containers.run(
        image, argv, entrypoint=entrypoint, remove=True, labels=[LABEL], stdout=True, stderr=True
    )
    return str(output.decode())


def test_agent_image_holds_the_agent_only(docker_engine: Any, agent_image: str) -> None:
    probe = (
        "import importlib.util, os, sys, tether.agent.main;"
        "missing = [m for m in ('amqtt', 'yaml', 'psycopg', 'prometheus_client', 'pip')"
        " if importlib.util.find_spec(m)];"
        "print('present:', missing, 'uid:', os.getuid(), 'python:', sys.version_info[:2])"
    )
    out = _one_shot(docker_engine, agent_image, ["-c", probe], entrypoint=["python3"])
    assert "present: [] uid: 10001 python: (3, 11)" in out, out
    assert "tether-agent, version" in _one_shot(docker_engine, agent_image, ["--version"])
    attrs = docker_engine.images.get(agent_image).attrs
    assert attrs["Config"]["User"] == "10001:10001"
    assert attrs["Config"]["Entrypoint"] == ["tether-agent"]
    print(f"\n{agent_image}: {attrs['Size'] / 1e6:.0f} MB")


def _docker_socket() -> Path | None:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return None
    path = Path(host[len("unix://") :])
    return path if path.exists() and stat.S_ISSOCK(path.stat().st_mode) else None


@pytest.mark.parametrize("driver", ["process", "docker"])
def test_agent_container_comes_online(
    docker_engine: Any,
    agent_image: str,
    busybox_image: str,
    containers: list[Any],
    tmp_path: Path,
    driver: str,
) -> None:
    """The agent image on the host network against a `tether up` on loopback."""
    run = uuid.uuid4().hex[:6]
    device_id = f"{DEVICE_PREFIX}{driver}-{run}"
    kwargs: dict[str, Any] = {}
    if driver == "docker":
        socket = _docker_socket()
        if socket is None:
            pytest.skip("the Docker engine is not on a local unix socket that a container could mount")
        # As documented in docker/Dockerfile.agent: uid 10001 plus the socket's group.
        kwargs = {
            "volumes": {str(socket): {"bind": "/var/run/docker.sock", "mode": "rw"}},
            "group_add": [str(socket.stat().st_gid)],
        }
    controller = ControllerProcess(tmp_path / "controller")
    try:
        agent = _run(
            docker_engine,
            agent_image,
            containers,
            command=[
                "--broker",
                controller.url,
                "--device-id",
                device_id,
                "--driver",
                driver,
                "--label",
                f"site={run}",
                "--label",
                "source=image",
            ],  # fmt: skip
            network_mode="host",
            **kwargs,
        )
        try:
            device = wait_online(controller.url, device_id, timeout=60)
        except AssertionError:
            agent.reload()
            raise AssertionError(f"agent container {agent.status}:\n{_logs(agent)}") from None

        shown = cli_json(controller.url, "devices", "show", device_id)
        facts = shown["facts"]
        assert facts["driver"] == driver
        assert facts["os"].startswith("Debian GNU/Linux 12"), facts["os"]
        assert facts["arch"] == platform.machine()
        assert facts["labels"] == {"site": run, "source": "image"}
        live = cli_json(controller.url, "devices", "facts", device_id)
        assert live["disk_path"] == "/var/lib/tether-agent"
        assert live["agent_version"] == facts["agent_version"]
        if driver == "docker":
            assert live["docker_version"], live
            _deploy_through_the_socket(docker_engine, controller.url, busybox_image, device_id, run, tmp_path)
        else:
            assert live.get("docker_version") is None
        assert device["status"] == "online"

        # `docker stop` sends SIGTERM to the agent (PID 1): it says goodbye and exits 0.
        agent.stop(timeout=30)
        agent.reload()
        assert agent.attrs["State"]["ExitCode"] == 0, _logs(agent)
        wait_until(
            lambda: cli_json(controller.url, "devices", "show", device_id)["status"] == "offline",
            30,
            interval=0.2,
            message=f"{device_id} offline after docker stop",
        )
    finally:
        controller.stop()


def _deploy_through_the_socket(
    client: Any, broker: str, image: str, device_id: str, run: str, tmp_path: Path
) -> None:
    """A stack deployed to the containerized agent runs as a container on the host engine."""
    assert (
        cli(
            broker, "groups", "create", f"g-{run}", "--select", f"site={run}", "--trust-device-labels"
        ).returncode
        == 0
    )
    stack = tmp_path / "stack.yml"
    stack.write_text(f"services:\n  idle:\n    image: {image}\n    command: [sleep, '3600']\n")
    deploy = cli(
        broker, "stacks", "deploy", str(stack), "--name", f"idle-{run}", "--group", f"g-{run}",
        "--wait", "--min-healthy-time", "1s", "--timeout", "90",
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    def running() -> list[Any]:
        found = client.containers.list(filters={"label": [f"io.tether.device={device_id}"]})
        return [c for c in found if c.status == "running"]

    (container,) = wait_until(running, 30, message=f"{device_id}'s stack container running")
    assert container.labels["io.tether.stack"] == f"idle-{run}"


def _production_healthcheck(container_port: str) -> dict[str, Any]:
    """The controller health check of compose/production.yml, with short intervals for a test."""
    doc = yaml.safe_load((REPO_ROOT / "compose" / "production.yml").read_text())
    controller = doc["services"]["controller"]
    http = controller["command"][controller["command"].index("--http") + 1]
    assert http.endswith(f":{container_port}")
    return {
        "test": controller["healthcheck"]["test"],
        "interval": 500_000_000,  # ns
        "timeout": 5_000_000_000,
        "retries": 3,
        "start_period": 30_000_000_000,
    }


def test_controller_image_default_command(
    docker_engine: Any, controller_image: str, containers: list[Any]
) -> None:
    """As compose/quickstart.yml runs it: the image's own command, port 1883 published."""
    controller = _run(docker_engine, controller_image, containers, ports={"1883/tcp": ("127.0.0.1", None)})

    def ready() -> bool:
        controller.reload()
        if controller.status == "exited":
            raise AssertionError(f"controller container exited:\n{_logs(controller)}")
        return "controller ready (leader; state in /data/tether.db)" in _logs(controller)

    wait_until(ready, 60, interval=0.2, message="controller ready in the container")
    # The CLI in the container, as the operator of /data/operator.json (TETHER_CREDENTIALS).
    code, out = _exec(controller, ["tether", "devices", "ls", "-o", "json"])
    assert code == 0 and json.loads(out) == [], out
    code, listing = _exec(controller, ["ls", "-ln", "/data"])
    assert code == 0 and " 10001 10001 " in listing, listing
    # From the host, without credentials, the published broker refuses.
    host_port = controller.attrs["NetworkSettings"]["Ports"]["1883/tcp"][0]["HostPort"]
    refused = cli(f"mqtt://127.0.0.1:{host_port}", "devices", "ls", timeout=30)
    assert refused.returncode != 0 and "Not authorized" in refused.stderr, refused.stderr


def test_controller_image_with_agent_image(
    docker_engine: Any,
    controller_image: str,
    agent_image: str,
    containers: list[Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The controller image (embedded broker, --http as in production.yml), health checked as
    Compose would, with an agent container in its network namespace, the device's credentials
    issued by the controller, and the CLI from here with the operator's."""
    probe = "import amqtt, yaml, psycopg, prometheus_client, os; print('uid', os.getuid())"
    assert "uid 10001" in _one_shot(docker_engine, controller_image, ["python3", "-c", probe])

    controller = _run(
        docker_engine,
        controller_image,
        containers,
        command=[
            "tether",
            "up",
            "--bind",
            "0.0.0.0",
            "--data-dir",
            "/data",
            "--http",
            "0.0.0.0:9100",
            "--log-format",
            "json",
        ],  # fmt: skip
        healthcheck=_production_healthcheck("9100"),
        ports={"1883/tcp": ("127.0.0.1", None)},  # an ephemeral port on the host's loopback
    )

    def health() -> str | None:
        controller.reload()
        if controller.status == "exited":
            raise AssertionError(f"controller container exited:\n{_logs(controller)}")
        status = controller.attrs["State"].get("Health", {}).get("Status")
        return status if status == "healthy" else None

    try:
        wait_until(health, 60, interval=0.2, message="controller container healthy")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_logs(controller)}") from None
    assert re.search(r'"level": "info"', _logs(controller)), _logs(controller)
    host_port = controller.attrs["NetworkSettings"]["Ports"]["1883/tcp"][0]["HostPort"]
    broker = f"mqtt://127.0.0.1:{host_port}"
    code, operator = _exec(controller, ["cat", "/data/operator.json"])
    assert code == 0, operator
    (tmp_path / "operator.json").write_text(operator)
    monkeypatch.setenv("TETHER_CREDENTIALS", str(tmp_path / "operator.json"))

    device_id = f"{DEVICE_PREFIX}pair-{uuid.uuid4().hex[:6]}"
    code, out = _exec(controller, ["tether", "devices", "credentials", device_id, "-o", "json"])
    assert code == 0, out
    issued = json.loads(out)
    agent = _run(
        docker_engine,
        agent_image,
        containers,
        command=["--broker", "mqtt://127.0.0.1:1883", "--device-id", device_id, "--driver", "process"],
        environment={"TETHER_USERNAME": issued["username"], "TETHER_PASSWORD": issued["password"]},
        network_mode=f"container:{controller.id}",
    )
    try:
        wait_online(broker, device_id, timeout=60)
    except AssertionError:
        raise AssertionError(f"{_logs(agent)}\n---\n{_logs(controller)}") from None

    def metrics() -> str | None:
        code, text = _exec(controller, ["python3", "-c", METRICS])
        assert code == 0, text
        return text if 'tether_devices{presence="online"} 1.0' in text else None

    wait_until(metrics, 30, interval=0.5, message="/metrics counts the agent container online")


METRICS = (
    "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9100/metrics').read().decode())"
)
