"""The agent core's reconcile when nothing changed: it skips planning and reporting, but a
crashed instance is still seen (the driver is asked every time) and restarted."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from support.infra import wait_until
from support.links import RecordingLink
from tether.agent import core as core_module
from tether.agent.core import AgentCore
from tether.agent.drivers.base import Driver
from tether.agent.drivers.fake import LABEL_EXIT_CODE, FakeDriver
from tether.agent.drivers.process import ProcessDriver
from tether.agent.store import MemoryStore
from tether.protocol import codec, topics
from tether.protocol.models import (
    ConfigMount,
    DesiredState,
    Event,
    Presence,
    ServiceSpec,
    StackDefinition,
    StackFile,
    StackRef,
    StackSpec,
    VolumeSpec,
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


def test_a_reconcile_whose_actions_settle_makes_the_next_one_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the reconcile that creates the services, the next one on the same desired state and
    runtime plans nothing and reports nothing again; a changed desired state is planned and
    applied at once, and a crash after it is still seen and restarted."""
    now = [1000.0]
    driver = FakeDriver(DEVICE)
    link = RecordingLink()
    core = deploy(driver, link, (ServiceSpec(name="web", image="fake:1", restart="always"),), lambda: now[0])
    plans = CountingPlan(monkeypatch)
    core.reconcile_once()  # creates web, then plans again what that left: nothing
    assert plans.calls == 2 and core.idle
    assert link.report().stacks["app"].state == "running"
    reports, events = len(link.reports()), len(link.events())
    now[0] += 1
    core.reconcile_once()
    assert plans.calls == 2, "the same desired state and runtime: not planned again"
    assert (len(link.reports()), len(link.events())) == (reports, events)
    assert not core.converging and core.next_wakeup(now[0]) == now[0] + 1.0  # watched a minute after a start

    _legit(core, 2, "fake:2")  # a new version of the stack: accepted, the same stack name
    assert core.desired is not None and core.desired.generation == 2 and not core.idle
    now[0] += 1
    core.reconcile_once()
    assert plans.calls == 4, "a changed desired state is planned (then what it left, again)"
    (web,) = driver.observe()
    assert web.spec_hash == core.desired_stacks()[0]["app"].services[0].spec_hash()
    assert link.report().generation == 2 and link.report().stacks["app"].state == "running"

    driver.crash("app", "web", exit_code=1)  # version 2 has no restart policy
    now[0] += 1
    core.reconcile_once()
    assert plans.calls == 5, "the runtime changed: planned"
    assert link.report().stacks["app"].services["web"].state == "exited", "the crash is seen and told"


def test_a_reconcile_whose_create_failed_is_not_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """A create that failed waits for its backoff: the reconciles after it keep planning, and
    the create is tried again once the backoff has passed."""
    now = [1000.0]
    driver = FakeDriver(DEVICE)
    broken = ServiceSpec(name="web", image="fake:1", labels={"tether.fake/start_error": "no such image"})
    core = deploy(driver, RecordingLink(), (broken,), lambda: now[0])
    plans = CountingPlan(monkeypatch)
    core.reconcile_once()
    assert plans.calls == 1 and not core.idle
    assert core.errors[("app", "web")] == "no such image"
    now[0] += 5
    core.reconcile_once()
    assert plans.calls == 2, "planned again: the failed create is retried after its backoff"
    assert core.restarts[("app", "web")].count == 2


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


class FlakyConfigStore(MemoryStore):
    """Refuses to write config files while ``failing`` (a full disk, for the configs alone)."""

    failing = True

    def write_config(self, stack: str, name: str, content: bytes, mode: int) -> bool:
        if self.failing:
            raise OSError(28, "No space left on device", f"/data/configs/{stack}/{name}")
        return super().write_config(stack, name, content, mode)


def test_a_stack_whose_config_could_not_be_written_starts_once_it_can_be() -> None:
    """A config file that could not be written is rendered again at every reconcile; the
    reconcile after it is written plans the stack (it is not quiet: what it renders changed)
    and the report no longer says it failed."""
    now = [1000.0]
    driver = FakeDriver(DEVICE)
    link = RecordingLink()
    store = FlakyConfigStore()
    core = AgentCore(DEVICE, {}, driver, store, link, clock=lambda: now[0])
    mount = ConfigMount(source="app.conf", target="/etc/app.conf")
    spec = StackSpec(
        services=(ServiceSpec(name="web", image="fake:1", configs=(mount,)),), configs={"app.conf": "x=1\n"}
    )
    _deploy(core, 1, spec)
    core.reconcile_once()
    assert link.report().stacks["app"].state == "failed" and driver.observe() == []
    now[0] += 1
    core.reconcile_once()  # the same failure: nothing new
    store.failing = False
    now[0] += 1
    core.reconcile_once()
    assert [i.service for i in driver.observe()] == ["web"], "written at last: the stack starts"
    assert link.report().stacks["app"].state == "running"


class FlakyStackDirStore(MemoryStore):
    """Cannot make a stack's directory ready while ``failing`` (a full disk)."""

    failing = True

    def stack_paths(self, stack: str, sources: set[str], files: tuple[StackFile, ...]) -> dict[str, str]:
        if self.failing:
            raise OSError(28, "No space left on device")
        return super().stack_paths(stack, sources, files)


def test_a_stack_whose_directory_could_not_be_made_ready_starts_once_it_can_be() -> None:
    """Like a config file: the stack's directory (relative bind mounts) that could not be made
    ready is tried again at every reconcile, and the stack starts once it is."""
    now = [1000.0]
    driver = FakeDriver(DEVICE)
    link = RecordingLink()
    store = FlakyStackDirStore()
    core = AgentCore(DEVICE, {}, driver, store, link, clock=lambda: now[0])
    volume = VolumeSpec(type="stack", source="data", target="/data")
    spec = StackSpec(services=(ServiceSpec(name="web", image="fake:1", volumes=(volume,)),))
    _deploy(core, 1, spec)
    core.reconcile_once()
    assert link.report().stacks["app"].state == "failed" and driver.observe() == []
    now[0] += 1
    core.reconcile_once()
    store.failing = False
    now[0] += 1
    core.reconcile_once()
    assert [i.service for i in driver.observe()] == ["web"], "made ready at last: the stack starts"
    assert link.report().stacks["app"].state == "running"


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


# --- forged desired states (issue 13) -----------------------------------------------------


class SubscribingLink(RecordingLink):
    """A recording link that also keeps its current subscriptions."""

    def __init__(self) -> None:
        super().__init__()
        self.filters: set[str] = set()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.filters.add(topic_filter)

    def unsubscribe(self, topic_filter: str) -> None:
        self.filters.discard(topic_filter)


def _desired(generation: int, spec: StackSpec | None = None, spec_hash: str | None = None) -> bytes:
    """A desired state payload (encoded without validation, so absurd values can be sent)."""
    h = spec_hash or (spec.spec_hash() if spec is not None else None)
    stacks = [{"name": "app", "spec_hash": h}] if h else []
    return msgpack.packb({"v": 1, "device_id": DEVICE, "generation": generation, "stacks": stacks})


def _deploy(core: AgentCore, generation: int, spec: StackSpec) -> None:
    """The desired state naming ``spec``, then its definition, as the device receives them."""
    core.handle(topics.device(DEVICE, DeviceTopic.DESIRED), _desired(generation, spec))
    core.handle(
        topics.stack(spec.spec_hash()), codec.encode(StackDefinition(spec_hash=spec.spec_hash(), spec=spec))
    )


def _legit(core: AgentCore, generation: int, image: str) -> StackSpec:
    """What the controller does: the definition (retained, before), then the desired state."""
    spec = StackSpec(services=(ServiceSpec(name="web", image=image),))
    _deploy(core, generation, spec)
    return spec


def _forged_core(now: list[float], link: RecordingLink | None = None) -> AgentCore:
    core = AgentCore(
        DEVICE, {}, FakeDriver(DEVICE), MemoryStore(), link or RecordingLink(), clock=lambda: now[0]
    )
    _legit(core, 1, "fake:1")
    assert core.desired is not None and core.desired.generation == 1
    return core


@pytest.mark.parametrize("generation", [2**64 - 1, 2**53, 1 + 2**32 + 1])
def test_absurd_generation_is_rejected_and_the_next_real_one_applies(generation: int) -> None:
    """A desired state with an absurd generation (2^64-1, past 2^53, or more than 2^32 beyond the
    applied one) is rejected and reported; the controller's next generation is applied."""
    now = [1000.0]
    link = RecordingLink()
    core = _forged_core(now, link)
    core.handle(topics.device(DEVICE, DeviceTopic.DESIRED), _desired(generation, spec_hash="f" * 64))
    assert core.pending is None and core.desired is not None and core.desired.generation == 1
    assert core.rejection is not None and "generation" in core.rejection
    core.reconcile_once()  # the reconcile the rejection asks for: its event goes out at its end
    assert link.events("desired.rejected")
    spec = _legit(core, 2, "fake:2")
    assert core.desired.generation == 2 and core.desired.stacks[0].spec_hash == spec.spec_hash()
    core.reconcile_once()
    assert link.report().generation == 2 and link.report().error is None


def test_a_forged_pending_state_does_not_hold_back_the_next_real_one() -> None:
    """A forged state with a high generation naming a definition nobody publishes waits as pending;
    the controller's next desired state (lower generation, published later) replaces it, is
    applied, and the forged definition is no longer subscribed to."""
    now = [1000.0]
    link = SubscribingLink()
    core = _forged_core(now, link)
    forged = "f" * 64
    core.handle(topics.device(DEVICE, DeviceTopic.DESIRED), _desired(1000, spec_hash=forged))
    assert core.pending is not None and core.pending.generation == 1000
    assert topics.stack(forged) in link.filters
    spec = _legit(core, 2, "fake:2")
    assert core.pending is None and core.desired is not None and core.desired.generation == 2
    assert core.desired.stacks[0].spec_hash == spec.spec_hash()
    assert topics.stack(forged) not in link.filters
    core.handle(topics.device(DEVICE, DeviceTopic.DESIRED), _desired(1000, spec_hash=forged))
    _legit(core, 3, "fake:3")  # and again: it never wedges
    assert core.desired.generation == 3


def test_a_pending_state_whose_definition_never_arrives_is_rejected() -> None:
    """A pending state still missing a definition after DEFINITION_TIMEOUT s of connection is
    rejected (reported, unsubscribed); time offline does not count; later states apply."""
    now = [1000.0]
    link = SubscribingLink()
    core = _forged_core(now, link)
    forged = "f" * 64
    core.handle(topics.device(DEVICE, DeviceTopic.DESIRED), _desired(7, spec_hash=forged))
    link.connected = False
    now[0] += core_module.DEFINITION_TIMEOUT * 2
    core.reconcile_once()
    assert core.pending is not None, "offline: the definition could not arrive"
    link.connected = True
    core.on_connected()
    now[0] += core_module.DEFINITION_TIMEOUT - 1
    core.reconcile_once()
    assert core.pending is not None
    now[0] += 2
    core.reconcile_once()
    assert core.pending is None and core.desired is not None and core.desired.generation == 1
    report = link.report()
    assert report.generation == 1 and report.error is not None and "did not arrive" in report.error
    assert topics.stack(forged) not in link.filters
    _legit(core, 2, "fake:2")
    assert core.desired.generation == 2


def test_a_deploys_events_go_out_together_at_the_end_of_its_reconcile() -> None:
    """The event the desired state raised (``desired.accepted``) waits for the reconcile it asks
    for; that reconcile's own (one ``service.created`` per service) go with it, oldest first,
    in one message on ``.../events``, before its report: one message per deploy, not one per event."""
    link = RecordingLink()
    services = tuple(ServiceSpec(name=f"s{i}", image="fake:1") for i in range(3))
    core = deploy(FakeDriver(DEVICE), link, services, lambda: 1000.0)
    assert not [t for t, _ in link.published if t.endswith("/events")]  # waits for the reconcile
    core.reconcile_once()
    sent = [(t.rpartition("/")[2], p) for t, p in link.published]
    assert [kind for kind, _ in sent] == ["events", "reported"]
    batch = codec.decode_many(sent[0][1], Event, 1000, "seq")
    assert [(e.seq, e.kind) for e in batch] == [
        (1, "desired.accepted"),
        (2, "service.created"),
        (3, "service.created"),
        (4, "service.created"),
    ]
    assert {e.oldest for e in batch} == {1}


def test_service_lifecycle_events_name_the_stack_version() -> None:
    """created, restarted (with the exit code), unhealthy, healthy and exited events carry the
    stack's version, the one a deployment is told by; a crash loop's later restarts say nothing more."""
    now = [1000.0]
    driver = FakeDriver(DEVICE)
    link = RecordingLink()
    services = (
        ServiceSpec(name="web", image="fake:1", restart="always"),
        ServiceSpec(name="once", image="fake:1", labels={LABEL_EXIT_CODE: "3"}),
    )
    core = deploy(driver, link, services, lambda: now[0])
    version = StackSpec(services=services).spec_hash()
    core.reconcile_once()
    created = link.events("service.created")
    assert sorted(e.service or "" for e in created) == ["once", "web"]
    assert all(e.spec_hash == version and e.stack == "app" for e in created)
    assert version[:12] in created[0].message

    driver.crash("app", "web", exit_code=137)
    core.reconcile_once()
    (restarted,) = link.events("service.restarted")
    assert restarted.spec_hash == version and "code 137" in restarted.message

    web = next(i for i in driver.observe() if i.service == "web")
    driver.add(dataclasses.replace(web, health="unhealthy", health_output="connection refused"))
    now[0] += 1
    core.reconcile_once()
    (unhealthy,) = link.events("service.unhealthy")
    assert "connection refused" in unhealthy.message and unhealthy.spec_hash == version
    driver.add(dataclasses.replace(web, health="healthy"))
    now[0] += 1
    core.reconcile_once()
    assert [e.service for e in link.events("service.healthy")] == ["web"]

    once = next(i for i in driver.observe() if i.service == "once")
    driver.add(dataclasses.replace(once, state="running", exit_code=None))
    core.reconcile_once()
    driver.add(dataclasses.replace(once, state="exited", exit_code=3))
    core.reconcile_once()
    (exited,) = link.events("service.exited")
    assert "code 3" in exited.message and exited.level == "error"

    for _ in range(8):  # a crash loop: restarts with backoff, then one crash_loop event
        driver.crash("app", "web", exit_code=1)
        now[0] += 400
        core.reconcile_once()
    assert len(link.events("service.crash_loop")) == 1
    assert len(link.events("service.restarted")) < 8


def test_an_offline_presence_of_the_live_session_is_corrected() -> None:
    """The agent answers an ``offline`` of its current session (the controller publishing a
    will a restarted broker lost) and of an older one with ``online``; not its own ``online``."""
    link = RecordingLink()
    core = AgentCore(DEVICE, {}, FakeDriver(), MemoryStore(), link, clock=lambda: 1000.0)
    core.make_will()
    topic = topics.device(DEVICE, DeviceTopic.PRESENCE)

    def onlines() -> list[Presence]:
        return [
            p
            for t, raw in link.published
            if t == topic and (p := codec.decode(raw, Presence)).status == "online"
        ]

    core.handle(topic, codec.encode(Presence(device_id=DEVICE, status="online", session=core.session)))
    assert onlines() == []
    core.handle(topic, codec.encode(Presence(device_id=DEVICE, status="offline", session=core.session)))
    assert [p.session for p in onlines()] == [core.session]
    will = codec.encode(Presence(device_id=DEVICE, status="offline", session=core.session - 1))
    core.handle(topic, will)
    assert len(onlines()) == 2
    core.handle(topic, will)  # the same will again (queued, then retained at the SUBSCRIBE)
    assert len(onlines()) == 2, "answered once"
    link.connected = False
    core.handle(topic, codec.encode(Presence(device_id=DEVICE, status="offline", session=core.session)))
    assert len(onlines()) == 2, "not connected: nothing to restore"
    link.connected = True
    core.make_will()  # a new connection: the same will is news again
    core.handle(topic, will)
    assert [p.session for p in onlines()][2:] == [core.session]


def test_the_agents_own_online_coming_back_is_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Subscribed to its own presence, the agent gets every ``online`` it publishes back: that
    one (of this session) is known by its bytes, not decoded; after a new CONNECT (a new
    session) the same bytes are an older session's word, decoded and answered."""
    link = RecordingLink()
    core = AgentCore(DEVICE, {}, FakeDriver(), MemoryStore(), link, clock=lambda: 1000.0)
    core.make_will()
    core.publish_online()
    topic, own = link.published[-1][0], link.published[-1][1]
    assert topic == topics.device(DEVICE, DeviceTopic.PRESENCE)
    decoded: list[object] = []
    real = codec.decode
    monkeypatch.setattr(codec, "decode", lambda *a, **k: decoded.append(a[1]) or real(*a, **k))
    published = len(link.published)
    core.handle(topic, own)
    assert decoded == [] and len(link.published) == published
    core.make_will()
    core.handle(topic, own)
    assert decoded == [Presence]
    online = codec.decode(link.published[-1][1], Presence)
    assert (
        len(link.published) == published + 1 and online.status == "online" and online.session == core.session
    )


def test_only_the_devices_own_topics_and_awaited_definitions_are_acted_on() -> None:
    """A desired state on another device's topic (or a topic with a level more), and a stack
    definition not awaited, are ignored; the device's own desired state and the definition it
    awaits are taken."""
    core = AgentCore(DEVICE, {}, FakeDriver(DEVICE), MemoryStore(), RecordingLink(), clock=lambda: 1000.0)
    spec = StackSpec(services=(ServiceSpec(name="web", image="fake:1"),))
    definition = codec.encode(StackDefinition(spec_hash=spec.spec_hash(), spec=spec))
    core.handle(topics.stack(spec.spec_hash()), definition)  # not awaited yet
    assert spec.spec_hash() not in core.specs
    for topic in (
        topics.device("core-2", DeviceTopic.DESIRED),
        topics.device(DEVICE, DeviceTopic.DESIRED) + "/x",
        "x" + topics.device(DEVICE, DeviceTopic.DESIRED),
    ):
        core.handle(topic, _desired(1, spec))
        assert core.pending is None and core.desired is None, topic
    core.handle(topics.device(DEVICE, DeviceTopic.DESIRED), _desired(1, spec))
    assert core.pending is not None and core.awaiting == {spec.spec_hash()}
    core.handle(topics.stack(spec.spec_hash()) + "/x", definition)
    assert core.desired is None
    core.handle(topics.stack(spec.spec_hash()), definition)
    assert core.desired is not None and core.desired.generation == 1
