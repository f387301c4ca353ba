"""Batches on the wire (events since issue 21): a msgpack array of encoded maps, framed
without decoding them again, and decoded all or nothing with one error naming the bad item."""

from __future__ import annotations

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
