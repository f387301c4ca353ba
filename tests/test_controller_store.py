"""The controller's store on SQLite and PostgreSQL: migrations, WAL, transactions, every record kind."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator

import pytest
from tether.controller.models import DesiredRecord, Device, Group, Job, Stack
from tether.controller.store import (
    JOB_RESULTS_KEPT,
    MIGRATIONS,
    PresenceWritten,
    Store,
    _desired_published_column,
    _untrust_device_labels,
    _users_from_operators,
)
from tether.protocol.credentials import Credential
from tether.protocol.errors import StoreError
from tether.protocol.models import (
    DeviceFacts,
    JobSpec,
    ReportedState,
    ServiceSpec,
    StackRef,
    StackSpec,
    StackStatus,
)

SPEC = StackSpec(services=(ServiceSpec(name="web", image="web:1"),))
REF = StackRef(name="web", spec_hash=SPEC.spec_hash())


pytestmark = pytest.mark.store


@pytest.fixture
def store(store_target: str) -> Iterator[Store]:
    s = Store(store_target)
    yield s
    s.close()


def device(device_id: str, **labels: str) -> Device:
    return Device(
        id=device_id,
        status="online",
        session=2,
        since=10.0,
        facts=DeviceFacts(agent_version="0.1.0", driver="docker", arch="aarch64", os="Linux", labels=labels),
        reported=ReportedState(device_id=device_id, generation=3),
    )


def web_stack(version: int = 1) -> Stack:
    return Stack(
        name="web",
        group="edge",
        spec_hash=SPEC.spec_hash(),
        spec=SPEC,
        compose="services: {}",
        version=version,
    )


def test_migrations_run_once_and_reopening_is_harmless(store_target: str) -> None:
    """Opening the same file twice (even while open) leaves the schema at the latest version."""
    first = Store(store_target)
    first.put_device(device("pi-1"))
    second = Store(store_target)
    try:
        assert second.schema_version() == len(MIGRATIONS)
        applied = [r[0] for r in second.db.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert applied == list(range(1, len(MIGRATIONS) + 1))
        assert second.get_device("pi-1") == device("pi-1")
        query = (
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            if second.kind == "sqlite"
            else "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
        tables = {r[0] for r in second.db.execute(query)}
        assert {"devices", "groups", "stacks", "desired", "definitions"} <= tables
    finally:
        second.close()
        first.close()


def test_wal_mode_is_on(store: Store, store_target: str) -> None:
    """SQLite runs in WAL mode, persistently (another connection sees it too)."""
    if store.kind != "sqlite":
        pytest.skip("WAL is SQLite's")
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other = sqlite3.connect(store_target)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


def test_failed_transaction_leaves_nothing_half_written(store: Store, store_target: str) -> None:
    """An exception inside a transaction rolls back every write in it, nested ones included."""
    store.create_group(Group(name="kept", devices=("pi-0",)))
    with pytest.raises(RuntimeError, match="midway"), store.transaction():
        store.put_device(device("pi-1"))
        store.create_group(Group(name="edge", devices=("pi-1",)))
        with store.transaction():
            store.put_stack(web_stack())
        store.delete_group("kept")
        raise RuntimeError("midway")
    assert store.get_device("pi-1") is None
    assert store.get_group("edge") is None
    assert store.get_stack("web") is None
    assert store.get_group("kept") is not None
    # The connection is usable again and a fresh reader sees the same.
    with store.transaction():
        store.put_device(device("pi-2"))
    reader = Store(store_target)
    try:
        assert [d.id for d in reader.list_devices()] == ["pi-2"]
    finally:
        reader.close()


def test_nested_transaction_that_fails_undoes_only_its_own_writes(store: Store) -> None:
    """A nested transaction is a savepoint: its writes go if it raises, the outer ones stay."""
    with store.transaction():
        store.put_device(device("pi-1"))
        with pytest.raises(RuntimeError, match="one message"), store.transaction():
            store.put_device(device("pi-2"))
            store.create_group(Group(name="edge", devices=("pi-2",)))
            raise RuntimeError("one message")
        with store.transaction():
            store.put_device(device("pi-3"))
    assert [d.id for d in store.list_devices()] == ["pi-1", "pi-3"]
    assert store.get_group("edge") is None


def test_a_unit_of_a_batch_that_fails_undoes_only_its_own_writes(store: Store) -> None:
    """Units of a batch share one savepoint: one that raises leaves nothing behind, and what
    the units before it wrote (rows, counters, reports in one statement, a savepoint of
    their own) and after it stays, each exactly once."""
    with store.transaction(), store.batch() as batch:
        with batch.unit():
            store.put_device(device("pi-1"))
            store.put_reported_many([("pi-1", ReportedState(device_id="pi-1", generation=4))])
            assert store.count_dropped("pi-1", "event_trimmed") == 1
            with pytest.raises(RuntimeError), store.transaction():  # undone within the unit
                store.put_device(device("pi-9"))
                raise RuntimeError("inner")
            store.add_event("pi-1", 1, '{"kind": "a"}')
        with pytest.raises(RuntimeError, match="one message"), batch.unit():
            store.put_device(device("pi-2"))
            store.count_dropped("pi-1", "event_trimmed")
            store.add_event("pi-1", 2, '{"kind": "b"}')
            raise RuntimeError("one message")
        assert store.reported_generation("pi-1") == 4  # read again after the rollback
        with batch.unit():
            store.put_device(device("pi-3"))
            assert store.count_dropped("pi-1", "event_trimmed") == 2
    assert [d.id for d in store.list_devices()] == ["pi-1", "pi-3"]
    got = store.get_device("pi-1")
    assert got is not None and got.reported is not None and got.reported.generation == 4
    assert store.dropped("pi-1") == {"event_trimmed": 2}
    assert [json.loads(body)["kind"] for body in store.list_events("pi-1")] == ["a"]


def test_desired_generation_follows_writes_rollbacks_and_removals(store: Store) -> None:
    """The desired record's generation as kept by the store: what was written, read or
    committed; a write rolled back (a savepoint too) is forgotten, so is a removed device."""
    assert store.desired_generation("pi-1") is None
    store.put_desired(DesiredRecord(device_id="pi-1", generation=3))
    assert store.desired_generation("pi-1") == 3
    with store.transaction():
        with pytest.raises(RuntimeError), store.transaction():
            store.put_desired(DesiredRecord(device_id="pi-1", generation=7))
            assert store.desired_generation("pi-1") == 7
            raise RuntimeError("rolled back")
        assert store.desired_generation("pi-1") == 3
    with pytest.raises(RuntimeError), store.transaction():
        store.put_desired(DesiredRecord(device_id="pi-1", generation=8))
        raise RuntimeError("rolled back")
    assert store.desired_generation("pi-1") == 3
    other = Store(store.target)  # nothing kept: read from the row
    assert other.desired_generation("pi-1") == 3
    other.close()
    store.put_device(device("pi-1"))
    store.forget_device("pi-1")
    assert store.desired_generation("pi-1") is None


def test_after_commit_runs_only_for_writes_that_were_committed(store: Store) -> None:
    """Actions asked with after_commit run once the transaction commits, in order; never
    those asked inside a savepoint, a batch's unit or a transaction that was rolled back;
    at once outside a transaction."""
    ran: list[str] = []
    with store.transaction(), store.batch() as batch:
        with batch.unit():
            store.after_commit(lambda: ran.append("unit 1"))
        with pytest.raises(RuntimeError), batch.unit():
            store.after_commit(lambda: ran.append("unit 2"))
            raise RuntimeError("one message")
        with pytest.raises(RuntimeError), store.transaction():
            store.after_commit(lambda: ran.append("savepoint"))
            raise RuntimeError("inner")
        store.after_commit(lambda: ran.append("batch"))
        assert ran == []
    assert ran == ["unit 1", "batch"]
    with pytest.raises(RuntimeError), store.transaction():
        store.after_commit(lambda: ran.append("rolled back"))
        raise RuntimeError("outer")
    store.after_commit(lambda: ran.append("outside"))
    assert ran == ["unit 1", "batch", "outside"]


def test_a_report_rewrites_only_the_reported_state(store: Store) -> None:
    """put_reported replaces the reported state alone; a device row from before keeps working."""
    store.put_device(device("pi-1", zone="a"))
    assert store.reported_generation("pi-1") == 3
    store.put_reported("pi-1", ReportedState(device_id="pi-1", generation=5))
    got = store.get_device("pi-1")
    assert got is not None and got.reported is not None and got.reported.generation == 5
    assert got.labels == {"zone": "a"} and got.status == "online"
    assert [d.reported.generation for d in store.list_devices() if d.reported] == [5]
    assert store.reported_generation("pi-9") is None
    # A row written before the reported table existed carries its state in the body.
    legacy = device("pi-2")
    store.db.execute("INSERT INTO devices (id, body) VALUES (?, ?)", ("pi-2", legacy.model_dump_json()))
    assert store.reported_generation("pi-2") == 3
    assert store.get_device("pi-2") == legacy
    store.forget_device("pi-1")
    assert store.reported_generation("pi-1") is None and store.get_device("pi-1") is None


def test_the_store_says_which_devices_it_wrote(store: Store) -> None:
    """devices_written: None at first and after a rollback (anything may have changed), else the
    devices, each with its new reported state when nothing else was written to it, or its row as
    written when its reported state was kept (a presence), with the report written since."""
    assert store.devices_written() is None
    store.put_device(device("pi-1"))
    with store.transaction():
        store.put_device(device("pi-2"))
        store.forget_device("pi-1")
    store.put_reported("pi-2", ReportedState(device_id="pi-2", generation=4))
    assert store.devices_written() == {"pi-1": None, "pi-2": None}  # more than a report: read again
    assert store.devices_written() == {}
    report = ReportedState(device_id="pi-2", generation=5)
    store.put_reported("pi-2", report)
    assert store.devices_written() == {"pi-2": report}
    present = device("pi-2").model_copy(update={"status": "offline", "session": 3, "reported": None})
    store.put_device(present, keep_reported=True)  # a presence: its row as written, its report kept
    assert store.devices_written() == {"pi-2": PresenceWritten(present)}
    store.put_device(present, keep_reported=True)
    store.put_reported("pi-2", report)
    assert store.devices_written() == {"pi-2": PresenceWritten(present, report)}
    with pytest.raises(RuntimeError), store.transaction():
        store.put_device(device("pi-3"))
        raise RuntimeError("rolled back")
    assert store.devices_written() is None


def test_duplicate_group_is_a_store_error(store: Store) -> None:
    """Creating a group whose name exists raises StoreError and keeps the original."""
    store.create_group(Group(name="edge", devices=("pi-1",)))
    with pytest.raises(StoreError, match="'edge' already exists"):
        store.create_group(Group(name="edge", selector="site=x"))
    assert store.get_group("edge") == Group(name="edge", devices=("pi-1",))


def test_devices_put_get_list(store: Store) -> None:
    """Devices are stored whole, replaced on put, listed by id."""
    store.put_device(device("pi-2", site="b"))
    store.put_device(device("pi-1"))
    store.put_device(device("pi-2", site="c"))
    assert store.get_device("pi-2") == device("pi-2", site="c")
    assert store.get_device("pi-2").labels == {"site": "c"}  # type: ignore[union-attr]
    assert store.get_device("nope") is None
    assert [d.id for d in store.list_devices()] == ["pi-1", "pi-2"]


def test_devices_and_desired_generations_read_by_the_chunk_of_ids(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """get_devices and desired_generations read many ids at once (2 a query here): each id that
    exists comes back as get_device / the desired record gives it, the others are left out."""
    monkeypatch.setattr("tether.controller.store._IN_CHUNK", 2)
    for n in range(5):
        store.put_device(device(f"pi-{n}", site=str(n)))
    store.put_reported("pi-3", ReportedState(device_id="pi-3", generation=4))
    store.put_desired(DesiredRecord(device_id="pi-1", generation=7))
    store.put_desired(DesiredRecord(device_id="pi-3", generation=4))
    ids = ["pi-4", "nope", "pi-3", "pi-1", "pi-0"]
    found = store.get_devices(ids)
    assert sorted(found) == ["pi-0", "pi-1", "pi-3", "pi-4"]
    assert all(found[d] == store.get_device(d) for d in found)
    assert found["pi-3"].reported is not None and found["pi-3"].reported.generation == 4
    assert store.desired_generations(ids) == {"pi-1": 7, "pi-3": 4}
    assert store.get_devices([]) == {} and store.desired_generations([]) == {}


def test_groups_put_get_list_delete(store: Store) -> None:
    """Static and selector groups round-trip, are listed by name and can be deleted."""
    static = Group(name="lab", devices=("pi-1", "pi-2"), created=5.0)
    dynamic = Group(name="berlin", selector="site=berlin")
    store.create_group(static)
    store.create_group(dynamic)
    assert store.get_group("lab") == static
    assert store.get_group("berlin").kind == "selector"  # type: ignore[union-attr]
    assert store.list_groups() == [dynamic, static]
    store.delete_group("lab")
    assert store.list_groups() == [dynamic]


def test_stacks_put_get_list_delete(store: Store) -> None:
    """Stacks round-trip with their spec, are replaced on put and can be deleted."""
    store.put_stack(web_stack(1))
    store.put_stack(web_stack(2))
    assert store.get_stack("web") == web_stack(2)
    assert store.list_stacks() == [web_stack(2)]
    store.delete_stack("web")
    assert store.get_stack("web") is None
    assert store.list_stacks() == []


def test_desired_records_and_definitions_and_mark_all_unpublished(store: Store) -> None:
    """Desired records and definition flags round-trip; mark_all_unpublished clears every flag."""
    store.put_desired(DesiredRecord(device_id="pi-2", generation=4, stacks=(REF,), published=True))
    store.put_desired(DesiredRecord(device_id="pi-1", generation=1, published=True))
    store.set_definition("a" * 64, True)
    store.set_definition("b" * 64, False)
    store.set_definition("b" * 64, True)
    assert store.get_desired("pi-2") == DesiredRecord(
        device_id="pi-2", generation=4, stacks=(REF,), published=True
    )
    assert store.get_desired("pi-3") is None
    assert [r.device_id for r in store.list_desired()] == ["pi-1", "pi-2"]
    assert store.definitions() == {"a" * 64: True, "b" * 64: True}

    store.mark_all_unpublished()
    assert [r.published for r in store.list_desired()] == [False, False]
    assert store.get_desired("pi-2").stacks == (REF,)  # type: ignore[union-attr]
    assert store.definitions() == {"a" * 64: False, "b" * 64: False}
    store.delete_definition("a" * 64)
    assert store.definitions() == {"b" * 64: False}


def test_mark_published_only_marks_the_generation_that_was_published(store: Store) -> None:
    """Marking records published flips only those still at the acknowledged generation."""
    one = DesiredRecord(device_id="pi-1", generation=1, stacks=(REF,))
    two = DesiredRecord(device_id="pi-2", generation=5)
    store.put_desired_many([one, two])
    store.put_desired(two.model_copy(update={"generation": 6}))  # changed after it was published
    store.mark_published([one, two])
    assert [(r.device_id, r.generation, r.published) for r in store.list_desired()] == [
        ("pi-1", 1, True),
        ("pi-2", 6, False),
    ]
    assert store.get_desired("pi-1") == one.model_copy(update={"published": True})


def test_rows_written_by_another_controller_are_read_afresh(store_target: str) -> None:
    """Parsed rows are reused only while their stored text is unchanged: another store on the
    same database (a second controller) writing a row, or a rolled-back write, is seen."""
    first, second = Store(store_target), Store(store_target)
    try:
        first.put_desired(DesiredRecord(device_id="pi-1", generation=1))
        first.put_stack(web_stack(1))
        assert second.get_desired("pi-1") == DesiredRecord(device_id="pi-1", generation=1)
        assert second.list_stacks() == [web_stack(1)]
        first.put_desired(DesiredRecord(device_id="pi-1", generation=2, stacks=(REF,)))
        first.mark_all_unpublished()
        first.put_stack(web_stack(2))
        assert second.list_desired() == [DesiredRecord(device_id="pi-1", generation=2, stacks=(REF,))]
        assert second.get_stack("web") == web_stack(2)
        with pytest.raises(RuntimeError), first.transaction():
            first.put_stack(web_stack(3))
            raise RuntimeError("rolled back")
        assert first.get_stack("web") == web_stack(2)
        first.delete_stack("web")
        assert second.list_stacks() == []
    finally:
        first.close()
        second.close()


def test_migration_moves_the_published_flag_into_its_column(store_target: str) -> None:
    """Upgrading: desired records written with ``published`` in their body keep their flag and
    generation (a published one is not published again, an unpublished one still is)."""
    old = Store(store_target)
    version = MIGRATIONS.index(_desired_published_column) + 1
    with old.transaction():
        old.db.execute("DELETE FROM schema_migrations WHERE version = ?", (version,))
        old.db.execute("DELETE FROM desired")
        for device_id, generation, published in (("pi-1", 3, True), ("pi-2", 7, False)):
            record = DesiredRecord(device_id=device_id, generation=generation, published=published)
            old.db.execute(
                "INSERT INTO desired (device_id, body) VALUES (?, ?)", (device_id, record.model_dump_json())
            )
    old.close()
    new = Store(store_target)
    try:
        assert new.schema_version() == len(MIGRATIONS)
        assert [(r.device_id, r.generation, r.published) for r in new.list_desired()] == [
            ("pi-1", 3, True),
            ("pi-2", 7, False),
        ]
        new.mark_published([DesiredRecord(device_id="pi-2", generation=7)])
        assert new.get_desired("pi-2").published  # type: ignore[union-attr]
    finally:
        new.close()


def test_migration_makes_the_operator_the_first_admin_user(store_target: str) -> None:
    """Upgrading a data dir from before users: its operator credential (admin) becomes an admin
    user with the same password hash; devices stay devices; nothing is audited yet."""
    old = Store(store_target)
    version = MIGRATIONS.index(_users_from_operators) + 1
    with old.transaction():
        for table in ("users", "api_tokens", "audit"):
            old.db.execute(f"DROP TABLE {table}")
        old.db.execute("DELETE FROM schema_migrations WHERE version = ?", (version,))
        old.put_credential(Credential("admin", "operator", "admin", "$7$hash-a"), 1.0)
        old.put_credential(Credential("pi-1", "device", "pi-1", "$7$hash-b"), 1.0)
    old.close()
    new = Store(store_target)
    try:
        assert new.schema_version() == len(MIGRATIONS)
        assert [(u.name, u.role) for u in new.list_users()] == [("admin", "admin")]
        assert new.get_credential("admin") == Credential("admin", "operator", "admin", "$7$hash-a")
        assert new.list_audit() == [] and new.list_api_tokens() == []
    finally:
        new.close()


def test_data_survives_closing_and_reopening(store_target: str) -> None:
    """Everything written is there again after the store is closed and opened anew."""
    first = Store(store_target)
    first.put_device(device("pi-1", site="x"))
    first.create_group(Group(name="edge", devices=("pi-1",)))
    first.put_stack(web_stack(3))
    first.put_desired(DesiredRecord(device_id="pi-1", generation=9, stacks=(REF,)))
    first.set_definition(SPEC.spec_hash(), True)
    first.close()

    again = Store(store_target)
    try:
        assert again.list_devices() == [device("pi-1", site="x")]
        assert again.list_groups() == [Group(name="edge", devices=("pi-1",))]
        assert again.get_stack("web") == web_stack(3)
        assert again.get_desired("pi-1") == DesiredRecord(device_id="pi-1", generation=9, stacks=(REF,))
        assert again.definitions() == {SPEC.spec_hash(): True}
    finally:
        again.close()


def test_migration_says_which_devices_leave_selector_groups(
    store_target: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Upgrading: a selector group stops matching device-reported labels, and the migration
    names each device that leaves (and keeps those an operator or a token labelled)."""
    import logging

    old = Store(store_target)
    version = MIGRATIONS.index(_untrust_device_labels) + 1  # as a store from before it
    old.db.execute("DELETE FROM schema_migrations WHERE version = ?", (version,))
    with old.transaction():
        old.put_device(device("claims", pool="pB"))
        old.put_device(device("vouched", pool="pB").model_copy(update={"operator_labels": {"pool": "pB"}}))
        old.create_group(Group(name="pb", selector="pool=pB"))
        old.create_group(Group(name="any-arm", selector="arch=aarch64", trust_device_labels=True))
    old.close()
    with caplog.at_level(logging.INFO, logger="tether.controller.store"):
        new = Store(store_target)
    try:
        assert new.schema_version() == len(MIGRATIONS)
        group = new.get_group("pb")
        assert group is not None and not group.trust_device_labels
    finally:
        new.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "group pb" in warnings[0] and "claims" in warnings[0] and "vouched" not in warnings[0]
    assert "tether groups trust pb" in warnings[0]


def test_reported_generation_follows_writes_rollbacks_and_removals(store: Store) -> None:
    """The generation a report check reads is the stored one: a rolled-back write and a
    removed device leave nothing behind (a device enrolled again starts from its own)."""
    store.put_device(device("pi-1"))
    store.put_reported("pi-1", ReportedState(device_id="pi-1", generation=5))
    assert store.reported_generation("pi-1") == 5
    with pytest.raises(RuntimeError), store.transaction():
        store.put_reported("pi-1", ReportedState(device_id="pi-1", generation=9))
        raise RuntimeError("rolled back")
    assert store.reported_generation("pi-1") == 5
    store.forget_device("pi-1")
    assert store.reported_generation("pi-1") is None
    store.put_device(device("pi-1").model_copy(update={"reported": None}))
    assert store.reported_generation("pi-1") is None


def test_stack_reports_are_extracted_by_the_database(store: Store) -> None:
    """What each device reports of one stack (version, state), its generation and error, read
    without parsing reports, on both databases; a stack name with '.' and '-' works."""
    store.put_device(device("pi-1"))
    store.put_device(device("pi-2"))
    running = StackStatus(spec_hash="a" * 64, state="running")
    store.put_reported("pi-1", ReportedState(device_id="pi-1", generation=4, stacks={"web.v-2": running}))
    store.put_reported("pi-2", ReportedState(device_id="pi-2", generation=2, error="no space"))
    assert store.stack_reports("web.v-2") == {
        "pi-1": (4, None, "a" * 64, "running"),
        "pi-2": (2, "no space", None, None),
    }
    assert store.stack_reports("other")["pi-1"] == (4, None, None, None)


def test_job_results_seconds_apart_keep_their_order_and_the_newest_are_kept(store: Store) -> None:
    """Job results started a second apart list newest last and the trim keeps exactly the newest
    JOB_RESULTS_KEPT (PostgreSQL's 4-byte REAL rounded such times together: no order, no trim)."""
    start = 1_780_000_000.0
    for i in range(JOB_RESULTS_KEPT + 2):
        store.add_job_result("backup", "pi-1", f"run-{i}", start + i, f'{{"n": {i}}}')
    listed = store.list_job_results("backup", "pi-1", limit=1000)
    assert [body for _, body in listed] == [f'{{"n": {i}}}' for i in range(2, JOB_RESULTS_KEPT + 2)]


def test_jobs_and_their_results_put_get_list_delete(store: Store) -> None:
    """Jobs are stored, listed by name and deleted with their results; a run's result is known
    once stored (how a redelivered one is told apart), stored once per run, and listed for every
    device or one, oldest first (what `tether jobs logs` and result ingestion ask the store)."""
    tick = Job(name="tick", group="g", spec=JobSpec(name="tick", command=("date",), every_s=1.0), created=1.0)
    once = Job(
        name="hello", group="g", spec=JobSpec(name="hello", command=("true",), run_id="r1"), created=2.0
    )
    store.put_job(tick)
    store.put_job(once)
    assert store.get_job("tick") == tick and store.get_job("nope") is None
    assert [j.name for j in store.list_jobs()] == ["hello", "tick"]
    assert not store.has_job_result("tick", "pi-1", "run-1")
    store.add_job_result("tick", "pi-1", "run-1", 1_780_000_000.0, '{"n": 1}')
    store.add_job_result("tick", "pi-2", "run-1", 1_780_000_001.0, '{"n": 2}')
    store.add_job_result("tick", "pi-1", "run-1", 1_780_000_000.0, '{"n": 1}')  # redelivered: once
    assert store.has_job_result("tick", "pi-1", "run-1") and not store.has_job_result("tick", "pi-1", "run-2")
    assert store.list_job_results("tick", None, limit=10) == [("pi-1", '{"n": 1}'), ("pi-2", '{"n": 2}')]
    assert store.list_job_results("tick", None, limit=1) == [("pi-2", '{"n": 2}')]
    assert store.list_job_results("tick", "pi-2", limit=10) == [("pi-2", '{"n": 2}')]
    store.delete_job("tick")
    assert store.get_job("tick") is None and [j.name for j in store.list_jobs()] == ["hello"]
    assert store.list_job_results("tick", None, limit=10) == [] and not store.has_job_result(
        "tick", "pi-1", "run-1"
    )
