"""The embedded broker's own process: amqtt in a thread, commands from the controller on a socket.

:class:`~tether.broker.embedded.EmbeddedBroker` starts ``python -m tether.broker.child FD``
(its own interpreter and GIL, so the broker gets a core of its own) and talks to it over
the socket ``FD``, one :class:`multiprocessing.connection.Connection`:

* The controller sends ``(request id, operation, arguments)``; this process handles them
  one at a time, in order, on its main thread, and answers each with ``("reply", request
  id, ok, value)``. The first request is ``start`` (the listener, and a snapshot of the
  controller's :class:`~tether.broker.embedded.BrokerTable`); then the table's updates
  (``put``, ``remove``, ``users``, ``set_stacks``, ``set_tokens``), ``disconnect_users``,
  ``session_state``, ``lockouts`` (how many login lockouts began) and ``stop``.
* Log records go back as ``("log", attributes)``, so they reach the controller's own
  logging (its format, level and destination).
* End of file on the socket (the controller exited, even by SIGKILL) stops the broker and
  this process. SIGINT and SIGTERM are ignored: the broker lives exactly as long as its
  controller, which stops it last.

:class:`BrokerThread` runs amqtt in a background thread with its own event loop, listening
on a TCP port (0 = ephemeral). By default the broker is
:class:`~tether.broker.amqtt_fixes.TetherBroker`, amqtt 0.12.1 with Tether's fixes (no
retained-message leak between sessions, no dropped connections in a connect storm,
indexed retained messages and subscriptions, will on keepalive expiry, persistent
sessions with offline queueing); see docs/adr/0004-embedded-broker-fixes.md.
``stock=True`` runs amqtt's own Broker instead, for tests and benchmarks that show the
difference; never use it for a fleet. Tests that patch the broker's internals, and
``bench/broker_bench.py`` (which runs the broker alone in a process of its own), use
:class:`BrokerThread` directly.

The broker speaks MQTT 3.1.1 only (amqtt refuses an MQTT 5 CONNECT). Tether's protocol
does not rely on the broker for state it cannot rebuild: every receiver classifies
incoming topics itself, and the controller republishes its retained topics from its
store when it starts the broker.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from amqtt.broker import Broker
from tether.protocol.credentials import CredentialTable  # authentication (issue 5)
from tether.protocol.lockout import Lockout, LockoutPolicy

from .amqtt_fixes import TetherBroker, check_amqtt_version
from .auth import auth_plugins, disconnect_users  # authentication (issue 5)
from .errors import BrokerStartError

log = logging.getLogger(__name__)

__all__ = ["BrokerThread", "broker_config", "main"]


def broker_config(
    host: str,
    port: int,
    table: CredentialTable | None = None,
    tls: tuple[str, str] | None = None,
    client_ca: str | None = None,
    lockout: Lockout | None = None,
) -> dict[str, Any]:
    """The amqtt configuration for one TCP listener (TLS with ``tls``: certificate and key files).

    Without ``table`` anonymous clients are allowed everything; with it, connections and
    topics are checked against it (broker/auth.py). ``client_ca``: every client must present
    a certificate signed by this CA, and its common name is its username (mTLS).
    ``lockout``: the login throttling of password CONNECTs (None: the default policy).
    """
    listener: dict[str, Any] = {"type": "tcp", "bind": f"{host}:{port}", "max_connections": -1}
    if tls is not None:  # TLS (issue 5): amqtt wraps the listener in an ssl.SSLContext
        listener.update({"ssl": True, "certfile": tls[0], "keyfile": tls[1]})
        if client_ca is not None:  # amqtt verifies a presented client certificate against cafile
            listener["cafile"] = client_ca
    return {
        "listeners": {"default": listener},
        "plugins": (
            auth_plugins(table, client_certs=client_ca is not None, lockout=lockout)
            if table is not None
            else {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        ),
    }


def _requiring_client_certs(base: type[Broker]) -> type[Broker]:
    """``base`` with TLS listeners that refuse a handshake without a valid client certificate.

    amqtt 0.12.1 builds its listener context with ``CERT_OPTIONAL`` (a certificate, if sent,
    is verified against ``cafile``); a client sending none would only be refused at CONNECT
    by the auth plugin. ``CERT_REQUIRED`` refuses it in the handshake already.
    """

    class RequiringClientCerts(base):  # type: ignore[misc, valid-type]
        @staticmethod
        def _create_ssl_context(listener: Any) -> ssl.SSLContext:
            context = base._create_ssl_context(listener)
            context.verify_mode = ssl.CERT_REQUIRED
            return context

    return RequiringClientCerts


class BrokerThread:
    """An amqtt broker in a background thread of this process. :meth:`start` returns the bound port.

    ``stock=True`` runs amqtt's unmodified Broker (for comparisons only).
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
        self.stock = stock
        self.tls = tls  # (certificate file, key file): listen with TLS only
        self.client_ca = client_ca  # mTLS: clients need a certificate from this CA (its CN = username)
        self.table = table  # authentication (issue 5): None = anonymous clients allowed everything
        self.lockout = Lockout.of(lockout or LockoutPolicy())  # login throttling of password CONNECTs
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Broker | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 15.0) -> int:
        """Start listening; return the actual port. Raise :class:`BrokerStartError` on failure."""
        if not self.stock:
            check_amqtt_version()  # raises a BrokerStartError subclass that says what to do
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # A failed start is reported once, by us; amqtt would log it with a traceback first.
        quiet = logging.getLogger("amqtt.broker")
        quiet.setLevel(logging.CRITICAL)
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        ready = self._ready.wait(timeout)
        quiet.setLevel(logging.WARNING)
        if not ready:
            raise BrokerStartError("embedded broker did not start in time")
        if self._error is not None:
            raise BrokerStartError(f"cannot start embedded broker on {self.host}:{self.port}: {self._error}")
        return self.port

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start())
        except BaseException as exc:  # reported to start()
            self._error = exc.__cause__ or exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _start(self) -> None:
        config = broker_config(self.host, self.port, self.table, self.tls, self.client_ca, self.lockout)
        cls: type[Broker] = Broker if self.stock else TetherBroker
        if self.client_ca is not None:
            cls = _requiring_client_certs(cls)
        self._broker = cls(config)
        await self._broker.start()
        server = self._broker._servers["default"].instance  # amqtt exposes no public accessor
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]

    def session_state(self, client_id: str, timeout: float = 5.0) -> str | None:
        """The broker's session of ``client_id``: "connected", "disconnected", or None if it has none."""
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or not loop.is_running():
            return None

        async def read() -> str | None:
            entry = broker.sessions.get(client_id)
            return None if entry is None else str(entry[0].transitions.state)

        return asyncio.run_coroutine_threadsafe(read(), loop).result(timeout)

    # --- authentication (issue 5) -----------------------------------------------------------

    def disconnect_users(self, usernames: set[str], timeout: float = 5.0) -> int:
        """Close the live connections of ``usernames`` now (e.g. revoked); how many were closed."""
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or not loop.is_running():
            return 0
        return asyncio.run_coroutine_threadsafe(disconnect_users(broker, usernames), loop).result(timeout)

    # --- end authentication ----------------------------------------------------------------

    def stop(self) -> None:
        """Shut the broker down and join its thread."""
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or not loop.is_running():
            return
        fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
        try:
            fut.result(timeout=10)
        except Exception:  # shutting down anyway
            log.debug("embedded broker shutdown raised", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)


# --- the process ------------------------------------------------------------------------------


class _ForwardingHandler(logging.Handler):
    """Send every log record to the controller, which hands it to its own logging."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            attrs = dict(record.__dict__)
            attrs["msg"] = record.getMessage()
            attrs["args"] = None
            if record.exc_info:
                attrs["exc_text"] = logging.Formatter().formatException(record.exc_info)
            attrs["exc_info"] = None
            attrs.pop("message", None)
            self._send(("log", attrs))
        except Exception:
            self.handleError(record)


def _table(snapshot: dict[str, Any] | None) -> CredentialTable | None:
    """This process's copy of the controller's table, from the snapshot sent with ``start``."""
    if snapshot is None:
        return None
    table = CredentialTable(snapshot["credentials"], allow_anonymous=snapshot["allow_anonymous"])
    table.set_stacks(snapshot["stacks"])
    table.set_tokens(snapshot["tokens"])
    return table


def _update_users(table: CredentialTable, changed: list[Any], removed: list[str]) -> None:
    """Apply a :meth:`BrokerTable.replace`: these credentials changed or are new, these are gone."""
    users = {c.username: c for c in table.credentials()}
    users.update((c.username, c) for c in changed)
    for username in removed:
        users.pop(username, None)
    table.replace(users.values())


def _handlers(broker: BrokerThread, table: CredentialTable | None) -> dict[str, Callable[..., Any]]:
    handlers: dict[str, Callable[..., Any]] = {
        "disconnect_users": lambda usernames: broker.disconnect_users(set(usernames)),
        "session_state": broker.session_state,
        "lockouts": lambda: broker.lockout.lockouts,
    }
    if table is not None:
        handlers.update(
            put=table.put,
            remove=table.remove,
            users=lambda changed, removed: _update_users(table, changed, removed),
            set_stacks=table.set_stacks,
            set_tokens=table.set_tokens,
        )
    return handlers


def serve(conn: Connection) -> int:
    """Run the broker the first request on ``conn`` describes until ``stop`` or end of file."""
    send_lock = threading.Lock()

    def send(message: Any) -> None:
        with send_lock:
            conn.send(message)

    def reply(request_id: int, ok: bool, value: Any) -> None:
        send(("reply", request_id, ok, value))

    request_id, op, options = conn.recv()
    assert op == "start", op
    root = logging.getLogger()
    root.setLevel(options["log_level"])
    forwarding = _ForwardingHandler(send)
    root.addHandler(forwarding)
    table = _table(options["table"])
    try:
        broker = BrokerThread(
            options["host"],
            options["port"],
            stock=options["stock"],
            table=table,
            tls=options["tls"],
            client_ca=options["client_ca"],
            lockout=options.get("lockout"),
        )
        port = broker.start()
    except BrokerStartError as exc:
        reply(request_id, False, str(exc))
        return 1
    reply(request_id, True, port)
    handlers = _handlers(broker, table)
    stop_id: int | None = None
    try:
        while True:
            request_id, op, args = conn.recv()
            if op == "stop":
                stop_id = request_id
                break
            try:
                ok, value = True, handlers[op](*args)
            except Exception as exc:
                log.exception("embedded broker: %s failed", op)
                ok, value = False, f"{type(exc).__name__}: {exc}"
            reply(request_id, ok, value)
    except (EOFError, OSError):  # the controller is gone: nobody to log to or answer
        root.removeHandler(forwarding)
    broker.stop()
    if stop_id is not None:
        reply(stop_id, True, None)
    return 0


def main(argv: list[str]) -> int:
    # The controller stops us (end of file on the socket); a terminal's Ctrl-C or a
    # service manager's SIGTERM to the whole group must not take the broker away first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return serve(Connection(int(argv[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
