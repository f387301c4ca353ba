"""The controller's worker takes device reports in batches: one store transaction per burst.

No broker here: the messages are put on the controller's inbox as its MQTT thread would,
and the worker's batching (:meth:`Controller._ingest`) runs on a real SQLite store.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
import pytest
from support.links import RecordingLink
from support.recording import RecordingPublisher
from tether.controller import publishing
from tether.controller.inbox import message as queued
from tether.controller.models import User
from tether.controller.service import _STOP, INGEST_BATCH, Controller
from tether.controller.store import Store
from tether.protocol import codec, topics
from tether.protocol.commands import GroupsCreate, StacksDeploy
from tether.protocol.credentials import Credential, hash_password
from tether.protocol.models import (
    MAX_COUNTER,
    DesiredState,
    DeviceFacts,
    Event,
    EventsAcked,
    Presence,
    Reply,
    ReportedState,
    Request,
)
from tether.protocol.topics import DeviceTopic

COMPOSE = "services:\n  web:\n    image: busybox:1.36\n    command: [sleep, '3600']\n"


def reported(device_id: str, generation: int) -> tuple[str, bytes]:
    return (
        topics.device(device_id, DeviceTopic.REPORTED),
        codec.encode(ReportedState(device_id=device_id, generation=generation)),
    )


def test_a_burst_larger_than_a_batch_loses_nothing(tmp_path: Path) -> None:
    """Every report of a burst is stored, however the burst splits into batches."""
    store = Store(tmp_path / "tether.db")
    controller = Controller(store)
    controller.leading.set()
    n = INGEST_BATCH * 2 + 7
    messages = [reported(f"d-{i}", 1) for i in range(n)]
    for message in messages[1:]:
        controller.inbox.put(message)
    following = controller._ingest(*queued(*messages[0]))
    while following is None and not controller.inbox.empty():
        following = controller._ingest(*controller.inbox.get_nowait())
    assert following is None
    assert controller.inbox.empty()
    assert {d.id: d.reported.generation for d in store.list_devices() if d.reported} == {
        f"d-{i}": 1 for i in range(n)
    }
    store.close()


def test_messages_received_are_counted_per_kind_once_handled(tmp_path: Path) -> None:
    """tether_messages_received_total counts every message the worker took, per kind (device
    topics by their leaf), batched or not; topics that are not Tether's are not counted."""
    store = Store(tmp_path / "tether.db")
    controller = Controller(store)
    controller.leading.set()
    n = INGEST_BATCH + 3
    for i in range(n):
        controller.inbox.put(reported(f"d-{i}", 1))
    controller.inbox.put((topics.device("d-0", DeviceTopic.EVENTS), b"\xc1"))  # counted, not valid
    controller.inbox.put(("tether/v1/devices/d-0/reported/extra", b"x"))  # not a Tether topic
    controller.inbox.put((_STOP, b""))
    controller._run()

    def received(kind: str) -> float:
        return (
            controller.metrics.registry.get_sample_value("tether_messages_received_total", {"kind": kind})
            or 0
        )

    assert (received("reported"), received("events")) == (n, 1)
    assert len(store.list_devices()) == n
    store.close()


def test_a_bad_message_in_a_batch_leaves_no_trace_and_the_rest_count(tmp_path: Path) -> None:
    """A malformed report is dropped alone; a request ends the batch and comes back in order."""
    store = Store(tmp_path / "tether.db")
    controller = Controller(store)
    controller.leading.set()
    request = (topics.REQUESTS, b"a request")
    controller.inbox.put((topics.device("d-1", DeviceTopic.REPORTED), b"\xc1 not msgpack"))
    controller.inbox.put(reported("d-1", 4))
    controller.inbox.put(request)
    controller.inbox.put(reported("d-3", 1))
    following = controller._ingest(*queued(*reported("d-0", 2)))
    assert following == queued(*request)
    assert {d.id: d.reported.generation for d in store.list_devices() if d.reported} == {"d-0": 2, "d-1": 4}
    assert controller.inbox.get_nowait() == queued(*reported("d-3", 1))
    store.close()


def test_devices_registering_together_are_scheduled_in_one_pass(tmp_path: Path) -> None:
    """The presence of new devices is taken in a batch: one scheduling pass for the batch (not
    one per device), and every device gets its desired state once the batch is committed."""
    store = Store(tmp_path / "tether.db")
    controller = Controller(store)
    controller.client = client = RecordingPublisher()  # type: ignore[assignment]
    controller.leading.set()
    controller.execute(GroupsCreate(name="edge", selector="site=a", trust_device_labels=True))
    controller.execute(StacksDeploy(name="web", group="edge", compose=COMPOSE))
    client.published.clear()
    passes: list[set[str] | None] = []
    recompute = controller.recompute
    controller.recompute = lambda ids=None: (passes.append(ids and set(ids)), recompute(ids))[1]  # type: ignore[method-assign]
    facts = DeviceFacts(agent_version="1", driver="process", arch="x86_64", os="linux", labels={"site": "a"})
    messages = [
        (
            topics.device(f"d-{i}", DeviceTopic.PRESENCE),
            codec.encode(Presence(device_id=f"d-{i}", status="online", session=1, facts=facts)),
        )
        for i in range(5)
    ]
    for message in messages[1:]:
        controller.inbox.put(message)
    assert controller._ingest(*queued(*messages[0])) is None
    assert passes == [{f"d-{i}" for i in range(5)}]
    assert not [t for t, *_ in client.published if t.endswith("/desired")]  # not before the commit
    controller._publish_deferred()
    desired = {t: codec.decode(p, DesiredState) for t, p, _r in client.published if t.endswith("/desired")}
    assert {d.device_id for d in desired.values()} == {f"d-{i}" for i in range(5)}
    assert all([ref.name for ref in d.stacks] == ["web"] for d in desired.values())
    store.close()


def test_absurd_counters_from_a_device_are_dropped_alone(tmp_path: Path) -> None:
    """A report or presence with a generation or session beyond 2^53-1 (2^64-1 once overflowed the
    database's integers) is refused at decoding; the device's next real report counts."""
    store = Store(tmp_path / "tether.db")
    controller = Controller(store)
    controller.leading.set()
    forged = msgpack.packb({"v": 1, "device_id": "d-1", "generation": 2**64 - 1})
    forged_presence = msgpack.packb({"v": 1, "device_id": "d-1", "status": "online", "session": 2**63})
    controller.inbox.put(reported("d-1", 3))
    assert controller._ingest(*queued(topics.device("d-1", DeviceTopic.REPORTED), forged)) is None
    assert controller._ingest(*queued(topics.device("d-1", DeviceTopic.PRESENCE), forged_presence)) is None
    assert {d.id: (d.reported.generation, d.session) for d in store.list_devices() if d.reported} == {
        "d-1": (3, -1)
    }
    store.close()


def test_a_reply_too_large_for_one_message_becomes_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply that would exceed the message size limit is not sent (a broker would disconnect
    the controller); the client gets an error reply saying so."""
    store = Store(tmp_path / "tether.db")
    store.put_user(User(name="admin", role="admin"))  # the operator `tether up` creates
    store.put_credential(Credential("admin", "operator", "admin", hash_password("pw")))
    controller = Controller(store)
    controller.leading.set()
    link = RecordingLink()
    controller.client = link  # type: ignore[assignment]
    monkeypatch.setattr(
        controller,
        "execute",
        lambda command, principal=None, prepared=None: {"blob": "x" * codec.MAX_PAYLOAD},
    )
    reply_to = topics.replies("tether-cli-1")
    controller._on_request(codec.encode(Request(id="r1", reply_to=reply_to, command={"kind": "devices.ls"})))
    [(topic, payload)] = link.published
    reply = codec.decode(payload, Reply)
    assert topic == reply_to and not reply.ok and reply.error is not None and "exceeds" in reply.error
    assert len(payload) < 1024


class PublishingClient:
    """Stands in for the controller's MQTT client: connected, keeps what is published."""

    connected = True
    session_present = True

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, int, bool]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        self.published.append((topic, payload, qos, retain))
        return True


def event(device_id: str, seq: int, oldest: int) -> tuple[str, bytes]:
    body = Event(device_id=device_id, seq=seq, kind="k", message=str(seq), oldest=oldest)
    return topics.device(device_id, DeviceTopic.EVENTS), codec.encode(body)


def test_events_are_acknowledged_up_to_the_first_gap(tmp_path: Path) -> None:
    """The acknowledgement covers every event stored without a gap from the device's oldest
    queued one; a later arrival moves ``last``; the missing one, once stored, closes the gap;
    acknowledgements are retained and go out from the tick, one per device; a device with no
    gap left holds no set of stored numbers of its own."""
    store = Store(tmp_path / "tether.db")
    controller = Controller(store)
    controller.leading.set()
    client = PublishingClient()
    controller.client = client  # type: ignore[assignment]

    def acks() -> list[EventsAcked]:
        found = [
            codec.decode(p, EventsAcked) for t, p, q, r in client.published if r and t.endswith("/acked")
        ]
        client.published.clear()
        return found

    for message in (event("d-1", 4, 4), event("d-1", 5, 4), event("d-1", 7, 4)):
        controller.handle(*message)
    controller.publish_acks()
    assert [(a.device_id, a.seq, a.last, a.resend) for a in acks()] == [("d-1", 5, 7, False)]
    controller.publish_acks()
    assert acks() == []  # nothing new
    controller.handle(*event("d-1", 6, 4))
    controller.handle(*event("d-1", 6, 4))  # a duplicate: acknowledged again all the same
    controller.publish_acks()
    assert [(a.seq, a.last) for a in acks()] == [(7, 7)]
    assert controller.context.publisher._event_marks["d-1"].above is publishing._NO_SEQS, (
        "no gap left: no set of its own kept"
    )
    stored = [json.loads(b) for b in store.list_events("d-1")]
    assert [e["seq"] for e in stored] == [4, 5, 6, 7]
    assert not any("oldest" in e for e in stored), "what the device still queued is not stored with it"
    store.close()


def test_a_connection_without_our_session_asks_every_device_to_resend(tmp_path: Path) -> None:
    """After a CONNACK without our session (the broker lost it: events may have found nobody
    subscribed), every device gets an acknowledgement that asks it to resend, keeping what is
    known to be stored."""
    store = Store(tmp_path / "tether.db")
    controller = Controller(store)
    controller.leading.set()
    client = PublishingClient()
    controller.client = client  # type: ignore[assignment]
    controller.handle(*event("d-1", 3, 1))
    controller.handle(*event("d-1", 1, 1))
    controller.handle(
        topics.device("d-2", DeviceTopic.PRESENCE),
        codec.encode(Presence(device_id="d-2", status="online", session=1)),
    )
    client.published.clear()
    client.session_present = False
    controller.handle("\x00connected", b"")
    controller.publish_acks()
    found = {
        a.device_id: (a.seq, a.last, a.resend)
        for t, p, q, r in client.published
        if t.endswith("/acked") and (a := codec.decode(p, EventsAcked))
    }
    assert found == {"d-1": (1, 3, True), "d-2": (0, 0, True)}
    store.close()


def _behind_fleet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reconnect: bool = True
) -> tuple[Any, Any, PublishingClient, list[float], str]:
    """A controller whose devices d-1 and d-2 (held) report generation 1 while generation 2
    was published to them (acknowledged now), on a clock moved by hand; the spec hash. With
    ``reconnect``, both then connect again (as after a broker restart)."""
    from tether.controller import service
    from tether.controller.models import DesiredRecord, Device
    from tether.protocol.models import ServiceSpec, StackRef, StackSpec

    now = [1000.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: now[0])
    store = Store(tmp_path / "tether.db")
    controller = Controller(store)
    controller.leading.set()
    client = PublishingClient()
    client.publish_many = lambda messages, timeout=30.0: [  # type: ignore[attr-defined]
        client.publish(*m) for m in messages
    ]
    controller.client = client  # type: ignore[assignment]
    spec = StackSpec(services=(ServiceSpec(name="a", command=("true",)),))
    store.put_spec(spec.spec_hash(), spec)
    for device_id, held in (("d-1", False), ("d-2", True)):
        reported = ReportedState(device_id=device_id, generation=1, held=held)
        store.put_device(Device(id=device_id, status="online", session=1, reported=reported))
        refs = (StackRef(name="s", spec_hash=spec.spec_hash()),)
        store.put_desired(DesiredRecord(device_id=device_id, generation=2, stacks=refs))
    controller.publish_pending()  # acknowledged at 1000.0
    if reconnect:
        for device_id in ("d-1", "d-2"):
            presence = Presence(device_id=device_id, status="online", session=2)
            controller.handle(topics.device(device_id, DeviceTopic.PRESENCE), codec.encode(presence))
    client.published.clear()
    return controller, store, client, now, spec.spec_hash()


def _republished(controller: Any, client: PublishingClient, probe_back: bool = True) -> list[str]:
    """What repair_behind published but its probe; the probe comes back through the broker
    (handled in order, as the inbox would hand it over) unless ``probe_back`` is False."""
    from tether.protocol.models import DesiredState

    controller.repair_behind()
    found = []
    for t, p, _q, r in client.published:
        if t == topics.PROBE:
            if probe_back:
                controller.handle(t, p)
            continue
        if t.endswith("/desired"):
            assert codec.decode(p, DesiredState).generation == 2 and r
        found.append(t)
    client.published.clear()
    return found


def test_a_device_that_stays_behind_gets_its_desired_state_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An online device that connected again after its desired state was published and still
    reports an older generation gets its desired state and definitions published again once
    everything the broker held a grace after was handled; again only if it connects again
    (and after a doubled wait); a held device, or one that caught up, does not."""

    controller, store, client, now, spec_hash = _behind_fleet(tmp_path, monkeypatch)
    assert _republished(controller, client) == []
    now[0] += publishing.BEHIND_GRACE  # the probe that returns now was sent a grace after the publish
    assert _republished(controller, client) == []
    now[0] += publishing.BEHIND_CHECK
    desired = topics.device("d-1", DeviceTopic.DESIRED)
    assert _republished(controller, client) == [topics.stack(spec_hash), desired]
    now[0] += publishing.BEHIND_GRACE + publishing.BEHIND_CHECK
    assert _republished(controller, client) == []  # acknowledged again: d-1 gets it on its session
    presence = Presence(device_id="d-1", status="online", session=3)  # unless it connects again
    controller.handle(topics.device("d-1", DeviceTopic.PRESENCE), codec.encode(presence))
    now[0] += publishing.BEHIND_GRACE + publishing.BEHIND_CHECK
    assert _republished(controller, client) == []  # the probe sent a grace after is not back yet
    now[0] += publishing.BEHIND_CHECK
    assert _republished(controller, client) == [topics.stack(spec_hash), desired]
    store.put_reported("d-1", ReportedState(device_id="d-1", generation=2))
    now[0] += 10 * publishing.BEHIND_GRACE
    assert _republished(controller, client) == []
    store.close()


def test_a_device_slow_to_take_a_deploy_is_not_taken_for_one_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device connected since before the publish (slow to get to it: a loaded 10,000-device
    deploy) is never republished to, however long it stays on the older generation."""

    controller, store, client, now, _ = _behind_fleet(tmp_path, monkeypatch, reconnect=False)
    for _ in range(20):
        assert _republished(controller, client) == []
        now[0] += publishing.BEHIND_CHECK
    store.close()


def test_a_report_queued_behind_a_big_deploy_is_not_taken_for_a_device_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the probe sent after the grace has not come back (messages still queued before
    it: a loaded deploy's reports), nothing is republished, however long it takes; once it
    is back, a device still behind is."""

    controller, store, client, now, spec_hash = _behind_fleet(tmp_path, monkeypatch)
    for _ in range(5):  # 5 checks over 4 graces: the probe sent first is still on its way
        assert _republished(controller, client, probe_back=False) == []
        now[0] += publishing.BEHIND_GRACE
    probe = controller.context.publisher._probe
    assert probe is not None and probe[1] == 1000.0  # not sent again before PROBE_LOST
    controller.handle(topics.PROBE, b"forged")  # a token that is not ours changes nothing
    assert _republished(controller, client, probe_back=False) == []
    now[0] += publishing.PROBE_LOST + 1  # lost: sent again, and this one comes back
    assert _republished(controller, client) == []  # it comes back after this check
    now[0] += publishing.BEHIND_CHECK
    assert _republished(controller, client) == [
        topics.stack(spec_hash),
        topics.device("d-1", DeviceTopic.DESIRED),
    ]
    store.close()


def test_reports_of_a_batch_are_stored_once_per_device_newest_first(tmp_path: Path) -> None:
    """Within one batch a device's reports are written together, the newest kept; an older
    report arriving after a newer one (QoS 1 redelivery) never overwrites it."""
    store = Store(tmp_path / "tether.db")
    controller = Controller(store)
    controller.leading.set()
    for device_id in ("d-1", "d-2"):
        controller._ingest(*queued(*reported(device_id, 1)))  # a first report creates the device's row
    writes: list[list[str]] = []
    put_many = store.put_reported_many

    def recording(items: Any) -> None:
        items = list(items)
        writes.append([f"{d}@{r.generation}" for d, r in items])
        put_many(items)

    store.put_reported_many = recording  # type: ignore[method-assign]
    for message in (reported("d-1", 3), reported("d-1", 2), reported("d-2", 5)):
        controller.inbox.put(message)
    assert controller._ingest(*queued(*reported("d-1", 2))) is None
    assert writes == [["d-1@3", "d-2@5"]]
    assert {d.id: d.reported.generation for d in store.list_devices() if d.reported} == {"d-1": 3, "d-2": 5}
    store.close()


@pytest.mark.store
def test_a_message_failing_midway_undoes_only_itself_in_its_batch(
    store_target: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A message whose handling fails after it wrote (here once its event is stored: a job's
    result, stored as it comes) leaves no row and no fleet event; the messages before it in
    the batch (their writes undone with the batch's savepoint and written again) and after
    it count, each once."""
    store = Store(store_target)
    controller = Controller(store)
    controller.leading.set()
    add_event = store.add_event

    def failing(device_id: str, seq: int, body: str) -> bool:
        added = add_event(device_id, seq, body)
        if device_id == "d-1":
            raise RuntimeError("injected failure")
        return added

    store.add_event = failing  # type: ignore[method-assign]

    def presence(device_id: str) -> tuple[str, bytes]:
        return topics.device(device_id, DeviceTopic.PRESENCE), codec.encode(
            Presence(device_id=device_id, status="online", session=1)
        )

    def event(device_id: str, seq: int, kind: str = "desired.applied") -> tuple[str, bytes]:
        return topics.device(device_id, DeviceTopic.EVENTS), codec.encode(
            Event(device_id=device_id, seq=seq, kind=kind, message="applied", oldest=seq)
        )

    for message in (
        presence("d-1"),
        event("d-0", 1),
        event("d-1", 1, "job.result"),
        presence("d-2"),
        event("d-2", 1),
    ):
        controller.inbox.put(message)
    assert controller._ingest(*queued(*presence("d-0"))) is None
    assert [d.id for d in store.list_devices()] == ["d-0", "d-1", "d-2"]
    assert {d: len(store.list_events(d)) for d in ("d-0", "d-1", "d-2")} == {"d-0": 1, "d-1": 0, "d-2": 1}
    assert sorted((e.kind, e.subject) for e in controller.context.events.due) == [
        ("device.online", f"devices/{d}") for d in ("d-0", "d-1", "d-2")
    ]
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"failed to handle a message on {topics.device('d-1', DeviceTopic.EVENTS)}"
    ]
    store.close()


@pytest.mark.store
def test_a_batchs_events_are_stored_together_each_once(
    store_target: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Events of a batch (stored together when it ends) are stored once each and logged the
    first time only: one already stored, one twice in the batch; more than one statement's
    worth of a device's events leave its newest EVENTS_KEPT."""
    store = Store(store_target)
    controller = Controller(store)
    controller.leading.set()

    def event(device_id: str, seq: int) -> tuple[str, bytes]:
        return topics.device(device_id, DeviceTopic.EVENTS), codec.encode(
            Event(device_id=device_id, seq=seq, kind="note", message=f"m{seq}", oldest=seq)
        )

    assert controller._ingest(*queued(*event("d-0", 1))) is None
    caplog.clear()
    caplog.set_level("DEBUG", logger="tether.controller.ingesting")
    for message in (
        event("d-0", 1),
        event("d-0", 2),
        event("d-0", 2),
        *(event("d-1", s) for s in range(1, 301)),
    ):
        controller.inbox.put(message)
    assert controller._ingest(*queued(*event("d-0", 3))) is None
    assert [json.loads(b)["seq"] for b in store.list_events("d-0")] == [1, 2, 3]
    assert [json.loads(b)["seq"] for b in store.list_events("d-1", 1000)] == list(range(101, 301))
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("device d-")]
    assert sorted(logged) == sorted(
        ["device d-0: note: m2", "device d-0: note: m3", *(f"device d-1: note: m{s}" for s in range(1, 301))]
    )
    store.close()


@pytest.mark.store
def test_a_fresh_controller_reads_stored_events_of_a_batchs_devices_at_once(store_target: str) -> None:
    """A controller started on a store holding events learns what is stored of the devices
    whose events a batch brings in one read (not one query per device), and acknowledges
    each device as the events stored say: up to the first gap above its oldest."""
    store = Store(store_target)
    store.add_events([("d-0", 1, "{}"), ("d-0", 2, "{}"), ("d-0", 4, "{}"), ("d-1", 5, "{}")])
    controller = Controller(store)
    controller.leading.set()
    client = PublishingClient()
    controller.client = client  # type: ignore[assignment]
    reads: list[dict[str, int]] = []
    read = store.event_seqs_above_many

    def counted(bounds: Mapping[str, int]) -> dict[str, list[int]]:
        reads.append(dict(bounds))
        return read(bounds)

    store.event_seqs_above_many = counted  # type: ignore[method-assign]
    store.event_seqs_above = None  # type: ignore[assignment,method-assign]  # never device by device
    for message in (event("d-0", 3, 1), event("d-1", 6, 6), event("d-2", 2, 1), event("d-2", 3, 1)):
        controller.inbox.put(message)
    assert controller._ingest(*queued(*event("d-3", 1, 1))) is None
    assert reads == [{"d-0": 0, "d-1": 5, "d-2": 0, "d-3": 0}]
    controller.publish_acks()
    acks = {
        a.device_id: (a.seq, a.last)
        for a in (codec.decode(p, EventsAcked) for t, p, q, r in client.published if t.endswith("/acked"))
    }
    assert acks == {"d-0": (4, 4), "d-1": (6, 6), "d-2": (0, 3), "d-3": (1, 1)}
    controller.handle(*event("d-2", 1, 1))  # known now: nothing read again
    assert len(reads) == 1
    store.close()


def test_a_broken_batch_takes_nothing_more_off_the_inbox(store_target: str) -> None:
    """Once a batch's writes cannot be restored (the database failing the replay), the batch
    stops taking messages: the ones after the failing message stay queued and count next."""
    store = Store(store_target)
    controller = Controller(store)
    controller.leading.set()
    add_event = store.add_event
    fail = True

    def failing(device_id: str, seq: int, body: str) -> bool:
        if fail and device_id == "d-1":
            # The batch's savepoint vanishes under it: rolling back to it (the replay) fails.
            store.db.db.execute("RELEASE SAVEPOINT tether_batch")
            raise RuntimeError("injected failure")
        return add_event(device_id, seq, body)

    store.add_event = failing  # type: ignore[method-assign]

    def event(device_id: str) -> tuple[str, bytes]:  # a job's result: stored as it comes
        return topics.device(device_id, DeviceTopic.EVENTS), codec.encode(
            Event(device_id=device_id, seq=1, kind="job.result", message="applied", oldest=1)
        )

    after = [reported(f"d-{i}", 1) for i in range(2, 12)]
    for message in (event("d-1"), *after):
        controller.inbox.put(message)
    with pytest.raises(Exception):  # noqa: B017 (the database's own error, whichever the store's)
        controller._ingest(*queued(*reported("d-0", 1)))
    assert controller.inbox.qsize() == len(after)
    fail = False
    assert controller._ingest(*controller.inbox.get_nowait()) is None
    assert controller.inbox.empty()
    assert sorted(d.id for d in store.list_devices() if d.reported) == sorted(f"d-{i}" for i in range(2, 12))
    store.close()


def test_an_event_whose_handling_failed_is_not_acknowledged(tmp_path: Path) -> None:
    """An event noted stored, then undone because its handling failed later in its batch
    (here its job result), is not acknowledged: the device keeps it and sends it again. The
    event before it, in the same batch, is acknowledged once committed."""
    store = Store(tmp_path / "tether.db")
    controller = Controller(store)
    controller.leading.set()
    client = PublishingClient()
    controller.client = client  # type: ignore[assignment]

    def failing(device_id: str, data: dict[str, Any]) -> None:
        raise RuntimeError("injected failure")

    controller.ingestor._on_job_result = failing  # type: ignore[method-assign]
    failed = Event(device_id="d-1", seq=2, kind="job.result", message="done", data={"job": "j"}, oldest=1)
    controller.inbox.put((topics.device("d-1", DeviceTopic.EVENTS), codec.encode(failed)))
    assert controller._ingest(*queued(*event("d-1", 1, 1))) is None
    assert [json.loads(b)["seq"] for b in store.list_events("d-1")] == [1]
    controller.publish_acks()
    acks = [codec.decode(p, EventsAcked) for t, p, q, r in client.published if t.endswith("/acked")]
    assert [(a.seq, a.last) for a in acks] in ([], [(1, 1)]), "event 2 was not stored"
    controller.handle(*event("d-1", 3, 1))  # the device goes on: the ack shows 2 missing
    client.published.clear()
    controller.publish_acks()
    acks = [codec.decode(p, EventsAcked) for t, p, q, r in client.published if t.endswith("/acked")]
    assert [(a.seq, a.last) for a in acks] == [(1, 3)]
    store.close()


@pytest.mark.store
def test_an_event_failing_in_a_batch_message_undoes_only_itself(store_target: str) -> None:
    """Events in one message (a batch) are each handled as if they came alone: one whose
    handling fails (its job result) is undone and not acknowledged, and the events after it
    in the same message are stored and acknowledged all the same (not left for the device's
    resend probe, 60 s to 15 minutes later)."""
    store = Store(store_target)
    controller = Controller(store)
    controller.leading.set()
    client = PublishingClient()
    controller.client = client  # type: ignore[assignment]

    def failing(device_id: str, data: dict[str, Any]) -> None:
        controller.ingestor._event("job.result", device_id, {"job": "j"})  # emitted, then undone
        raise RuntimeError("injected failure")

    controller.ingestor._on_job_result = failing  # type: ignore[method-assign]
    batch = [
        Event(device_id="d-1", seq=1, kind="k", message="1", oldest=1),
        Event(device_id="d-1", seq=2, kind="job.result", message="done", data={"job": "j"}, oldest=1),
        Event(device_id="d-1", seq=3, kind="k", message="3", oldest=1),
        Event(
            device_id="d-1", seq=4, kind="job.result", message="x" * 5000, oldest=1
        ),  # trimmed: stored at once
    ]
    payload = codec.array([codec.encode(e) for e in batch])
    assert controller._ingest(*queued(topics.device("d-1", DeviceTopic.EVENTS), payload)) is None
    assert [json.loads(b)["seq"] for b in store.list_events("d-1")] == [1, 3, 4]
    assert not [e for e in controller.context.events.due if e.kind == "job.result"]
    controller.publish_acks()
    acks = [codec.decode(p, EventsAcked) for t, p, q, r in client.published if t.endswith("/acked")]
    assert [(a.seq, a.last) for a in acks] == [(1, 4)], "2 is missing: the device sends it again"
    store.close()


@pytest.mark.store
def test_counters_up_to_the_wire_limit_are_stored(store_target: str) -> None:
    """Events with a ``seq`` up to the wire's MAX_COUNTER (2**53 - 1) are stored and
    acknowledged on both backends (PostgreSQL's INTEGER refused them before migration 19:
    the device sent the event again for ever)."""
    store = Store(store_target)
    controller = Controller(store)
    controller.leading.set()
    client = PublishingClient()
    controller.client = client  # type: ignore[assignment]
    big = MAX_COUNTER
    controller.inbox.put(event("d-0", big, big))
    assert controller._ingest(*queued(*event("d-0", big - 1, big - 1))) is None
    assert [json.loads(b)["seq"] for b in store.list_events("d-0")] == [big - 1, big]
    controller.publish_acks()
    acks = [codec.decode(p, EventsAcked) for t, p, q, r in client.published if t.endswith("/acked")]
    assert [(a.seq, a.last) for a in acks] == [(big, big)]
    store.close()


@pytest.mark.store
def test_an_event_the_database_refuses_undoes_nothing_else_of_its_batch(store_target: str) -> None:
    """An event the database refuses (a trigger refusing a ``seq`` of 2**31 and more, as
    PostgreSQL's INTEGER did before migration 19) when a batch's events are stored together
    is neither stored nor acknowledged, as when it was stored alone in its own unit; the
    rest of the batch counts: another device's presence, report and events, and the same
    device's other event."""
    store = Store(store_target)
    if store.kind == "sqlite":
        store.db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.seq > 2147483647 "
            "BEGIN SELECT RAISE(ABORT, 'integer out of range'); END"
        )
    else:
        store.db.execute(
            "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN IF NEW.seq > 2147483647 THEN "
            "RAISE EXCEPTION 'integer out of range'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        store.db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    controller = Controller(store)
    controller.leading.set()
    client = PublishingClient()
    controller.client = client  # type: ignore[assignment]
    presence = (
        topics.device("d-0", DeviceTopic.PRESENCE),
        codec.encode(Presence(device_id="d-0", status="online", session=1)),
    )
    for message in (event("d-0", 1, 1), event("d-1", 2**31, 1), event("d-1", 1, 1), reported("d-0", 1)):
        controller.inbox.put(message)
    assert controller._ingest(*queued(*presence)) is None
    assert [(d.id, d.status) for d in store.list_devices()] == [("d-0", "online")]
    assert [json.loads(b)["seq"] for b in store.list_events("d-0")] == [1]
    assert [json.loads(b)["seq"] for b in store.list_events("d-1")] == [1]
    controller.publish_acks()
    acks = {
        a.device_id: (a.seq, a.last)
        for a in (codec.decode(p, EventsAcked) for t, p, q, r in client.published if t.endswith("/acked"))
    }
    assert acks == {"d-0": (1, 1), "d-1": (1, 1)}
    store.close()
