"""The Ingestor on its own: device messages on a real SQLite store, with its collaborators
(publisher, scheduler, deployer) real and its MQTT session a recorder; the fleet events it
emits and the syncs it asks for are collected."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest
from support.recording import Clock, RecordingPublisher
from tether.controller import publishing
from tether.controller.deploying import Deployer
from tether.controller.fleet_events import FleetEvent
from tether.controller.ingesting import MAX_EVENT_MESSAGE, Ingestor, allowance
from tether.controller.models import DesiredRecord, Device, Job
from tether.controller.observability import Metrics
from tether.controller.parts import build_context
from tether.controller.store import Store
from tether.protocol import codec
from tether.protocol.credentials import Credential
from tether.protocol.device_api import MetricsSample
from tether.protocol.models import (
    DeviceFacts,
    Event,
    JobResult,
    JobSpec,
    Presence,
    Reply,
    ReportedState,
    Request,
    ServiceStatus,
    StackStatus,
)
from tether.protocol.topics import DeviceTopic


@dataclass
class Rig:
    """An Ingestor and what it was handed."""

    store: Store
    client: RecordingPublisher
    clock: Clock
    metrics: Metrics
    deployer: Deployer
    ingestor: Ingestor
    events: list[FleetEvent] = field(default_factory=list)
    syncs: list[None] = field(default_factory=list)
    online: list[str] = field(default_factory=list)
    refreshes: list[None] = field(default_factory=list)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def _rig(store: Store, clock: Clock) -> Rig:
    leading = threading.Event()
    leading.set()
    metrics = Metrics()
    client = RecordingPublisher()
    parts = build_context(
        store,
        clock=clock,
        client=lambda: client,  # type: ignore[arg-type,return-value]
        leading=leading,
        metrics=metrics,
    )
    rig = Rig(store, client, clock, metrics, parts.deployer, None, events=parts.events.due)  # type: ignore[arg-type]
    rig.ingestor = Ingestor(
        parts,
        metrics=metrics,
        sync=lambda: rig.syncs.append(None),
        online=rig.online.append,
        refresh=lambda: rig.refreshes.append(None),
        client=lambda: client,  # type: ignore[arg-type,return-value]
    )
    return rig


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    store = Store(tmp_path / "tether.db")
    yield _rig(store, Clock())
    store.close()


def presence(rig: Rig, device_id: str, status: str, session: int, keepalive: int | None = None) -> None:
    facts = DeviceFacts(agent_version="1", driver="process", arch="x86_64", os="linux", keepalive=keepalive)
    message = Presence(device_id=device_id, status=status, session=session, facts=facts)  # type: ignore[arg-type]
    with rig.store.transaction():
        rig.ingestor.on_message(DeviceTopic.PRESENCE, device_id, codec.encode(message))


def report(rig: Rig, device_id: str, generation: int, state: str = "running", restarts: int = 0) -> None:
    service = ServiceStatus(state=state, restarts=restarts)  # type: ignore[arg-type]
    stacks = {"web": StackStatus(spec_hash="a" * 64, state=state, services={"web": service})}  # type: ignore[arg-type]
    message = ReportedState(device_id=device_id, generation=generation, stacks=stacks)
    with rig.store.transaction():
        rig.ingestor.on_message(DeviceTopic.REPORTED, device_id, codec.encode(message))
        rig.ingestor.flush_reports()


def event(rig: Rig, device_id: str, seq: int, **kw: object) -> None:
    message = Event(device_id=device_id, seq=seq, **{"kind": "note", "message": "hello", **kw})  # type: ignore[arg-type]
    with rig.store.transaction():
        rig.ingestor.on_message(DeviceTopic.EVENTS, device_id, codec.encode(message))
        rig.ingestor.flush_reports()


def status(store: Store, device_id: str) -> tuple[str, int]:
    device = store.get_device(device_id)
    assert device is not None
    return device.status, device.session


def test_presence_online_then_a_late_will_then_its_own_will(rig: Rig) -> None:
    """Online stores the device and asks to schedule it; a will of an older session is ignored, its own counts."""
    presence(rig, "pi-1", "online", 2)
    assert status(rig.store, "pi-1") == ("online", 2)
    assert rig.ingestor.take_syncs() == (False, {"pi-1"})  # new: scheduled at the end of the batch
    assert rig.ingestor.take_syncs() == (False, set())  # taken once
    assert rig.online == ["pi-1"] and rig.kinds() == ["device.online"]
    assert rig.deployer.dirty
    presence(rig, "pi-1", "offline", 1)  # the will of the previous connection, late
    assert status(rig.store, "pi-1") == ("online", 2) and rig.kinds() == ["device.online"]
    rig.clock.now += 5
    presence(rig, "pi-1", "offline", 2)
    assert status(rig.store, "pi-1") == ("offline", 2)
    assert rig.events[-1].kind == "device.offline" and rig.events[-1].data == {
        "session": 2,
        "since": rig.clock.now,
    }
    assert rig.ingestor.take_syncs() == (False, set())  # its labels did not change


def test_presence_stale_after_a_restart_turns_offline_past_the_allowance(rig: Rig) -> None:
    """After a restart, devices shown online are unknown; one heard from is online again, the
    others become offline once their keepalive allowance has passed."""
    presence(rig, "pi-1", "online", 1, keepalive=10)
    presence(rig, "pi-2", "online", 1, keepalive=10)
    restarted = _rig(rig.store, rig.clock)
    restarted.ingestor.connected(lost=False)
    assert status(rig.store, "pi-1") == ("unknown", 1) and status(rig.store, "pi-2") == ("unknown", 1)
    assert restarted.refreshes and not restarted.events  # gauges told; nothing is news yet
    restarted.ingestor.connected(lost=False)  # a reconnect with the session kept: trusted now
    presence(restarted, "pi-1", "online", 1)  # the broker's retained word: same session, not news
    assert status(rig.store, "pi-1") == ("online", 1) and restarted.kinds() == []
    device = rig.store.get_device("pi-2")
    assert device is not None
    rig.clock.now += allowance(device) - 1
    restarted.ingestor.expire_stale()
    assert status(rig.store, "pi-2") == ("unknown", 1)
    rig.clock.now += 1
    restarted.ingestor.expire_stale()
    assert status(rig.store, "pi-1") == ("online", 1) and status(rig.store, "pi-2") == ("offline", 1)
    assert restarted.kinds() == ["device.offline"] and restarted.events[0].subject == "devices/pi-2"
    assert restarted.syncs == []  # no replicas stack: nothing to place again


def test_a_report_older_than_the_stored_one_is_ignored(rig: Rig) -> None:
    """A report of an older generation (a late redelivery) changes nothing and emits nothing."""
    report(rig, "pi-1", 3)
    assert rig.kinds() == ["device.changed"]
    report(rig, "pi-1", 2, state="failed")
    device = rig.store.get_device("pi-1")
    assert device is not None and device.reported is not None
    assert device.reported.generation == 3 and device.reported.stacks["web"].state == "running"
    assert rig.kinds() == ["device.changed"]
    report(rig, "pi-1", 4, state="failed", restarts=5)
    assert rig.kinds() == ["device.changed", "device.changed", "service.crashloop"]


def test_after_a_restart_a_report_is_compared_with_the_stored_one(rig: Rig) -> None:
    """The first report after a restart emits only what changed from the report stored before it."""
    report(rig, "pi-1", 3)
    restarted = _rig(rig.store, rig.clock)
    report(restarted, "pi-1", 3)
    assert restarted.kinds() == []  # the same as stored: no news
    report(restarted, "pi-1", 3, state="failed", restarts=6)
    assert restarted.kinds() == ["device.changed", "service.crashloop"]
    again = _rig(rig.store, rig.clock)
    report(again, "pi-1", 3, state="failed", restarts=7)
    assert again.kinds() == []  # still the same crash loop (restart counts alone are no news)


def test_an_event_is_stored_once_and_trimmed_with_a_counted_reason(rig: Rig) -> None:
    """An event is stored once however often it is delivered; one too long is stored trimmed and counted."""
    event(rig, "pi-1", 1)
    event(rig, "pi-1", 1)
    assert len(rig.store.list_events("pi-1")) == 1
    event(rig, "pi-1", 2, message="x" * (MAX_EVENT_MESSAGE + 10))
    stored = [Event.model_validate_json(e) for e in rig.store.list_events("pi-1")]
    assert [e.seq for e in stored] == [1, 2]
    assert stored[1].message == "x" * MAX_EVENT_MESSAGE + "..."
    assert rig.store.dropped("pi-1") == {"event_trimmed": 1}


def _batch(rig: Rig, device_id: str, payload: bytes) -> None:
    with rig.store.transaction():
        rig.ingestor.on_message(DeviceTopic.EVENTS, device_id, payload)
        rig.ingestor.flush_reports()


def test_a_batch_of_events_is_stored_each_once_and_a_bad_batch_not_at_all(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch's events are stored as if sent one by one (each once, a redelivery too); a
    batch with one bad event, or one naming another device, is refused whole with a warning
    naming that event and what is wrong: nothing of it is stored."""

    def payload(*events: Event | dict[str, object]) -> bytes:
        return codec.array([codec.encode(e) if isinstance(e, Event) else msgpack.packb(e) for e in events])

    def note(seq: int, device_id: str = "pi-1") -> Event:
        return Event(device_id=device_id, seq=seq, kind="note", message=str(seq), oldest=1)

    def stored() -> list[int]:
        return [Event.model_validate_json(e).seq for e in rig.store.list_events("pi-1")]

    _batch(rig, "pi-1", payload(note(1), note(2), note(3)))
    _batch(rig, "pi-1", payload(note(2), note(3)))  # delivered again
    assert stored() == [1, 2, 3]
    caplog.clear()
    _batch(rig, "pi-1", payload(note(4), {"v": 1, "device_id": "pi-1", "seq": 5, "message": "m"}, note(6)))
    assert stored() == [1, 2, 3]
    assert "Event batch: item 2 of 3 (seq 5): kind: Field required" in caplog.text
    _batch(rig, "pi-1", payload(note(4), note(5, device_id="pi-2")))
    assert stored() == [1, 2, 3]
    assert "Event batch: item 2 of 2 (seq 5) names another device" in caplog.text
    _batch(rig, "pi-1", payload(note(4)))
    assert stored() == [1, 2, 3, 4]


def test_a_job_result_is_stored_counted_and_emitted_once(rig: Rig) -> None:
    """A job's result is stored and emitted once (a redelivery under another seq counts once)."""
    spec = JobSpec(name="backup", command=("true",), run_id="r1")
    rig.store.put_job(Job(name="backup", group="edge", spec=spec))
    result = JobResult(job="backup", run="r1", started=1.0, duration_s=0.5, exit_code=3, output="oops")
    event(rig, "pi-1", 1, kind="job.result", data=result.model_dump())
    event(rig, "pi-1", 2, kind="job.result", data=result.model_dump())
    assert [d for d, _ in rig.store.list_job_results("backup", None, 10)] == ["pi-1"]
    assert rig.kinds() == ["job.result"]
    assert rig.events[0].data == {"job": "backup", "run": "r1", "outcome": "failed", "exit_code": 3}
    assert rig.metrics.job_runs.labels(outcome="failed")._value.get() == 1


def test_malformed_payloads_are_dropped_alone_with_a_counted_reason(rig: Rig) -> None:
    """Undecodable messages, messages naming another device and bad job results leave nothing
    behind; what was not stored as sent is counted per device and reason."""
    for kind in (DeviceTopic.PRESENCE, DeviceTopic.REPORTED, DeviceTopic.EVENTS, DeviceTopic.METRICS):
        with rig.store.transaction():
            rig.ingestor.on_message(kind, "pi-1", b"\xc1 not msgpack")
    forged = msgpack.packb({"v": 1, "device_id": "pi-1", "generation": 2**64 - 1})
    with rig.store.transaction():
        rig.ingestor.on_message(DeviceTopic.REPORTED, "pi-1", forged)
    report(rig, "pi-2", 1)  # on pi-1's topic below, naming pi-2
    message = ReportedState(device_id="pi-2", generation=9)
    with rig.store.transaction():
        rig.ingestor.on_message(DeviceTopic.REPORTED, "pi-1", codec.encode(message))
    assert rig.store.get_device("pi-1") is None and rig.store.reported_generation("pi-2") == 1
    assert rig.ingestor.device_metrics == {}
    event(rig, "pi-1", 1, kind="job.result", data={"job": "backup"})  # no run, no start
    event(
        rig,
        "pi-1",
        2,
        kind="job.result",
        data=JobResult(job="nope", run="r", started=0, duration_s=0).model_dump(),
    )
    assert rig.store.dropped("pi-1") == {"job_result_malformed": 1, "job_result_unknown_job": 1}
    assert rig.store.list_job_results("nope", None, 10) == []
    assert rig.metrics.dropped.labels(reason="job_result_malformed")._value.get() == 1
    assert "job.result" not in rig.kinds()


def test_metrics_keep_the_newest_sample_and_tell_a_full_disk_once(rig: Rig) -> None:
    """A sample is kept per device (an older one ignored); a disk past 90% fires device.disk_low once."""

    def sample(at: float, disk: int) -> None:
        payload = codec.encode(MetricsSample(at=at, full=True, cpu=1.0, disk=disk, disk_total=100))
        rig.ingestor.on_message(DeviceTopic.METRICS, "pi-1", payload)

    sample(10.0, 50)
    sample(5.0, 95)  # older: ignored
    assert rig.ingestor.device_metrics["pi-1"]["disk"] == 50 and rig.kinds() == []
    sample(11.0, 95)
    sample(12.0, 96)
    assert rig.kinds() == ["device.disk_low"]
    assert "pi-1" in rig.ingestor.device_history.rings


def test_a_device_row_from_an_enrollment_gets_its_first_report(rig: Rig) -> None:
    """A device known before it ever reported (a row without a report) stores its first report."""
    with rig.store.transaction():
        rig.store.put_device(Device(id="pi-1", operator_labels={"site": "a"}))
    report(rig, "pi-1", 1)
    device = rig.store.get_device("pi-1")
    assert device is not None and device.reported is not None and device.operator_labels == {"site": "a"}


def test_after_a_reconnection_devices_shown_online_must_show_life(rig: Rig) -> None:
    """After a (re)connection every device shown online must show life: one heard from in a
    newer session meanwhile is never asked, the others are asked for their facts later, from
    the tick; one that answers is confirmed, one silent past its allowance gets its will."""
    for device_id in ("pi-1", "pi-2", "pi-3", "pi-4"):
        presence(rig, device_id, "online", 1, keepalive=10)
    rig.ingestor.connected(lost=False)  # the first connection: made stale, and reconfirmed
    for device_id in ("pi-1", "pi-2", "pi-3", "pi-4"):
        presence(rig, device_id, "online", 2, keepalive=10)  # each showed life: nothing to ask
    rig.clock.now += 15.0  # a third of the allowance (1.5 x 10 + 30)
    rig.ingestor.ask_unconfirmed()
    assert rig.client.published == []
    rig.ingestor.connected(lost=False)  # a reconnection
    presence(rig, "pi-4", "online", 3, keepalive=10)  # reconnected on its own
    rig.clock.now += 14.9
    rig.ingestor.ask_unconfirmed()
    assert rig.client.published == []  # not yet asked
    rig.clock.now += 0.1
    rig.ingestor.ask_unconfirmed()
    asked = {t: codec.decode(p, Request) for t, p, _ in rig.client.published}
    assert sorted(asked) == [f"tether/v1/devices/pi-{i}/requests" for i in (1, 2, 3)]
    assert {r.reply_to for r in asked.values()} == {rig.ingestor.asked_topic}
    answer = Reply(id=asked["tether/v1/devices/pi-1/requests"].id, ok=True, result={"os": "linux"})
    rig.ingestor.on_answer(codec.encode(answer))
    presence(rig, "pi-2", "online", 3, keepalive=10)  # reconnected: a newer session
    rig.client.published.clear()
    device = rig.store.get_device("pi-3")
    assert device is not None
    rig.clock.now += allowance(device)
    rig.ingestor.ask_unconfirmed()
    rig.ingestor.expire_unconfirmed()
    [(topic, payload, retained)] = rig.client.published
    will = codec.decode(payload, Presence)
    assert topic.endswith("/pi-3/presence") and retained and (will.status, will.session) == ("offline", 2)


def test_devices_are_neither_asked_nor_given_their_will_while_the_inbox_holds_a_burst(rig: Rig) -> None:
    """While the inbox holds a burst (the presences showing life may wait in it) no device is
    asked and no will is published; both resume once it is over."""
    for device_id in ("pi-1", "pi-2"):
        presence(rig, device_id, "online", 1, keepalive=10)
    rig.ingestor.connected(lost=False)  # the first connection: made stale
    for device_id in ("pi-1", "pi-2"):
        presence(rig, device_id, "online", 2, keepalive=10)
    rig.ingestor.connected(lost=False)  # a reconnection
    busy = [True]
    rig.ingestor._busy = lambda: busy[0]
    rig.clock.now += 15.0
    rig.ingestor.ask_unconfirmed()
    assert rig.client.published == []
    device = rig.store.get_device("pi-1")
    assert device is not None
    rig.clock.now += allowance(device)
    rig.ingestor.expire_unconfirmed()
    assert rig.client.published == []
    presence(rig, "pi-1", "online", 3, keepalive=10)  # its presence, handled once the burst is
    busy[0] = False
    rig.ingestor.ask_unconfirmed()
    asked = [t for t, _, _ in rig.client.published]
    assert asked == ["tether/v1/devices/pi-2/requests"]
    rig.client.published.clear()
    rig.clock.now += 10.0  # ANSWER_S after its turn
    rig.ingestor.expire_unconfirmed()
    [(topic, payload, _)] = rig.client.published
    assert topic.endswith("/pi-2/presence") and codec.decode(payload, Presence).status == "offline"


def test_a_presence_keeps_the_stored_report_without_rewriting_it(rig: Rig) -> None:
    """A presence (reconnection storm: one per device) leaves the stored reported state as it
    is, read back whole after a restart, while the device's presence and session change."""
    presence(rig, "pi-1", "online", 1)
    report(rig, "pi-1", 3)
    before = rig.store.db.execute("SELECT body FROM reported WHERE device_id = 'pi-1'").fetchone()
    presence(rig, "pi-1", "offline", 1)
    presence(rig, "pi-1", "online", 2)
    assert status(rig.store, "pi-1") == ("online", 2)
    after = rig.store.db.execute("SELECT body FROM reported WHERE device_id = 'pi-1'").fetchone()
    assert after == before
    restarted = Store(rig.store.target)
    try:
        device = restarted.get_device("pi-1")
        assert device is not None and device.reported is not None and device.reported.generation == 3
        assert restarted.get_device("pi-1", reported=False) == device.model_copy(update={"reported": None})
    finally:
        restarted.close()


def test_a_generation_we_never_issued_is_published_past_only_when_newer(rig: Rig) -> None:
    """A device that applied a generation newer than its desired record's (our state is older:
    a restored backup) gets the record again one past it, unpublished; a report of an older
    or the same generation leaves the record as it is."""
    rig.store.put_desired_many([DesiredRecord(device_id="pi-1", generation=5, published=True)])
    report(rig, "pi-1", 4)
    report(rig, "pi-1", 5)
    record = rig.store.get_desired("pi-1")
    assert record is not None and (record.generation, record.published) == (5, True)
    report(rig, "pi-1", 8)
    record = rig.store.get_desired("pi-1")
    assert record is not None and (record.generation, record.published) == (9, False)
    assert rig.store.desired_generation("pi-1") == 9 and rig.store.desired_generation("pi-2") is None


def test_retained_presence_is_read_again_after_a_reconnection_and_a_lost_probe(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first connection reads nothing again (its subscriptions just did); a reconnection,
    and a probe that never came back, each read every device's retained presence again (those
    not online first), each batch unsubscribed at the next step."""
    rig.ingestor.reread.rate = 10**9  # the pace is tests/unit/test_reread.py's: all at once here
    presence(rig, "b", "offline", 1)
    rig.ingestor.connected(False)
    presence(rig, "a", "online", 1)
    topic = {d: f"tether/v1/devices/{d}/presence" for d in ("a", "b")}
    rig.ingestor.reread_presence()
    rig.ingestor.reread_presence()
    assert rig.client.subscribed == [] and rig.client.unsubscribed == []
    rig.ingestor.connected(False)  # again: a reconnection
    rig.ingestor.reread_presence()
    assert rig.client.subscribed == [topic["b"], topic["a"]]
    rig.ingestor.reread_presence()
    assert rig.client.unsubscribed == [topic["b"], topic["a"]]
    rig.client.subscribed.clear()
    monkeypatch.setattr(publishing, "PROBE_LOST", -1.0)  # a probe not back by the next look is lost
    publisher = rig.ingestor.publisher
    publisher.repair_behind()
    assert rig.client.topics().count("tether/v1/controller/probe") == 1 and publisher.probes_lost == 0
    publisher.repair_behind()
    assert publisher.probes_lost == 1
    rig.ingestor.reread_presence()
    assert rig.client.subscribed == [topic["b"], topic["a"]]


def test_a_presence_equal_to_what_is_shown_changes_nothing(rig: Rig) -> None:
    """A retained presence read again that says what is shown (session, status, facts) writes
    nothing and marks nothing changed; one with other facts is stored."""
    presence(rig, "a", "online", 3)
    rig.deployer.dirty = False
    events = len(rig.events)
    presence(rig, "a", "online", 3)
    assert not rig.deployer.dirty and len(rig.events) == events and status(rig.store, "a") == ("online", 3)
    presence(rig, "a", "online", 3, keepalive=5)
    assert rig.deployer.dirty
    device = rig.store.get_device("a")
    assert device is not None and device.facts is not None and device.facts.keepalive == 5


def test_a_device_known_only_by_its_credential_is_read_too(rig: Rig) -> None:
    """A device with a credential but no row (its first presence dropped) is among the devices
    whose retained presence is read again; a revoked one is not."""
    rig.ingestor.reread.rate = 10**9
    for name, revoked in (("fresh", False), ("gone", True)):
        rig.store.put_credential(Credential(name, "device", name, "$7$x", revoked))
    rig.ingestor.connected(False)
    rig.ingestor.reread_presence()
    rig.ingestor.connected(False)  # a reconnection: every device read again
    rig.ingestor.reread_presence()
    assert rig.client.subscribed == ["tether/v1/devices/fresh/presence"]


def test_a_retained_online_read_again_for_a_device_shown_offline_must_show_life(rig: Rig) -> None:
    """A device turned offline after a restart (its retained ``online`` never came: dropped)
    and then turned online by that word read again (:mod:`.reread`), in the session shown
    ended, must show life like any device shown online after a reconnection: the broker may
    have restored that word with no will behind it. Silent past its allowance, it gets its will."""
    presence(rig, "pi-1", "online", 1, keepalive=10)
    device = rig.store.get_device("pi-1")
    assert device is not None
    restarted = _rig(rig.store, rig.clock)
    restarted.ingestor.connected(lost=False)  # unknown until heard from; its retained word is lost
    for _ in range(int(allowance(device)) + 1):  # the ticks of its allowance
        rig.clock.now += 1
        restarted.ingestor.expire_stale()
        restarted.ingestor.ask_unconfirmed()
        restarted.ingestor.expire_unconfirmed()
    assert status(rig.store, "pi-1") == ("offline", 1) and not len(restarted.ingestor.reconfirm)
    restarted.client.published.clear()
    presence(restarted, "pi-1", "online", 1, keepalive=10)  # the retained word, read again: as it says
    assert status(rig.store, "pi-1") == ("online", 1)
    for _ in range(int(allowance(device)) + 1):
        rig.clock.now += 1
        restarted.ingestor.ask_unconfirmed()
        restarted.ingestor.expire_unconfirmed()
    published = [
        (t, codec.decode(p, Presence), r) for t, p, r in restarted.client.published if t.endswith("/presence")
    ]
    assert [(t, w.status, w.session, r) for t, w, r in published] == [
        ("tether/v1/devices/pi-1/presence", "offline", 1, True)
    ]


def test_a_device_info_event_is_logged_at_debug_and_a_warning_at_warning(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """At ``tether up``'s default level (info) a device's info events are stored, not logged
    (a deploy to 10,000 devices would log 40,000 lines); its warnings and errors are logged."""
    caplog.set_level("INFO", logger="tether.controller.ingesting")
    events = [
        Event(device_id="pi-1", seq=1, kind="service.started", message="web started", oldest=1),
        Event(device_id="pi-1", seq=2, kind="service.failed", message="db exited 1", level="error", oldest=1),
    ]
    _batch(rig, "pi-1", codec.array([codec.encode(e) for e in events]))
    assert len(rig.store.list_events("pi-1")) == 2
    logged = [
        (r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("device pi-1")
    ]
    assert logged == [("WARNING", "device pi-1: service.failed: db exited 1")]
    caplog.clear()
    caplog.set_level("DEBUG", logger="tether.controller.ingesting")
    _batch(rig, "pi-1", codec.encode(Event(device_id="pi-1", seq=3, kind="note", message="hello", oldest=1)))
    assert [
        (r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("device pi-1")
    ] == [("DEBUG", "device pi-1: note: hello")]


@pytest.mark.parametrize("at", [float("inf"), float("-inf"), float("nan")])
def test_an_event_whose_time_is_not_a_finite_number_is_refused_naming_it(
    rig: Rig, caplog: pytest.LogCaptureFixture, at: float
) -> None:
    """An event's time must be finite: stored as JSON it would be null, which is not read back
    (the device's events could no longer be listed). Alone or in a batch whose content was seen
    before (the memo's path), it is refused with a warning naming the field; nothing is stored."""
    good = [Event(device_id="pi-1", seq=s, kind="note", message="m", at=1.5, oldest=1) for s in (1, 2)]
    _batch(rig, "pi-1", codec.array([codec.encode(e) for e in good]))
    bad = {**good[0].model_dump(), "seq": 3, "at": at}
    for payload in (msgpack.packb(bad), codec.array([codec.encode(good[1]), msgpack.packb(bad)])):
        caplog.clear()
        _batch(rig, "pi-1", payload)
        assert "at: Input should be a finite number" in caplog.text
    assert [Event.model_validate_json(e).seq for e in rig.store.list_events("pi-1")] == [1, 2]
