"""The state store behaves the same on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from tether.controller.models import DesiredRecord, Group
from tether.controller.store import Store
from tether.protocol.errors import StoreError

pytestmark = pytest.mark.store


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    return str(request.getfixturevalue("postgres_url"))


def test_migrations_run_twice_and_data_survives_reopen(target: str) -> None:
    """Opening the same store twice migrates once; what was written is there after reopening."""
    first = Store(target)
    with first.transaction():
        first.create_group(Group(name="g", devices=("a",)))
        first.put_desired(DesiredRecord(device_id="a", generation=3))
    version = first.schema_version()
    first.close()
    second = Store(target)
    assert second.schema_version() == version > 0
    assert second.get_group("g") == Group(name="g", devices=("a",))
    assert second.get_desired("a") == DesiredRecord(device_id="a", generation=3)
    second.close()


def test_rollback_leaves_nothing_half_written(target: str) -> None:
    """A failing transaction writes nothing; a duplicate group is a StoreError."""
    store = Store(target)
    store.create_group(Group(name="g", devices=("a",)))
    with pytest.raises(StoreError), store.transaction():
        store.put_desired(DesiredRecord(device_id="x", generation=1))
        store.create_group(Group(name="g", devices=("b",)))
    assert store.get_desired("x") is None
    assert store.get_group("g") == Group(name="g", devices=("a",))
    store.close()


def test_events_are_stored_once_and_bounded(target: str) -> None:
    """An event seq is stored once; only the newest EVENTS_KEPT stay."""
    from tether.controller.store import EVENTS_KEPT

    store = Store(target)
    assert store.add_event("d", 1, '{"seq": 1}') is True
    assert store.add_event("d", 1, '{"seq": 1}') is False
    for seq in range(2, EVENTS_KEPT + 10):
        store.add_event("d", seq, f'{{"seq": {seq}}}')
    kept = store.list_events("d", limit=10_000)
    assert len(kept) == EVENTS_KEPT
    assert kept[-1] == f'{{"seq": {EVENTS_KEPT + 9}}}'
    store.close()


def test_events_added_in_one_transaction_are_bounded_when_it_commits(target: str) -> None:
    """Events stored within a transaction (trimmed once per device, as it commits) leave the
    newest EVENTS_KEPT per device, the same as one by one; rolled back, none of them stays
    and the next commit trims nothing it should keep."""
    from tether.controller.store import EVENTS_KEPT

    store = Store(target)
    store.add_event("a", 1, '{"seq": 1}')
    with store.transaction():
        for seq in range(EVENTS_KEPT + 5, 1, -1):  # newest first: the oldest are the ones to go
            assert store.add_event("a", seq, f'{{"seq": {seq}}}') is True
            store.add_event("b", seq, f'{{"seq": {seq}}}')
        assert store.add_event("a", 3, "{}") is False  # a duplicate inside the transaction
    for device in ("a", "b"):
        kept = store.list_events(device, limit=10_000)
        assert kept == [f'{{"seq": {seq}}}' for seq in range(6, EVENTS_KEPT + 6)]
    with pytest.raises(RuntimeError), store.transaction():
        store.add_event("c", 1, '{"seq": 1}')
        raise RuntimeError("undone")
    with store.transaction():
        store.add_event("c", 2, '{"seq": 2}')
    assert store.list_events("c") == ['{"seq": 2}']
    store.close()


def test_stored_event_numbers_are_read_for_many_devices_at_once(target: str) -> None:
    """``event_seqs_above_many`` gives each device's stored sequence numbers above its own
    bound, in order, over more devices than one query binds; devices with none are absent;
    ``event_seqs_above`` agrees device by device."""
    from tether.controller.store import _IN_CHUNK

    store = Store(target)
    n = _IN_CHUNK + 20
    store.add_events([(f"d-{i}", seq, "{}") for i in range(n) for seq in (1, 2, 5, i + 10)])
    bounds = {f"d-{i}": i % 7 for i in range(n)} | {"nobody": 0}
    found = store.event_seqs_above_many(bounds)
    assert set(found) == {f"d-{i}" for i in range(n)}
    for i in range(n):
        expected = [s for s in sorted({1, 2, 5, i + 10}) if s > i % 7]
        assert found[f"d-{i}"] == expected
        assert store.event_seqs_above(f"d-{i}", i % 7) == expected
    assert store.event_seqs_above_many({}) == {}
    assert store.event_seqs_above_many({"d-0": 2**53 - 2, "d-1": -1}) == {
        "d-1": [1, 2, 5, 11]
    }  # the wire's bounds
    store.close()


def test_events_stored_together_say_which_are_new(target: str) -> None:
    """``add_events`` returns the (device, seq) stored now: all of a statement's rows when
    none was there (counted), else only the new ones (a redelivery: an event stored before,
    or twice in the batch), the first body kept; in statements of every size."""
    store = Store(target)
    rows = [(f"d-{i}", seq, f'{{"n": {i}}}') for i in range(90) for seq in (1, 2, 3)]
    assert store.add_events(rows) == {(d, s) for d, s, _ in rows}  # 270: statements of 256, 4, 4, 4, 1, 1
    again = [("d-0", 1, '{"n": "again"}'), ("d-0", 4, "{}"), ("d-0", 4, '{"n": "twice"}')] + [
        (f"e-{i}", 1, "{}") for i in range(300)
    ]
    assert store.add_events(again) == {("d-0", 4)} | {(f"e-{i}", 1) for i in range(300)}
    assert store.list_events("d-0") == ['{"n": 0}', '{"n": 0}', '{"n": 0}', "{}"]  # seq 1 to 4
    store.close()


def test_unreachable_postgres_is_a_clear_error() -> None:
    """A bad PostgreSQL URL gives a StoreError naming the problem."""
    from support.infra import free_port

    with pytest.raises(StoreError, match="cannot connect to PostgreSQL"):
        Store(f"postgresql://postgres@127.0.0.1:{free_port()}/nope")


def test_webhook_deliveries_survive_reopen_and_come_due_in_order(target: str) -> None:
    """Pending deliveries are kept across a reopen (a controller restart) and read back due, oldest
    first; counts per state, pruning keeps pending ones; removing a webhook removes its deliveries."""
    from tether.controller.models import Delivery, Webhook

    store = Store(target)
    store.put_webhook(Webhook(id="wh-1", url="http://x/", on=("device.offline",)))
    now = 1_765_000_000.25  # a real clock: PostgreSQL's REAL (4 bytes) would round it by a minute
    first = store.add_delivery(Delivery(webhook="wh-1", kind="test", payload={"a": 1}, next_at=now + 5))
    second = store.add_delivery(Delivery(webhook="wh-1", kind="test", payload={"a": 2}, next_at=now + 1))
    third = store.add_delivery(Delivery(webhook="wh-1", kind="test", payload={"a": 3}, next_at=now + 1.5))
    store.put_delivery(first.model_copy(update={"state": "delivered", "next_at": None}))
    store.close()
    store = Store(target)
    assert [d.id for d in store.due_deliveries(now + 1.25)] == [second.id]
    assert store.delivery_counts() == {"wh-1": {"delivered": 1, "pending": 2}}
    store.prune_deliveries(0)
    assert [d.id for d in store.list_deliveries("wh-1", 10)] == [third.id, second.id]
    store.delete_webhook("wh-1")
    assert store.list_deliveries(None, 10) == [] and store.get_webhook("wh-1") is None
    store.close()
