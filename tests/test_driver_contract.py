"""One contract every runtime driver must honour: fake (memory), process (host) and docker (engine)."""

from __future__ import annotations

import contextlib
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.infra import wait_until
from tether.agent.drivers.base import (
    LABEL_DEVICE,
    LABEL_MANAGED,
    LABEL_SERVICE,
    LABEL_SPEC_HASH,
    LABEL_STACK,
    Driver,
    InstanceState,
    Observed,
)
from tether.agent.drivers.fake import LABEL_EXIT_CODE, LABEL_LOGS, LABEL_START_ERROR, FakeDriver
from tether.agent.drivers.process import ProcessDriver
from tether.protocol.errors import DriverError
from tether.protocol.models import PortSpec, ServiceSpec, StackSpec

STACK = "contract"
# Exits with 3 the first time; once started again (same instance, same filesystem) it keeps running.
EXIT_ONCE = "[ -e once ] || { touch once; exit 3; }; exec sleep 300"
TIMEOUT = 30.0


@dataclass
class Harness:
    """One driver kind, the services that script it, and cleanup of whatever a test left running."""

    kind: str
    make: Callable[[str], Driver]
    device_id: str
    image: str | None = None
    client: Any = None
    drivers: list[tuple[str, Driver]] = field(default_factory=list)

    def driver(self, device_id: str | None = None) -> Driver:
        device = device_id or self.device_id
        drv = self.make(device)
        self.drivers.append((device, drv))
        return drv

    def long_running(self, name: str = "app") -> ServiceSpec:
        if self.kind == "docker":
            return ServiceSpec(name=name, image=self.image, command=("sleep", "300"))
        return ServiceSpec(name=name, image="fake:1", command=("sh", "-c", "sleep 300"))

    def script(self, name: str, script: str, exit_code: int, output: str = "") -> ServiceSpec:
        """A service running ``script``; for the fake driver, one created exited with ``exit_code``."""
        labels = {LABEL_EXIT_CODE: str(exit_code), LABEL_LOGS: output} if self.kind == "fake" else {}
        return ServiceSpec(
            name=name, image=self.image or "fake:1", command=("sh", "-c", script), labels=labels
        )

    def broken(self) -> tuple[ServiceSpec, str]:
        """A service whose creation must fail, and a fragment of the expected error message."""
        if self.kind == "fake":
            return ServiceSpec(
                name="bad", image="fake:1", labels={LABEL_START_ERROR: "boom: scripted"}
            ), "boom"
        if self.kind == "process":
            return ServiceSpec(name="bad", command=("/nonexistent/tether-nope", "x")), "tether-nope"
        return ServiceSpec(
            name="bad", image="tether-test/nope:1", command=("sleep", "1")
        ), "tether-test/nope:1"

    def cleanup(self) -> None:
        for _device, drv in reversed(self.drivers):
            with contextlib.suppress(DriverError):
                for inst in drv.observe():
                    drv.remove(inst, 0)
                drv.prune(set())
            drv.close()
        if self.client is not None:  # safety net: only this test's devices, never other tests'
            for device in {d for d, _ in self.drivers}:
                selector = {"label": [f"{LABEL_DEVICE}={device}"]}
                for container in self.client.containers.list(all=True, filters=selector):
                    with contextlib.suppress(Exception):
                        container.remove(force=True)
                for network in self.client.networks.list(filters=selector):
                    with contextlib.suppress(Exception):
                        network.remove()


def make_harness(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    device_id = f"contract-{uuid.uuid4().hex[:8]}"
    if kind == "fake":
        host: dict[str, Any] = {}
        return Harness("fake", lambda d: FakeDriver(d, host), device_id)
    if kind == "process":
        return Harness("process", lambda d: ProcessDriver(d, tmp_path / "agent"), device_id)
    client = request.getfixturevalue("docker_engine")
    image = request.getfixturevalue("busybox_image")
    from tether.agent.drivers.docker import DockerDriver

    return Harness("docker", lambda d: DockerDriver(d), device_id, image=image, client=client)


@pytest.fixture(params=["fake", "process", pytest.param("docker", marks=pytest.mark.docker)])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    h = make_harness(request.param, request, tmp_path)
    try:
        yield h
    finally:
        h.cleanup()


@pytest.fixture
def docker_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    h = make_harness("docker", request, tmp_path)
    try:
        yield h
    finally:
        h.cleanup()


def stack_of(*services: ServiceSpec) -> StackSpec:
    return StackSpec(services=services)


def wait_for(driver: Driver, state: InstanceState, service: str) -> Observed:
    """Poll observe() until ``service`` has an instance in ``state``; return it."""

    def found() -> Observed | None:
        return next((i for i in driver.observe() if i.service == service and i.state == state), None)

    try:
        return wait_until(found, timeout=TIMEOUT, message=f"{service} to be {state}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; observed {driver.observe()}") from None


def test_create_shows_one_running_instance(harness: Harness) -> None:
    """create() starts an instance that observe() reports running, with its stack, service and hash."""
    driver = harness.driver()
    svc = harness.long_running()
    driver.create(STACK, stack_of(svc), svc)
    inst = wait_for(driver, "running", "app")
    assert (inst.stack, inst.service, inst.spec_hash) == (STACK, "app", svc.spec_hash())
    assert inst.exit_code is None
    assert driver.observe() == [inst]


def test_exited_instance_reports_its_exit_code(harness: Harness) -> None:
    """An instance whose process exits is observed as exited, with its exit code."""
    driver = harness.driver()
    svc = harness.script("job", "exit 3", 3)
    driver.create(STACK, stack_of(svc), svc)
    inst = wait_for(driver, "exited", "job")
    assert inst.exit_code == 3
    assert inst.spec_hash == svc.spec_hash()
    assert len(driver.observe()) == 1


def test_start_restarts_the_same_exited_instance(harness: Harness) -> None:
    """start() runs an exited instance again: it is then running under the same id."""
    driver = harness.driver()
    svc = harness.script("job", EXIT_ONCE, 3)
    driver.create(STACK, stack_of(svc), svc)
    exited = wait_for(driver, "exited", "job")
    assert exited.exit_code == 3
    driver.start(exited, svc)
    running = wait_for(driver, "running", "job")
    assert running.id == exited.id
    assert running.exit_code is None
    assert len(driver.observe()) == 1


def test_remove_makes_the_instance_disappear(harness: Harness) -> None:
    """remove() stops and deletes an instance (running or exited); removing it again is a no-op."""
    driver = harness.driver()
    app, job = harness.long_running(), harness.script("job", "exit 3", 3)
    driver.create(STACK, stack_of(app, job), app)
    driver.create(STACK, stack_of(app, job), job)
    running, exited = wait_for(driver, "running", "app"), wait_for(driver, "exited", "job")
    driver.remove(running, 0)
    assert [i.service for i in driver.observe()] == ["job"]
    driver.remove(exited, 0)
    assert driver.observe() == []
    driver.remove(running, 0)
    assert driver.observe() == []


def test_another_device_never_sees_these_instances(harness: Harness) -> None:
    """A driver for device B on the same host observes none of device A's instances."""
    mine = harness.driver()
    theirs = harness.driver(f"{harness.device_id}-b")
    svc = harness.long_running()
    mine.create(STACK, stack_of(svc), svc)
    wait_for(mine, "running", "app")
    assert theirs.observe() == []
    assert len(mine.observe()) == 1


def test_failed_create_raises_driver_error_and_leaves_nothing(harness: Harness) -> None:
    """A create that cannot succeed raises DriverError naming the cause, and no instance remains."""
    driver = harness.driver()
    svc, fragment = harness.broken()
    with pytest.raises(DriverError, match=fragment.replace(".", r"\.")):
        driver.create(STACK, stack_of(svc), svc)
    assert driver.observe() == []


def test_logs_return_the_tail_of_an_instances_output(harness: Harness) -> None:
    """logs() gives the last lines an instance wrote; an unknown instance has no output."""
    driver = harness.driver()
    svc = harness.script("job", "echo first-line; echo last-line; exit 3", 3, "first-line\nlast-line")
    driver.create(STACK, stack_of(svc), svc)
    inst = wait_for(driver, "exited", "job")
    text = wait_until(lambda: driver.logs(inst, 10), timeout=TIMEOUT, message="job output")
    assert text.split() == ["first-line", "last-line"]
    assert driver.logs(inst, 1).split() == ["last-line"]
    ghost = Observed("no-such-instance", STACK, "ghost", inst.spec_hash, "exited", 0)
    assert driver.logs(ghost, 10) == ""


def test_a_new_instance_has_only_its_own_output(harness: Harness) -> None:
    """The instance that replaces another (a new version) does not show its predecessor's output: the
    last log lines of a failing new version are its own."""
    driver = harness.driver()
    old = harness.script("job", "echo from-the-old-one; exit 0", 0, "from-the-old-one")
    driver.create(STACK, stack_of(old), old)
    inst = wait_for(driver, "exited", "job")
    wait_until(lambda: driver.logs(inst, 10), timeout=TIMEOUT, message="the old one's output")
    driver.remove(inst, 1.0)
    new = harness.script("job", "echo from-the-new-one; exit 3", 3, "from-the-new-one")
    driver.create(STACK, stack_of(new), new)
    inst = wait_for(driver, "exited", "job")
    text = wait_until(lambda: driver.logs(inst, 10), timeout=TIMEOUT, message="the new one's output")
    assert text.split() == ["from-the-new-one"]


def _talker(harness: Harness) -> ServiceSpec:
    """Prints one and two, then (after a second) a tick every 0.2 s; the fake driver gets ticks by emit()."""
    if harness.kind == "fake":
        return ServiceSpec(name="talk", image="fake:1", labels={LABEL_LOGS: "one\ntwo\n"})
    script = "echo one; echo two; sleep 1; while true; do echo tick; sleep 0.2; done"
    return ServiceSpec(name="talk", image=harness.image or "fake:1", command=("sh", "-c", script))


def test_log_stream_gives_the_output_then_follows_until_stopped(harness: Harness) -> None:
    """log_stream(): the output so far, then (following) what is written next, ending soon after stop."""
    driver = harness.driver()
    svc = _talker(harness)
    driver.create(STACK, stack_of(svc), svc)
    inst = wait_for(driver, "running", "talk")
    wait_until(lambda: "two" in driver.logs(inst, 10), timeout=TIMEOUT, message="talk output")
    stop = threading.Event()
    assert "".join(driver.log_stream(inst, None, None, False, stop)).startswith("one\ntwo\n")
    assert "".join(driver.log_stream(inst, 0, None, False, stop)) == ""
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(driver.log_stream(inst, 0, None, True, stop)))
    reader.start()
    try:
        if harness.kind == "fake":
            assert isinstance(driver, FakeDriver)
            driver.emit(inst.id, "tick\n")
        wait_until(lambda: "tick" in "".join(seen), timeout=TIMEOUT, message="a line written while following")
    finally:
        stop.set()
        reader.join(timeout=5)
    assert not reader.is_alive(), "log_stream did not end after stop was set"
    fresh = threading.Event()
    if harness.kind == "process":
        with pytest.raises(DriverError, match="does not timestamp"):
            list(driver.log_stream(inst, 10, 1.0, False, fresh))
    else:
        assert "one" in "".join(driver.log_stream(inst, None, 1.0, False, fresh))


def test_usage_reports_each_running_instance(harness: Harness) -> None:
    """usage(): CPU seconds and memory in use per running instance, keyed stack/service."""
    driver = harness.driver()
    svc = harness.long_running()
    driver.create(STACK, stack_of(svc), svc)
    wait_for(driver, "running", "app")
    usage = wait_until(lambda: driver.usage().get(f"{STACK}/app"), timeout=TIMEOUT, message="usage")
    cpu, mem = usage
    assert cpu is not None and cpu >= 0.0 and mem is not None
    assert mem > 0 or harness.kind == "fake"


# --- docker only -------------------------------------------------------------------------------


@pytest.mark.docker
def test_docker_published_port_answers_http(docker_harness: Harness) -> None:
    """A port published on 127.0.0.1 without a host port gets one from Docker that serves HTTP."""
    driver = docker_harness.driver()
    svc = ServiceSpec(
        name="web",
        image=docker_harness.image,
        command=("sh", "-c", "echo hello > /www/index.html && exec httpd -f -p 80 -h /www"),
        ports=(PortSpec(container=80, host_ip="127.0.0.1"),),
    )
    driver.create(STACK, stack_of(svc), svc)
    inst = wait_for(driver, "running", "web")
    container = docker_harness.client.containers.get(inst.id)

    def binding() -> dict[str, str] | None:
        container.reload()
        bindings = container.ports.get("80/tcp") or []
        return bindings[0] if bindings else None

    bound = wait_until(binding, timeout=TIMEOUT, message="Docker to publish 80/tcp")
    assert bound is not None and bound["HostIp"] == "127.0.0.1"

    def fetch() -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{bound['HostPort']}/index.html", timeout=2) as r:
                return bytes(r.read())
        except OSError:
            return None

    assert wait_until(fetch, timeout=TIMEOUT, message="httpd to answer") == b"hello\n"


@pytest.mark.docker
def test_docker_container_carries_tether_labels(docker_harness: Harness) -> None:
    """Containers carry the managed, device, stack, service and spec-hash labels plus the service's own."""
    driver = docker_harness.driver()
    svc = docker_harness.long_running().model_copy(update={"labels": {"team": "edge"}})
    driver.create(STACK, stack_of(svc), svc)
    inst = wait_for(driver, "running", "app")
    labels = docker_harness.client.containers.get(inst.id).labels
    assert labels[LABEL_MANAGED] == "true"
    assert labels[LABEL_DEVICE] == docker_harness.device_id
    assert labels[LABEL_STACK] == STACK
    assert labels[LABEL_SERVICE] == "app"
    assert labels[LABEL_SPEC_HASH] == svc.spec_hash()
    assert labels["team"] == "edge"


def test_docker_prepare_makes_what_create_needs_while_the_old_instance_runs(docker_harness: Harness) -> None:
    """prepare: the stack's network exists before anything is created; the create after it
    runs the service; a missing image fails prepare (so the old instance is never removed)."""
    from tether.agent.drivers.docker import DockerDriver

    driver = docker_harness.driver()
    svc = docker_harness.long_running()
    assert isinstance(driver, DockerDriver)
    network = f"tether-{docker_harness.device_id}-{STACK}"
    assert not docker_harness.client.networks.list(names=[network])
    driver.prepare(STACK, stack_of(svc), svc)
    assert [n.name for n in docker_harness.client.networks.list(names=[network])] == [network]
    assert driver.observe() == []
    driver.create(STACK, stack_of(svc), svc)
    wait_for(driver, "running", "app")
    missing = svc.model_copy(update={"image": "tether-test/nope:1"})
    with pytest.raises(DriverError, match="tether-test/nope:1"):
        driver.prepare(STACK, stack_of(missing), missing)


def test_docker_replace_starts_the_successor_made_ahead_and_cleans_up(docker_harness: Harness) -> None:
    """replace: the successor prepare created (invisible to observe until started) runs under the
    instance's name and the old container is gone; a successor that cannot start puts the old
    one back; one made ahead and never used is removed by prune."""
    from tether.agent.drivers.docker import NEXT_MARK, DockerDriver

    driver = docker_harness.driver()
    assert isinstance(driver, DockerDriver)
    client, name = docker_harness.client, f"tether-{docker_harness.device_id}-{STACK}-app"
    v1 = docker_harness.long_running()
    driver.create(STACK, stack_of(v1), v1)
    old = wait_for(driver, "running", "app")

    def containers() -> dict[str, str]:
        found = client.containers.list(
            all=True, filters={"label": f"{LABEL_DEVICE}={docker_harness.device_id}"}
        )
        return {c.name: c.status for c in found}

    v2 = v1.model_copy(update={"command": ("sleep", "301")})
    driver.prepare(STACK, stack_of(v2), v2)
    made = [n for n in containers() if NEXT_MARK in n]
    assert len(made) == 1 and containers()[made[0]] == "created"
    assert [i.spec_hash for i in driver.observe()] == [v1.spec_hash()], "made ahead: not an instance"
    driver.replace(old, 1.0, STACK, stack_of(v2), v2)
    new = wait_for(driver, "running", "app")
    assert new.spec_hash == v2.spec_hash() and new.id != old.id
    assert containers() == {name: "running"}

    broken = v2.model_copy(update={"command": ("/no/such/binary",)})
    driver.prepare(STACK, stack_of(broken), broken)
    with pytest.raises(DriverError, match="start"):
        driver.replace(new, 1.0, STACK, stack_of(broken), broken)
    back = wait_for(driver, "running", "app")
    assert back.id == new.id and containers() == {name: "running"}, "the old version runs again"

    driver.prepare(STACK, stack_of(v1), v1)
    assert len(containers()) == 2
    driver.prune({STACK})
    assert containers() == {name: "running"}, "the unused successor is gone"
