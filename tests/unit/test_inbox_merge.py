"""The controller's inbox merges a device's outdated presence and report into its newer one
(controller/inbox.py): pure rules, and handling what it gives against handling every message."""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.recording import Clock, RecordingPublisher
from tether.controller.inbox import Inbox, merged, message, supersedes, topic_of
from tether.controller.service import Controller
from tether.controller.store import Store
from tether.controller.variables import SecretsKey
from tether.protocol import codec, topics
from tether.protocol.models import DeviceFacts, Event, Presence, ReportedState, StackStatus
from tether.protocol.topics import DeviceTopic

FACTS = [
    DeviceFacts(agent_version="1", driver="docker", arch="amd64", os="linux", labels={"site": "a"}),
    DeviceFacts(agent_version="1", driver="docker", arch="amd64", os="linux", labels={"site": "b"}),
]
STACKS: list[dict[str, StackStatus]] = [
    {},
    {"app": StackStatus(spec_hash="a" * 12, state="converging")},
    {"app": StackStatus(spec_hash="a" * 12, state="running")},
    {"app": StackStatus(spec_hash="b" * 12, state="failed")},
]


def presence(
    device: str, status: str, session: int, facts: int | None = 0, at: float = 1.0
) -> tuple[str, bytes]:
    message = Presence(
        device_id=device,
        status=status,  # type: ignore[arg-type]
        session=session,
        facts=None if facts is None else FACTS[facts],
        at=at,
    )
    return topics.device(device, DeviceTopic.PRESENCE), codec.encode(message)


def report(device: str, generation: int, stacks: int = 2, at: float = 1.0) -> tuple[str, bytes]:
    message = ReportedState(device_id=device, generation=generation, stacks=STACKS[stacks], at=at)
    return topics.device(device, DeviceTopic.REPORTED), codec.encode(message)


def event(device: str, seq: int) -> tuple[str, bytes]:
    message = Event(device_id=device, seq=seq, kind="stack.started", message=f"event {seq}")
    return topics.device(device, DeviceTopic.EVENTS), codec.encode(message)


def _with(message: tuple[str, bytes], **fields: Any) -> tuple[str, bytes]:
    raw = msgpack.unpackb(message[1])
    raw.update(fields)
    return message[0], msgpack.packb(raw)


def test_a_reconnection_merges_into_one_presence_and_one_report_per_device() -> None:
    """The storm's case: the stale retained presence and report, then the new ones: one of each is kept,
    the newest, in the first one's place; another device's messages and events keep theirs."""
    stale, new = presence("d1", "online", 3, at=1.0), presence("d1", "online", 4, at=9.0)
    old_report, new_report = report("d1", 2, at=1.0), report("d1", 2, at=9.0)
    other = presence("d2", "online", 1)
    got = merged([stale, old_report, other, event("d1", 5), new, new_report, event("d1", 6)])
    assert got == [new, new_report, other, event("d1", 5), event("d1", 6)]


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        (presence("d1", "online", 3), presence("d1", "offline", 4)),  # a status change is never skipped
        (presence("d1", "offline", 3), presence("d1", "online", 4)),
        (presence("d1", "online", 4), presence("d1", "online", 3)),  # older session: not newer
        (presence("d1", "online", 3, facts=0), presence("d1", "online", 4, facts=1)),  # new labels
        (presence("d1", "online", 3, facts=0), presence("d1", "online", 4, facts=None)),  # facts kept
        (presence("d1", "online", 3), _with(presence("d1", "online", 4), at="soon")),  # invalid at
        (presence("d1", "online", 3), _with(presence("d1", "online", 4), session=2**60)),  # past the bound
        (presence("d1", "online", 3), _with(presence("d1", "online", 4), session=True)),
        (presence("d1", "online", 3), (presence("d1", "online", 4)[0], b"\xc1 not msgpack")),
        (report("d1", 2), report("d1", 3)),  # another generation
        (report("d1", 2, stacks=1), report("d1", 2, stacks=2)),  # converging, then running: an event each
        (report("d1", 2), _with(report("d1", 2), at=float("nan"))),
        (event("d1", 5), event("d1", 5)),  # events are history, even sent twice
    ],
)
def test_what_handling_the_later_alone_would_change_is_never_merged(
    earlier: tuple[str, bytes], later: tuple[str, bytes]
) -> None:
    """A later message whose handling alone would differ from handling both keeps its own place."""
    kind = earlier[0].rpartition("/")[2]
    assert not supersedes(kind, earlier[1], later[1])
    assert merged([earlier, later]) == [earlier, later]


def test_a_message_taken_by_the_worker_no_longer_takes_later_ones() -> None:
    """Once the worker took a presence, the next one of that device is queued, not merged into it;
    merged messages are counted by kind."""
    counted: list[str] = []
    inbox = Inbox(on_merged=counted.append)
    first, second, third = (presence("d1", "online", s) for s in (1, 2, 3))
    inbox.put(first)
    assert inbox.get_nowait() == message(*first)
    inbox.put(second)
    inbox.put(third)
    assert inbox.qsize() == 1
    assert inbox.get(timeout=0) == message(*third)
    assert inbox.empty() and counted == ["presence"]


def test_a_waiting_message_keeps_no_topic_string() -> None:
    """A device's message waits as its interned id, kind and payload (the topic string, 80 bytes,
    is not kept); any other topic, and a device topic the controller would not parse, as is."""
    inbox = Inbox()
    topic = "".join(["tether/v1/devices/", "d7", "/events"])  # a fresh string, as received
    inbox.put((topic, b"e"))
    device_id, kind, payload = inbox.get_nowait()
    assert (device_id, kind, payload) == ("d7", DeviceTopic.EVENTS, b"e")
    assert device_id is sys.intern("d7") and topic_of((device_id, kind, payload)) == topic
    for other in (topics.REQUESTS, "tether/v1/devices/bad id/presence", "tether/v1/devices/d7/presence/x"):
        assert message(other, b"x") == (other, None, b"x")
        assert topic_of(message(other, b"x")) == other


# --- handling what the inbox gives against handling every message (a real store and controller) ---

DEVICES = ("d1", "d2")
TAKE = ("take", b"")
_message = st.one_of(
    st.builds(
        presence,
        st.sampled_from(DEVICES),
        st.sampled_from(["online", "offline"]),
        st.integers(0, 3),
        st.sampled_from([0, 1, None]),
        st.sampled_from([1.0, 2.0]),
    ),
    st.builds(
        report, st.sampled_from(DEVICES), st.integers(0, 2), st.integers(0, 3), st.sampled_from([1.0, 2.0])
    ),
    st.builds(event, st.sampled_from(DEVICES), st.integers(1, 4)),
    st.builds(
        lambda m: _with(m, device_id="d2"),
        st.builds(presence, st.just("d1"), st.just("online"), st.integers(0, 3)),
    ),
    st.sampled_from(
        [
            (topics.device("d1", DeviceTopic.PRESENCE), b"\xc1"),
            (topics.device("d2", DeviceTopic.REPORTED), b"\x90"),
        ]
    ),
)


def _handled(path: Path, messages: list[tuple[str, bytes]]) -> dict[str, Any]:
    """What a leading controller on a fresh store keeps and emits after handling ``messages`` in order."""
    store = Store(path / "tether.db")
    try:
        controller = Controller(store, clock=Clock(), secrets=SecretsKey.load_or_create(path))
        controller.client = RecordingPublisher()  # type: ignore[assignment]
        controller.leading.set()
        listener = controller.bus.subscribe(maxsize=10_000)
        for topic, payload in messages:
            controller.handle(topic, payload)
        devices = {}
        for device_id in DEVICES:
            device = store.get_device(device_id)
            devices[device_id] = None if device is None else device.model_dump()
        return {
            "devices": devices,
            "events": {d: store.list_events(d, limit=100) for d in DEVICES},
            "fleet": [(e.kind, e.subject, e.data) for e in listener.drain()],
        }
    finally:
        store.close()


_PRESENCE = ("device.online", "device.offline")


def _presence_sessions(fleet: list[tuple[str, str, dict[str, Any]]]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (k, s, {n: v for n, v in d.items() if n != "session"} if k in _PRESENCE else d) for k, s, d in fleet
    ]


def _taken(inbox: Inbox) -> tuple[str, bytes]:
    """The next message the worker takes, as received (topic, payload)."""
    entry = inbox.get_nowait()
    return topic_of(entry), entry[2]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_message, st.just(TAKE)), max_size=24))
def test_handling_what_the_inbox_gives_ends_as_handling_every_message(ops: list[tuple[str, bytes]]) -> None:
    """Whatever the messages and whenever the worker takes one, handling what the inbox gives leaves
    the same devices, stored events and fleet events as handling every message; a presence change
    merged into a newer one of the same status names the newer session."""
    every = [m for m in ops if m != TAKE]
    inbox, given_ = Inbox(), []
    for op in ops:
        if op == TAKE:
            if not inbox.empty():
                given_.append(_taken(inbox))
        else:
            inbox.put(op)
    while not inbox.empty():
        given_.append(_taken(inbox))
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        want, got = _handled(Path(a), every), _handled(Path(b), given_)
    assert got["devices"] == want["devices"]
    assert got["events"] == want["events"]
    assert _presence_sessions(got["fleet"]) == _presence_sessions(want["fleet"])
    for (kind, _, mine), (_, _, theirs) in zip(got["fleet"], want["fleet"], strict=True):
        if kind in _PRESENCE:
            assert mine["session"] >= theirs["session"]


def test_the_inbox_is_safe_across_threads() -> None:
    """Puts from one thread while the worker takes: every event arrives, in order, and each device's
    last presence is the last one taken of it."""
    inbox = Inbox()
    sent = []
    for i in range(2000):
        sent.append(presence(f"d{i % 50}", "online", i // 50))
        sent.append(event(f"d{i % 50}", i + 1))

    def put() -> None:
        for sent_message in sent:
            inbox.put(sent_message)

    putter = threading.Thread(target=put)
    putter.start()
    taken: list[tuple[str, bytes]] = []
    while putter.is_alive() or not inbox.empty():
        if not inbox.empty():
            taken.append(_taken(inbox))
    putter.join()
    assert [m for m in taken if m[0].endswith("/events")] == [m for m in sent if m[0].endswith("/events")]
    for i in range(50):
        mine = [m for m in taken if m[0] == topics.device(f"d{i}", DeviceTopic.PRESENCE)]
        assert mine[-1] == presence(f"d{i}", "online", 39)
