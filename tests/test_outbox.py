"""The agent's on-disk event outbox: bounded, oldest dropped and counted, kept until acknowledged."""

from __future__ import annotations

import queue
import uuid
from pathlib import Path

import pytest
from support.infra import wait_until
from tether.agent import core as core_module
from tether.agent.core import AgentCore
from tether.agent.drivers.fake import FakeDriver
from tether.agent.store import LocalStore, MemoryStore
from tether.broker import EmbeddedBroker
from tether.protocol import codec, topics
from tether.protocol.models import Event, EventsAcked, ReportedState
from tether.protocol.mqtt import BrokerAddress, MqttClient
from tether.protocol.topics import DeviceTopic


def _event(seq: int) -> Event:
    return Event(device_id="d", seq=seq, kind="k", message=str(seq))


def test_bound_drops_the_oldest_and_counts_across_restarts(tmp_path: Path) -> None:
    """Past the bound the oldest events go; the count of dropped events survives a restart."""
    store = LocalStore(tmp_path, outbox_limit=3)
    for seq in range(1, 6):
        store.outbox_put(_event(seq))
    assert [e.seq for e in store.outbox_head(10)] == [3, 4, 5]
    assert store.outbox_dropped() == 2
    again = LocalStore(tmp_path, outbox_limit=3)
    assert [e.seq for e in again.outbox_head(10)] == [3, 4, 5] and again.outbox_dropped() == 2
    again.outbox_ack(4)
    assert [e.seq for e in again.outbox_head(10)] == [3, 5] and again.outbox_size() == 2


class TrackedLink:
    """A link that acknowledges only when told to, like a broker's PUBACK."""

    def __init__(self) -> None:
        self.connected = True
        self.sent: list[tuple[str, bytes]] = []
        self.acks: dict[int, bool] = {}

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        self.sent.append((topic, payload))
        return True

    def publish_tracked(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False):  # type: ignore[no-untyped-def]
        self.sent.append((topic, payload))
        seqs = [e.seq for e in _events(payload)]  # a batch: one PUBACK, once every seq of it is marked
        for seq in seqs:
            self.acks.setdefault(seq, False)
        return lambda: all(self.acks[s] for s in seqs)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        return None

    def unsubscribe(self, topic_filter: str) -> None:
        return None


def _events(payload: bytes) -> list[Event]:
    return codec.decode_many(payload, Event, 1000, "seq")


def _events_sent(link: TrackedLink) -> list[int]:
    return [e.seq for t, p in link.sent if t.endswith("/events") for e in _events(p)]


def test_events_stay_on_disk_until_acknowledged_and_go_again_after_reconnect(tmp_path: Path) -> None:
    """An unacknowledged event is resent on the next connection; an acknowledged one is forgotten
    (by the broker's PUBACK: a device upgraded from an agent without controller acknowledgements)."""
    (tmp_path / "outbox").mkdir()
    (tmp_path / "outbox" / "state").write_text('{"seq": 0, "dropped": 0}')
    link = TrackedLink()
    core = AgentCore("d", {}, FakeDriver("d"), LocalStore(tmp_path), link)
    core.event("one", "first")
    core.flush_events()
    core.event("two", "second")
    core.flush_events()
    assert _events_sent(link) == [1, 2] and len(link.sent) == 2
    link.acks[1] = True
    core.flush_events()
    assert [e.seq for e in core.store.outbox_head(10)] == [2]  # 1 acknowledged, 2 still on disk
    # A new process (power cut) or a reconnect: what was not acknowledged goes again.
    restarted = AgentCore("d", {}, FakeDriver("d"), LocalStore(tmp_path), link)
    link.sent.clear()
    restarted.on_connected()
    assert _events_sent(link) == [2]


def test_dropped_events_are_reported(tmp_path: Path) -> None:
    """The reported state carries how many events the bounded outbox dropped."""
    link = TrackedLink()
    link.connected = False
    core = AgentCore("d", {}, FakeDriver("d"), LocalStore(tmp_path, outbox_limit=2), link)
    for i in range(5):
        core.event("k", str(i))
    link.connected = True
    core.reconcile_once()
    reported = [codec.decode(p, ReportedState) for t, p in link.sent if t.endswith("/reported")]
    assert reported and reported[-1].events_dropped == 3


def _ack(core: AgentCore, seq: int, last: int = 0, resend: bool = False) -> None:
    payload = codec.encode(EventsAcked(device_id="d", seq=seq, last=last, resend=resend))
    core.handle(topics.device("d", DeviceTopic.ACKED), payload)


def test_after_a_first_controller_acknowledgement_events_stay_until_the_controller_has_them(
    tmp_path: Path,
) -> None:
    """On a device upgraded from an agent without acknowledgements the broker's PUBACK frees
    an event until the controller's first acknowledgement; from then on an event stays
    queued (across a restart too) until an acknowledgement covers it; each event tells the
    oldest one still queued."""
    (tmp_path / "outbox").mkdir()
    (tmp_path / "outbox" / "state").write_text('{"seq": 0, "dropped": 0}')  # an older agent's
    link = TrackedLink()
    core = AgentCore("d", {}, FakeDriver("d"), LocalStore(tmp_path), link)
    core.event("one", "first")
    core.flush_events()
    link.acks[1] = True
    core.flush_events()
    assert core.store.outbox_size() == 0  # no acknowledgement seen yet: the PUBACK counts
    _ack(core, 1, last=1)
    core.event("two", "second")
    core.event("three", "third")
    core.flush_events()  # one message: [2, 3]
    link.acks.update({2: True, 3: True})
    core.flush_events()
    assert [e.seq for e in core.store.outbox_head(10)] == [2, 3]  # the broker has them; we wait
    assert [e.oldest for t, p in link.sent if t.endswith("/events") for e in _events(p)] == [1, 2, 2]
    _ack(core, 2, last=2)
    assert [e.seq for e in core.store.outbox_head(10)] == [3]
    restarted = AgentCore("d", {}, FakeDriver("d"), LocalStore(tmp_path), link)
    assert restarted.store.events_acked() == 2 and restarted.store.outbox_size() == 1


def test_an_event_the_controller_missed_is_sent_again_at_once(tmp_path: Path) -> None:
    """An acknowledgement that stops below an event it saw stored after (a gap), or one that
    asks to resend, sends the delivered but unacknowledged events again; an acknowledgement
    of events this device never numbered (a previous installation) is ignored."""
    link = TrackedLink()
    core = AgentCore("d", {}, FakeDriver("d"), LocalStore(tmp_path), link)
    _ack(core, 0)
    for kind in ("one", "two", "three"):
        core.event(kind, kind)
        core.flush_events()
    link.acks.update({1: True, 2: True, 3: True})
    core.flush_events()
    link.sent.clear()
    _ack(core, 1, last=3)  # 2 was lost on the way (3 arrived)
    assert _events_sent(link) == [2]
    link.acks[2] = False  # its new copy is in flight
    link.sent.clear()
    _ack(core, 1, last=3, resend=True)  # the controller was away: 3 may be lost too
    assert _events_sent(link) == [3]
    _ack(core, 99, last=99)  # not ours
    assert [e.seq for e in core.store.outbox_head(10)] == [2, 3]
    _ack(core, 3, last=3)
    assert core.store.outbox_size() == 0


def test_an_event_of_a_batch_the_controller_missed_goes_again_at_once_without_a_flush_between(
    tmp_path: Path,
) -> None:
    """The controller's acknowledgement usually comes before the agent's next flush: the
    runner's loop waits on its inbox right after publishing a batch, and the broker's PUBACK
    (the batch's, on the client's thread) is not looked at until a flush. An acknowledgement
    showing an event of that batch lost (stored around it: the controller undoes a failing
    event of a batch alone) still sends it again at once, not after RESEND_AFTER."""
    link = TrackedLink()
    core = AgentCore("d", {}, FakeDriver("d"), LocalStore(tmp_path), link)
    _ack(core, 0)
    for kind in ("one", "two", "three"):
        core.event(kind, kind)
    core.flush_events()  # one message: [1, 2, 3]
    link.acks.update({1: True, 2: True, 3: True})  # its PUBACK; no flush since
    link.sent.clear()
    _ack(core, 1, last=3)  # 2 was not stored
    assert _events_sent(link) == [2]
    core.event("four", "four")
    core.flush_events()  # [4]
    link.acks.update({2: True, 4: True})
    link.sent.clear()
    _ack(core, 1, last=4, resend=True)  # the controller was away: all that seq does not cover
    assert _events_sent(link) == [2, 3, 4]


def test_a_lost_event_of_a_batch_goes_again_at_once_through_a_real_broker() -> None:
    """The same through the embedded broker, in the order the runner sees it: a batch is
    published, the broker acknowledges it, and the controller's acknowledgement (showing
    event 2 not stored) is the next message the agent handles, with no flush between."""
    broker = EmbeddedBroker("127.0.0.1", 0)
    port = broker.start()
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    events: list[int] = []
    device = f"d-{uuid.uuid4().hex[:8]}"
    agent = MqttClient(
        [BrokerAddress("127.0.0.1", port)], device, on_message=lambda t, p, r: inbox.put((t, p))
    )
    controller = MqttClient(
        [BrokerAddress("127.0.0.1", port)],
        f"c-{uuid.uuid4().hex[:8]}",
        on_message=lambda t, p, r: (
            probes.append(p) if p == b"probe" else events.extend(e.seq for e in _events(p))
        ),
    )
    probes: list[bytes] = []
    try:
        core = AgentCore(device, {}, FakeDriver(device), MemoryStore(), agent)
        agent.subscribe(topics.device(device, DeviceTopic.ACKED))
        controller.subscribe(topics.device(device, DeviceTopic.EVENTS))
        agent.connect(10)
        controller.connect(10)

        # The controller's subscription in force before the batch goes (another connection's
        # SUBSCRIBE may be handled after it: the batch would then reach nobody).
        def probed() -> bool:
            controller.publish(topics.device(device, DeviceTopic.EVENTS), b"probe", qos=0)
            return bool(probes)

        wait_until(probed, 10)
        for kind in ("one", "two", "three"):
            core.event(kind, kind)
        core.flush_events()  # one message: [1, 2, 3]
        wait_until(lambda: events == [1, 2, 3], 10)
        wait_until(lambda: all(check() for check in core._inflight.values()), 10)  # its PUBACK
        acked = EventsAcked(device_id=device, seq=1, last=3)
        assert controller.publish(topics.device(device, DeviceTopic.ACKED), codec.encode(acked))
        core.handle(*inbox.get(timeout=10))
        wait_until(lambda: events[3:] == [2], 10)
    finally:
        agent.stop()
        controller.stop()
        broker.stop()


def test_unacknowledged_events_go_again_after_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While no acknowledgement covers delivered events, the newest is sent again after
    RESEND_AFTER, then after twice as long; the acknowledgement it brings back shows the
    older ones lost, and they go again at once."""
    now = [1000.0]
    monkeypatch.setattr(core_module.time, "monotonic", lambda: now[0])
    link = TrackedLink()
    core = AgentCore("d", {}, FakeDriver("d"), LocalStore(tmp_path), link)
    for kind in ("one", "two", "three"):
        core.event(kind, kind)
        core.flush_events()
    link.acks.update({1: True, 2: True, 3: True})
    core.flush_events()
    core.flush_events()
    link.sent.clear()
    now[0] += core_module.RESEND_AFTER - 1
    core.flush_events()
    assert _events_sent(link) == []
    now[0] += 1
    core.flush_events()  # the newest goes again ...
    core.flush_events()  # ... and is delivered again
    assert _events_sent(link) == [3]
    link.sent.clear()
    now[0] += core_module.RESEND_AFTER
    core.flush_events()
    assert _events_sent(link) == []  # the wait doubled
    now[0] += core_module.RESEND_AFTER
    core.flush_events()
    assert _events_sent(link) == [3]
    link.sent.clear()
    _ack(core, 0, last=3)  # the controller has only 3: 1 and 2 were lost
    assert _events_sent(link) == [1, 2]


def test_a_new_device_keeps_its_first_events_until_the_controller_has_them(tmp_path: Path) -> None:
    """A fresh data directory expects the controller's acknowledgements from the first event
    on: the broker's PUBACK does not free an event even before any acknowledgement arrived."""
    link = TrackedLink()
    core = AgentCore("d", {}, FakeDriver("d"), LocalStore(tmp_path), link)
    core.event("one", "first")
    core.flush_events()
    link.acks[1] = True
    core.flush_events()
    assert [e.seq for e in core.store.outbox_head(10)] == [1]
    _ack(core, 1, last=1)
    assert core.store.outbox_size() == 0


def test_events_dropped_by_the_bound_do_not_hold_back_newer_ones(tmp_path: Path) -> None:
    """Delivered events the full outbox drops before any acknowledgement covers them stop
    counting as sent: newer events still go out."""
    link = TrackedLink()
    core = AgentCore("d", {}, FakeDriver("d"), LocalStore(tmp_path, outbox_limit=3), link)
    for i in range(3):
        core.event("k", str(i))
    core.flush_events()
    link.acks.update({1: True, 2: True, 3: True})
    core.flush_events()  # all three delivered, none acknowledged by the controller
    link.connected = False
    for i in range(3):
        core.event("k", str(i))  # 4, 5, 6 push 1, 2, 3 out
    link.connected = True
    link.sent.clear()
    core.flush_events()
    assert _events_sent(link) == [4, 5, 6]


def test_a_backlog_goes_in_a_few_bounded_batches(tmp_path: Path) -> None:
    """A full outbox (1,000 events queued offline) goes out on connecting in batches of
    EVENT_BATCH, oldest first, each seq once, at most BATCHES_IN_FLIGHT messages awaiting
    the broker's PUBACK; one PUBACK (a batch's) lets the next go; an event larger than
    EVENT_BATCH_BYTES goes alone, smaller ones fill a batch up to that many bytes."""
    link = TrackedLink()
    link.connected = False
    core = AgentCore("d", {}, FakeDriver("d"), MemoryStore(), link)  # (LocalStore: 1,000 fsyncs)
    for i in range(1000):
        core.event("k", str(i))
    assert link.sent == []
    link.connected = True
    core.on_connected()
    batches = [[e.seq for e in _events(p)] for t, p in link.sent if t.endswith("/events")]
    assert len(batches) == core_module.BATCHES_IN_FLIGHT == 10
    assert [s for b in batches for s in b] == list(range(1, 1001))
    assert {len(b) for b in batches} == {core_module.EVENT_BATCH}
    link.sent.clear()
    core.event("k", "x" * core_module.EVENT_BATCH_BYTES)  # 1001: too big to share a message
    core.event("k", "y" * (core_module.EVENT_BATCH_BYTES // 3))  # 1002, 1003: together
    core.event("k", "z" * (core_module.EVENT_BATCH_BYTES // 3))
    core.flush_events()
    assert _events_sent(link) == []  # ten batches await the broker
    link.acks.update({s: True for s in batches[0]})
    core.flush_events()
    assert [[e.seq for e in _events(p)] for _, p in link.sent] == [[1001]]  # one batch's room
    link.acks.update({s: True for s in batches[1]})
    core.flush_events()
    assert [[e.seq for e in _events(p)] for _, p in link.sent] == [[1001], [1002, 1003]]
    assert all(len(p) < core_module.EVENT_BATCH_BYTES for _, p in link.sent[1:])
