"""The agent's on-disk event outbox: bounded, oldest dropped and counted, kept until acknowledged."""

from __future__ import annotations

from pathlib import Path

from tether.agent.core import AgentCore
from tether.agent.drivers.fake import FakeDriver
from tether.agent.store import LocalStore
from tether.protocol import codec
from tether.protocol.models import Event, ReportedState


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
        seq = codec.decode(payload, Event).seq
        self.acks.setdefault(seq, False)
        return lambda: self.acks[seq]

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        return None

    def unsubscribe(self, topic_filter: str) -> None:
        return None


def _events_sent(link: TrackedLink) -> list[int]:
    return [codec.decode(p, Event).seq for t, p in link.sent if t.endswith("/events")]


def test_events_stay_on_disk_until_acknowledged_and_go_again_after_reconnect(tmp_path: Path) -> None:
    """An unacknowledged event is resent on the next connection; an acknowledged one is forgotten."""
    link = TrackedLink()
    core = AgentCore("d", {}, FakeDriver("d"), LocalStore(tmp_path), link)
    core.event("one", "first")
    core.event("two", "second")
    assert _events_sent(link) == [1, 2]
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
