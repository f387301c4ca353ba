"""The controller's state, in SQLite (WAL; the default) or PostgreSQL, behind one interface.

One set of numbered migrations serves both, recorded in ``schema_migrations``; each runs in
a transaction (on PostgreSQL under an advisory lock, so two controllers starting together
do not race), so running them twice is harmless. Rows hold JSON renderings of the pydantic
models in :mod:`.models`; the SQL is the common subset of both databases, written with
``?`` placeholders (translated for psycopg).
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar, cast

from pydantic import BaseModel, TypeAdapter
from tether.protocol.credentials import Credential
from tether.protocol.errors import StoreError
from tether.protocol.heap import MadeOnce, share_field_sets, shared_copy
from tether.protocol.models import ReportedState, StackSpec, StackStatus
from tether.protocol.secret_files import private_file
from tether.protocol.topics import DEVICE_ID_RE

from .models import (
    ApiToken,
    AuditRecord,
    Delivery,
    DesiredRecord,
    Device,
    Enrollment,
    EnrollmentToken,
    Group,
    Job,
    Registry,
    Stack,
    User,
    Variable,
    Webhook,
)
from .rollout import Deployment, DeviceRollout

log = logging.getLogger(__name__)


def _untrust_device_labels(store: Store) -> None:
    """Selector groups stop matching what devices report about themselves (issue 13).

    Nothing is rewritten: a group without ``trust_device_labels`` now matches only labels
    set by an operator or pinned at enrollment (a token's labels, already stored as operator
    labels). This logs, per selector group, the devices that leave it and how to bring them
    back; the controller's first sync then takes their stacks away.
    """
    from .scheduler import members

    attributes = {d.id: d.attributes() for d in store.list_devices() if not d.revoked}
    for group in store.list_groups():
        if group.selector is None:
            continue
        before = members(group.model_copy(update={"trust_device_labels": True}), attributes)
        after = set(members(group, attributes))
        leaving = [d for d in before if d not in after]
        if not leaving:
            log.info(
                "migration: group %s (selector %s) keeps its %d members",
                group.name,
                group.selector,
                len(after),
            )
            continue
        log.warning(
            "migration: group %s (selector %s) now matches only labels set by an operator or at "
            "enrollment; %d device(s) that matched through labels or facts they report leave it: %s. "
            "To keep one: tether devices label ID KEY=VALUE; to trust every device's own labels: "
            "tether groups trust %s",
            group.name,
            group.selector,
            len(leaving),
            ", ".join(leaving[:20]) + (f" (+{len(leaving) - 20} more)" if len(leaving) > 20 else ""),
            group.name,
        )


def _desired_published_column(store: Store) -> None:
    """A desired record's ``published`` flag and generation get columns of their own (issue
    21), so marking 10,000 records published is one bulk UPDATE instead of 10,000 rewritten
    bodies."""
    rows = store.db.execute("SELECT device_id, body FROM desired").fetchall()
    for device_id, body in rows:
        data = json.loads(body)
        published = bool(data.pop("published", False))
        store.db.execute(
            "UPDATE desired SET published = ?, generation = ?, body = ? WHERE device_id = ?",
            (
                int(published),
                int(data.get("generation", 0)),
                json.dumps(data, separators=(",", ":")),
                device_id,
            ),
        )


def _users_from_operators(store: Store) -> None:
    """Users (issue 19): every existing operator credential (``admin`` of ``tether up``)
    becomes an admin user, so existing data dirs keep their one admin."""
    for statement in (
        "CREATE TABLE users (name TEXT PRIMARY KEY, body TEXT NOT NULL)",
        "CREATE TABLE api_tokens (id TEXT PRIMARY KEY, body TEXT NOT NULL)",
        "CREATE TABLE audit (id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, username TEXT NOT NULL, body TEXT NOT NULL)",
        "CREATE INDEX audit_at ON audit (at)",
    ):
        store.db.execute(statement)
    for credential in store.list_credentials():
        if credential.role == "operator":
            store.put_user(User(name=credential.username, role="admin"))


def _timestamps_double_precision(store: Store) -> None:
    """PostgreSQL's ``REAL`` is 4 bytes: a Unix time in it is rounded to about two minutes,
    so job results started within the same two minutes had no order (and the newest-50 trim
    kept them all). SQLite's ``REAL`` is 8 bytes already."""
    if store.kind == "postgresql":
        store.db.execute("ALTER TABLE job_results ALTER COLUMN started TYPE DOUBLE PRECISION")
        store.db.execute("ALTER TABLE credentials ALTER COLUMN created TYPE DOUBLE PRECISION")


def _deployment_entries(store: Store) -> None:
    """A deployment's per-device entries get a table of their own (issue 21): a deployment
    step writes the entries it changed and the deployment's header row, not the whole
    deployment (1.3 MB at 10,000 devices, once a second during a deploy). Each entry keeps
    its place in the deployment's order (``pos``); ``rev`` tells a reader whether what it
    keeps parsed is still the stored deployment."""
    for statement in (
        "CREATE TABLE deployment_devices (deployment_id INTEGER NOT NULL, device_id TEXT NOT NULL, "
        "pos INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (deployment_id, device_id))",
        "ALTER TABLE deployments ADD COLUMN rev BIGINT NOT NULL DEFAULT 0",
    ):
        store.db.execute(statement)
    for (deployment_id,) in store.db.execute("SELECT id FROM deployments ORDER BY id").fetchall():
        (body,) = store.db.execute("SELECT body FROM deployments WHERE id = ?", (deployment_id,)).fetchone()
        data = json.loads(body)
        devices = data.pop("devices", None) or {}
        store.db.executemany(
            "INSERT INTO deployment_devices (deployment_id, device_id, pos, body) VALUES (?, ?, ?, ?)",
            [
                (deployment_id, device_id, pos, json.dumps(entry, separators=(",", ":")))
                for pos, (device_id, entry) in enumerate(devices.items())
            ],
        )
        store.db.execute(
            "UPDATE deployments SET body = ?, rev = ? WHERE id = ?",
            (json.dumps(data, separators=(",", ":")), secrets.randbits(63), deployment_id),
        )


def _counters_bigint(store: Store) -> None:
    """The counters devices send (an event's ``seq``, a report's ``generation``) go up to
    2**53 - 1 on the wire (``MAX_COUNTER``); PostgreSQL's ``INTEGER`` stops below 2**31, so
    such an event could never be stored and its device sent it again for ever. The desired
    generation counts the same way. SQLite's ``INTEGER`` holds 8 bytes already."""
    if store.kind == "postgresql":
        store.db.execute("ALTER TABLE events ALTER COLUMN seq TYPE BIGINT")
        store.db.execute("ALTER TABLE reported ALTER COLUMN generation TYPE BIGINT")
        store.db.execute("ALTER TABLE desired ALTER COLUMN generation TYPE BIGINT")


MIGRATIONS: list[str | Callable[[Store], None]] = [
    """
    CREATE TABLE devices (id TEXT PRIMARY KEY, body TEXT NOT NULL);
    CREATE TABLE groups (name TEXT PRIMARY KEY, body TEXT NOT NULL);
    CREATE TABLE stacks (name TEXT PRIMARY KEY, body TEXT NOT NULL);
    CREATE TABLE desired (device_id TEXT PRIMARY KEY, body TEXT NOT NULL);
    CREATE TABLE definitions (spec_hash TEXT PRIMARY KEY, published INTEGER NOT NULL DEFAULT 0);
    """,
    """
    CREATE TABLE events (device_id TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL,
                         PRIMARY KEY (device_id, seq));
    """,
    """
    CREATE TABLE deployments (id INTEGER PRIMARY KEY, stack TEXT NOT NULL, body TEXT NOT NULL);
    CREATE INDEX deployments_stack ON deployments (stack, id);
    CREATE TABLE specs (spec_hash TEXT PRIMARY KEY, body TEXT NOT NULL);
    """,
    """
    CREATE TABLE jobs (name TEXT PRIMARY KEY, body TEXT NOT NULL);
    CREATE TABLE job_results (job TEXT NOT NULL, device_id TEXT NOT NULL, run TEXT NOT NULL,
                              started REAL NOT NULL, body TEXT NOT NULL, PRIMARY KEY (job, device_id, run));
    """,
    """
    CREATE TABLE credentials (username TEXT PRIMARY KEY, role TEXT NOT NULL, device_id TEXT,
                              password_hash TEXT NOT NULL, revoked INTEGER NOT NULL DEFAULT 0,
                              created REAL NOT NULL DEFAULT 0);
    CREATE INDEX credentials_device ON credentials (device_id);
    """,
    """
    CREATE TABLE tokens (id TEXT PRIMARY KEY, body TEXT NOT NULL);
    CREATE TABLE enrollments (device_id TEXT PRIMARY KEY, body TEXT NOT NULL);
    """,
    """
    CREATE TABLE variables (id TEXT PRIMARY KEY, body TEXT NOT NULL);
    """,
    """
    CREATE TABLE reported (device_id TEXT PRIMARY KEY, generation INTEGER NOT NULL, body TEXT NOT NULL);
    """,
    _untrust_device_labels,
    """
    CREATE TABLE registries (id TEXT PRIMARY KEY, body TEXT NOT NULL);
    """,
    """
    CREATE TABLE dropped (device_id TEXT NOT NULL, reason TEXT NOT NULL, count INTEGER NOT NULL,
                          PRIMARY KEY (device_id, reason));
    """,
    """
    ALTER TABLE desired ADD COLUMN published INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE desired ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
    """,
    _desired_published_column,
    """
    CREATE TABLE stack_versions (name TEXT NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL,
                                 PRIMARY KEY (name, version));
    """,
    """
    CREATE TABLE webhooks (id TEXT PRIMARY KEY, body TEXT NOT NULL);
    CREATE TABLE deliveries (id INTEGER PRIMARY KEY, webhook TEXT NOT NULL, state TEXT NOT NULL,
                             next_at DOUBLE PRECISION, body TEXT NOT NULL);
    CREATE INDEX deliveries_due ON deliveries (state, next_at);
    CREATE INDEX deliveries_webhook ON deliveries (webhook, id);
    """,
    _users_from_operators,
    _timestamps_double_precision,
    _deployment_entries,
    _counters_bigint,
]
"""SQL scripts, or functions changing data through the store (inside the migration's transaction)."""

JOB_RESULTS_KEPT = 50
"""Results kept per job and device (the newest)."""
EVENTS_KEPT = 200
"""Events kept per device (the newest)."""

MIGRATION_LOCK = 0x7E7E_0001
"""PostgreSQL advisory lock key held while migrating."""


M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


_STACKS_JSON = TypeAdapter(dict[str, StackStatus])
_STACKS_MADE: MadeOnce[dict[str, StackStatus], str] = MadeOnce(
    lambda s: _STACKS_JSON.dump_json(s, exclude_defaults=True).decode()
)
"""The JSON of each reported ``stacks`` dict seen lately, without the values its fields have
by default (see :func:`report_json`)."""
_AFTER_STACKS = ',"error":'
"""What follows ``stacks`` in a reported state's JSON (``error`` is always written)."""


def report_json(reported: ReportedState) -> str:
    """The JSON a reported state is stored as: ``reported.model_dump_json()``, byte for byte,
    but for its ``stacks``, written without the values their fields have by default (a
    service's ``health``, ``exit_code``, ``restarts``, ``last_error``, ``log_tail`` of a
    service running without a blip: 787 bytes a report of a 3-service stack, 502 so; the
    row's bytes are what SQLite's upsert and COMMIT cost, 20,000 rows a deploy to 10,000
    devices). Read back (``model_validate_json``), the same model; the fields ``stack_reports``
    extracts (``spec_hash``, ``state``) have no default, so are always written.

    The JSON of ``stacks`` is made once per stacks dict: a fleet's reports share theirs
    (``codec.FieldMemo`` gives one per distinct encoding), and dumping them was most of a
    report's JSON (3.6 us a report of a 3-service stack, 1 us so). A plain report (no error,
    download or storage error, a device id and a time written alike by pydantic and Python)
    is written around them here; any other, dumped without them and the stacks' JSON put in
    where the model has them, before ``error`` (in JSON text a ``,"`` is never inside a string)."""
    stacks = reported.stacks
    if not stacks:
        return reported.model_dump_json()
    made = _STACKS_MADE.get(stacks)
    at = reported.at
    if (
        _PLAIN_FIELDS
        and reported.error is None
        and not reported.downloads
        and reported.storage_error is None
        and type(at) is float
        and (at == 0.0 or 1.0 <= at < 1e15)  # Python's repr and pydantic's: no exponent, same digits
        and type(reported.generation) is int
        and type(reported.events_dropped) is int
        and DEVICE_ID_RE.match(reported.device_id)  # nothing to escape
    ):
        return (
            f'{{"v":{reported.v},"device_id":"{reported.device_id}","generation":{reported.generation},'
            f'"stacks":{made},"error":null,"held":{"true" if reported.held else "false"},'
            f'"events_dropped":{reported.events_dropped},"at":{at!r}}}'
        )
    rest = reported.model_dump_json(exclude=_STACKS)
    split = rest.index(_AFTER_STACKS)
    return f'{rest[:split]},"stacks":{made}{rest[split:]}'


_PLAIN_FIELDS = tuple(ReportedState.model_fields) == (
    "v",
    "device_id",
    "generation",
    "stacks",
    "error",
    "held",
    "events_dropped",
    "downloads",
    "storage_error",
    "at",
)
"""The fields :func:`report_json` writes itself for a plain report (downloads and storage_error
are left out while unset); a model with others is dumped by pydantic."""
_STACKS = {"stacks"}


_PRESENCE_FIELDS = frozenset({"status", "session", "since", "reported"})
"""What a write of a device may change and keep :meth:`Store.memo`'s values (with ``moved``):
its presence (its reported state has a table of its own)."""
_LISTED_FIELDS = tuple(name for name in Device.model_fields if name not in _PRESENCE_FIELDS)
"""The others: a write changing any of them drops :meth:`Store.memo`'s values."""


class _Parsed(Generic[M]):
    """Rows of one table as parsed models, each kept while its stored text is the same.

    Reading 10,000 rows is cheap; parsing their JSON into models is what cost the
    controller most of its CPU at that size (every deployment step, every full scheduling
    pass, every ``stacks ls``). A row whose text did not change since it was last parsed
    gives the same (immutable) model again. A row is recognised by its text, so a row
    written by another controller sharing the database (``--ha``), or a write rolled back,
    is parsed afresh. What is kept of the text is its hash (Python's keyed 64-bit SipHash,
    computed in C once per string read), not the text: at 10,000 devices the texts would
    be 15 MB more; two different texts of one row with the same hash are a 2^-64 chance
    that no device can steer (the key is random per process).
    """

    def __init__(self, parse: Callable[[str, Any], M]) -> None:
        self.parse = parse
        self.rows: dict[Any, tuple[int, Any, M]] = {}

    def get(self, key: Any, body: str, tag: Any = None) -> M:
        """The model of row ``key`` stored as ``body`` (and ``tag``: a column the model includes)."""
        hit = self.rows.get(key)
        if hit is not None and hit[0] == hash(body) and hit[1] == tag:
            return hit[2]
        model = share_field_sets(self.parse(body, tag))  # kept: see protocol/heap.py
        self.rows[key] = (hash(body), tag, model)
        return model

    def wrote(self, key: Any, body: str, model: M, tag: Any = None) -> None:
        """``model`` was just stored as ``body``: reading it back needs no parsing."""
        self.rows[key] = (hash(body), tag, share_field_sets(model))

    def retag(self, key: Any, tag: Any, model: M) -> None:
        """Row ``key``, its text unchanged, now has ``tag`` and reads as ``model``."""
        hit = self.rows.get(key)
        if hit is not None:
            self.rows[key] = (hit[0], tag, share_field_sets(model))

    def keep_only(self, keys: Iterable[Any]) -> None:
        """Forget rows not among ``keys`` (after reading a whole table: deleted rows go)."""
        keep = set(keys)
        if len(keep) != len(self.rows):
            self.rows = {k: v for k, v in self.rows.items() if k in keep}


_IN_CHUNK = 500
"""Most ids bound in one ``IN (...)`` query (SQLite allows 32,766 parameters since 3.32, 999 before)."""


def _chunks(ids: Sequence[str]) -> Iterator[tuple[str, ...]]:
    for start in range(0, len(ids), _IN_CHUNK):
        yield tuple(ids[start : start + _IN_CHUNK])


def is_postgres_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


class _Postgres:
    """A psycopg 3 connection with sqlite3's ``execute`` shape (``?`` placeholders)."""

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise StoreError("PostgreSQL support is not installed: pip install 'tether[postgres]'") from exc
        try:
            self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {str(exc).strip().splitlines()[0]}") from exc

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]

    def executemany(self, sql: str, params: Iterable[tuple[Any, ...]]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), params)  # type: ignore[arg-type]

    def close(self) -> None:
        self.conn.close()


def _private_sqlite_files(db: Path) -> None:
    """Make the database file 0600 before SQLite opens it: SQLite gives its ``-wal`` and
    ``-shm`` files the database's mode. Existing ones (made before) are tightened too."""
    if str(db) == ":memory:" or str(db).startswith("file:") or not db.parent.is_dir():
        return
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}-journal")):
        if path == db or path.exists():
            private_file(path)


class _Transaction:
    """:meth:`Store.transaction`: a transaction, or a savepoint inside one."""

    __slots__ = ("done", "savepoint", "store")

    def __init__(self, store: Store) -> None:
        self.store = store
        self.savepoint: str | None = None
        self.done = 0  # how many after_commit actions were asked before it

    def __enter__(self) -> None:
        store = self.store
        if store._in_tx:
            self.done = len(store._after_commit)
            store._savepoints += 1
            self.savepoint = f"sp{store._savepoints}"
            store.db.execute(f"SAVEPOINT {self.savepoint}")
            return
        store.db.execute("BEGIN IMMEDIATE" if store.kind == "sqlite" else "BEGIN")
        store._in_tx = True

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        store = self.store
        name = self.savepoint
        if name is not None:
            try:
                if exc_type is not None:
                    store._rolled_back()
                    del store._after_commit[self.done :]
                    store.db.execute(f"ROLLBACK TO SAVEPOINT {name}")
                store.db.execute(f"RELEASE SAVEPOINT {name}")
            finally:
                store._savepoints -= 1
            return
        actions, store._after_commit = store._after_commit, []
        try:
            if exc_type is None:
                try:
                    store._trim_events()  # part of the transaction: see add_event
                except BaseException:
                    store._rollback()
                    raise
                store.db.execute("COMMIT")
            else:
                store._rollback()
        finally:
            store._in_tx = False
        if exc_type is None:
            for action in actions:
                action()


_ROWS_PER_INSERT = (256, 64, 16, 4, 1)
"""Rows per statement of :meth:`Store.add_events`: a few sizes, each statement compiled once."""
_INSERT_EVENTS = {
    n: "INSERT INTO events (device_id, seq, body) VALUES "
    + ", ".join(["(?, ?, ?)"] * n)
    + " ON CONFLICT (device_id, seq) DO NOTHING"
    for n in _ROWS_PER_INSERT
}
"""Without RETURNING: when every row is stored (the count says so), which ones is known
(reading back 40,000 rows of a deploy's events cost 1 us each); see :meth:`Store.add_events`."""


class _Journal:
    """The store's connection while a :class:`Batch` is open: every statement but a plain
    read is also written down, to be run again should the batch's savepoint be rolled back."""

    __slots__ = ("db", "statements")

    def __init__(self, db: Any) -> None:
        self.db = db
        self.statements: list[tuple[str, Any, bool]] = []

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        if not sql.startswith("SELECT"):
            self.statements.append((sql, params, False))
        return self.db.execute(sql, params)

    def executemany(self, sql: str, params: Iterable[tuple[Any, ...]]) -> Any:
        rows = list(params)
        self.statements.append((sql, rows, True))
        return self.db.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


class Batch:
    """Many small units of work (the device messages of one inbox batch) in the open
    transaction with one savepoint for them all, instead of a savepoint each (two statements
    per message; a round trip each with PostgreSQL). :meth:`Store.batch`.

    A unit that raises (:meth:`unit`) still leaves nothing behind and takes nothing of the
    others with it: the batch's savepoint is rolled back and what the units before it wrote
    is written again, statement by statement as they ran (the store's connection writes each
    down meanwhile: :class:`_Journal`), then the batch goes on. Should that fail too, every
    unit after it is refused and the batch raises: the transaction around it is rolled back.
    """

    _SAVEPOINT = "tether_batch"

    def __init__(self, store: Store) -> None:
        self.store = store
        self.journal = _Journal(store.db)
        self.broken: BaseException | None = None
        self.done = 0  # how many after_commit actions were asked before it

    def __enter__(self) -> Batch:
        if not self.store._in_tx:
            raise RuntimeError("a batch is opened inside a transaction")
        self.done = len(self.store._after_commit)
        self.store.db.execute(f"SAVEPOINT {self._SAVEPOINT}")
        self.store.db = self.journal
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        store, db = self.store, self.journal.db
        store.db = db
        if exc_type is not None:
            store._rolled_back()
            del store._after_commit[self.done :]
            db.execute(f"ROLLBACK TO SAVEPOINT {self._SAVEPOINT}")
        db.execute(f"RELEASE SAVEPOINT {self._SAVEPOINT}")
        if exc_type is None and self.broken is not None:
            raise StoreError("a batch's writes could not be restored after one of its units failed") from (
                self.broken
            )

    def unit(self) -> _Unit:
        """One unit of work: if its block raises, its writes are undone (and the exception goes on)."""
        return _Unit(self)

    def _undo_from(self, mark: int) -> None:
        """Undo what was written since the journal's ``mark``: back to the batch's savepoint,
        then the statements before ``mark`` again."""
        store, db = self.store, self.journal.db
        redo = self.journal.statements[:mark]
        del self.journal.statements[mark:]
        store._rolled_back()
        try:
            db.execute(f"ROLLBACK TO SAVEPOINT {self._SAVEPOINT}")
            for sql, params, many in redo:
                if many:
                    db.executemany(sql, params)
                else:
                    db.execute(sql, params)
        except Exception as exc:
            self.broken = exc
            raise


class _Unit:
    """:meth:`Batch.unit`."""

    __slots__ = ("batch", "done", "mark")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.mark = 0
        self.done = 0

    def __enter__(self) -> None:
        if self.batch.broken is not None:
            raise StoreError("a batch's writes could not be restored: the rest of the batch is refused")
        self.mark = len(self.batch.journal.statements)
        self.done = len(self.batch.store._after_commit)

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        if exc_type is not None:
            del self.batch.store._after_commit[self.done :]  # its writes are undone
            if self.batch.broken is None:
                self.batch._undo_from(self.mark)


class PresenceWritten(NamedTuple):
    """:meth:`Store.devices_written` of a device whose row was written with its reported state
    kept (a presence): the row as written (the very model the store keeps of it), and the
    reported state written before or after it, if any (None: the stored one is unchanged).
    A pair, not a copy of the row with the report: a registration writes 10,000 of them
    before the fleet view takes them (a Device copy each was +20 MB of peak RSS)."""

    device: Device
    reported: ReportedState | None = None


Written = ReportedState | PresenceWritten | None
"""What :meth:`Store.devices_written` says of one device written."""
_UNWRITTEN = object()


class Store:
    """The controller's state. Use from one thread; group writes with :meth:`transaction`.

    ``target`` is a SQLite file path, or a ``postgresql://`` URL.
    """

    def __init__(self, target: Path | str) -> None:
        self.target = str(target)
        self.db: Any
        if is_postgres_url(self.target):
            self.kind = "postgresql"
            self.db = _Postgres(self.target)
        else:
            self.kind = "sqlite"
            _private_sqlite_files(Path(self.target))
            self.db = sqlite3.connect(self.target, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=5000")
        self._in_tx = False
        self._savepoints = 0
        self._after_commit: list[Callable[[], None]] = []  # see after_commit
        self._untrimmed: set[str] = set()  # see add_event
        self._devices_written: dict[str, Written] | None = None  # see devices_written
        self._desired_written: dict[str, DesiredRecord | None] | None = None  # see desired_written
        self._generations: dict[str, int] = {}
        """Per device, the generation of the reported state this store wrote last (committed or in
        the open transaction; forgotten with a rollback): a report's first check reads no row."""
        self._desired_generations: dict[str, int] = {}
        """Per device, the generation of its desired record as this store last wrote or read it
        (forgotten with a rollback; never above the stored one: generations only grow, and a
        backup is restored with the controller stopped): see :meth:`desired_generation`."""
        self._devices = _Parsed(lambda body, _: Device.model_validate_json(body))
        self._memo: dict[Hashable, Any] = {}  # see memo
        self._moved: dict[Hashable, Callable[[str, str], None]] = {}  # see memo
        self.sole_writer = self.kind == "sqlite"
        """Only this process writes the database (SQLite: one controller per file, see
        :mod:`.lease`); with PostgreSQL, other controllers (``--ha``) may, so :meth:`memo`
        keeps nothing."""
        self._desired = _Parsed(self._parse_desired)
        self._deployments: dict[int, tuple[int, int, Deployment]] = {}
        """Per deployment kept parsed: (its ``rev``, its entries' highest ``pos``, the deployment)."""
        self._stacks = _Parsed(lambda body, _: Stack.model_validate_json(body))
        self._groups = _Parsed(lambda body, _: Group.model_validate_json(body))
        self.migrate()

    def migrate(self) -> None:
        """Apply the migrations not yet recorded; safe to run twice, and concurrently."""
        self.db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
        with self.transaction():
            if self.kind == "postgresql":
                self.db.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            done = {row[0] for row in self.db.execute("SELECT version FROM schema_migrations")}
            for number, script in enumerate(MIGRATIONS, start=1):
                if number in done:
                    continue
                if callable(script):
                    script(self)
                else:
                    for statement in filter(str.strip, script.split(";")):
                        self.db.execute(statement)
                self.db.execute("INSERT INTO schema_migrations (version) VALUES (?)", (number,))

    def schema_version(self) -> int:
        row = self.db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def transaction(self) -> _Transaction:
        """All writes inside commit together or not at all.

        Nested inside another, it is a savepoint: if its block raises, its own writes are
        undone and the exception goes on; the outer transaction decides about the rest. So
        a batch of messages handled in one transaction (the controller's inbox) can drop one
        message's writes without losing the others'. (A class, not a generator: the inbox
        takes one savepoint per device message.)
        """
        return _Transaction(self)

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the open transaction is committed (at once outside one). Never
        if the writes it follows are undone: forgotten with the transaction, or the savepoint
        or batch unit it was asked in, rolled back. For what must not be told of writes that
        may yet be undone (an event acknowledged to its device, which then drops it)."""
        if self._in_tx:
            self._after_commit.append(action)
        else:
            action()

    def batch(self) -> Batch:
        """Units of work (:meth:`Batch.unit`) sharing one savepoint, inside the open transaction:
        see :class:`Batch` (the controller's inbox, a batch of device messages)."""
        return Batch(self)

    def _rollback(self) -> None:
        """Roll the open transaction back (not a savepoint)."""
        self._untrimmed.clear()
        self._rolled_back()
        self.db.execute("ROLLBACK")

    def _rolled_back(self) -> None:
        """What was read or written inside a transaction undone may be gone: forget it."""
        self._devices_written = None
        self._desired_written = None
        self._generations = {}
        self._desired_generations = {}
        self._forget_memo()

    def close(self) -> None:
        self.db.close()

    # --- generic helpers ---

    def _get(self, table: str, key: str, value: str) -> str | None:
        row = self.db.execute(f"SELECT body FROM {table} WHERE {key} = ?", (value,)).fetchone()
        return row[0] if row else None

    def _all(self, table: str, key: str) -> list[str]:
        return [r[0] for r in self.db.execute(f"SELECT body FROM {table} ORDER BY {key}")]

    def memo(
        self, key: Hashable, compute: Callable[[], T], moved: Callable[[T, str, str], None] | None = None
    ) -> T:
        """``compute()``, kept until this store next writes a device, group or desired state
        (or rolls back): what a listing computes over the whole fleet, once per listing
        instead of once per page. Only while this process is the :attr:`sole_writer`.

        A write that changes only a device's presence (its status, session, since) keeps a
        value given ``moved``: ``moved(value, device_id, status)`` brings it up to date
        instead (a reconnection storm writes every device's presence, while a listing is
        paged through); a value without ``moved`` is forgotten."""
        if not self.sole_writer:
            return compute()
        if key not in self._memo:
            if len(self._memo) >= 16:  # e.g. a search typed letter by letter
                self._forget_memo()
            value = compute()
            self._memo[key] = value
            if moved is not None:
                self._moved[key] = lambda device_id, status: moved(value, device_id, status)
        return cast(T, self._memo[key])

    def _forget_memo(self) -> None:
        self._memo.clear()
        self._moved.clear()

    def _presence_moved(self, before: Device | None, after: Device) -> None:
        """``after`` is written over ``before`` (the device as last read or written): keep what
        :meth:`memo` holds if only its presence changed, else forget it."""
        if not self._memo:
            return
        if before is None or any(getattr(before, name) != getattr(after, name) for name in _LISTED_FIELDS):
            self._forget_memo()
            return
        for key in [k for k in self._memo if k not in self._moved]:
            del self._memo[key]
        if before.status != after.status:
            for moved in self._moved.values():
                moved(after.id, after.status)

    def _put(self, table: str, key: str, value: str, body: str) -> None:
        if table == "groups":
            self._forget_memo()
        self.db.execute(
            f"INSERT INTO {table} ({key}, body) VALUES (?, ?) ON CONFLICT({key}) DO UPDATE SET body = excluded.body",
            (value, body),
        )

    # --- devices ---

    # A device's reported state has a row of its own (table ``reported``): it changes with
    # every report, the rest of the device rarely, so a report rewrites only that row.
    # Rows written before the table existed keep it inside the device's body until then.

    _DEVICES = "SELECT d.id, d.body, r.body FROM devices d LEFT JOIN reported r ON r.device_id = d.id"
    _DEVICES_BARE = "SELECT id, body, NULL FROM devices"
    """Device rows without their reported states (what :meth:`_device` reads, with None)."""

    def _device(self, device_id: str, body: str, reported_body: str | None) -> Device:
        # Reported states are parsed on every read, not kept: they are most of a device's
        # memory, and the controller's hot paths read them from its fleet view instead.
        device = self._devices.get(device_id, body)
        if reported_body is None:
            return device
        return device.model_copy(update={"reported": ReportedState.model_validate_json(reported_body)})

    def get_device(self, device_id: str, reported: bool = True) -> Device | None:
        """The device; without ``reported``, without its reported state (see :meth:`list_devices`)."""
        if reported:
            row = self.db.execute(f"{self._DEVICES} WHERE d.id = ?", (device_id,)).fetchone()
        else:
            row = self.db.execute(f"{self._DEVICES_BARE} WHERE id = ?", (device_id,)).fetchone()
        return self._device(*row) if row else None

    def get_devices(self, device_ids: Sequence[str]) -> dict[str, Device]:
        """The devices of ``device_ids`` that exist, with their reported states, by id: one
        query per :data:`_IN_CHUNK` ids (a page of ``devices.ls`` read one by one was a
        query per device, most of the page's cost)."""
        found: dict[str, Device] = {}
        for chunk in _chunks(device_ids):
            sql = f"{self._DEVICES} WHERE d.id IN ({','.join('?' * len(chunk))})"
            found.update((r[0], self._device(*r)) for r in self.db.execute(sql, chunk))
        return found

    def list_devices(self, reported: bool = True) -> list[Device]:
        """Every device row; without ``reported``, the devices without their reported states
        (labels, facts and presence only: much less to parse)."""
        sql = f"{self._DEVICES} ORDER BY d.id" if reported else f"{self._DEVICES_BARE} ORDER BY id"
        devices = [self._device(*r) for r in self.db.execute(sql)]  # row by row: see list_desired
        if len(self._devices.rows) != len(devices):  # some were deleted
            self._devices.keep_only(d.id for d in devices)
        return devices

    def put_device(self, device: Device, keep_reported: bool = False) -> None:
        """Store the device with its reported state (None: it has none); with
        ``keep_reported`` and no reported state, the stored one stays (what a presence
        changes, read with ``get_device(reported=False)``)."""
        body = device.model_dump_json(exclude={"reported"})
        bare = device if device.reported is None else device.model_copy(update={"reported": None})
        before = self._devices.rows.get(device.id)
        self._presence_moved(before[2] if before is not None else None, bare)
        self._put("devices", "id", device.id, body)
        self._devices.wrote(device.id, body, bare)
        if device.reported is not None:
            self.put_reported(device.id, device.reported)
        elif not keep_reported:
            self.db.execute("DELETE FROM reported WHERE device_id = ?", (device.id,))
            self._generations.pop(device.id, None)
        written = self._devices_written
        if written is not None:
            if keep_reported and device.reported is None:  # its row as written, its report as it was
                earlier = written.get(device.id, _UNWRITTEN)
                if earlier is _UNWRITTEN:
                    written[device.id] = PresenceWritten(bare)
                elif isinstance(earlier, ReportedState):  # a report written before it: the two
                    written[device.id] = PresenceWritten(bare, earlier)
                elif isinstance(earlier, PresenceWritten):
                    written[device.id] = PresenceWritten(bare, earlier.reported)
            else:
                written[device.id] = None

    def reported_generation(self, device_id: str) -> int | None:
        """The generation of the device's stored reported state; None if it has none (or no row)."""
        known = self._generations.get(device_id)
        if known is not None:
            return known
        row = self.db.execute("SELECT generation FROM reported WHERE device_id = ?", (device_id,)).fetchone()
        if row is not None:
            return int(row[0])
        # A row from before the table (its report in the body), or none: no reported row to join.
        device = self.get_device(device_id, reported=False)
        return device.reported.generation if device is not None and device.reported is not None else None

    def put_reported(self, device_id: str, reported: ReportedState) -> None:
        """Store a device's reported state (its device row must exist: see :meth:`put_device`)."""
        self.put_reported_many([(device_id, reported)])

    def put_reported_many(self, items: Iterable[tuple[str, ReportedState]]) -> None:
        """Store devices' reported states (each device row must exist), in one statement."""
        rows = []
        written = self._devices_written
        for device_id, reported in items:
            rows.append((device_id, reported.generation, report_json(reported)))
            self._generations[device_id] = reported.generation
            if written is not None:
                earlier = written.get(device_id, reported)
                if isinstance(earlier, PresenceWritten):  # its row written before: it, with this report
                    written[device_id] = PresenceWritten(earlier.device, reported)
                elif earlier is not None:
                    written[device_id] = reported
        self.db.executemany(
            "INSERT INTO reported (device_id, generation, body) VALUES (?, ?, ?) ON CONFLICT(device_id) "
            "DO UPDATE SET generation = excluded.generation, body = excluded.body",
            rows,
        )

    def stack_reports(self, stack: str) -> dict[str, tuple[int, str | None, str | None, str | None]]:
        """Per device with a reported state: (generation, error, the version and state it
        reports of ``stack``), extracted by the database (no report parsed here: ``stacks ls``
        at 10,000 devices). ``stack`` is a stack name (letters, digits, '.', '_', '-')."""
        if self.kind == "postgresql":
            sql = (
                "SELECT device_id, generation, body::json->>'error', body::json->'stacks'->?->>'spec_hash', "
                "body::json->'stacks'->?->>'state' FROM reported"
            )
            params: tuple[Any, ...] = (stack, stack)
        else:
            path = f'$.stacks."{stack}"'
            sql = (
                "SELECT device_id, generation, json_extract(body, '$.error'), json_extract(body, ?), "
                "json_extract(body, ?) FROM reported"
            )
            params = (f"{path}.spec_hash", f"{path}.state")
        return {row[0]: (int(row[1]), row[2], row[3], row[4]) for row in self.db.execute(sql, params)}

    @property
    def tracking_writes(self) -> bool:
        """Whether :meth:`devices_written` would name the devices written (not None)."""
        return self._devices_written is not None

    def devices_written(self) -> dict[str, Written] | None:
        """The devices written (or forgotten) since the last call; None: any may have changed.

        Per device id, its new reported state if that is all that was written to it
        (:meth:`put_reported`); the device as its row was written if its reported state was
        kept (``put_device(keep_reported=True)``: a presence), with the reported state
        written after or before it if any (else None in ``reported``: the one stored is
        unchanged); else None. None on the first call and after a rollback.
        For a reader that keeps devices in memory (the controller's deployment steps); with
        several controllers on one database only the leader writes devices.
        """
        written, self._devices_written = self._devices_written, {}
        return written

    def forget_device(self, device_id: str) -> None:
        """Delete the device's record, desired state, events, job results, enrollment and the
        variables scoped to it."""
        self._forget_memo()
        for table, key in (("devices", "id"), ("reported", "device_id"), ("desired", "device_id"),
                           ("events", "device_id"), ("job_results", "device_id"),
                           ("enrollments", "device_id"), ("dropped", "device_id")):  # fmt: skip
            self.db.execute(f"DELETE FROM {table} WHERE {key} = ?", (device_id,))
        if self._devices_written is not None:
            self._devices_written[device_id] = None
        if self._desired_written is not None:
            self._desired_written[device_id] = None
        self._generations.pop(device_id, None)
        self._desired_generations.pop(device_id, None)
        prefix = f"device:{device_id}|"  # not LIKE: '_' in a device id would be a wildcard
        self.db.execute("DELETE FROM variables WHERE substr(id, 1, length(?)) = ?", (prefix, prefix))
        self.db.execute("DELETE FROM registries WHERE substr(id, 1, length(?)) = ?", (prefix, prefix))

    # --- groups ---

    def get_group(self, name: str) -> Group | None:
        body = self._get("groups", "name", name)
        return self._groups.get(name, body) if body else None

    def list_groups(self) -> list[Group]:
        rows = self.db.execute("SELECT name, body FROM groups ORDER BY name").fetchall()
        return [self._groups.get(name, body) for name, body in rows]

    def create_group(self, group: Group) -> None:
        if self.get_group(group.name) is not None:
            raise StoreError(f"group {group.name!r} already exists")
        self._put("groups", "name", group.name, group.model_dump_json())

    def delete_group(self, name: str) -> None:
        self._forget_memo()
        self.db.execute("DELETE FROM groups WHERE name = ?", (name,))

    # --- stacks ---

    def get_stack(self, name: str) -> Stack | None:
        body = self._get("stacks", "name", name)
        return self._stacks.get(name, body) if body else None

    def list_stacks(self) -> list[Stack]:
        rows = self.db.execute("SELECT name, body FROM stacks ORDER BY name").fetchall()
        return [self._stacks.get(name, body) for name, body in rows]

    def put_stack(self, stack: Stack) -> None:
        body = stack.model_dump_json()
        self._put("stacks", "name", stack.name, body)
        self._stacks.wrote(stack.name, body, stack)

    def delete_stack(self, name: str) -> None:
        self.db.execute("DELETE FROM stacks WHERE name = ?", (name,))
        self.db.execute("DELETE FROM stack_versions WHERE name = ?", (name,))

    def put_stack_version(self, stack: Stack) -> None:
        """Keep the Compose file of ``stack``'s version (`tether stacks show --version N`)."""
        body = json.dumps({"spec_hash": stack.spec_hash, "compose": stack.compose, "updated": stack.updated})
        self.db.execute(
            "INSERT INTO stack_versions (name, version, body) VALUES (?, ?, ?) "
            "ON CONFLICT (name, version) DO UPDATE SET body = excluded.body",
            (stack.name, stack.version, body),
        )

    def get_stack_version(self, name: str, version: int) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT body FROM stack_versions WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        return json.loads(row[0]) if row else None

    # --- desired states ---

    # A desired record's ``published`` flag and its generation are columns of their own
    # (migration 14): marking 10,000 records published touches only the flag, in one statement.

    @staticmethod
    def _parse_desired(body: str, published: Any) -> DesiredRecord:
        record = DesiredRecord.model_validate_json(body)
        return record.model_copy(update={"published": True}) if published else record

    def get_desired(self, device_id: str) -> DesiredRecord | None:
        row = self.db.execute(
            "SELECT body, published FROM desired WHERE device_id = ?", (device_id,)
        ).fetchone()
        return self._desired.get(device_id, row[0], bool(row[1])) if row else None

    def desired_generation(self, device_id: str) -> int | None:
        """The generation of the device's desired record (its column: no body read); None if it
        has none. As this store last wrote or read it (no row read then): with ``--ha``, another
        controller may have written a newer one since, never an older one, so it is a lower
        bound there (what a report's check needs: :meth:`.ingesting.Ingestor.on_reported`)."""
        known = self._desired_generations.get(device_id)
        if known is not None:
            return known
        row = self.db.execute("SELECT generation FROM desired WHERE device_id = ?", (device_id,)).fetchone()
        if row is None:
            return None
        generation = self._desired_generations[device_id] = int(row[0])
        return generation

    def desired_generations(self, device_ids: Sequence[str]) -> dict[str, int]:
        """The generation of each of ``device_ids``' desired record, from its column as stored
        now (no body read; none for a device without one): one query per :data:`_IN_CHUNK` ids."""
        found: dict[str, int] = {}
        for chunk in _chunks(device_ids):
            sql = (
                f"SELECT device_id, generation FROM desired WHERE device_id IN ({','.join('?' * len(chunk))})"
            )
            found.update((r[0], int(r[1])) for r in self.db.execute(sql, chunk))
        return found

    def desired_device_ids(self) -> set[str]:
        """The devices with a desired record (nothing parsed: the gauges' count of devices never seen)."""
        return {row[0] for row in self.db.execute("SELECT device_id FROM desired")}

    def desired_written(self) -> dict[str, DesiredRecord | None] | None:
        """The desired records written (or deleted: None) since the last call, per device; None
        on the first call and after a rollback: any may have changed. For a reader that keeps
        desired records in memory (the scheduler's stack counts); with several controllers on
        one database only the leader writes them."""
        written, self._desired_written = self._desired_written, {}
        return written

    def list_desired(self) -> list[DesiredRecord]:
        # Row by row, not fetchall(): the records are kept parsed, so every row's body is read
        # only to be compared; 50,000 of them at once (about 20 MB of small strings) left the
        # allocator holding their peak after every deploy.
        records = [
            self._desired.get(device_id, body, bool(published))
            for device_id, body, published in self.db.execute(
                "SELECT device_id, body, published FROM desired ORDER BY device_id"
            )
        ]
        if len(self._desired.rows) != len(records):  # some were deleted
            self._desired.keep_only(r.device_id for r in records)
        return records

    def put_desired(self, record: DesiredRecord) -> None:
        self.put_desired_many([record])

    def put_desired_many(self, records: Iterable[DesiredRecord]) -> None:
        """Store desired records (one statement for all of them)."""
        self._forget_memo()  # a desired state names a device, perhaps never seen

        written = self._desired_written

        def rows() -> Iterator[tuple[str, int, str, int]]:  # made as written: not every body at once
            for record in records:
                body = record.model_dump_json(exclude={"published"})
                self._desired.wrote(record.device_id, body, record, record.published)
                self._desired_generations[record.device_id] = record.generation
                if written is not None:
                    written[record.device_id] = record
                yield record.device_id, record.generation, body, int(record.published)

        self.db.executemany(
            "INSERT INTO desired (device_id, generation, body, published) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(device_id) DO UPDATE SET generation = excluded.generation, body = excluded.body, "
            "published = excluded.published",
            rows(),
        )

    def mark_published(self, records: Iterable[DesiredRecord]) -> None:
        """Mark desired records published, each only if the device still has that generation."""

        # One statement per generation and _IN_CHUNK devices, not one per device: a deploy's
        # records mostly share their generation (10,000 statements were half the cost).
        by_generation: dict[int, list[str]] = {}
        kept = self._desired.rows
        for record in records:
            device_id, generation = record.device_id, record.generation
            hit = kept.get(device_id)
            if hit is not None and hit[2].generation == generation:
                self._desired.retag(device_id, True, shared_copy(hit[2], {"published": True}))
            by_generation.setdefault(generation, []).append(device_id)
        for generation, device_ids in by_generation.items():
            for chunk in _chunks(device_ids):
                self.db.execute(
                    f"UPDATE desired SET published = 1 WHERE generation = ? "
                    f"AND device_id IN ({','.join('?' * len(chunk))})",
                    (generation, *chunk),
                )

    def mark_all_unpublished(self) -> None:
        """The broker lost its retained messages (a fresh embedded broker): publish all again."""
        with self.transaction():
            self.db.execute("UPDATE desired SET published = 0")
            self.db.execute("UPDATE definitions SET published = 0")

    # --- deployments and every version of every stack ---

    def next_deployment_id(self) -> int:
        row = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM deployments").fetchone()
        return int(row[0]) + 1

    # A deployment is a header row (``deployments``: everything but its devices, and ``rev``,
    # drawn afresh at every write) and one row per device (``deployment_devices``, in the
    # order of the deployment's ``devices``: ``pos``), since migration 18: a step that
    # changes 100 devices' entries writes those 100 rows and the header, not the whole
    # deployment (1.3 MB at 10,000 devices). The deployments read last (the latest of each
    # stack) are kept parsed while their ``rev`` is the stored one.

    def put_deployment(
        self, deployment: Deployment, before: Deployment | None = None, changed: Iterable[str] | None = None
    ) -> None:
        """Store ``deployment``: its header, and the entries that differ from the stored ones.

        ``changed`` (with ``before``, the deployment as this store last read or wrote it
        and the one ``deployment`` was made from): the only devices whose entries may differ
        from ``before``'s (changed, added or removed). Without it, or if ``before`` is not
        what is stored, entries are compared by identity with the stored deployment as this
        store knows it (unchanged entries are the very same objects), or all written."""
        rev = secrets.randbits(63)
        new = deployment.devices
        with self.transaction():  # header and entries together (a savepoint inside a step's transaction)
            row = self.db.execute("SELECT rev FROM deployments WHERE id = ?", (deployment.id,)).fetchone()
            kept = self._deployments.get(deployment.id)
            todo: Iterable[str]
            if row is not None and kept is not None and kept[0] == int(row[0]):
                top, old = kept[1], kept[2].devices
                if new is old:
                    todo = ()  # the header alone changed (an operator's pause, superseded...)
                elif changed is not None and kept[2] is before:
                    todo = changed
                else:
                    differ = [d for d, r in new.items() if old.get(d) is not r]
                    added = sum(1 for d in differ if d not in old)
                    if len(old) + added != len(new):  # some were removed
                        differ.extend(d for d in old if d not in new)
                    todo = differ
            else:  # a new deployment, or not the one stored: every entry written again
                if row is not None:
                    self.db.execute(
                        "DELETE FROM deployment_devices WHERE deployment_id = ?", (deployment.id,)
                    )
                top, old, todo = -1, {}, new
            todo = todo if isinstance(todo, (list, tuple, set, dict)) else list(todo)
            gone = [(deployment.id, d) for d in todo if d not in new and d in old]
            if gone:
                self.db.executemany(
                    "DELETE FROM deployment_devices WHERE deployment_id = ? AND device_id = ?", gone
                )

            def upserts() -> Iterator[tuple[int, str, int, str]]:
                # Made as written, not all at once: a step that moves 50,000 devices held
                # every entry's body (and a tuple each) until the statement ran.
                nonlocal top
                bodies: dict[int, tuple[DeviceRollout, str]] = {}  # a few, not one per device
                for d in todo:
                    r = new.get(d)
                    if r is None:
                        continue
                    hit = bodies.get(id(r))  # equal entries (moved together) are one object
                    if hit is not None and hit[0] is r:
                        body = hit[1]
                    else:
                        if len(bodies) >= 256:
                            bodies.clear()
                        body = r.model_dump_json()
                        share_field_sets(r)
                        bodies[id(r)] = (r, body)
                    if d in old:
                        pos = 0  # unchanged by the update
                    else:
                        top += 1
                        pos = top
                    yield deployment.id, d, pos, body

            self.db.executemany(
                "INSERT INTO deployment_devices (deployment_id, device_id, pos, body) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (deployment_id, device_id) DO UPDATE SET body = excluded.body",
                upserts(),
            )
            self.db.execute(
                "INSERT INTO deployments (id, stack, body, rev) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET body = excluded.body, rev = excluded.rev",
                (deployment.id, deployment.stack, deployment.model_dump_json(exclude={"devices"}), rev),
            )
        self._deployments[deployment.id] = (rev, top, deployment)

    def _deployment(self, deployment_id: int, rev: int, keep: bool) -> Deployment:
        """Deployment ``deployment_id`` whose stored ``rev`` was just read: the one kept, or read
        (and kept, with ``keep``). Header and entries are of one write: a write by another
        controller between the two reads is seen (``rev``) and they are read again."""
        kept = self._deployments.get(deployment_id)
        if kept is not None and kept[0] == rev:
            return kept[2]
        for _ in range(10):
            row = self.db.execute(
                "SELECT rev, body FROM deployments WHERE id = ?", (deployment_id,)
            ).fetchone()
            rows = self.db.execute(
                "SELECT d.rev, e.device_id, e.pos, e.body FROM deployment_devices e JOIN deployments d "
                "ON d.id = e.deployment_id WHERE e.deployment_id = ? ORDER BY e.pos",
                (deployment_id,),
            ).fetchall()
            rev = int(row[0])
            if rows:
                if all(r[0] == rev for r in rows):
                    break
            elif (
                self.db.execute("SELECT rev FROM deployments WHERE id = ?", (deployment_id,)).fetchone()[0]
                == rev
            ):
                break
        else:
            raise StoreError(f"deployment {deployment_id} kept changing while it was read")
        parsed: dict[str, DeviceRollout] = {}  # equal entries (moved together) parsed once
        devices = {}
        for _, device_id, _, body in rows:
            entry = parsed.get(body)
            if entry is None:
                entry = parsed[body] = DeviceRollout.model_validate_json(body)
            devices[device_id] = entry
        deployment = Deployment.model_validate_json(row[1]).model_copy(update={"devices": devices})
        if keep:
            share_field_sets(deployment)  # kept: see protocol/heap.py
            self._deployments[deployment_id] = (rev, int(rows[-1][2]) if rows else -1, deployment)
        return deployment

    def get_deployment(self, deployment_id: int) -> Deployment | None:
        row = self.db.execute("SELECT rev FROM deployments WHERE id = ?", (deployment_id,)).fetchone()
        return self._deployment(deployment_id, int(row[0]), keep=False) if row else None

    def list_deployments(self, stack: str | None = None, limit: int = 50) -> list[Deployment]:
        if stack is None:
            rows = self.db.execute("SELECT id, rev FROM deployments ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self.db.execute(
                "SELECT id, rev FROM deployments WHERE stack = ? ORDER BY id DESC LIMIT ?", (stack, limit)
            )
        return [self._deployment(i, int(rev), keep=False) for i, rev in rows.fetchall()]

    def latest_deployments(self) -> dict[str, Deployment]:
        """The newest deployment of every stack."""
        rows = self.db.execute(
            "SELECT d.id, d.rev FROM deployments d JOIN (SELECT stack, MAX(id) AS id FROM deployments "
            "GROUP BY stack) m ON d.id = m.id"
        ).fetchall()
        if len(rows) != len(self._deployments):  # only the latest are kept parsed
            ids = {r[0] for r in rows}
            self._deployments = {k: v for k, v in self._deployments.items() if k in ids}
        latest = [self._deployment(deployment_id, int(rev), keep=True) for deployment_id, rev in rows]
        return {d.stack: d for d in latest}

    def put_spec(self, spec_hash: str, spec: StackSpec) -> None:
        self.db.execute(
            "INSERT INTO specs (spec_hash, body) VALUES (?, ?) ON CONFLICT(spec_hash) DO NOTHING",
            (spec_hash, spec.model_dump_json()),
        )

    def get_spec(self, spec_hash: str) -> StackSpec | None:
        row = self.db.execute("SELECT body FROM specs WHERE spec_hash = ?", (spec_hash,)).fetchone()
        return StackSpec.model_validate_json(row[0]) if row else None

    # --- jobs ---

    def get_job(self, name: str) -> Job | None:
        body = self._get("jobs", "name", name)
        return Job.model_validate_json(body) if body else None

    def list_jobs(self) -> list[Job]:
        return [Job.model_validate_json(b) for b in self._all("jobs", "name")]

    def put_job(self, job: Job) -> None:
        self._put("jobs", "name", job.name, job.model_dump_json())

    def delete_job(self, name: str) -> None:
        self.db.execute("DELETE FROM jobs WHERE name = ?", (name,))
        self.db.execute("DELETE FROM job_results WHERE job = ?", (name,))

    def has_job_result(self, job: str, device_id: str, run: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM job_results WHERE job = ? AND device_id = ? AND run = ?", (job, device_id, run)
        ).fetchone()
        return row is not None

    def add_job_result(self, job: str, device_id: str, run: str, started: float, body: str) -> None:
        """Store a run's result (once per run); keep the newest JOB_RESULTS_KEPT per job and device."""
        self.db.execute(
            "INSERT INTO job_results (job, device_id, run, started, body) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (job, device_id, run) DO UPDATE SET body = excluded.body",
            (job, device_id, run, started, body),
        )
        self.db.execute(
            "DELETE FROM job_results WHERE job = ? AND device_id = ? AND started < ("
            "SELECT started FROM job_results WHERE job = ? AND device_id = ? ORDER BY started DESC LIMIT 1 OFFSET ?)",
            (job, device_id, job, device_id, JOB_RESULTS_KEPT - 1),
        )

    def list_job_results(self, job: str, device_id: str | None, limit: int) -> list[tuple[str, str]]:
        """(device, result JSON) pairs, oldest first, the newest ``limit``."""
        if device_id is None:
            rows = self.db.execute(
                "SELECT device_id, body FROM job_results WHERE job = ? ORDER BY started DESC LIMIT ?",
                (job, limit),
            ).fetchall()
        else:
            rows = self.db.execute(
                "SELECT device_id, body FROM job_results WHERE job = ? AND device_id = ? ORDER BY started DESC LIMIT ?",
                (job, device_id, limit),
            ).fetchall()
        return [(r[0], r[1]) for r in reversed(rows)]

    # --- events ---

    def add_event(self, device_id: str, seq: int, body: str) -> bool:
        """Store an event once; False if this (device, seq) was already stored (a duplicate)."""
        cur = self.db.execute(
            "INSERT INTO events (device_id, seq, body) VALUES (?, ?, ?) ON CONFLICT (device_id, seq) DO NOTHING",
            (device_id, seq, body),
        )
        if cur.rowcount:
            # Trimmed to the newest EVENTS_KEPT once per device and transaction, before it
            # commits (a device sends its events in bursts: one per service and deploy).
            self._untrimmed.add(device_id)
            if not self._in_tx:
                self._trim_events()
        return bool(cur.rowcount)

    def add_events(self, events: list[tuple[str, int, str]]) -> set[tuple[str, int]]:
        """:meth:`add_event` for many (device, seq, body), a few statements for them all;
        the (device, seq) of those stored now (not duplicates)."""
        if not self._in_tx:  # (its savepoints need one)
            with self.transaction():
                return self.add_events(events)
        added: set[tuple[str, int]] = set()
        at = 0
        while at < len(events):
            size = next(s for s in _ROWS_PER_INSERT if s <= len(events) - at)
            rows = events[at : at + size]
            params = [value for row in rows for value in row]
            at += size
            # Most often every row is new: the count tells, and which rows is then known. If
            # not (a redelivery), the statement is undone and run again returning those stored.
            self.db.execute("SAVEPOINT tether_events")
            if self.db.execute(_INSERT_EVENTS[size], params).rowcount == size:
                added.update([(device_id, seq) for device_id, seq, _ in rows])
                self._untrimmed.update([device_id for device_id, _, _ in rows])
            else:
                self.db.execute("ROLLBACK TO SAVEPOINT tether_events")
                sql = _INSERT_EVENTS[size] + " RETURNING device_id, seq"
                for device_id, seq in self.db.execute(sql, params).fetchall():
                    added.add((device_id, int(seq)))
                    self._untrimmed.add(device_id)
            self.db.execute("RELEASE SAVEPOINT tether_events")
        return added  # trimmed with the transaction (see add_event)

    def _trim_events(self) -> None:
        """Keep the newest EVENTS_KEPT events of each device :meth:`add_event` stored since the last trim."""
        if self._untrimmed:
            devices, self._untrimmed = sorted(self._untrimmed), set()
            self.db.executemany(
                "DELETE FROM events WHERE device_id = ? AND seq <= ("
                "SELECT seq FROM events WHERE device_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                [(d, d, EVENTS_KEPT) for d in devices],
            )

    def count_dropped(self, device_id: str, reason: str) -> int:
        """One more message of ``device_id`` not stored (or stored trimmed) for ``reason``; the new count."""
        self.db.execute(
            "INSERT INTO dropped (device_id, reason, count) VALUES (?, ?, 1) "
            "ON CONFLICT (device_id, reason) DO UPDATE SET count = dropped.count + 1",
            (device_id, reason),
        )
        row = self.db.execute(
            "SELECT count FROM dropped WHERE device_id = ? AND reason = ?", (device_id, reason)
        ).fetchone()
        return int(row[0])

    def dropped(self, device_id: str) -> dict[str, int]:
        """Per reason, how many of the device's messages were not stored as sent."""
        rows = self.db.execute(
            "SELECT reason, count FROM dropped WHERE device_id = ? ORDER BY reason", (device_id,)
        ).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def event_seqs_above(self, device_id: str, seq: int) -> list[int]:
        """The sequence numbers of the device's stored events above ``seq``, in order."""
        return self.event_seqs_above_many({device_id: seq}).get(device_id, [])

    def event_seqs_above_many(self, bounds: Mapping[str, int]) -> dict[str, list[int]]:
        """Per device of ``bounds`` with any, the sequence numbers of its stored events above
        its bound, in order: one query per :data:`_IN_CHUNK` devices."""
        found: dict[str, list[int]] = {}
        for chunk in _chunks(list(bounds)):
            values = ", ".join(["(?, CAST(? AS BIGINT))"] * len(chunk))
            sql = (
                f"WITH bounds (device_id, seq) AS (VALUES {values}) SELECT e.device_id, e.seq "
                "FROM events e JOIN bounds b ON e.device_id = b.device_id AND e.seq > b.seq "
                "ORDER BY e.device_id, e.seq"
            )
            params = [x for d in chunk for x in (d, bounds[d])]
            for device_id, seq in self.db.execute(sql, params):
                found.setdefault(device_id, []).append(int(seq))
        return found

    def list_events(self, device_id: str, limit: int = 50) -> list[str]:
        rows = self.db.execute(
            "SELECT body FROM events WHERE device_id = ? ORDER BY seq DESC LIMIT ?", (device_id, limit)
        ).fetchall()
        return [r[0] for r in reversed(rows)]

    # --- stack definitions on the broker ---

    def definitions(self) -> dict[str, bool]:
        """Every definition hash the broker should (True) or may still (False) hold."""
        return {h: bool(p) for h, p in self.db.execute("SELECT spec_hash, published FROM definitions")}

    def set_definition(self, spec_hash: str, published: bool) -> None:
        self.db.execute(
            "INSERT INTO definitions (spec_hash, published) VALUES (?, ?) "
            "ON CONFLICT(spec_hash) DO UPDATE SET published = excluded.published",
            (spec_hash, int(published)),
        )

    def delete_definition(self, spec_hash: str) -> None:
        self.db.execute("DELETE FROM definitions WHERE spec_hash = ?", (spec_hash,))

    # --- broker credentials (hashes only; see tether.protocol.credentials) ---

    def put_credential(self, credential: Credential, created: float = 0.0) -> None:
        """Create or replace a credential (a new password hash un-revokes it)."""
        device_id = credential.name if credential.role == "device" else None
        self.db.execute(
            "INSERT INTO credentials (username, role, device_id, password_hash, revoked, created) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(username) DO UPDATE SET role = excluded.role, "
            "device_id = excluded.device_id, password_hash = excluded.password_hash, "
            "revoked = excluded.revoked, created = excluded.created",
            (credential.username, credential.role, device_id, credential.password_hash,
             int(credential.revoked), created),
        )  # fmt: skip

    def _credential(self, row: Any) -> Credential:
        username, role, device_id, password_hash, revoked = row
        return Credential(username, role, device_id or username, password_hash, bool(revoked))

    def get_credential(self, username: str) -> Credential | None:
        row = self.db.execute(
            "SELECT username, role, device_id, password_hash, revoked FROM credentials WHERE username = ?",
            (username,),
        ).fetchone()
        return self._credential(row) if row else None

    def list_credentials(self) -> list[Credential]:
        rows = self.db.execute(
            "SELECT username, role, device_id, password_hash, revoked FROM credentials ORDER BY username"
        )
        return [self._credential(r) for r in rows]

    def credentialed_devices(self) -> list[str]:
        """The devices a credential not revoked names (some may have no device row yet)."""
        rows = self.db.execute(
            "SELECT DISTINCT device_id FROM credentials WHERE device_id IS NOT NULL AND revoked = 0"
        )
        return [r[0] for r in rows]

    def revoke_device_credentials(self, device_id: str) -> list[str]:
        """Mark every credential of ``device_id`` revoked; their usernames."""
        rows = self.db.execute(
            "SELECT username FROM credentials WHERE device_id = ?", (device_id,)
        ).fetchall()
        self.db.execute("UPDATE credentials SET revoked = 1 WHERE device_id = ?", (device_id,))
        return [r[0] for r in rows]

    def delete_credential(self, username: str) -> None:
        self.db.execute("DELETE FROM credentials WHERE username = ?", (username,))

    # --- users, their API tokens (hashes only) and the audit log (issue 19) ---

    def get_user(self, name: str) -> User | None:
        body = self._get("users", "name", name)
        return User.model_validate_json(body) if body else None

    def list_users(self) -> list[User]:
        return [User.model_validate_json(b) for b in self._all("users", "name")]

    def put_user(self, user: User) -> None:
        self._put("users", "name", user.name, user.model_dump_json())

    def delete_user(self, name: str) -> None:
        """Remove the user, its API tokens and its credential."""
        self.db.execute("DELETE FROM users WHERE name = ?", (name,))
        for token in self.list_api_tokens():
            if token.user == name:
                self.db.execute("DELETE FROM api_tokens WHERE id = ?", (token.id,))
        self.delete_credential(name)

    def get_api_token(self, token_id: str) -> ApiToken | None:
        body = self._get("api_tokens", "id", token_id)
        return ApiToken.model_validate_json(body) if body else None

    def list_api_tokens(self) -> list[ApiToken]:
        return [ApiToken.model_validate_json(b) for b in self._all("api_tokens", "id")]

    def put_api_token(self, token: ApiToken) -> None:
        self._put("api_tokens", "id", token.id, token.model_dump_json())

    def delete_api_token(self, token_id: str) -> None:
        self.db.execute("DELETE FROM api_tokens WHERE id = ?", (token_id,))

    def add_audit(self, record: AuditRecord) -> None:
        self.db.execute(
            "INSERT INTO audit (id, at, username, body) VALUES (?, ?, ?, ?)",
            (record.id, record.at, record.user, record.model_dump_json()),
        )

    def list_audit(self, since: float = 0.0, user: str | None = None, limit: int = 1000) -> list[AuditRecord]:
        """The newest ``limit`` records at or after ``since`` (of ``user`` only, if given), oldest first."""
        sql = "SELECT body FROM audit WHERE at >= ?"
        args: list[Any] = [since]
        if user is not None:
            sql += " AND username = ?"
            args.append(user)
        rows = self.db.execute(f"{sql} ORDER BY at DESC, id DESC LIMIT ?", (*args, limit)).fetchall()
        return [AuditRecord.model_validate_json(r[0]) for r in reversed(rows)]

    def prune_audit(self, before: float) -> None:
        """Forget the records older than ``before`` (the retention, ``tether up --audit-retention``)."""
        self.db.execute("DELETE FROM audit WHERE at < ?", (before,))

    # --- enrollment tokens (hashes only) and the waiting room ---

    def get_token(self, token_id: str) -> EnrollmentToken | None:
        body = self._get("tokens", "id", token_id)
        return EnrollmentToken.model_validate_json(body) if body else None

    def list_tokens(self) -> list[EnrollmentToken]:
        return [EnrollmentToken.model_validate_json(b) for b in self._all("tokens", "id")]

    def put_token(self, token: EnrollmentToken) -> None:
        self._put("tokens", "id", token.id, token.model_dump_json())

    def delete_token(self, token_id: str) -> None:
        self.db.execute("DELETE FROM tokens WHERE id = ?", (token_id,))

    def get_enrollment(self, device_id: str) -> Enrollment | None:
        body = self._get("enrollments", "device_id", device_id)
        return Enrollment.model_validate_json(body) if body else None

    def list_enrollments(self) -> list[Enrollment]:
        return [Enrollment.model_validate_json(b) for b in self._all("enrollments", "device_id")]

    def put_enrollment(self, enrollment: Enrollment) -> None:
        self._put("enrollments", "device_id", enrollment.device_id, enrollment.model_dump_json())

    def delete_enrollment(self, device_id: str) -> None:
        self.db.execute("DELETE FROM enrollments WHERE device_id = ?", (device_id,))

    # --- variables (a secret's values only as ciphertext) ---

    def get_variable(self, scope: str, path: str) -> Variable | None:
        body = self._get("variables", "id", f"{scope}|{path}")
        return Variable.model_validate_json(body) if body else None

    def list_variables(self) -> list[Variable]:
        return [Variable.model_validate_json(b) for b in self._all("variables", "id")]

    def put_variable(self, variable: Variable) -> None:
        self._put("variables", "id", f"{variable.scope}|{variable.path}", variable.model_dump_json())

    def delete_variable(self, scope: str, path: str) -> None:
        self.db.execute("DELETE FROM variables WHERE id = ?", (f"{scope}|{path}",))

    # --- registries (credentials only as ciphertext) ---

    def get_registry(self, scope: str, host: str) -> Registry | None:
        body = self._get("registries", "id", f"{scope}|{host}")
        return Registry.model_validate_json(body) if body else None

    def list_registries(self) -> list[Registry]:
        return [Registry.model_validate_json(b) for b in self._all("registries", "id")]

    def put_registry(self, registry: Registry) -> None:
        self._put("registries", "id", f"{registry.scope}|{registry.host}", registry.model_dump_json())

    def delete_registry(self, scope: str, host: str) -> None:
        self.db.execute("DELETE FROM registries WHERE id = ?", (f"{scope}|{host}",))

    # --- webhooks and their deliveries (controller/notify.py) ---

    def get_webhook(self, webhook_id: str) -> Webhook | None:
        body = self._get("webhooks", "id", webhook_id)
        return Webhook.model_validate_json(body) if body else None

    def list_webhooks(self) -> list[Webhook]:
        return [Webhook.model_validate_json(b) for b in self._all("webhooks", "id")]

    def put_webhook(self, webhook: Webhook) -> None:
        self._put("webhooks", "id", webhook.id, webhook.model_dump_json())

    def delete_webhook(self, webhook_id: str) -> None:
        self.db.execute("DELETE FROM deliveries WHERE webhook = ?", (webhook_id,))
        self.db.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,))

    def add_delivery(self, delivery: Delivery) -> Delivery:
        """Store a new delivery; returns it with its id."""
        row = self.db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM deliveries").fetchone()
        delivery = delivery.model_copy(update={"id": int(row[0])})
        self.db.execute(
            "INSERT INTO deliveries (id, webhook, state, next_at, body) VALUES (?, ?, ?, ?, ?)",
            (delivery.id, delivery.webhook, delivery.state, delivery.next_at, delivery.model_dump_json()),
        )
        return delivery

    def get_delivery(self, delivery_id: int) -> Delivery | None:
        row = self.db.execute("SELECT body FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
        return Delivery.model_validate_json(row[0]) if row else None

    def put_delivery(self, delivery: Delivery) -> None:
        self.db.execute(
            "UPDATE deliveries SET state = ?, next_at = ?, body = ? WHERE id = ?",
            (delivery.state, delivery.next_at, delivery.model_dump_json(), delivery.id),
        )

    def due_deliveries(self, now: float, limit: int = 100) -> list[Delivery]:
        """Pending deliveries whose time has come, oldest first."""
        rows = self.db.execute(
            "SELECT body FROM deliveries WHERE state = 'pending' AND next_at <= ? ORDER BY id LIMIT ?",
            (now, limit),
        ).fetchall()
        return [Delivery.model_validate_json(r[0]) for r in rows]

    def list_deliveries(self, webhook_id: str | None, limit: int) -> list[Delivery]:
        if webhook_id is None:
            rows = self.db.execute("SELECT body FROM deliveries ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self.db.execute(
                "SELECT body FROM deliveries WHERE webhook = ? ORDER BY id DESC LIMIT ?", (webhook_id, limit)
            )
        return [Delivery.model_validate_json(r[0]) for r in rows.fetchall()]

    def delivery_counts(self) -> dict[str, dict[str, int]]:
        """Per webhook, its deliveries per state."""
        counts: dict[str, dict[str, int]] = {}
        for webhook, state, n in self.db.execute(
            "SELECT webhook, state, COUNT(*) FROM deliveries GROUP BY webhook, state"
        ).fetchall():
            counts.setdefault(webhook, {})[state] = int(n)
        return counts

    def prune_deliveries(self, keep: int) -> None:
        """Keep the newest ``keep`` deliveries that are done (pending ones always stay)."""
        self.db.execute(
            "DELETE FROM deliveries WHERE state != 'pending' AND id <= "
            "(SELECT COALESCE(MAX(id), 0) FROM deliveries) - ?",
            (keep,),
        )
