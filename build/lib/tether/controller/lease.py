"""Leadership: exactly one controller schedules and publishes at a time.

* SQLite: an exclusive ``flock`` on ``{db}.lock``; a second controller on the same file
  refuses to start (SQLite is a single-controller store).
* PostgreSQL: a session-level advisory lock on a dedicated connection. Standby
  controllers try to take it every tick; when the leader dies its connection closes, the
  database releases the lock, and the first standby to ask becomes the leader. A leader
  that loses its lock connection steps down at once (the process exits and its supervisor
  restarts it as a standby), so two leaders never act together.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any, Protocol

from tether.protocol.errors import StoreError

from .store import is_postgres_url

LEADER_LOCK = 0x7E7E_0002


class Lease(Protocol):
    def try_acquire(self) -> bool:
        """Take the lease if free; True if we hold it now."""
        ...

    def still_held(self) -> bool:
        """Whether the lease we took is still ours."""
        ...

    def release(self) -> None: ...


class FileLease:
    """An exclusive lock file next to a SQLite database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def still_held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class PostgresLease:
    """A PostgreSQL session advisory lock held on its own connection."""

    def __init__(self, url: str) -> None:
        import psycopg

        self._psycopg = psycopg
        self.url = url
        self._conn: Any = None
        self._held = False

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        return self._conn

    def try_acquire(self) -> bool:
        if self._held:
            return self.still_held()
        try:
            row = self._connection().execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()
        except self._psycopg.Error:
            self._conn = None
            return False
        self._held = bool(row and row[0])
        return self._held

    def still_held(self) -> bool:
        if not self._held:
            return False
        try:
            self._connection().execute("SELECT 1")
        except self._psycopg.Error:
            self._held = False
            self._conn = None
        return self._held

    def release(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._held = False


def lease_for(target: str) -> Lease:
    """The lease that guards the store at ``target`` (a SQLite path or a PostgreSQL URL)."""
    if is_postgres_url(target):
        return PostgresLease(target)
    lease = FileLease(Path(f"{target}.lock"))
    if not lease.try_acquire():
        raise StoreError(f"another controller is using {target}; a SQLite store serves one controller")
    return lease
