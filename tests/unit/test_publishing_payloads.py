"""Desired states and event acknowledgements made from a shared template (controller/publishing.py,
codec.Template): byte for byte what encoding each model gives."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pydantic import ValidationError
from support.recording import RecordingPublisher
from tether.controller.models import DesiredRecord
from tether.controller.publishing import _desired_payload
from tether.controller.service import Controller
from tether.controller.store import Store
from tether.protocol import codec, topics
from tether.protocol.models import (
    MAX_COUNTER,
    DesiredState,
    Event,
    EventsAcked,
    JobSpec,
    RegistryAuth,
    StackRef,
    VarBinding,
)
from tether.protocol.topics import DeviceTopic


def _state(record: DesiredRecord, now: float) -> bytes:
    return codec.encode(
        DesiredState(
            device_id=record.device_id,
            generation=record.generation,
            stacks=record.stacks,
            jobs=record.jobs,
            vars=record.vars,
            registries=record.registries,
            stage=record.stage,
            issued_at=now,
        )
    )


def test_template_payloads_equal_each_encoded_desired_state() -> None:
    """Records sharing stacks, jobs, variables, registries and stage (or not; set or left out
    of the map while empty), with ids of every length class and generations up to the bound,
    give the bytes of their own encoded DesiredState."""
    rng = random.Random(21)
    one = (StackRef(name="app", spec_hash="a" * 64),)
    two = (StackRef(name="app", spec_hash="b" * 64), StackRef(name="db", spec_hash="c" * 64))
    jobs = (JobSpec(name="backup", command=("sh", "-c", "true"), every_s=60),)
    bindings = (VarBinding(stack="app", ref="db/password", digest="d" * 16, sealed="c2VhbGVk"),)
    auths = (RegistryAuth(host="registry.example:5000", digest="e" * 16, sealed="YXV0aA=="),)
    shapes = [
        dict(stacks=one),
        dict(stacks=two, jobs=jobs),
        dict(stacks=one, vars=bindings, registries=auths),
        dict(stacks=(), stage=two),
        dict(),
    ]
    ids = ["d", "dev-1", "x" * 31, "y" * 32, "z" * 200, "ü-device"]
    generations = [0, 1, 127, 128, 255, 256, 65_535, 65_536, 2**32, MAX_COUNTER]
    templates: dict[tuple[int, ...], tuple[DesiredRecord, codec.Template]] = {}
    now = 1_765_000_000.123456
    for _ in range(300):
        record = DesiredRecord.model_construct(
            device_id=rng.choice(ids),
            generation=rng.choice(generations),
            published=False,
            **{"stacks": (), "jobs": (), "vars": (), "registries": (), "stage": (), **rng.choice(shapes)},
        )
        assert _desired_payload(record, now, templates) == _state(record, now)
    assert len(templates) == len(shapes)


def test_a_generation_out_of_bounds_is_refused_as_before() -> None:
    """A generation DesiredState refuses is refused with a template at hand too (validated)."""
    templates: dict[tuple[int, ...], tuple[DesiredRecord, codec.Template]] = {}
    stacks = (StackRef(name="app", spec_hash="a" * 64),)
    ok = DesiredRecord(device_id="a", generation=1, stacks=stacks)
    _desired_payload(ok, 1.0, templates)
    for generation in (-1, MAX_COUNTER + 1):
        bad = ok.model_copy(update={"generation": generation})
        with pytest.raises(ValidationError):
            _desired_payload(bad, 1.0, templates)


def test_template_refuses_what_it_cannot_vary_and_values_of_another_type() -> None:
    """A field left out while unset cannot vary, nor a structured one; a value of another type
    than the model's is refused rather than encoded differently from a copy."""
    event = Event(device_id="d", seq=1, kind="k", message="m", at=1.5)
    with pytest.raises(ValueError, match="cannot vary"):
        codec.Template(DesiredState(device_id="d", generation=1), ("vars",))
    with pytest.raises(ValueError, match="not a plain value"):
        codec.Template(DesiredState(device_id="d", generation=1), ("stacks",))
    template = codec.Template(event, ("seq", "at"))
    assert template.encode(7, 2.5) == codec.encode(event.model_copy(update={"seq": 7, "at": 2.5}))
    with pytest.raises(TypeError):
        template.encode(7, 2)  # an int where the model has a float: msgpack would differ


def test_event_acknowledgements_are_the_bytes_of_each_encoded_events_acked(tmp_path: Path) -> None:
    """Acknowledgements of several devices in one pass (made from one template) are byte for
    byte each device's encoded EventsAcked, with its own seq and last."""
    store = Store(tmp_path / "tether.db")
    controller = Controller(store)
    controller.leading.set()
    client = RecordingPublisher()
    controller.client = client  # type: ignore[assignment]
    for device_id, seqs in (("d-1", (1, 2)), ("d-22", (3, 5)), ("dev-333", (1, 2, 3, 200))):
        for seq in seqs:
            body = Event(device_id=device_id, seq=seq, kind="k", message="m", oldest=seqs[0])
            controller.handle(topics.device(device_id, DeviceTopic.EVENTS), codec.encode(body))
    client.published.clear()
    controller.publish_acks()
    acks = [(t, p) for t, p, _ in client.published if t.endswith("/acked")]
    assert len(acks) == 3
    for topic, payload in acks:
        ack = codec.decode(payload, EventsAcked)
        assert topic == topics.device(ack.device_id, DeviceTopic.ACKED)
        assert payload == codec.encode(EventsAcked(device_id=ack.device_id, seq=ack.seq, last=ack.last))
    assert {(a.device_id, a.seq, a.last) for a in (codec.decode(p, EventsAcked) for _, p in acks)} == {
        ("d-1", 2, 2),
        ("d-22", 3, 5),
        ("dev-333", 3, 200),
    }
    store.close()


def _marks_as_before(marks: dict[str, list], stored: list[tuple[str, int, int]]) -> None:  # type: ignore[type-arg]
    """Publisher.note_stored_many's bookkeeping as it was written first (every event through
    the set of seqs above the acknowledged one): what the faster one must keep giving."""
    for device_id, seq, oldest in stored:
        m = marks.setdefault(device_id, [oldest - 1, 0, set()])
        m[0] = max(m[0], oldest - 1)
        m[1] = max(m[1], seq)
        if seq > m[0]:
            m[2].add(seq)
        while m[0] + 1 in m[2]:
            m[0] += 1
        m[2] = {s for s in m[2] if s > m[0]}


def test_event_marks_are_those_of_the_plain_bookkeeping(tmp_path: Path) -> None:
    """In order, repeated, lost and resent events, older agents (oldest 0 is never noted): the
    acknowledged seq, the last and the seqs above of each device are as the plain bookkeeping's."""
    controller = Controller(Store(tmp_path / "tether.db"))
    rng = random.Random(7)
    expected: dict[str, list] = {}  # type: ignore[type-arg]
    for _ in range(300):
        stored = []
        for _ in range(rng.randrange(1, 12)):
            device_id = f"d-{rng.randrange(5)}"
            known = expected.get(device_id, [0, 0, set()])
            seq = max(1, known[0] + rng.choice([-2, 0, 1, 1, 1, 2, 3]))
            oldest = rng.choice([max(1, known[0] + 1), max(1, known[0] + 1), max(1, seq - 2), 1])
            stored.append((device_id, seq, oldest))
        controller.context.publisher.note_stored_many(stored)
        _marks_as_before(expected, stored)
        got = {
            d: [m.acked, m.last, set(m.above)] for d, m in controller.context.publisher._event_marks.items()
        }
        assert got == expected
