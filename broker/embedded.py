"""The embedded broker, run in a child process of the controller (its own interpreter and GIL).

:class:`EmbeddedBroker` starts ``python -m tether.broker.child`` (``broker/child.py``:
amqtt 0.12.1 with Tether's fixes) and talks to it over a socket pair; :meth:`start`
returns the port it bound (0 = ephemeral), or raises :class:`BrokerStartError` with the
child's reason (port in use, bad TLS files, another amqtt version). In one process, the
broker, the controller's MQTT client and its worker shared one GIL: at 1,000 devices the
broker alone took 43 % of the process (docs/performance.md). In its own process it gets
the second core.

The broker authenticates against its own copy of the controller's credential table.
The controller uses a :class:`BrokerTable`: every update is applied to it and sent to
the child, in order, and the call returns once the child has applied it too, so an
update (a device's new stacks for the ACL, a revocation, an enrollment token) is in force
in the broker before the controller tells anyone about it. :meth:`EmbeddedBroker.disconnect_users`
likewise returns once the child closed the connections.

The child stops when its socket reaches end of file, so it never outlives the controller
(even one killed with SIGKILL), and ignores SIGINT and SIGTERM (the controller stops it
last). Its log records are handed to this process's logging. This module does not import
amqtt: the controller's process never loads the broker.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from tether.protocol.credentials import Credential, CredentialTable, TokenGrant
from tether.protocol.lockout import LockoutPolicy

from .errors import BrokerStartError
from .version import check_amqtt_version

log = logging.getLogger(__name__)

__all__ = ["BrokerStartError", "BrokerTable", "EmbeddedBroker"]

REQUEST_TIMEOUT = 10.0
"""Seconds a table update waits for the broker process (it answers in milliseconds)."""


class BrokerTable(CredentialTable):
    """The controller's :class:`CredentialTable` when the broker runs in its child process.

    Each update is applied here, then to the broker's copy; it returns when both hold it.
    Before :meth:`EmbeddedBroker.start` (and after :meth:`EmbeddedBroker.stop`) it is a
    plain table; ``start`` sends the broker a snapshot. ``allow_anonymous`` is read at start.
    """

    def __init__(self, credentials: Iterable[Credential] = (), *, allow_anonymous: bool = False) -> None:
        super().__init__(credentials, allow_anonymous=allow_anonymous)
        self._broker: EmbeddedBroker | None = None
        self._order = threading.RLock()  # an update is applied here and sent as one step

    def snapshot(self) -> dict[str, Any]:
        return {
            "allow_anonymous": self.allow_anonymous,
            "credentials": self.credentials(),
            "stacks": self.all_stacks(),
            "tokens": dict(self._tokens),
        }

    def _forward(self, op: str, *args: Any) -> None:
        if self._broker is not None:
            self._broker._request(op, *args)

    def replace(self, credentials: Iterable[Credential]) -> None:
        with self._order:
            before = {c.username: c for c in self.credentials()}
            super().replace(credentials)
            after = {c.username: c for c in self.credentials()}
            changed = [c for name, c in after.items() if before.get(name) != c]
            removed = [name for name in before if name not in after]
            if changed or removed:  # only the difference crosses to the broker
                self._forward("users", changed, removed)

    def put(self, credential: Credential) -> None:
        with self._order:
            super().put(credential)
            self._forward("put", credential)

    def remove(self, username: str) -> None:
        with self._order:
            super().remove(username)
            self._forward("remove", username)

    def set_stacks(self, assigned: Mapping[str, Collection[str]]) -> None:
        with self._order:
            super().set_stacks(assigned)
            self._forward("set_stacks", {device_id: frozenset(h) for device_id, h in assigned.items()})

    def set_tokens(self, grants: Mapping[str, TokenGrant]) -> None:
        with self._order:
            super().set_tokens(grants)
            self._forward("set_tokens", dict(grants))


class EmbeddedBroker:
    """An amqtt broker in a child process. :meth:`start` returns the bound port.

    ``table``: a :class:`BrokerTable` to authenticate against (None: anonymous clients may
    do everything). ``lockout``: the throttling of failed password logins (protocol/lockout.py;
    None: 5 failures, then 30 s doubling up to 15 min). ``stock=True`` runs amqtt's unmodified Broker (for comparisons only).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        stock: bool = False,
        table: CredentialTable | None = None,
        tls: tuple[str, str] | None = None,
        client_ca: str | None = None,
        lockout: LockoutPolicy | None = None,
    ) -> None:
        if client_ca is not None and (tls is None or table is None):
            raise BrokerStartError("client certificates need TLS and authentication")
        if table is not None and not isinstance(table, BrokerTable):
            raise TypeError("the embedded broker needs a tether.broker.BrokerTable (it forwards updates)")
        self.stock = stock
        self.tls = tls  # (certificate file, key file): listen with TLS only
        self.client_ca = client_ca  # mTLS: clients need a certificate from this CA (its CN = username)
        self.table: BrokerTable | None = table  # authentication (issue 5)
        self.lockout = lockout  # login throttling of password CONNECTs (None: the default policy)
        self.host = host
        self.port = port
        self.pid: int | None = None
        """The broker process's pid, once started."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()  # one message at a time on the socket
        self._pending_lock = threading.Lock()  # guards _pending and _gone (never held while sending)
        self._gone = False
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[Any]] = {}
        self._reader: threading.Thread | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        """Whether the broker process is up (False before start, after stop, or if it died)."""
        return self._reader is not None and self._reader.is_alive()

    def start(self, timeout: float = 15.0) -> int:
        """Start the broker process and its listener; return the actual port.

        Raise :class:`BrokerStartError` (with the broker's reason) if it cannot listen."""
        if not self.stock:
            check_amqtt_version()  # here too: a clear message if amqtt is missing or another version
        self._stopping = self._gone = False
        ours, theirs = socket.socketpair()
        with theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tether.broker.child", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=2,  # nothing is printed; if anything is, it joins our stderr
            )
        self.pid = self._proc.pid
        self._sock = ours  # kept to shut down: that wakes our reader and ends the child
        self._conn = Connection(os.dup(ours.fileno()))
        options = {
            "host": self.host,
            "port": self.port,
            "stock": self.stock,
            "tls": self.tls,
            "client_ca": self.client_ca,
            "lockout": self.lockout,
            "log_level": logging.getLogger().getEffectiveLevel(),
        }
        table = self.table
        if table is None:
            return self._start(options, timeout)
        with table._order:  # no update between the snapshot and forwarding
            port = self._start({**options, "table": table.snapshot()}, timeout)
            table._broker = self
        return port

    def _start(self, options: dict[str, Any], timeout: float) -> int:
        assert self._conn is not None and self._proc is not None
        options.setdefault("table", None)
        deadline = time.monotonic() + timeout
        try:
            self._conn.send((0, "start", options))
            while True:  # log records may come first
                if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                    raise BrokerStartError("embedded broker did not start in time")
                message = self._conn.recv()
                if message[0] == "log":
                    _log_record(message[1])
                    continue
                _, _, ok, value = message
                if not ok:
                    raise BrokerStartError(value)
                break
        except (EOFError, OSError) as exc:
            proc = self._proc
            self._end_process()
            raise BrokerStartError(
                f"embedded broker process exited during start (exit status {proc.returncode})"
            ) from exc
        except BaseException:
            self._end_process()
            raise
        self.port = int(value)
        self._reader = threading.Thread(target=self._read, name="embedded-broker-reader", daemon=True)
        self._reader.start()
        return self.port

    def _read(self) -> None:
        """The broker's messages: replies to requests, and log records."""
        conn = self._conn
        assert conn is not None
        try:
            while True:
                message = conn.recv()
                if message[0] == "log":
                    _log_record(message[1])
                    continue
                _, request_id, ok, value = message
                with self._pending_lock:
                    future = self._pending.pop(request_id, None)
                if future is None:
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(RuntimeError(f"embedded broker: {value}"))
        except (EOFError, OSError):
            pass
        with self._pending_lock:
            self._gone = True
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(ConnectionError("the embedded broker process has exited"))
        if not self._stopping and self._proc is not None:
            log.error("the embedded broker process exited (exit status %s)", self._proc.wait())

    def _request(self, op: str, *args: Any, timeout: float = REQUEST_TIMEOUT) -> Any:
        """Send one request to the broker process and wait for its answer (None if it is gone)."""
        future: Future[Any] = Future()
        conn = self._conn
        with self._pending_lock:
            if self._gone or conn is None:
                return None
            request_id = next(self._ids)
            self._pending[request_id] = future
        try:
            with self._send_lock:
                conn.send((request_id, op, args))
        except OSError:  # it exited: our reader fails the future
            pass
        try:
            return future.result(timeout)
        except ConnectionError:  # it exited meanwhile: nothing is connected to it any more
            return None

    def session_state(self, client_id: str, timeout: float = 5.0) -> str | None:
        """The broker's session of ``client_id``: "connected", "disconnected", or None if it has none."""
        state: str | None = self._request("session_state", client_id, timeout=timeout)
        return state

    # --- authentication (issue 5) -----------------------------------------------------------

    def disconnect_users(self, usernames: set[str], timeout: float = 5.0) -> int:
        """Close the live connections of ``usernames`` now (e.g. revoked); how many were closed.

        Returns once the broker has closed them."""
        closed = self._request("disconnect_users", sorted(usernames), timeout=timeout)
        return int(closed or 0)

    def lockouts(self, timeout: float = 2.0) -> int | None:
        """How many login lockouts the broker has begun (None: it did not answer in time)."""
        try:
            count = self._request("lockouts", timeout=timeout)
        except TimeoutError:
            return None
        return int(count) if count is not None else None

    # --- end authentication ----------------------------------------------------------------

    def stop(self) -> None:
        """Shut the broker down and wait for its process to exit."""
        if self._proc is None:
            return
        if self.table is not None:
            with self.table._order:
                self.table._broker = None
        self._stopping = True
        try:
            self._request("stop", timeout=15)
        except TimeoutError:
            log.warning("the embedded broker did not stop in time; killing it")
        self._end_process()

    def _end_process(self) -> None:
        """Shut our end of the socket down (the child stops at end of file) and reap the child."""
        self._stopping = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(5)
        for closable in (self._conn, self._sock):
            if closable is not None:
                closable.close()
        self._proc = self._conn = self._sock = None


def _log_record(attrs: dict[str, Any]) -> None:
    """Hand a record from the broker process to our own logging, subject to our levels."""
    record = logging.makeLogRecord(attrs)
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)
