"""Run amqtt in its own thread and event loop, listening on a TCP port (0 = ephemeral).

By default the broker is :class:`~tether.broker.amqtt_fixes.TetherBroker`, amqtt 0.12.1
with Tether's fixes (no retained-message leak between sessions, no dropped connections
in a connect storm, indexed retained messages and subscriptions, will on keepalive
expiry, persistent sessions with offline queueing); see
docs/adr/0004-embedded-broker-fixes.md. ``stock=True`` runs amqtt's own Broker instead,
for tests and benchmarks that show the difference; never use it for a fleet.

The broker speaks MQTT 3.1.1 only (amqtt refuses an MQTT 5 CONNECT). Tether's protocol
does not rely on the broker for state it cannot rebuild: every receiver classifies
incoming topics itself, and the controller republishes its retained topics from its
store when it starts the broker.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from typing import Any

from amqtt.broker import Broker
from tether.protocol.credentials import CredentialTable  # authentication (issue 5)

from .amqtt_fixes import TetherBroker, check_amqtt_version
from .auth import auth_plugins, disconnect_users  # authentication (issue 5)
from .errors import BrokerStartError

log = logging.getLogger(__name__)

__all__ = ["BrokerStartError", "EmbeddedBroker", "broker_config"]


def broker_config(
    host: str,
    port: int,
    table: CredentialTable | None = None,
    tls: tuple[str, str] | None = None,
    client_ca: str | None = None,
) -> dict[str, Any]:
    """The amqtt configuration for one TCP listener (TLS with ``tls``: certificate and key files).

    Without ``table`` anonymous clients are allowed everything; with it, connections and
    topics are checked against it (broker/auth.py). ``client_ca``: every client must present
    a certificate signed by this CA, and its common name is its username (mTLS).
    """
    listener: dict[str, Any] = {"type": "tcp", "bind": f"{host}:{port}", "max_connections": -1}
    if tls is not None:  # TLS (issue 5): amqtt wraps the listener in an ssl.SSLContext
        listener.update({"ssl": True, "certfile": tls[0], "keyfile": tls[1]})
        if client_ca is not None:  # amqtt verifies a presented client certificate against cafile
            listener["cafile"] = client_ca
    return {
        "listeners": {"default": listener},
        "plugins": (
            auth_plugins(table, client_certs=client_ca is not None)  # authentication (issue 5)
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


class EmbeddedBroker:
    """An amqtt broker in a background thread. :meth:`start` returns the bound port.

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
    ) -> None:
        if client_ca is not None and (tls is None or table is None):
            raise BrokerStartError("client certificates need TLS and authentication")
        self.stock = stock
        self.tls = tls  # (certificate file, key file): listen with TLS only
        self.client_ca = client_ca  # mTLS: clients need a certificate from this CA (its CN = username)
        self.table = table  # authentication (issue 5): None = anonymous clients allowed everything
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
        config = broker_config(self.host, self.port, self.table, self.tls, self.client_ca)
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
