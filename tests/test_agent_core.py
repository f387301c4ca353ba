"""The agent core's reconcile when nothing changed: it skips planning and reporting, but a
crashed instance is still seen (the driver is asked every time) and restarted."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.infra import wait_until
from support.links import RecordingLink
from tether.agent import core as core_module
from tether.agent.core import AgentCore
from tether.agent.drivers.base import Driver
from tether.agent.drivers.fake import FakeDriver
from tether.agent.drivers.process import ProcessDriver
from tether.agent.store import MemoryStore
from tether.protocol import codec, topics
from tether.protocol.models import (
    DesiredState,
    ServiceSpec,
    StackDefinition,
    StackRef,
    StackSpec,
)
from tether.protocol.topics import DeviceTopic

DEVICE = "core-1"


class CountingPlan:
    """Wraps ``reconcile.plan`` as the core calls it, counting the calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = core_module.reconcile.plan

        def plan(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(core_module.reconcile, "plan", plan)


def deploy(
    driver: Driver, link: RecordingLink, services: tuple[ServiceSpec, ...], clock: Callable[[], float]
) -> AgentCore:
    core = AgentCore(DEVICE, {}, driver, MemoryStore(), link, clock=clock)
    spec = StackSpec(services=services)
    desired = DesiredState(
        device_id=DEVICE, generation=1, stacks=(StackRef(name="app", spec_hash=spec.spec_hash()),)
    )
    core.handle(topics.device(DEVICE, DeviceTopic.DESIRED), codec.encode(desired))
    definition = StackDefinition(spec_hash=spec.spec_hash(), spec=spec)
    core.handle(topics.stack(spec.spec_hash()), codec.encode(definition))
    assert core.desired is not None and core.desired.generation == 1
    return core


def test_an_unchanged_device_skips_planning_and_a_crash_is_still_restarted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    driver = FakeDriver(DEVICE)
    link = RecordingLink()
    services = (
        ServiceSpec(name="db", image="fake:1", restart="always"),
        ServiceSpec(name="web", image="fake:1", restart="always", depends_on=("db",)),
    )
    core = deploy(driver, link, services, lambda: now[0])
    plans = CountingPlan(monkeypatch)
    core.reconcile_once()  # creates both
    core.reconcile_once()  # sees them running: nothing to do
    assert plans.calls == 2 and not core.converging
    reports = len(link.reports())
    assert link.reports()[-1].stacks["app"].state == "running"

    for _ in range(3):
        now[0] += 10
        core.reconcile_once()
    assert plans.calls == 2, "nothing changed: no plan"
    assert len(link.reports()) == reports, "nothing changed: no report"

    driver.crash("app", "web", exit_code=137)
    now[0] += 10
    core.reconcile_once()
    assert plans.calls == 3
    web = next(i for i in driver.observe() if i.service == "web")
    assert web.state == "running", "the crashed instance is started again"
    assert core.restarts[("app", "web")].total == 1
    assert link.reports()[-1].stacks["app"].services["web"].restarts == 1


def test_quiet_reconciles_resume_planning_while_a_restart_waits_for_its_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A service with restarts to its name is not quiet: its count is forgotten after a steady
    run, which only the clock changes; the same for a restart held back by its backoff."""
    now = [1000.0]
    driver = FakeDriver(DEVICE)
    core = deploy(
        driver, RecordingLink(), (ServiceSpec(name="web", image="fake:1", restart="always"),), lambda: now[0]
    )
    core.reconcile_once()
    driver.crash("app", "web", exit_code=1)
    core.reconcile_once()  # restarted at once (first restart, no backoff)
    driver.crash("app", "web", exit_code=1)
    plans = CountingPlan(monkeypatch)
    core.reconcile_once()  # second restart: waits 1 s
    assert ("app", "web") in core.waiting
    now[0] += 2
    core.reconcile_once()
    assert plans.calls == 2
    assert next(i for i in driver.observe()).state == "running"
    now[0] += 61  # a steady run: the restart count is forgotten
    core.reconcile_once()
    assert core.restarts[("app", "web")].count == 0
    now[0] += 10
    core.reconcile_once()
    assert plans.calls == 3, "quiet again once the count is forgotten"


def test_a_report_that_could_not_be_sent_goes_out_on_a_quiet_reconcile() -> None:
    now = [1000.0]
    link = RecordingLink()
    core = deploy(FakeDriver(DEVICE), link, (ServiceSpec(name="web", image="fake:1"),), lambda: now[0])
    core.reconcile_once()
    core.reconcile_once()
    link.connected = False
    core.on_connected()  # the link is down again at once: the report stays unsent
    sent = len(link.reports())
    link.connected = True
    now[0] += 10
    core.reconcile_once()
    assert len(link.reports()) == sent + 1
    assert link.reports()[-1].at == now[0]


def test_a_killed_process_is_restarted_after_quiet_reconciles(tmp_path: Path) -> None:
    """The real process driver: after reconciles that found nothing to do, a process killed
    behind the agent's back is seen exited and started again."""
    driver = ProcessDriver(DEVICE, tmp_path)
    link = RecordingLink()
    services = (ServiceSpec(name="sleeper", command=("sleep", "1000"), restart="always"),)
    core = deploy(driver, link, services, time.time)
    record = tmp_path / "processes" / "app.sleeper.json"
    try:
        core.reconcile_once()
        core.reconcile_once()
        assert not core.converging
        pid = json.loads(record.read_text())["pid"]
        core.reconcile_once()  # quiet
        os.killpg(pid, signal.SIGKILL)

        def restarted() -> int | None:
            core.reconcile_once()
            new = json.loads(record.read_text())["pid"]
            running = any(i.state == "running" for i in driver.observe())
            return new if new != pid and running else None

        new_pid = wait_until(restarted, 15, interval=0.05)
        assert core.restarts[("app", "sleeper")].total == 1
        assert link.reports()[-1].stacks["app"].services["sleeper"].restarts == 1
        os.kill(new_pid, 0)  # it runs
    finally:
        for instance in driver.observe():
            driver.remove(instance, 1)
        driver.close()
