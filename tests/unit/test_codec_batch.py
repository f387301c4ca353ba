"""Batches on the wire (events since issue 21): a msgpack array of encoded maps, framed
without decoding them again, and decoded all or nothing with one error naming the bad item."""

from __future__ import annotations

import random

import msgpack
import pytest
from tether.protocol import codec
from tether.protocol.errors import PayloadError
from tether.protocol.models import Event


@pytest.mark.parametrize("n", [0, 1, 15, 16, 65535, 65536])
def test_array_frames_encoded_items_as_packb_would(n: int) -> None:
    items = list(range(n))
    framed = codec.array([codec.packb(i) for i in items])
    assert framed == codec.packb(items) and codec.is_array(framed)


def _event(seq: int, **kw: object) -> Event:
    return Event(device_id="d", seq=seq, **{"kind": "note", "message": str(seq), **kw})  # type: ignore[arg-type]


def test_decode_many_takes_one_map_or_a_batch_oldest_first() -> None:
    one = codec.encode(_event(1))
    assert not codec.is_array(one)
    assert codec.decode_many(one, Event, 10, "seq") == [_event(1)]
    batch = codec.array([codec.encode(_event(s, oldest=2)) for s in (2, 3, 4)])
    assert [(e.seq, e.oldest) for e in codec.decode_many(batch, Event, 10, "seq")] == [(2, 2), (3, 2), (4, 2)]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (
            codec.array(
                [codec.encode(_event(1)), msgpack.packb({"device_id": "d", "seq": 7, "message": "m"})]
            ),
            "Event batch: item 2 of 2 (seq 7): kind: Field required",
        ),
        (
            codec.array([codec.encode(_event(1)), codec.encode(_event(2)), msgpack.packb(3)]),
            "Event batch: item 3 of 3: expected a map, got int",
        ),
        (codec.array([codec.encode(_event(s)) for s in range(1, 5)]), "4 items, expected 1 to 3"),
        (codec.array([]), "0 items, expected 1 to 3"),
        (b"\x93\x01", "Event batch: not valid msgpack"),
    ],
)
def test_a_bad_batch_is_refused_whole_naming_the_bad_item(payload: bytes, fragment: str) -> None:
    with pytest.raises(PayloadError) as caught:
        codec.decode_many(payload, Event, 3, "seq")
    assert fragment in str(caught.value)


_VARY = ("device_id", "seq", "at", "oldest")
_ODD: dict[str, list[object]] = {
    "device_id": ["d", "e", 7, b"d", None, 'é"\n', "x" * 300],
    "seq": [0, 1, 2, 2**53 - 1, 2**53, -1, 1.0, 1.5, True, "3", None],
    "at": [0.0, 1.5, 1733580000.123, 1e16, 1e-7, float("nan"), float("inf"), 2, True, "1.5", None],
    "oldest": [0, 1, 5, -1, 2.0, False, "1"],
    "kind": ["k", "service.created", "", 1, None],
    "message": ["m", "100% done", "é", b"m"],
    "level": ["info", "warning", "fatal", 1],
    "v": [1, 1.0, True, 0, "1"],
    "data": [None, {"a": 1}, {"a": [1, 2.5e20]}, [1], "x"],
    "spec_hash": [None, "a" * 64, "g" * 64],
    "extra": ["ignored", {"x": 1}],
}


def _odd_item(rng: random.Random) -> object:
    """A map like an event's, often plain, sometimes with odd values or fields missing."""
    if rng.random() < 0.02:
        return rng.choice([1, "x", [1], None])
    item: dict[str, object] = {"device_id": "d", "seq": rng.randrange(0, 50), "kind": "k", "message": "m"}
    if rng.random() < 0.7:
        item["at"] = rng.choice([1.5, 1733580000.123, float(rng.randrange(10**6)) / 7])
    if rng.random() < 0.7:
        item["oldest"] = rng.randrange(1, 5)
    for name, values in _ODD.items():
        if rng.random() < 0.08:
            item[name] = rng.choice(values)
        if rng.random() < 0.03:
            item.pop(name, None)
    return item


def _same(a: Event, b: Event) -> bool:
    """Equal, with values of the same types (pydantic's == takes 1 for 1.0; nan is no nan)."""
    return (
        repr(a) == repr(b)
        and a.model_dump_json() == b.model_dump_json()
        and all(type(getattr(a, f)) is type(getattr(b, f)) for f in Event.model_fields)
    )


def test_batch_memo_decodes_odd_input_as_decode_many_does() -> None:
    """The same items accepted, equal (and dumped alike), the same error for a bad batch: over
    many batches through one memo, so that contents are seen again (and kept ones reused)."""
    rng = random.Random(21)
    derived: list[Event] = []

    def derive(event: Event) -> codec.Template:
        derived.append(event)
        plain = event.model_copy(update={"device_id": "d", "seq": 0, "at": 0.0})  # as the controller does
        return codec.Template(plain, ("device_id", "seq", "at"), json_exclude={"oldest"})

    memo = codec.BatchMemo(Event, _VARY, derive, size=64)
    hits = accepted = refused = 0
    for _ in range(3000):
        items = [_odd_item(rng) for _ in range(rng.randrange(1, 5))]
        payload = codec.packb(items if len(items) > 1 or rng.random() < 0.5 else items[0])
        try:
            expected: list[Event] | str = codec.decode_many(payload, Event, 3, "seq")
        except PayloadError as exc:
            expected = str(exc)
        try:
            got = memo.decode_many(payload, 3, "seq")
        except PayloadError as exc:
            assert str(exc) == expected
            refused += 1
            continue
        assert not isinstance(expected, str), expected
        accepted += 1
        assert len(got) == len(expected)
        for (model, template, values), event in zip(got, expected, strict=True):
            whole = model.model_copy(update=dict(zip(_VARY, values, strict=True)))
            assert _same(whole, event), (whole, event)
            if template is not None:
                hits += model is not whole
                try:
                    body = template.dump_json(*values[:3])
                except ValueError:
                    continue
                assert body == event.model_dump_json(exclude={"oldest"})
    assert accepted > 1000 and refused > 300 and hits > 1000
    assert len(derived) < accepted  # contents seen again were not validated again


def test_batch_memo_refuses_fields_it_cannot_check_apart() -> None:
    with pytest.raises(ValueError, match="not a plain"):
        codec.BatchMemo(Event, ("data",), lambda e: None)
    with pytest.raises(ValueError, match="only bounds"):
        codec.BatchMemo(Event, ("spec_hash",), lambda e: None)


@pytest.mark.parametrize(
    "value",
    [
        "d",
        "dev-000001",
        "a b",
        'a"b',
        "a\\b",
        "é",
        "a\nb",
        "\x7f",
        "\u2028",
        0,
        7,
        2**53,
        -3,
        1.0,
        -0.0,
        1733580000.123,
        1e15,
        1e16,
        1e-4,
        1e-5,
        123456789.000001,
        float("nan"),
        float("inf"),
        float("-inf"),
    ],
)
def test_a_json_template_writes_what_pydantic_writes_or_refuses(value: object) -> None:
    """Plain values are written as pydantic writes them; any other is refused (ValueError),
    never written differently."""
    event = Event(
        device_id="d", seq=1, kind="k", message="100%s done", data={"x": [1, 2.5]}, at=1.5, oldest=2
    )
    template = codec.Template(event, ("device_id", "seq", "at"), json_exclude={"oldest"})
    name = {str: "device_id", int: "seq", float: "at"}[type(value)]
    values: dict[str, object] = {"device_id": "d", "seq": 1, "at": 1.5, name: value}
    if name == "seq" and not 0 <= value <= 2**53 - 1:  # type: ignore[operator]
        return  # not an Event's (BatchMemo checks the bounds)
    copy = event.model_copy(update=values)
    try:
        body = template.dump_json(values["device_id"], values["seq"], values["at"])  # type: ignore[arg-type]
    except ValueError:
        assert type(value) is not int  # every int is plain
        return
    assert body == copy.model_dump_json(exclude={"oldest"})
    with pytest.raises(TypeError):
        template.dump_json("d", 1, 2)  # an int where the model has a float: pydantic writes 2.0


def test_batch_memo_derives_a_content_when_seen_again() -> None:
    """A content seen once costs its validation alone (nothing derived: a backlog's events
    are each their own); seen again, it is derived once and reused."""
    derived: list[Event] = []
    memo = codec.BatchMemo(Event, _VARY, lambda e: derived.append(e) or len(derived))

    def batch(device: str, seq: int) -> bytes:
        return codec.array(
            [
                codec.encode(Event(device_id=device, seq=s, kind="note", message=str(s), oldest=seq))
                for s in (seq, seq + 1)
            ]
        )

    first = memo.decode_many(batch("a", 1), 10, "seq")
    assert [(m.device_id, m.seq, d, v) for m, d, v in first] == [
        ("a", 1, None, ("a", 1, 0.0, 1)),
        ("a", 2, None, ("a", 2, 0.0, 1)),
    ]
    again = memo.decode_many(batch("b", 1), 10, "seq")
    assert [(d, v) for _, d, v in again] == [(1, ("b", 1, 0.0, 1)), (2, ("b", 2, 0.0, 1))]
    assert [d for _, d, _ in memo.decode_many(batch("c", 1), 10, "seq")] == [1, 2] and len(derived) == 2


def test_a_json_template_is_made_field_by_field_when_a_mark_is_ambiguous() -> None:
    """The data holding what the template marks a slot with: made field by field, as exact."""
    mark = {"seq": 7_340_032_000_000_001, "at": 7341.03125}
    event = Event(device_id="d", seq=1, kind="k", message="m", data=mark, at=1.5)
    template = codec.Template(event, ("device_id", "seq", "at"), json_exclude={"oldest"})
    copy = event.model_copy(update={"device_id": "e", "seq": 9, "at": 2.5})
    assert template.dump_json("e", 9, 2.5) == copy.model_dump_json(exclude={"oldest"})
    assert codec._json_marked(event, ("device_id", "seq", "at"), {"oldest"}) is None
    assert codec._json_marked(copy.model_copy(update={"data": None}), ("device_id", "seq", "at"), {"oldest"})
