"""Tether's fixes to amqtt 0.12.1's broker: a subclass, not a patch of site-packages.

See docs/adr/0004-embedded-broker-fixes.md for the defects and why each override exists.
In short, :class:`TetherBroker` replaces amqtt's per-connection and per-message paths:

* **Retained messages on connect** (confidentiality): amqtt sends a connecting client the
  retained messages of *every* session's subscriptions. Here nothing retained is sent on
  connect; retained messages go out only for a SUBSCRIBE, and only those matching the
  filters of that SUBSCRIBE (MQTT 3.1.1 section 3.3.1.3), as Mosquitto does.
* **No iteration over shared dicts across awaits** (amqtt raised "dictionary changed
  size during iteration" and dropped the new connection right after CONNACK).
* **Indexes instead of scans**: retained topics in a dict plus a :class:`TopicTrie` for
  wildcard filters; subscriptions in a dict by filter plus a :class:`FilterTrie` of the
  wildcard ones; each session knows its own filters, so disconnecting does not walk
  every subscription. No debug strings are built on hot paths.
* **One consumer per session**: the handler puts SUBSCRIBE, UNSUBSCRIBE, incoming
  PUBLISH and the end of the connection, in arrival order, into the session's queue; one
  loop per connection consumes it (amqtt used four futures and ``asyncio.wait`` per
  event, and could handle a disconnect before messages the client sent earlier).
* **Keepalive**: a client silent for 1.5 x its keepalive is disconnected and its will
  published (amqtt logged the read timeout and kept waiting forever).
* **Persistent sessions**: kept after disconnect (amqtt dropped every session of an
  anonymous client, so session-present was never set and nothing was queued); QoS 1/2
  messages for an offline persistent session are queued (at most
  ``max_queued_messages``) and delivered on reconnect; unacknowledged ones are
  redelivered with DUP set. No fixed 5 s PUBACK timeout (MQTT 3.1.1 retransmits on
  reconnect only); the PUBACK waiter is registered before the PUBLISH is written, so a
  fast PUBACK is never "unknown".
* **QoS**: delivered at min(subscription QoS, message QoS) (amqtt used the
  subscription's QoS); one copy per client at the highest matching QoS.
* **Authentication before session handling**: an unauthenticated CONNECT can no longer
  delete the existing session of the client id it claims.
* **Wills, client ids, packet size** (issue 13): a will is a publish like any other: a
  CONNECT whose will topic the ACL refuses gets CONNACK 5, and the will is checked again
  when it goes out (amqtt published it unchecked); a client id that is not one topic level
  (``names.CLIENT_ID``) gets CONNACK 2 (amqtt's own ids were ``amqtt/...``); a packet whose
  header announces more than ``MAX_PACKET_SIZE`` closes the connection before its body is read.
* **Topic checks without tasks**: amqtt runs the topic plugins (the ACL) as one task per
  plugin, gathered, for every SUBSCRIBE, every PUBLISH and every delivery; here they are
  awaited in turn (a fifth of the broker's CPU in a 1,000-device deploy).
* **Memory**: no ``transitions.Machine`` per session and no ``asyncio.Queue`` it does not
  need: about 16 KB per connected device instead of about 54 KB.

Everything here depends on amqtt internals, so it refuses to run on any amqtt version but
:data:`AMQTT_VERSION` (``broker/version.py``); tests/test_broker*.py cover each override against the stock path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any, TypeGuard

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker, RetainedApplicationMessage, Server
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError, ProtocolHandlerError
from amqtt.events import BrokerEvents, MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    NOT_AUTHORIZED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import (
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler, Subscription, UnSubscription
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.plugins.manager import PluginManager
from amqtt.session import OUTGOING, ApplicationMessage, Session
from tether.protocol import names
from tether.protocol.codec import MAX_PACKET_SIZE, packet_size

from .topic_index import FilterTrie, TopicTrie, is_wildcard, valid_filter
from .version import AMQTT_VERSION, UnsupportedAmqttVersion, check_amqtt_version  # noqa: F401  (re-exported)

log = logging.getLogger("tether.broker")
_amqtt_handler_log = logging.getLogger("amqtt.mqtt.protocol.handler")

CONNECT_TIMEOUT = 20.0
"""Seconds a new TCP connection may take to send its CONNECT packet."""

TAKEOVER_TIMEOUT = 5.0
"""Seconds to wait for the old connection's loop when a client id connects again."""

LISTEN_BACKLOG = 1024
"""TCP accept backlog (asyncio's default of 100 overflows in a reconnect storm)."""

SUBACK_FAILURE = 0x80


# --- sessions ----------------------------------------------------------------------------


class _SessionState:
    """The three-state machine of an amqtt session, without ``transitions``.

    amqtt builds a ``transitions.Machine`` per session (about 20 KB each); the broker only
    ever reads ``state`` and calls ``connect``/``disconnect``/``is_connected``.
    """

    __slots__ = ("_session", "state")

    def __init__(self, session: TetherSession) -> None:
        self._session = session
        self.state = "new"

    def connect(self) -> None:
        if self.state == "connected":
            raise ValueError("session is already connected")
        self.state = "connected"
        self._session._on_enter_connected()

    def disconnect(self) -> None:
        self.state = "disconnected"
        self._session._on_enter_disconnected()

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"

    def is_new(self) -> bool:
        return self.state == "new"


class _Inbox:
    """An unbounded single-consumer FIFO with the part of ``asyncio.Queue``'s API amqtt uses.

    An ``asyncio.Queue`` costs about 3 KB even when empty (two deques and an Event), and a
    session has two of them. This is a list (it rarely holds more than a few items) and
    at most one waiter.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.pop(0)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class TetherSession(Session):
    """An amqtt session with a light state machine and the set of its own subscriptions."""

    def __init__(self) -> None:
        # amqtt 0.12.1's Session.__init__, without building two asyncio.Queues only to
        # replace them (tests/test_broker.py checks that no attribute is missing).
        self._init_states()
        self.remote_address: str | None = None
        self.remote_port: int | None = None
        self.client_id: str | None = None
        self.clean_session: bool | None = None
        self.will_flag = False
        self.will_message: bytes | bytearray | None = None
        self.will_qos: int | None = None
        self.will_retain: bool | None = None
        self.will_topic: str | None = None
        self.keep_alive = 0
        self.publish_retry_delay = 0
        self.broker_uri: str | None = None
        self.username: str | None = None
        self.password: str | None = None
        self.cafile: str | None = None
        self.capath: str | None = None
        self.cadata: bytes | None = None
        self._packet_id = 0
        self.parent = 0
        self.last_connect_time: int | None = None
        self.ssl_object = None
        self.last_disconnect_time: int | None = None
        self.attributes: dict[str, Any] = {}
        self.inflight_out: OrderedDict[int, Any] = OrderedDict()
        self.inflight_in: OrderedDict[int, Any] = OrderedDict()
        self.retained_messages = _Inbox()  # type: ignore[assignment]  # queued while offline
        self.delivered_message_queue = _Inbox()  # type: ignore[assignment]  # the session loop's inbox
        self.is_anonymous = False
        self.filters: dict[str, int] = {}
        """This session's subscriptions: topic filter -> granted QoS."""
        self.queue_overflows = 0

    def _init_states(self) -> None:
        self.transitions = _SessionState(self)  # type: ignore[assignment]


# --- the per-connection protocol handler -------------------------------------------------

_SUB, _UNSUB, _END = 1, 2, 3


class _Control:
    """A non-message event for the session's loop, tagged with the connection it belongs to."""

    __slots__ = ("handler", "kind", "payload")

    def __init__(self, handler: TetherHandler, kind: int, payload: Any) -> None:
        self.handler = handler
        self.kind = kind
        self.payload = payload


class TetherHandler(BrokerProtocolHandler):
    """One client connection: reads packets in order, enforces keepalive, owns its deliveries."""

    def __init__(
        self,
        plugins_manager: PluginManager[Any],
        session: Session | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # amqtt 0.12.1's ProtocolHandler and BrokerProtocolHandler __init__, without the
        # two queues and the event this class does not use (about 7 KB, and a noticeable
        # share of a connect storm's CPU); tests/test_broker.py checks nothing is missing.
        self.read_timeout: float | None = None
        self.keepalive_timeout: int | None = None
        self.logger = _amqtt_handler_log
        self.session: Session | None = None
        if session is not None:
            self._init_session(session)
        self.reader: ReaderAdapter | None = None
        self.writer: WriterAdapter | None = None
        self.plugins_manager = plugins_manager
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._reader_task: asyncio.Task[None] | None = None
        self._keepalive_task: asyncio.TimerHandle | None = None
        self._reader_ready = None
        self._reader_stopped = None  # type: ignore[assignment]
        self._puback_waiters: dict[int, asyncio.Future[Any]] = {}
        self._pubrec_waiters: dict[int, asyncio.Future[Any]] = {}
        self._pubrel_waiters: dict[int, asyncio.Future[Any]] = {}
        self._pubcomp_waiters: dict[int, asyncio.Future[Any]] = {}
        self._write_lock = asyncio.Lock()
        self._disconnect_waiter = None
        self._pending_subscriptions = None  # type: ignore[assignment]
        self._pending_unsubscriptions = None  # type: ignore[assignment]
        self.will: tuple[str, bytes | bytearray, int, bool] | None = None
        self.taken_over = False
        self.keepalive_expired = False
        self.loop_done: asyncio.Future[None] = self._loop.create_future()
        self.loop_task: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ended = False
        self._last_rx = 0.0
        self._ka_timer: asyncio.TimerHandle | None = None

    def _init_session(self, session: Session) -> None:
        super()._init_session(session)
        # amqtt re-arms a no-op "write timeout" timer on every packet sent: drop it, and
        # enforce the read side instead (MQTT 3.1.1 section 3.1.2.10: 1.5 x keepalive).
        self.keepalive_timeout = None
        self.read_timeout = 1.5 * session.keep_alive if session.keep_alive > 0 else None

    # --- CONNECT -----------------------------------------------------------------------

    @classmethod
    async def init_from_connect(
        cls,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        plugins_manager: PluginManager[Any],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[TetherHandler, Session]:
        """amqtt's ``BrokerProtocolHandler.init_from_connect``, building a :class:`TetherSession`.

        Unlike amqtt, a first packet that is not a CONNECT is refused at once [MQTT-3.1.0-1]
        instead of being parsed as one (and waited for) whatever its type.
        """
        fixed_header = await MQTTFixedHeader.from_stream(reader)
        if fixed_header is None:
            raise NoDataError("connection closed before CONNECT")
        if fixed_header.packet_type != CONNECT:
            raise MQTTError(f"[MQTT-3.1.0-1] first packet has type {fixed_header.packet_type}, not CONNECT")
        if _oversized(fixed_header):
            raise MQTTError(
                f"CONNECT of {_size(fixed_header)} bytes exceeds the {MAX_PACKET_SIZE}-byte limit"
            )
        connect = await ConnectPacket.from_stream(reader, fixed_header=fixed_header)
        await plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=connect)
        if connect.variable_header is None or connect.payload is None:
            raise MQTTError("CONNECT packet: header or payload missing")
        if connect.payload.client_id is None:
            raise MQTTError("[MQTT-3.1.3-3] client identifier must be present")
        if connect.variable_header.will_flag and (
            connect.payload.will_topic is None or connect.payload.will_message is None
        ):
            raise MQTTError("will flag set, but will topic/message not present in payload")
        if connect.variable_header.reserved_flag:
            raise MQTTError("[MQTT-3.1.2-3] CONNECT reserved flag must be 0")
        if connect.proto_name != "MQTT":
            raise MQTTError(f"[MQTT-3.1.2-1] incorrect protocol name {connect.proto_name!r}")
        remote_address: str | None = None
        remote_port: int | None = None
        remote_info = writer.get_peer_info()
        if remote_info is not None:
            remote_address, remote_port = remote_info
            refusal: tuple[int, str] | None = None
            if connect.proto_level != 4:
                refusal = (
                    UNACCEPTABLE_PROTOCOL_VERSION,
                    f"protocol level {connect.proto_level} (MQTT 3.1.1 only)",
                )
            elif not connect.username_flag and connect.password_flag:
                refusal = (BAD_USERNAME_PASSWORD, "password without username")
            elif connect.username_flag and connect.username is None:
                refusal = (BAD_USERNAME_PASSWORD, "invalid username")
            elif connect.password_flag and connect.password is None:
                refusal = (BAD_USERNAME_PASSWORD, "invalid password")
            elif connect.clean_session_flag is False and connect.payload.client_id_is_random:
                refusal = (IDENTIFIER_REJECTED, "[MQTT-3.1.3-8] empty client id with clean session 0")
            if refusal is not None:
                connack = ConnackPacket.build(0, refusal[0])
                await plugins_manager.fire_event(MQTTEvents.PACKET_SENT, packet=connack)
                try:
                    await connack.to_stream(writer)
                finally:
                    await _close_quietly(writer)
                raise MQTTError(f"CONNECT from {remote_address}:{remote_port} refused: {refusal[1]}")

        session = TetherSession()
        session.client_id = connect.client_id
        if connect.payload.client_id_is_random:  # the server's choice (MQTT-3.1.3-6): one topic level,
            session.client_id = f"auto-{secrets.token_hex(8)}"  # not amqtt's "amqtt/..."
        session.clean_session = connect.clean_session_flag
        session.will_flag = connect.will_flag
        session.will_retain = connect.will_retain_flag
        session.will_qos = connect.will_qos
        session.will_topic = connect.will_topic
        session.will_message = connect.will_message
        session.username = connect.username
        session.password = connect.password
        session.remote_address = remote_address
        session.remote_port = remote_port
        session.ssl_object = writer.get_ssl_info()
        session.keep_alive = max(connect.keep_alive, 0)
        handler = cls(plugins_manager, loop=loop)
        if connect.will_flag and connect.will_topic is not None and connect.will_message is not None:
            handler.will = (
                connect.will_topic,
                connect.will_message,
                connect.will_qos or 0,
                bool(connect.will_retain_flag),
            )
        return handler, session

    # --- background work owned by this connection ---------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` (a delivery) as a task that ends with this connection at the latest."""
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            exc = task.exception()
            if exc is not None and not isinstance(exc, (ProtocolHandlerError, ConnectionError)):
                log.debug("delivery to %s failed: %r", self.session.client_id if self.session else "?", exc)

    async def start(self) -> None:
        """Start reading, and resend what the session left unacknowledged."""
        if not self._is_attached():
            raise ProtocolHandlerError("handler is not attached to a stream")
        self._reader_task = self._loop.create_task(self._reader_loop())
        await self._retry_deliveries()

    async def stop(self) -> None:
        """Stop reading and close the connection; cancel this connection's deliveries."""
        if self._ka_timer is not None:
            self._ka_timer.cancel()
            self._ka_timer = None
        self._stop_waiters()
        task = self._reader_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.wait([task])
        if self.writer is not None:
            with contextlib.suppress(OSError, asyncio.CancelledError, TimeoutError):
                await self.writer.close()
        for delivery in list(self._tasks):
            delivery.cancel()
        waiter = self._disconnect_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def abort(self) -> None:
        """Close the connection now; the reader sees EOF and the session loop ends it."""
        _abort(self.reader, self.writer)

    def _signal_end(self, packet: DisconnectPacket | None) -> None:
        """Tell the session loop, once, that this connection has ended (``packet`` if cleanly)."""
        if self._ended or self.session is None:
            return
        self._ended = True
        self.session.delivered_message_queue.put_nowait(_Control(self, _END, packet))  # type: ignore[arg-type]

    # --- reading -----------------------------------------------------------------------

    def _check_keepalive(self) -> None:
        self._ka_timer = None
        timeout = self.read_timeout
        if timeout is None:
            return
        idle = self._loop.time() - self._last_rx
        if idle >= timeout:
            self.keepalive_expired = True
            log.info(
                "client %s sent nothing for %.1f s (keepalive %s s): disconnecting",
                self.session.client_id if self.session else "?",
                idle,
                self.session.keep_alive if self.session else "?",
            )
            self.abort()
        else:
            self._ka_timer = self._loop.call_later(timeout - idle, self._check_keepalive)

    async def _reader_loop(self) -> None:
        """Read packets and handle them in order, inline (amqtt made a task per packet).

        Only an incoming QoS 2 PUBLISH runs in its own task, because it waits for the
        PUBREL that this loop reads.
        """
        session, reader = self.session, self.reader
        if session is None or reader is None:
            raise ProtocolHandlerError("handler is not attached")
        self._last_rx = self._loop.time()
        if self.read_timeout is not None:
            self._ka_timer = self._loop.call_later(self.read_timeout, self._check_keepalive)
        goodbye: DisconnectPacket | None = None
        try:
            while True:
                fixed_header = await MQTTFixedHeader.from_stream(reader)
                if fixed_header is None:
                    break  # EOF, reset, or aborted by us
                self._last_rx = self._loop.time()
                if _oversized(fixed_header):  # refused before its body is read (and buffered)
                    log.warning(
                        "client %s sent a packet of %d bytes (limit %d): closing",
                        session.client_id,
                        _size(fixed_header),
                        MAX_PACKET_SIZE,
                    )
                    break
                ptype = fixed_header.packet_type
                packet: Any = await packet_class(fixed_header).from_stream(reader, fixed_header=fixed_header)
                await self.plugins_manager.fire_event(
                    MQTTEvents.PACKET_RECEIVED, packet=packet, session=session
                )
                if ptype == PUBLISH:
                    if packet.qos == QOS_2:
                        self.spawn(self.handle_publish(packet))
                    else:
                        await self.handle_publish(packet)
                elif ptype == PUBACK:
                    await self.handle_puback(packet)
                elif ptype == PINGREQ:
                    await self.handle_pingreq(packet)
                elif ptype == SUBSCRIBE:
                    await self.handle_subscribe(packet)
                elif ptype == UNSUBSCRIBE:
                    await self.handle_unsubscribe(packet)
                elif ptype == PUBREC:
                    await self.handle_pubrec(packet)
                elif ptype == PUBREL:
                    await self.handle_pubrel(packet)
                elif ptype == PUBCOMP:
                    await self.handle_pubcomp(packet)
                elif ptype == DISCONNECT:
                    goodbye = packet
                    break
                else:  # a second CONNECT, or a packet only a server sends: protocol error
                    log.warning("client %s sent packet type %d: closing", session.client_id, ptype)
                    break
        except asyncio.CancelledError:
            pass  # stop() cancels us; the finally block below still reports the end
        except (MQTTError, AMQTTError, NoDataError, ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("client %s: %r, closing", session.client_id, exc)
        except Exception:
            log.warning("client %s: unexpected error reading, closing", session.client_id, exc_info=True)
        finally:
            if self._ka_timer is not None:
                self._ka_timer.cancel()
                self._ka_timer = None
            self._signal_end(goodbye)
            if self._disconnect_waiter is not None and not self._disconnect_waiter.done():
                self._disconnect_waiter.set_result(goodbye)
        await self.stop()

    async def handle_connection_closed(self) -> None:
        """A write failed (or amqtt code asks us to close): end the connection."""
        task = self._reader_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            self.abort()  # the reader sees EOF and reports the end after what it already read
        else:
            self._signal_end(None)
            await super().handle_connection_closed()

    async def handle_subscribe(self, subscribe: Any) -> None:
        if subscribe.variable_header is None or subscribe.payload is None or self.session is None:
            raise MQTTError("SUBSCRIBE packet: header or payload missing")
        sub = Subscription(subscribe.variable_header.packet_id, subscribe.payload.topics)
        self.session.delivered_message_queue.put_nowait(_Control(self, _SUB, sub))  # type: ignore[arg-type]

    async def handle_unsubscribe(self, unsubscribe: Any) -> None:
        if unsubscribe.variable_header is None or unsubscribe.payload is None or self.session is None:
            raise MQTTError("UNSUBSCRIBE packet: header or payload missing")
        unsub = UnSubscription(unsubscribe.variable_header.packet_id, unsubscribe.payload.topics)
        self.session.delivered_message_queue.put_nowait(_Control(self, _UNSUB, unsub))  # type: ignore[arg-type]

    # --- outgoing QoS 1 and 2: no fixed timeout, kept for redelivery -------------------

    def _keep_unacknowledged(self) -> bool:
        return self.session is not None and not self.session.clean_session

    def _forget(self, message: Any) -> None:
        if self.session is not None and self.session.inflight_out.get(message.packet_id) is message:
            del self.session.inflight_out[message.packet_id]

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        if app_message.direction != OUTGOING:
            await super()._handle_qos1_message_flow(app_message)
            return
        assert self.session is not None
        pid = app_message.packet_id
        self.session.inflight_out[pid] = app_message
        waiter: asyncio.Future[Any] = self._loop.create_future()
        self._puback_waiters[pid] = waiter
        try:
            packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
            await self._send_packet(packet)
            app_message.publish_packet = packet
            app_message.puback_packet = await waiter
        except BaseException:
            if not self._keep_unacknowledged():
                self._forget(app_message)
            raise
        else:
            self._forget(app_message)
        finally:
            if self._puback_waiters.get(pid) is waiter:
                del self._puback_waiters[pid]

    async def _handle_qos2_message_flow(self, app_message: Any) -> None:
        if app_message.direction != OUTGOING:
            await super()._handle_qos2_message_flow(app_message)
            return
        assert self.session is not None
        pid = app_message.packet_id
        self.session.inflight_out[pid] = app_message
        rec: asyncio.Future[Any] | None = None
        comp: asyncio.Future[Any] | None = None
        try:
            if app_message.pubrec_packet is None:
                rec = self._loop.create_future()
                self._pubrec_waiters[pid] = rec
                packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
                await self._send_packet(packet)
                app_message.publish_packet = packet
                app_message.pubrec_packet = await rec
            comp = self._loop.create_future()
            self._pubcomp_waiters[pid] = comp
            app_message.pubrel_packet = PubrelPacket.build(pid)
            await self._send_packet(app_message.pubrel_packet)
            app_message.pubcomp_packet = await comp
        except BaseException:
            if not self._keep_unacknowledged():
                self._forget(app_message)
            raise
        else:
            self._forget(app_message)
        finally:
            if rec is not None and self._pubrec_waiters.get(pid) is rec:
                del self._pubrec_waiters[pid]
            if comp is not None and self._pubcomp_waiters.get(pid) is comp:
                del self._pubcomp_waiters[pid]

    async def _retry_deliveries(self) -> None:
        """Resend what the session left unacknowledged [MQTT-4.4.0-1], without blocking start()."""
        session = self.session
        if session is None:
            return
        for message in list(session.inflight_in.values()) + list(session.inflight_out.values()):
            self.spawn(self._handle_message_flow(message))  # type: ignore[arg-type]


# --- the broker ---------------------------------------------------------------------------


class TetherBroker(Broker):
    """amqtt's Broker with the overrides described in the module docstring."""

    def __init__(
        self,
        config: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
        plugin_namespace: str | None = None,
        *,
        max_queued_messages: int = 1000,
    ) -> None:
        check_amqtt_version()
        super().__init__(config, loop, plugin_namespace)
        self.max_queued_messages = max_queued_messages
        self._retained_topics = TopicTrie()
        self._wildcard_filters = FilterTrie()
        self._shutting_down = False

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._retained_topics.clear()
        self._wildcard_filters.clear()
        self._shutting_down = False
        await super().start()

    async def shutdown(self) -> None:
        self._shutting_down = True  # no wills: the clients did not go away, the broker did
        for _, handler in list(self._sessions.values()):
            if isinstance(handler, TetherHandler):
                handler.abort()  # so that stopping each connection does not wait on its peer
        await super().shutdown()
        self._retained_topics.clear()
        self._wildcard_filters.clear()

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: Any,
    ) -> Any:
        if listener_type != ListenerType.TCP:
            return await super()._create_server_instance(
                listener_name, listener_type, address, port, ssl_context
            )

        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # when the loop closes, asyncio would log a cancelled connection task as an error
            with contextlib.suppress(asyncio.CancelledError):
                await self.stream_connected(reader, writer, listener_name)

        return await asyncio.start_server(
            connected, address, port, reuse_address=True, ssl=ssl_context, backlog=LISTEN_BACKLOG
        )

    async def _session_monitor(self) -> None:
        """Expire disconnected persistent sessions, if ``session_expiry_interval`` is set.

        Clean sessions are removed as soon as they disconnect (see :meth:`_end_connection`);
        amqtt's monitor also removed every *anonymous* session, which made persistent
        sessions impossible without authentication.
        """
        interval = self.config.session_expiry_interval
        if interval is None:
            return
        while True:
            await asyncio.sleep(min(max(interval / 4, 1.0), 60.0))
            cutoff = time.time() - interval
            expired = [
                cid
                for cid, (session, _) in list(self._sessions.items())
                if session.transitions.state == "disconnected"
                and session.last_disconnect_time is not None
                and session.last_disconnect_time < cutoff
            ]
            for cid in expired:
                current = self._sessions.get(cid)
                if current is not None and current[0].transitions.state == "disconnected":
                    await self._delete_session(cid)

    def create_offline_session(self, client_id: str) -> tuple[BrokerProtocolHandler, Session]:
        session = TetherSession()
        session.client_id = client_id
        handler = TetherHandler(self.plugins_manager, session)
        session.transitions.disconnect()
        return handler, session

    # --- connections -------------------------------------------------------------------

    async def _client_connected(
        self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter
    ) -> None:
        server = self._servers.get(listener_name)
        if server is None:
            raise BrokerError(f"invalid listener name {listener_name!r}")
        await server.acquire_connection()
        try:
            remote = writer.get_peer_info()
            if remote is None:
                await writer.close()
                return
            try:
                handler, session = await self._initialize_client_session(reader, writer, *remote)
            except (AMQTTError, MQTTError, NoDataError) as exc:
                log.info("connection from %s:%s not accepted: %s", remote[0], remote[1], exc)
                return
            except Exception:
                log.warning("connection from %s:%s failed", remote[0], remote[1], exc_info=True)
                await _close_quietly(writer)
                return
            try:
                await self._handle_client_session(reader, writer, session, handler, server, listener_name)
            except (AMQTTError, MQTTError, NoDataError, OSError) as exc:
                log.info("client %s: %r", session.client_id, exc)
            except Exception:
                log.warning("client %s: unexpected error", session.client_id, exc_info=True)
        finally:
            server.release_connection()

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """Read and check the CONNECT (within :data:`CONNECT_TIMEOUT`); no session lookup yet."""
        # a timer that closes the connection costs less than wait_for's extra task
        timer = self._loop.call_later(CONNECT_TIMEOUT, _abort, reader, writer)
        try:
            return await TetherHandler.init_from_connect(
                reader, writer, self.plugins_manager, loop=self._loop
            )
        except (MQTTError, AMQTTError, NoDataError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
            await _close_quietly(writer)
            if isinstance(exc, (MQTTError, AMQTTError, NoDataError)):
                raise
            raise AMQTTError(f"no valid CONNECT: {exc!r}") from exc
        finally:
            timer.cancel()

    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Server,
        listener_name: str,
    ) -> None:
        assert isinstance(handler, TetherHandler)
        incoming = client_session
        problem = names.CLIENT_ID.problem(incoming.client_id)
        if problem is not None:  # it is a topic level (clients/C/replies): never a wildcard
            log.warning("refused connection from %s: %s", incoming.remote_address, problem)
            await self._refuse(handler, incoming, reader, writer, IDENTIFIER_REJECTED)
            return
        if not await self._authenticate(incoming, self.listeners_config[listener_name]):
            await self._refuse(handler, incoming, reader, writer, NOT_AUTHORIZED)
            return
        if handler.will is not None and not await self._will_allowed(incoming, handler.will[0]):
            log.warning(
                "refused connection from %s (client %r, user %r): may not publish its will on %r",
                incoming.remote_address,
                incoming.client_id,
                incoming.username,
                handler.will[0],
            )
            await self._refuse(handler, incoming, reader, writer, NOT_AUTHORIZED)
            return
        cid = incoming.client_id
        session = await self._claim_session(cid, incoming)

        session.transitions.connect()
        handler.attach(session, reader, writer)
        self._sessions[cid] = (session, handler)
        handler.loop_task = asyncio.current_task()
        try:
            await handler.mqtt_connack_authorize(True)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=cid, client_session=session
            )
            await handler.start()  # reader, and redelivery of unacknowledged messages
            self._deliver_queued(session, handler)
            await self._client_message_loop(session, handler)
        finally:
            if not handler.loop_done.done():
                handler.loop_done.set_result(None)

    async def _refuse(
        self,
        handler: TetherHandler,
        session: Session,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        code: int,
    ) -> None:
        """Answer a CONNECT with CONNACK ``code`` (a refusal) and close the connection."""
        session.parent = 0
        handler.attach(session, reader, writer)
        await handler._send_packet(ConnackPacket.build(0, code))
        await _close_quietly(writer)

    async def _will_allowed(self, session: Session, topic: str) -> bool:
        """Whether ``session`` may have its will published on ``topic``: a valid topic name
        that the ACL lets it publish to, as if it published the message itself."""
        if not _valid_topic_name(topic) or topic.startswith("$"):
            return False
        return await self._topic_filtering(session, topic=topic, action=Action.PUBLISH)

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        """amqtt's rule (at least one auth plugin answers, and all that answer say yes),
        asking the plugins in turn instead of through a task each."""
        answers = []
        for plugin in self.plugins_manager._auth_plugins:
            authenticate = getattr(plugin, "authenticate", None)
            if authenticate is not None:
                answer = await authenticate(session=session)
                if answer is not None:
                    answers.append(bool(answer))
        return bool(answers) and all(answers)

    async def _claim_session(self, cid: str, incoming: Session) -> Session:
        """The session for a new connection of ``cid``: taken over, resumed or new."""
        existing = self._sessions.get(cid)
        if existing is not None and existing[0].transitions.state == "connected":
            await self._take_over(existing[0], existing[1])
            existing = self._sessions.get(cid)
        if existing is not None and not incoming.clean_session and not existing[0].clean_session:
            session = existing[0]
            for attr in (
                "will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                "username", "password", "remote_address", "remote_port", "ssl_object", "is_anonymous",
            ):  # fmt: skip
                setattr(session, attr, getattr(incoming, attr))
            session.clean_session = False
            session.parent = 1  # CONNACK session present
            return session
        if existing is not None:
            await self._delete_session(cid)
        incoming.parent = 0
        return incoming

    async def _take_over(self, old_session: Session, old_handler: BrokerProtocolHandler) -> None:
        """A client id connected again: close its old connection (no will) and wait for its loop."""
        log.info("client %s connected again: closing its previous connection", old_session.client_id)
        if isinstance(old_handler, TetherHandler):
            old_handler.taken_over = True
            old_handler.abort()
            await old_handler.stop()
            try:
                await asyncio.wait_for(asyncio.shield(old_handler.loop_done), TAKEOVER_TIMEOUT)
            except TimeoutError:
                if old_handler.loop_task is not None:
                    old_handler.loop_task.cancel()
        else:
            await old_handler.stop()
        if old_session.transitions.state == "connected":
            old_session.transitions.disconnect()

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """Consume the session's queue: SUBSCRIBE, UNSUBSCRIBE, PUBLISH and the end, in order."""
        assert isinstance(handler, TetherHandler)
        queue = client_session.delivered_message_queue
        goodbye: DisconnectPacket | None = None
        try:
            while True:
                item: Any = await queue.get()
                if type(item) is _Control:
                    if item.handler is not handler:
                        continue  # left over from a connection whose loop was cancelled
                    if item.kind == _END:
                        goodbye = item.payload
                        break
                    if item.kind == _SUB:
                        await self._handle_subscription(client_session, handler, item.payload)
                    else:
                        await self._handle_unsubscription(client_session, handler, item.payload)
                elif not await self._deliver_incoming(client_session, item):
                    handler.abort()  # protocol error: close; the reader's end marker follows
        except asyncio.CancelledError:
            await self._end_connection(client_session, handler, None)
            raise
        except Exception:
            log.warning("client %s: session loop failed", client_session.client_id, exc_info=True)
            handler.abort()
        await self._end_connection(client_session, handler, goodbye)

    async def _end_connection(
        self, session: Session, handler: TetherHandler, goodbye: DisconnectPacket | None
    ) -> None:
        """Will (unless a clean DISCONNECT or a takeover), stop, and forget a clean session."""
        cid = session.client_id
        if (
            goodbye is None
            and handler.will is not None
            and not handler.taken_over
            and not self._shutting_down
        ):
            topic, message, qos, retain = handler.will
            if not await self._will_allowed(session, topic):  # rights may have changed (revoked)
                log.warning("client %s vanished: its will on %s is no longer allowed, dropped", cid, topic)
            else:
                log.debug("client %s vanished: publishing its will on %s", cid, topic)
                await self._broadcast_message(session, topic, message, qos)
                if retain:
                    await self.retain_message(session, topic, message, qos)
        await handler.stop()
        current = self._sessions.get(cid) if cid else None
        if not handler.taken_over and current is not None and current[1] is handler:
            session.transitions.disconnect()
            if session.clean_session:
                await self._delete_session(cid)  # type: ignore[arg-type]
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_DISCONNECTED, client_id=cid, client_session=session
        )

    # --- subscriptions -----------------------------------------------------------------

    async def _handle_subscription(
        self, client_session: Session, handler: BrokerProtocolHandler, subscribe_waiter: Any
    ) -> None:
        """SUBACK, then the retained messages matching each granted filter (and nothing else)."""
        assert isinstance(handler, TetherHandler)
        subscription: Subscription = subscribe_waiter
        codes = [await self.add_subscription(sub, client_session) for sub in subscription.topics]
        await handler.mqtt_acknowledge_subscription(subscription.packet_id, codes)
        for (topic_filter, requested), granted in zip(subscription.topics, codes, strict=True):
            if granted == SUBACK_FAILURE:
                continue
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_SUBSCRIBED,
                client_id=client_session.client_id,
                topic=topic_filter,
                qos=requested,
            )
            await self._send_retained(client_session, handler, topic_filter, granted)

    async def _send_retained(
        self, session: Session, handler: TetherHandler, topic_filter: str, qos: int
    ) -> None:
        if is_wildcard(topic_filter):
            topics = self._retained_topics.match(topic_filter)
            messages = [self._retained_messages[t] for t in topics if t in self._retained_messages]
        else:
            one = self._retained_messages.get(topic_filter)
            messages = [one] if one is not None else []
        filtering = self.plugins_manager.is_topic_filtering_enabled()
        for message in messages:
            if filtering and not await self._topic_filtering(
                session, topic=message.topic, action=Action.RECEIVE
            ):
                continue
            msg_qos = message.qos if message.qos is not None else qos
            handler.spawn(handler.mqtt_publish(message.topic, message.data, min(qos, msg_qos), retain=True))

    async def _handle_unsubscription(
        self, client_session: Session, handler: BrokerProtocolHandler, unsubscribe_waiter: Any
    ) -> None:
        unsubscription: UnSubscription = unsubscribe_waiter
        for topic_filter in unsubscription.topics:
            self._del_subscription(topic_filter, client_session)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_UNSUBSCRIBED, client_id=client_session.client_id, topic=topic_filter
            )
        await handler.mqtt_acknowledge_unsubscription(unsubscription.packet_id)

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        """Whether every topic plugin allows ``action`` on ``topic`` (amqtt's rule: all truthy).

        amqtt wraps each plugin's call in a task and gathers them, for every check; the
        plugins' answers do not depend on running concurrently, so await them in turn."""
        manager = self.plugins_manager
        if not manager.is_topic_filtering_enabled():
            return True
        for plugin in manager._topic_plugins:  # amqtt exposes no public accessor
            if not await plugin.topic_filtering(session=session, topic=topic, action=action):
                return False
        return True

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """Add or replace (MQTT-3.8.4-3) one subscription; the granted QoS or 0x80."""
        topic_filter, qos = subscription
        if not valid_filter(topic_filter) or qos not in (QOS_0, QOS_1, QOS_2):
            return SUBACK_FAILURE
        if not await self._topic_filtering(session, topic_filter, Action.SUBSCRIBE):
            return SUBACK_FAILURE
        max_qos = self.config.get("max-qos", qos)
        if isinstance(max_qos, int):
            qos = min(qos, max_qos)
        subscribers = self._subscriptions.get(topic_filter)
        if subscribers is None:
            subscribers = self._subscriptions[topic_filter] = []
            if is_wildcard(topic_filter):
                self._wildcard_filters.add(topic_filter)
        for i, (sub_session, _) in enumerate(subscribers):
            if sub_session is session or sub_session.client_id == session.client_id:
                subscribers[i] = (session, qos)
                break
        else:
            subscribers.append((session, qos))
        filters = getattr(session, "filters", None)
        if filters is not None:
            filters[topic_filter] = qos
        return qos

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        filters = getattr(session, "filters", None)
        if filters is not None:
            filters.pop(a_filter, None)
        subscribers = self._subscriptions.get(a_filter)
        if not subscribers:
            return 0
        deleted = 0
        for i, (sub_session, _) in enumerate(subscribers):
            if sub_session is session or sub_session.client_id == session.client_id:
                del subscribers[i]
                deleted = 1
                break
        if not subscribers:
            del self._subscriptions[a_filter]
            if is_wildcard(a_filter):
                self._wildcard_filters.remove(a_filter)
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        filters = getattr(session, "filters", None)
        if filters is None:  # a session amqtt code created: find its filters the slow way
            candidates = [
                f
                for f, subs in self._subscriptions.items()
                if any(s.client_id == session.client_id for s, _ in subs)
            ]
        else:
            candidates = list(filters)
        for topic_filter in candidates:
            self._del_subscription(topic_filter, session)

    # --- publishing --------------------------------------------------------------------

    async def _deliver_incoming(self, client_session: Session, app_message: ApplicationMessage) -> bool:
        """Route one PUBLISH from a client; False on a protocol error (the connection closes)."""
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_RECEIVED, client_id=client_session.client_id, message=app_message
        )
        topic = app_message.topic
        if not _valid_topic_name(topic):
            log.warning("client %s published to invalid topic %r: closing", client_session.client_id, topic)
            return False
        if topic.startswith("$"):
            log.warning("client %s published to reserved topic %r: closing", client_session.client_id, topic)
            return False
        if not await self._topic_filtering(client_session, topic=topic, action=Action.PUBLISH):
            log.info("client %s may not publish to %s", client_session.client_id, topic)
            return True
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_BROADCAST, client_id=client_session.client_id, message=app_message
        )
        qos = app_message.qos if app_message.qos is not None else QOS_0
        await self._broadcast_message(client_session, topic, app_message.data, qos)
        if app_message.publish_packet is not None and app_message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, app_message.data, qos)
        return True

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        """Deliver now (no queue, no scan): each matching client once, at min(its QoS, ``force_qos``).

        ``force_qos`` is the message's QoS; ``None`` (broker-internal messages) means each
        subscription's QoS.
        """
        if topic is None or data is None:
            return
        targets: dict[str, tuple[Session, int]] = {}
        exact = self._subscriptions.get(topic)
        if exact:
            for target, sub_qos in exact:
                targets[target.client_id or ""] = (target, sub_qos)
        if len(self._wildcard_filters):
            for topic_filter in self._wildcard_filters.match(topic):
                for target, sub_qos in self._subscriptions.get(topic_filter, ()):
                    key = target.client_id or ""
                    known = targets.get(key)
                    if known is None or known[1] < sub_qos:
                        targets[key] = (target, sub_qos)
        if not targets:
            return
        filtering = self.plugins_manager.is_topic_filtering_enabled()
        for key, (target, sub_qos) in targets.items():
            qos = sub_qos if force_qos is None else min(sub_qos, force_qos)
            if filtering and not await self._topic_filtering(target, topic=topic, action=Action.RECEIVE):
                continue
            if target.transitions.state == "connected":
                entry = self._sessions.get(key)
                if entry is not None and entry[0] is target and isinstance(entry[1], TetherHandler):
                    entry[1].spawn(entry[1].mqtt_publish(topic, data, qos, retain=False))
            elif qos > QOS_0 and not target.clean_session:
                self._queue_offline(target, session, topic, data, qos)

    def _queue_offline(
        self, target: Session, source: Session | None, topic: str, data: bytes | bytearray, qos: int
    ) -> None:
        queue = target.retained_messages  # amqtt's name for "queued while disconnected"
        if queue.qsize() >= self.max_queued_messages:
            overflows = getattr(target, "queue_overflows", 0) + 1
            if isinstance(target, TetherSession):
                target.queue_overflows = overflows
            if overflows == 1 or overflows % 1000 == 0:
                log.warning(
                    "offline session %s has %d queued messages: dropping new ones (%d so far)",
                    target.client_id,
                    queue.qsize(),
                    overflows,
                )
            return
        queue.put_nowait(RetainedApplicationMessage(source, topic, data, qos))

    def _deliver_queued(self, session: Session, handler: TetherHandler) -> None:
        """Send what was queued while the session was offline (as normal messages, retain 0)."""
        queue = session.retained_messages
        while not queue.empty():
            message = queue.get_nowait()
            handler.spawn(handler.mqtt_publish(message.topic, message.data, message.qos, retain=False))

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        """Store (or, for an empty payload, clear [MQTT-3.3.1-10]) the retained message of a topic."""
        if topic_name is None:
            return
        if data:
            if topic_name not in self._retained_messages:
                self._retained_topics.add(topic_name)
            message = RetainedApplicationMessage(source_session, topic_name, data, qos)
            self._retained_messages[topic_name] = message
            await self.plugins_manager.fire_event(
                BrokerEvents.RETAINED_MESSAGE, client_id=None, retained_message=message
            )
        elif topic_name in self._retained_messages:
            cleared = self._retained_messages.pop(topic_name)
            self._retained_topics.remove(topic_name)
            cleared.data = b""
            await self.plugins_manager.fire_event(
                BrokerEvents.RETAINED_MESSAGE, client_id=None, retained_message=cleared
            )


def _size(header: MQTTFixedHeader) -> int:
    return packet_size(header.remaining_length)


def _oversized(header: MQTTFixedHeader) -> bool:
    """Whether a packet exceeds :data:`MAX_PACKET_SIZE` (Mosquitto's ``max_packet_size`` rule)."""
    return _size(header) > MAX_PACKET_SIZE


def _valid_topic_name(topic: str | None) -> TypeGuard[str]:
    """A topic name a client may publish to (MQTT 3.1.1 section 4.7.3): not empty, no wildcard, no NUL."""
    return topic is not None and topic != "" and "#" not in topic and "+" not in topic and "\x00" not in topic


def _abort(reader: ReaderAdapter | None, writer: WriterAdapter | None) -> None:
    """Close a connection at once (no flush): the reader sees EOF."""
    transport = None
    if isinstance(writer, StreamWriterAdapter):
        transport = getattr(getattr(writer, "_writer", None), "transport", None)
    if transport is not None:
        transport.abort()
    elif reader is not None:
        reader.feed_eof()


async def _close_quietly(writer: WriterAdapter) -> None:
    try:
        await writer.close()
    except Exception:  # already gone
        log.debug("closing a refused connection failed", exc_info=True)
