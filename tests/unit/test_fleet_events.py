"""Fleet events: the bus (bounded queues, lost events told), transition detection, and what
a controller on a real SQLite store emits as device messages and commands arrive."""

from __future__ import annotations

import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.fleet import job_result, online, report_running
from support.recording import Clock
from tether.controller.fleet import Seen
from tether.controller.fleet_events import (
    LOST,
    EventBus,
    FleetEvent,
    ReportSummary,
    disk_event,
    report_events,
)
from tether.controller.models import Device
from tether.controller.service import Controller
from tether.protocol import codec, topics
from tether.protocol.commands import DeploymentsAction, GroupsCreate, JobsRun, StacksDeploy
from tether.protocol.device_api import MetricsSample
from tether.protocol.models import (
    DownloadStatus,
    JobResult,
    Presence,
    ReportedState,
    ServiceStatus,
    StackStatus,
)
from tether.protocol.topics import DeviceTopic

COMPOSE = "services:\n  web:\n    image: busybox:1.36\n"


def _event(kind: str, n: int = 0) -> FleetEvent:
    return FleetEvent(kind, f"devices/d{n}", 1.0, {"n": n})


def test_a_slow_subscriber_loses_the_oldest_and_is_told_how_many() -> None:
    """A full queue drops its oldest events; the next get says how many were lost, then the newest follow."""
    bus = EventBus(clock=Clock())
    slow = bus.subscribe(maxsize=3)
    fast = bus.subscribe(maxsize=100)
    for n in range(10):
        bus.emit(_event("device.online", n))
    got = slow.drain()
    assert got[0].kind == LOST and got[0].data == {"count": 7}
    assert [e.data["n"] for e in got[1:]] == [7, 8, 9]
    assert [e.data["n"] for e in fast.drain()] == list(range(10))  # the other subscriber lost nothing
    assert [e.seq for e in got[1:]] == [8, 9, 10]


def test_subscriptions_filter_by_kind_wait_and_end_on_unsubscribe() -> None:
    """A subscriber for some kinds gets only those; get waits for the next event; unsubscribe ends it."""
    bus = EventBus()
    sub = bus.subscribe(kinds={"device.offline"})
    assert sub.get(timeout=0.01) is None
    bus.emit(_event("device.online"))
    threading.Timer(0.05, lambda: bus.emit(_event("device.offline", 2))).start()
    got = sub.get(timeout=5)
    assert got is not None and got.kind == "device.offline" and got.subject == "devices/d2"
    assert json.loads(json.dumps(got.to_json()))["data"] == {"n": 2}
    bus.unsubscribe(sub)
    assert not bus.listening
    bus.emit(_event("device.offline"))
    assert sub.get(timeout=0.01) is None


def _report(stacks: dict[str, StackStatus], **kw: object) -> ReportedState:
    return ReportedState(device_id="pi-1", generation=3, stacks=stacks, **kw)  # type: ignore[arg-type]


def test_report_transitions_crash_loop_download_and_storage_fire_once() -> None:
    """A crash loop, a stuck download and a storage error fire when they begin, not on every later report."""
    healthy = ReportSummary.of(
        _report(
            {
                "web": StackStatus(
                    spec_hash="a", state="running", services={"web": ServiceStatus(state="running")}
                )
            }
        )
    )
    looping_report = _report(
        {
            "web": StackStatus(
                spec_hash="a",
                state="failed",
                services={
                    "web": ServiceStatus(state="failed", restarts=5, last_error="crash loop: exit 1\nboom")
                },
            )
        },
        downloads={"db": DownloadStatus(spec_hash="b", state="retrying", reason="503 from registry")},
        storage_error="/var/lib/tether: no space left (0 bytes free)",
    )
    looping = ReportSummary.of(looping_report)
    kinds = [e.kind for e in report_events("pi-1", healthy, looping, 5.0)]
    assert kinds == ["device.changed", "service.crashloop", "download.stuck", "device.disk_low"]
    crash = report_events("pi-1", healthy, looping, 5.0)[1]
    assert crash.data == {
        "stack": "web",
        "service": "web",
        "restarts": 5,
        "reason": "crash loop: exit 1 boom",
    }
    web = looping_report.stacks["web"]
    again = web.model_copy(
        update={"services": {"web": web.services["web"].model_copy(update={"restarts": 6})}}
    )
    more = looping_report.model_copy(update={"stacks": {"web": again}})  # still looping: nothing new
    assert report_events("pi-1", looping, ReportSummary.of(more), 9.0) == []
    assert report_events("pi-1", healthy, healthy, 9.0) == []


def test_disk_low_fires_at_90_percent_and_again_only_after_going_under_85() -> None:
    """disk_event fires on crossing 90% used, stays quiet while above 85%, re-arms below it."""
    low, event = disk_event("pi-1", False, 91, 100, 1.0)
    assert low and event is not None and event.data["percent"] == 91.0
    assert disk_event("pi-1", True, 86, 100, 2.0) == (True, None)
    assert disk_event("pi-1", True, 84, 100, 3.0) == (False, None)
    assert disk_event("pi-1", False, 89, 100, 4.0) == (False, None)
    assert disk_event("pi-1", False, None, None, 4.0) == (False, None)


def test_the_controller_emits_at_real_transitions(controller: Controller) -> None:
    """Presence, reports, metrics, job results and deployment steps handled by the controller emit
    their events, after the change is stored; a late will from an old session emits nothing."""
    sub = controller.bus.subscribe()
    online(controller, "pi-1", session=2)
    controller.execute(GroupsCreate(name="edge", devices=("pi-1",)))
    deployed = controller.execute(StacksDeploy(name="web", group="edge", compose=COMPOSE))
    controller.flush_events()
    spec_hash = controller.store.get_stack("web").spec_hash  # type: ignore[union-attr]
    report_running(controller, "pi-1", 1, {"web": spec_hash})
    controller.execute(DeploymentsAction(kind="deployments.pause", id=deployed.deployment))
    controller.flush_events()
    controller.handle(
        topics.device("pi-1", DeviceTopic.METRICS),
        codec.encode(MetricsSample(at=1.0, full=True, disk=95, disk_total=100)),
    )
    controller.execute(JobsRun(name="backup", group="edge", command=("backup",)))
    job_result(
        controller, "pi-1", 1, JobResult(job="backup", run="r1", started=1.0, duration_s=0.1, exit_code=3)
    )
    late = Presence(device_id="pi-1", status="offline", session=1)
    controller.handle(topics.device("pi-1", DeviceTopic.PRESENCE), codec.encode(late))
    will = Presence(device_id="pi-1", status="offline", session=2)
    controller.handle(topics.device("pi-1", DeviceTopic.PRESENCE), codec.encode(will))
    events = sub.drain()
    kinds = [e.kind for e in events]
    assert kinds == [
        "device.online",
        "deployment.started",
        "device.changed",
        "deployment.paused",
        "device.disk_low",
        "job.result",
        "device.offline",
    ]
    by_kind = {e.kind: e for e in events}
    assert by_kind["deployment.started"].subject == "stacks/web"
    assert by_kind["deployment.started"].data["to_hash"] == spec_hash
    assert by_kind["device.changed"].data["stacks"] == {"web": {"spec_hash": spec_hash, "state": "running"}}
    assert by_kind["job.result"].data == {"job": "backup", "run": "r1", "outcome": "failed", "exit_code": 3}
    assert all(e.subject == "devices/pi-1" for e in events if e.kind.startswith(("device.", "job.")))
    json.dumps([e.to_json() for e in events])  # every event is JSON as it is


def test_a_device_changed_is_made_only_for_a_subscriber_that_wants_it(controller: Controller) -> None:
    """A report's ``device.changed`` is no webhook's kind: with no subscriber for it, it is
    neither made nor emitted (no number taken); one subscribed since gets it whole."""
    some = controller.bus.subscribe(kinds=("device.online", "device.offline"))
    assert controller.bus.wants("device.online") and not controller.bus.wants("device.changed")
    online(controller, "pi-1", session=1)
    report_running(controller, "pi-1", 1, {"web": "a" * 64})
    every = controller.bus.subscribe()
    assert controller.bus.wants("device.changed")
    report_running(controller, "pi-1", 2, {"web": "b" * 64})
    will = Presence(device_id="pi-1", status="offline", session=1)
    controller.handle(topics.device("pi-1", DeviceTopic.PRESENCE), codec.encode(will))
    assert [(e.kind, e.seq) for e in some.drain()] == [("device.online", 1), ("device.offline", 3)]
    changed, offline = every.drain()
    assert type(changed) is FleetEvent and (changed.kind, changed.seq, changed.subject) == (
        "device.changed",
        2,
        "devices/pi-1",
    )
    assert changed.data == {
        "generation": 2,
        "stacks": {"web": {"spec_hash": "b" * 64, "state": "running"}},
        "held": False,
        "error": None,
    }
    assert offline.kind == "device.offline"


def test_a_command_that_fails_midway_emits_nothing(
    controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deploy that fails after starting its deployment (rolled back) emits no deployment.started."""
    online(controller, "pi-1")
    controller.execute(GroupsCreate(name="edge", devices=("pi-1",)))
    sub = controller.bus.subscribe()

    def broken(device_ids: object = None) -> None:
        raise RuntimeError("scheduling broke")

    monkeypatch.setattr(controller.context.scheduler, "recompute", broken)
    with pytest.raises(RuntimeError, match="scheduling broke"):
        controller.execute(StacksDeploy(name="web", group="edge", compose=COMPOSE))
    controller.flush_events()
    assert sub.drain() == []
    assert controller.store.get_stack("web") is None  # rolled back: the event would have lied


_TEXT = st.one_of(st.none(), st.sampled_from(["", " ", "disk full", "x " * 200]))


@st.composite
def _reports(draw: st.DrawFn) -> ReportedState:
    services = st.builds(
        ServiceStatus,
        state=st.sampled_from(["running", "failed", "starting", "exited"]),
        restarts=st.integers(0, 8),
        last_error=_TEXT,
    )
    stacks = st.builds(
        StackStatus,
        spec_hash=st.sampled_from(["a" * 64, "b" * 64]),
        state=st.sampled_from(["converging", "running", "failed"]),
        services=st.dictionaries(st.sampled_from(["web", "db"]), services, max_size=2),
    )
    downloads = st.builds(
        DownloadStatus,
        spec_hash=st.sampled_from(["a" * 64, "b" * 64]),
        state=st.sampled_from(["downloading", "retrying", "staged", "failed"]),
        reason=_TEXT,
    )
    return ReportedState(
        device_id="pi-1",
        generation=draw(st.integers(-1, 5)),
        stacks=draw(st.dictionaries(st.sampled_from(["web", "mon"]), stacks, max_size=2)),
        downloads=draw(st.dictionaries(st.sampled_from(["web", "mon"]), downloads, max_size=2)),
        error=draw(_TEXT.filter(lambda t: t != "")),  # "" and None are one to the fleet view
        storage_error=draw(_TEXT),
        held=draw(st.booleans()),
    )


@given(_reports())
@settings(max_examples=200, deadline=None)
def test_the_fleet_view_summarises_a_report_as_the_report_itself_does(reported: ReportedState) -> None:
    """A report's summary from the fleet view (what the controller compares a first report
    after a restart with, instead of parsing the stored one) is the report's own summary."""
    seen = Seen.of(Device(id="pi-1", status="online", reported=reported))
    assert ReportSummary.of_seen(seen) == ReportSummary.of(reported)


@given(st.lists(_reports(), min_size=1, max_size=6), st.lists(st.integers(0, 5), min_size=1, max_size=12))
@settings(max_examples=100, deadline=None)
def test_a_summary_made_from_shared_statuses_is_the_report_s_own(
    reports: list[ReportedState], order: list[int]
) -> None:
    """Reports decoded through one FieldMemo share their stack statuses, and their summary is
    made once per set of statuses: it is still each report's own (generation, errors,
    crash loops), whatever order reports with equal and different statuses come in."""
    memo = codec.FieldMemo(ReportedState, "stacks")
    for i in order:
        report = reports[i % len(reports)]
        shared = memo.decode(codec.encode(report))
        fresh = ReportedState.model_validate(report.model_dump())  # new objects, nothing shared
        assert (
            ReportSummary.of(shared)
            == ReportSummary.of(fresh)
            == ReportSummary.of_seen(Seen.of(Device(id="pi-1", status="online", reported=fresh)))
        )


def test_the_bus_numbers_an_event_and_keeps_every_other_field() -> None:
    """EventBus.emit builds the numbered event field by field: none is lost (a field added
    to FleetEvent later included)."""
    import dataclasses

    event = FleetEvent("device.changed", "devices/pi-1", 12.5, {"generation": 3})
    emitted = EventBus().emit(event)
    assert emitted.seq > 0
    assert {f.name: getattr(emitted, f.name) for f in dataclasses.fields(FleetEvent) if f.name != "seq"} == {
        f.name: getattr(event, f.name) for f in dataclasses.fields(FleetEvent) if f.name != "seq"
    }
    assert [f.name for f in dataclasses.fields(FleetEvent)] == ["kind", "subject", "at", "data", "seq"]
