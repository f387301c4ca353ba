"""Updates over a slow link, end to end: a real registry behind a shaped loopback link, the
controller, a docker-driver agent. The service stays up while the new image downloads."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.images import skip_or_fail
from support.infra import free_port, remove_tether_containers, wait_until
from support.linkproxy import LinkProxy
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, wait_online
from support.registry import Registry, layer_size, push_image, registry_available

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

MB = 1_000_000
STACK = """
services:
  web:
    image: {image}
    command: ["sh", "-c", "mkdir -p /www && echo {version} > /www/index.html && exec httpd -f -p 8080 -h /www"]
    ports: ["127.0.0.1:{port}:8080"]
    restart: always
"""


class Poller:
    """GETs the published port every 50 ms on its own thread: (time, body or None) each."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.samples: list[tuple[float, str | None]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def get(self) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1) as resp:
                return str(resp.read().decode().strip())
        except OSError:
            return None

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), self.get()))
            self.stop.wait(0.05)

    def last(self) -> str | None:
        return self.samples[-1][1] if self.samples else None

    def gap_before(self, body: str) -> float:
        """Seconds without an answer right before ``body`` was first served."""
        first = next(i for i, (_, b) in enumerate(self.samples) if b == body)
        start = first
        while start > 0 and self.samples[start - 1][1] is None:
            start -= 1
        return self.samples[first][0] - self.samples[start - 1][0] if start > 0 else float("inf")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def setup(docker_engine: Any, busybox_image: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    reason = registry_available()
    if reason:
        skip_or_fail(reason)
    procs: list[Any] = []
    run = uuid.uuid4().hex[:6]
    with Registry(tmp_path / "registry") as registry:
        yield {"registry": registry, "procs": procs, "run": run}
        for proc in reversed(procs):
            proc.stop()
        remove_tether_containers(docker_engine, f"upd-{run}")
        _remove_images(docker_engine, f"/u{run}/")


def _remove_images(docker: Any, marker: str) -> None:
    """The images the agent loaded for this test (named with its run id)."""
    for image in docker.images.list():
        for tag in image.tags:
            if marker in tag:
                with contextlib.suppress(Exception):
                    docker.images.remove(tag, force=True)


def _download(broker: str, device: str) -> dict[str, Any] | None:
    rows = cli_json(broker, "stacks", "status", "web")["devices"]
    return next((r.get("download") for r in rows if r["device"] == device), None)


def _deploy(broker: str, path: Path, wait: bool = True) -> Any:
    args = ["stacks", "deploy", str(path), "--name", "web", "--group", "lab"]
    if wait:
        args += ["--wait", "--min-healthy-time", "1s", "--timeout", "180"]
    return cli(broker, *args, timeout=200)


def test_the_old_version_serves_while_the_new_image_crawls_in_and_the_switch_is_short(
    setup: dict[str, Any], docker_engine: Any, tmp_path: Path
) -> None:
    """5 MB at 300 KB/s: v1 answers throughout (a crash meanwhile is restarted), the agent is
    killed (SIGKILL, as in a power cut) mid-layer and resumes from the bytes it had on disk
    while v1 keeps answering, the switch gap is under 2.5 s, --wait succeeds."""
    registry, procs, run = setup["registry"], setup["procs"], setup["run"]
    v1_name, v2_name = f"u{run}/app:v1", f"u{run}/app:v2"
    push_image(docker_engine, registry.host, v1_name, 50_000)
    push_image(docker_engine, registry.host, v2_name, 5 * MB)
    size = layer_size(registry.host, v2_name)
    with LinkProxy(("127.0.0.1", registry.port), rate=300_000) as link:
        device = f"upd-{run}"
        controller = ControllerProcess(tmp_path / "controller")
        procs.append(controller)
        agent = AgentProcess(controller.url, device, tmp_path / device, driver="docker", labels={"site": run})
        procs.append(agent)
        wait_online(controller.url, device)
        assert (
            cli(
                controller.url, "groups", "create", "lab", "--select", f"site={run}", "--trust-device-labels"
            ).returncode
            == 0
        )
        port = free_port()
        stack = tmp_path / "web.yml"
        image = f"127.0.0.1:{link.port}/"
        stack.write_text(STACK.format(image=image + v1_name, version="v1", port=port))
        first = _deploy(controller.url, stack)
        assert first.returncode == 0, first.stdout + first.stderr
        poller = Poller(port)
        try:
            wait_until(lambda: poller.last() == "v1", 30, message="v1 answers")
            stack.write_text(STACK.format(image=image + v2_name, version="v2", port=port))
            result: dict[str, Any] = {}
            waiter = threading.Thread(target=lambda: result.update(r=_deploy(controller.url, stack)))
            waiter.start()
            download = wait_until(
                lambda: (
                    (d := _download(controller.url, device))
                    and d["state"] == "downloading"
                    and d["done"] > 0
                    and d
                ),
                60,
                interval=0.5,
                message="the report shows the download",
            )
            assert download["total"] == size

            # A crash during the download is restarted (the old version: the new one is not here).
            (container,) = docker_engine.containers.list(filters={"label": f"io.tether.device={device}"})
            started = container.attrs["State"]["StartedAt"]
            container.kill()
            # Exited, or already started again by the agent (a fast restart can come before a look).
            wait_until(
                lambda: (
                    container.reload()
                    or container.status == "exited"
                    or container.attrs["State"]["StartedAt"] != started
                ),
                10,
                message="the killed container exited",
            )
            wait_until(lambda: poller.last() == "v1", 30, message="v1 restarted during the download")
            assert link.down_bytes < size, "restarted while the download still ran"

            # The agent dies mid-layer and comes back: the layer resumes, the service never noticed.
            wait_until(
                lambda: (d := _download(controller.url, device)) and d["done"] > size * 0.3,
                60,
                interval=0.5,
                message="the report shows 30% of the layer",
            )
            agent.kill()
            killed_at, wire_at_kill = time.monotonic(), link.down_bytes
            partial = sum(f.stat().st_size for f in (tmp_path / device / "images" / "partial").iterdir())
            assert size * 0.3 < partial < size, "a partial layer on disk when the agent died"
            agent = AgentProcess(
                controller.url, device, tmp_path / device, driver="docker", labels={"site": run}
            )
            procs.append(agent)

            wait_until(lambda: poller.last() == "v2", 120, message="v2 answers")
            waiter.join(200)
        finally:
            poller.close()
        assert result["r"].returncode == 0, result["r"].stdout + result["r"].stderr
        served = [b for _, b in poller.samples]
        switch = served.index("v2")
        assert "v1" in served[:switch] and set(served[switch:]) <= {"v2"}
        gap = poller.gap_before("v2")
        assert gap <= 2.5, f"the switch took the service down for {gap:.2f} s"
        assert link.down_bytes <= size * 1.05 + 100_000, "the layer crossed the link about once"
        resumed = link.down_bytes - wire_at_kill
        assert resumed <= size - partial + 100_000, (
            f"after the restart {resumed} bytes, {partial} were on disk"
        )
        gap_start = switch
        while gap_start > 0 and served[gap_start - 1] is None:
            gap_start -= 1
        during = [b for t, b in poller.samples[:gap_start] if t > killed_at]
        assert during and set(during) == {"v1"}, "v1 answered from the agent's death to the switch"
        assert _download(controller.url, device) is None


def test_a_held_device_stages_the_new_version_and_switches_when_released(
    setup: dict[str, Any], docker_engine: Any, tmp_path: Path
) -> None:
    """tether-agent --hold: the new image is downloaded and reported staged, v1 keeps serving;
    --release switches to v2."""
    registry, procs, run = setup["registry"], setup["procs"], setup["run"]
    v1_name, v2_name = f"u{run}/app:v1", f"u{run}/app:v2"
    push_image(docker_engine, registry.host, v1_name, 50_000)
    push_image(docker_engine, registry.host, v2_name, 500_000)
    device = f"upd-{run}"
    controller = ControllerProcess(tmp_path / "controller")
    procs.append(controller)
    agent = AgentProcess(controller.url, device, tmp_path / device, driver="docker", labels={"site": run})
    procs.append(agent)
    wait_online(controller.url, device)
    assert (
        cli(
            controller.url, "groups", "create", "lab", "--select", f"site={run}", "--trust-device-labels"
        ).returncode
        == 0
    )
    port = free_port()
    stack = tmp_path / "web.yml"
    stack.write_text(STACK.format(image=f"{registry.host}/{v1_name}", version="v1", port=port))
    assert _deploy(controller.url, stack).returncode == 0
    poller = Poller(port)
    try:
        wait_until(lambda: poller.last() == "v1", 30)
        agent.run_cli(["--hold"])
        stack.write_text(STACK.format(image=f"{registry.host}/{v2_name}", version="v2", port=port))
        assert _deploy(controller.url, stack, wait=False).returncode == 0
        wait_until(
            lambda: (d := _download(controller.url, device)) and d["state"] == "staged",
            60,
            interval=0.5,
            message="staged while held",
        )
        assert docker_engine.images.get(f"{registry.host}/{v2_name}")
        assert poller.last() == "v1"
        agent.run_cli(["--release"])
        wait_until(lambda: poller.last() == "v2", 60, message="v2 after the release")
    finally:
        poller.close()


def test_private_registry_unauthorized_at_once_then_pulled_with_tether_registries(
    docker_engine: Any, busybox_image: str, tmp_path: Path
) -> None:
    """An htpasswd registry: without credentials the download fails at once (unauthorized, in
    the status); after `tether registries add`, the device opens them and the stack runs."""
    reason = registry_available()
    if reason:
        skip_or_fail(reason)
    run = uuid.uuid4().hex[:6]
    device = f"upd-{run}"
    procs: list[Any] = []
    try:
        with Registry(tmp_path / "registry", htpasswd={"edge": "s3cret"}) as registry:
            name = f"u{run}/private:v1"
            push_image(docker_engine, registry.host, name, 100_000, auth=("edge", "s3cret"))
            controller = ControllerProcess(tmp_path / "controller")
            procs.append(controller)
            procs.append(AgentProcess(controller.url, device, tmp_path / device, driver="docker"))
            wait_online(controller.url, device)
            cli_json(controller.url, "groups", "create", "lab", "--device", device)
            port = free_port()
            stack = tmp_path / "web.yml"
            stack.write_text(STACK.format(image=f"{registry.host}/{name}", version="v1", port=port))
            assert _deploy(controller.url, stack, wait=False).returncode == 0
            failed = wait_until(
                lambda: (d := _download(controller.url, device)) and d["state"] == "failed" and d,
                60,
                interval=0.5,
                message="the download fails as unauthorized",
            )
            assert "unauthorized" in failed["reason"] and "tether registries add" in failed["reason"]
            added = cli(
                controller.url,
                "registries",
                "add",
                registry.host,
                "--username",
                "edge",
                "--password-stdin",
                stdin="s3cret",
            )
            assert added.returncode == 0, added.stderr
            poller = Poller(port)
            try:
                wait_until(lambda: poller.last() == "v1", 90, message="the private image runs")
            finally:
                poller.close()
            assert _download(controller.url, device) is None
    finally:
        for proc in reversed(procs):
            proc.stop()
        remove_tether_containers(docker_engine, device)
        _remove_images(docker_engine, f"/u{run}/")
