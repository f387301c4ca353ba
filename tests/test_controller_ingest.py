"""The controller's worker takes device reports in batches: one store transaction per burst.

No broker here: the messages are put on the controller's inbox as its MQTT thread would,
and the worker's batching (:meth:`Controller._ingest`) runs on a real SQLite store.
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
from support.links import RecordingLink
from tether.controller.service import INGEST_BATCH, Controller
from tether.controller.store import Store
from tether.protocol import codec, topics
from tether.protocol.models import Presence, Reply, ReportedState, Request
from tether.protocol.topics import DeviceTopic


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
    following = controller._ingest(*messages[0])
    while following is None and not controller.inbox.empty():
        following = controller._ingest(*controller.inbox.get_nowait())
    assert following is None
    assert controller.inbox.empty()
    assert {d.id: d.reported.generation for d in store.list_devices() if d.reported} == {
        f"d-{i}": 1 for i in range(n)
    }
    store.close()


def test_a_bad_message_in_a_batch_leaves_no_trace_and_the_rest_count(tmp_path: Path) -> None:
    """A malformed report is dropped alone; a presence message ends the batch and comes back in order."""
    store = Store(tmp_path / "tether.db")
    controller = Controller(store)
    controller.leading.set()
    presence = (
        topics.device("d-2", DeviceTopic.PRESENCE),
        codec.encode(Presence(device_id="d-2", status="online", session=1)),
    )
    controller.inbox.put((topics.device("d-1", DeviceTopic.REPORTED), b"\xc1 not msgpack"))
    controller.inbox.put(reported("d-1", 4))
    controller.inbox.put(presence)
    controller.inbox.put(reported("d-3", 1))
    following = controller._ingest(*reported("d-0", 2))
    assert following == presence
    assert {d.id: d.reported.generation for d in store.list_devices() if d.reported} == {"d-0": 2, "d-1": 4}
    assert controller.inbox.get_nowait() == reported("d-3", 1)
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
    assert controller._ingest(topics.device("d-1", DeviceTopic.REPORTED), forged) is None
    assert controller._ingest(topics.device("d-1", DeviceTopic.PRESENCE), forged_presence) is None
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
    controller = Controller(store)
    controller.leading.set()
    link = RecordingLink()
    controller.client = link  # type: ignore[assignment]
    monkeypatch.setattr(controller, "execute", lambda command: {"blob": "x" * codec.MAX_PAYLOAD})
    reply_to = topics.replies("tether-cli-1")
    controller._on_request(codec.encode(Request(id="r1", reply_to=reply_to, command={"kind": "devices.ls"})))
    [(topic, payload)] = link.published
    reply = codec.decode(payload, Reply)
    assert topic == reply_to and not reply.ok and reply.error is not None and "exceeds" in reply.error
    assert len(payload) < 1024
    store.close()
