"""protocol/heap.py's memory habits: field-name sets shared by kept models, free memory released after a burst."""

from __future__ import annotations

import sys

import pytest
from tether.controller.models import DesiredRecord, Device
from tether.protocol import heap
from tether.protocol.models import DeviceFacts, StackRef


def _device(n: int) -> Device:
    facts = DeviceFacts(agent_version="1", driver="process", arch="x86_64", os="linux", hostname=f"h{n}")
    return Device(id=f"d{n}", status="online", session=n, facts=facts)


def test_models_of_one_shape_share_one_field_set_and_copies_stay_apart() -> None:
    """Kept models (nested ones too) share the set of their given field names; a copy with an
    update gets its own set and leaves the shared one as it was; content is unchanged."""
    a, b = heap.share_field_sets(_device(1)), heap.share_field_sets(_device(2))
    assert a.model_fields_set is b.model_fields_set
    assert a.facts is not None and b.facts is not None
    assert a.facts.model_fields_set is b.facts.model_fields_set
    names = set(a.model_fields_set)
    c = a.model_copy(update={"since": 5.0})
    assert "since" in c.model_fields_set and a.model_fields_set == names
    assert a.model_dump(exclude_unset=True) == _device(1).model_dump(exclude_unset=True)
    record = heap.share_field_sets(
        DesiredRecord(device_id="d1", generation=1, stacks=(StackRef(name="web", spec_hash="a" * 64),))
    )
    other = heap.share_field_sets(
        DesiredRecord(device_id="d2", generation=2, stacks=(StackRef(name="db", spec_hash="b" * 64),))
    )
    assert record.stacks[0].model_fields_set is other.stacks[0].model_fields_set


@pytest.mark.skipif(not heap.release_free_memory(), reason="the C library has no malloc_trim")
def test_free_memory_goes_back_after_a_burst() -> None:
    """Memory a burst took and freed (in holes the allocator keeps) is given back when idle."""
    clock = [0.0]
    releaser = heap.FreeMemoryReleaser(step=8 * 1024 * 1024, clock=lambda: clock[0])
    burst = [bytes(8192) for _ in range(8000)]  # 64 MB from the C allocator
    kept = burst[::4]  # holes between the survivors: not trimmed by free() alone
    del burst
    before = heap.resident_bytes()
    assert before is not None
    releaser.idle()
    after = heap.resident_bytes()
    assert releaser.releases == 1 and after is not None and after < before - 16 * 1024 * 1024
    clock[0] += 1.0
    releaser.idle()  # nothing new since: nothing to do
    assert releaser.releases == 1 and len(kept) == 2000


def test_free_memory_is_looked_at_once_a_second_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked again within its interval, the releaser does not even read the RSS."""
    if heap._TRIM is None:
        pytest.skip("no malloc_trim in this C library: the releaser never looks")
    clock = [0.0]
    releaser = heap.FreeMemoryReleaser(clock=lambda: clock[0])
    reads: list[int] = []
    monkeypatch.setattr(heap, "resident_bytes", lambda: reads.append(1) or 0)
    releaser.idle()
    clock[0] += 0.5
    releaser.idle()
    assert len(reads) == 1
    clock[0] += 0.5
    releaser.idle()
    assert len(reads) == 2


def test_kept_models_share_equal_strings_and_empty_dicts_and_read_the_same() -> None:
    """Strings of kept models (fields, dict keys and values, tuples) are one object per value
    across devices, equal label dicts and empty dict fields one shared (never written) dict
    each; dumps are unchanged."""

    def device(n: int) -> Device:
        facts = DeviceFacts(
            agent_version="".join(["1.", "2"]),  # built at run time: not one constant object
            driver="process",
            arch="x86_64",
            os="linux",
            hostname=f"h{n}",
            labels={"".join(["ro", "le"]): "".join(["ga", "te"])},
            addresses={"".join(["et", "h0"]): ("".join(["10.0.0.", str(n)]), "".join(["fe", "80::1"]))},
        )
        return Device(id=f"d{n}", status="online", session=n, facts=facts)

    a, b = heap.share_field_sets(device(1)), heap.share_field_sets(device(2))
    assert a.facts is not None and b.facts is not None
    assert a.facts.agent_version is b.facts.agent_version
    assert next(iter(a.facts.labels)) is next(iter(b.facts.labels))
    assert a.facts.labels is b.facts.labels  # equal labels: one dict
    assert a.facts.addresses["eth0"][1] is b.facts.addresses["eth0"][1]
    assert a.operator_labels is b.pinned_labels and a.operator_labels == {}
    for n, kept in ((1, a), (2, b)):
        assert kept.model_dump() == device(n).model_dump()
        assert kept == device(n)
    assert heap._EMPTY == {}
    c = heap.share_field_sets(Device(id="d3", operator_labels={"role": "gate", "site": "x"}))
    assert c.operator_labels is not a.facts.labels and c.operator_labels == {"role": "gate", "site": "x"}


def test_a_model_shared_already_is_not_walked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sharing a model that holds a shared field set (shared whole before) looks at nothing in
    it; a copy with an update has a set of its own until it is shared in full."""
    ref = StackRef(name="web", spec_hash="c" * 64)
    record = heap.share_field_sets(DesiredRecord(device_id="d9", generation=1, stacks=(ref,)))
    walked: list[object] = []
    real = heap._shared_tuple
    monkeypatch.setattr(heap, "_shared_tuple", lambda value: walked.append(value) or real(value))
    assert heap.share_field_sets(record) is record and walked == []
    copy = record.model_copy(update={"stacks": (ref, ref)})  # not plain: walked when shared
    assert copy.model_fields_set is not record.model_fields_set
    assert heap.share_field_sets(copy).model_fields_set is record.model_fields_set and walked
    other = heap.share_field_sets(DesiredRecord(device_id="d10", generation=3, stacks=(ref,)))
    assert (
        other.model_fields_set
        is heap.share_field_sets(DesiredRecord(device_id="d11", generation=4, stacks=(ref,))).model_fields_set
    )


def test_a_shared_copy_of_a_shared_model_is_shared_without_a_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """shared_copy of a model shared whole gives what a copy shared in full gives (equal, the
    shared set of its names, the same values inside) walking nothing; of a model not shared, or
    with an update that is not plain, it shares the copy in full."""
    ref = StackRef(name="web", spec_hash="d" * 64)
    record = heap.share_field_sets(DesiredRecord(device_id="d12", generation=1, stacks=(ref,)))
    walked: list[object] = []
    real = heap._shared_tuple
    monkeypatch.setattr(heap, "_shared_tuple", lambda value: walked.append(value) or real(value))
    copy = heap.shared_copy(record, {"published": True})
    assert walked == []
    assert copy == record.model_copy(update={"published": True}) and copy.published and not record.published
    assert copy.stacks is record.stacks
    full = heap.share_field_sets(DesiredRecord(device_id="d13", generation=1, stacks=(ref,), published=True))
    assert copy.model_fields_set is full.model_fields_set
    seen = len(walked)  # ``full`` was walked
    assert heap.share_field_sets(copy) is copy and len(walked) == seen
    fresh = DesiredRecord(device_id="d14", generation=1, stacks=(ref,))
    heap.shared_copy(fresh, {"published": True})
    assert len(walked) > seen  # not shared before: walked in full


def test_a_kept_copy_of_a_shared_model_reads_as_pydantic_s_and_holds_the_shared_set() -> None:
    """Kept.model_copy of a model shared whole, updated with plain values or strings, equals
    pydantic's copy (fields, fields set, dumps), holds the shared set of its names and the
    interned strings, and leaves the original as it was; with a model in the update, or of a
    model not shared, it is pydantic's copy (a set of its own, for share_field_sets to walk)."""
    ref = StackRef(name="web", spec_hash="e" * 64)
    record = heap.share_field_sets(DesiredRecord(device_id="d20", generation=1, stacks=(ref,)))
    before = record.model_dump(exclude_unset=True)
    update = {"published": True, "generation": 2}
    copy = record.model_copy(update=update)
    plain = super(heap.Kept, record).model_copy(update=update)  # pydantic's own
    assert copy == plain and copy.model_fields_set == plain.model_fields_set
    assert copy.model_dump_json(exclude_unset=True) == plain.model_dump_json(exclude_unset=True)
    full = heap.share_field_sets(DesiredRecord(device_id="d21", generation=2, stacks=(ref,), published=True))
    assert copy.model_fields_set is full.model_fields_set
    assert record.model_dump(exclude_unset=True) == before and not record.published
    device = heap.share_field_sets(_device(30))
    name = "".join(["gate", "way"])  # a string made at run time, not interned
    renamed = device.model_copy(update={"status": "offline", "id": name})
    assert renamed.id == "gateway" and renamed.id is sys.intern("gateway") and device.id == "d30"
    assert renamed.model_fields_set is device.model_fields_set
    facts = DeviceFacts(agent_version="2", driver="process", arch="x86_64", os="linux")
    walked = device.model_copy(update={"facts": facts})
    assert walked.model_fields_set is not device.model_fields_set and walked.facts is facts
    fresh = _device(31)
    assert fresh.model_copy(update={"session": 5}).model_fields_set is not fresh.model_fields_set


def test_made_once_per_object_by_identity_and_bounded() -> None:
    """MadeOnce makes once per very object (an equal one is another), keeps the object
    alive with what was made of it, and forgets everything when full."""
    calls: list[dict[str, int]] = []

    def make(value: dict[str, int]) -> int:
        calls.append(value)
        return sum(value.values())

    made = heap.MadeOnce(make, size=2)
    one, equal = {"a": 1}, {"a": 1}
    assert made.get(one) == made.get(one) == 1 and len(calls) == 1
    assert made.get(equal) == 1 and len(calls) == 2  # equal, not the same: made again
    assert made.get({"b": 2}) == 2 and len(calls) == 3  # full: forgotten, then kept
    assert made.get(one) == 1 and len(calls) == 4
