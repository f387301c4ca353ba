"""A minimal MQTT 3.1.1 client session for asyncio: thousands of them on one event loop.

Why not paho here
-----------------
The real agent uses paho (:mod:`tether.protocol.mqtt`); the simulator does not, for
three measured reasons. First, paho's ``connect()``/``reconnect()`` open the socket with a
*blocking* ``socket.create_connection``: during a reconnect storm, when the broker's listen
backlog is full and SYNs are retransmitted after 1 s, each one would stall the single
event loop that runs every device. Second, each paho client carries its own locks,
message-info objects and per-packet bookkeeping; at 10,000 devices on a 2-core machine
that shares its CPU with the broker and the controller, the client library would dominate
what the benchmarks measure. Third, the external-loop integration (``on_socket_*``
callbacks plus ``loop_read``/``loop_write``/``loop_misc`` per client) still needs a
per-client keepalive poll. An :class:`asyncio.BufferedProtocol` per device has none of that:
the connect is non-blocking, reads and writes are one callback each (every read into one
buffer the loop's sessions share), keepalive is one lazily rescheduled timer, and
everything a device sends in one loop iteration goes out in one ``send()``.

What stays real is everything above the socket: the device's :class:`AgentCore` sees the
same :class:`~tether.protocol.transport.Link` contract as with :class:`~tether.protocol.mqtt.MqttClient`,
and this session keeps that client's semantics: a fresh will from a callback before every
CONNECT, subscriptions remembered and renewed after every CONNACK, ``publish`` returning
False while disconnected, and unacknowledged QoS 1 messages sent again (DUP) after a
reconnect, as paho does. Only QoS 0 and 1 are sent; QoS 2 is answered if received.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tether.protocol.heap import Shared
from tether.protocol.transport import Delivery, MessageHandler, Will

CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
PUBREC = 0x50
PUBREL = 0x60
PUBCOMP = 0x70
SUBSCRIBE = 0x80
SUBACK = 0x90
UNSUBSCRIBE = 0xA0
UNSUBACK = 0xB0
PINGREQ = 0xC0
PINGRESP = 0xD0
DISCONNECT = 0xE0

_PINGREQ = bytes((PINGREQ, 0))
_DISCONNECT = bytes((DISCONNECT, 0))
_PACK_H = struct.Struct("!H")
_ACK = struct.Struct("!BBH")
"""PUBACK, PUBREC, PUBCOMP: the packet type, remaining length 2, the packet id."""
_topic_headers: Shared[str, bytes] = Shared(65_536)
"""A topic's length-prefixed UTF-8 (``_str``), made once: a device publishes to a few topics of
its own again and again (its reports, events, presence)."""


READ_BUFFER = 65_536
"""Bytes one read takes from a socket at most (:class:`MqttSession` reads into a buffer its
thread's sessions share)."""
_read_buffers = threading.local()


def _read_buffer() -> memoryview:
    """This thread's read buffer: the sessions of one event loop read into one buffer, each
    read handled before the next. asyncio's plain :class:`asyncio.Protocol` reads with
    ``recv(262144)``: a new 256 KiB object for every read, which glibc maps and unmaps
    (above its mmap threshold) to keep the few bytes a broker sent; reading into a buffer
    made once is several times cheaper (47 against 7 microseconds a read, here)."""
    buffer: memoryview | None = getattr(_read_buffers, "buffer", None)
    if buffer is None:
        buffer = _read_buffers.buffer = memoryview(bytearray(READ_BUFFER))
    return buffer


class ProtocolError(Exception):
    """The broker sent something that is not MQTT 3.1.1."""


def varint(n: int) -> bytes:
    """The MQTT remaining-length encoding of ``n``."""
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return _PACK_H.pack(len(b)) + b


def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


def connect_packet(
    client_id: str,
    *,
    clean_session: bool,
    keepalive: int,
    will: Will | None = None,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    flags = 0x02 if clean_session else 0
    payload = _str(client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += _str(will.topic) + _str(will.payload)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
        if password is not None:
            flags |= 0x40
            payload += _str(password)
    header = _str("MQTT") + bytes((4, flags)) + _PACK_H.pack(keepalive)
    return packet(CONNECT, header + payload)


def publish_packet(
    topic: str, payload: bytes, qos: int, retain: bool, pid: int = 0, dup: bool = False
) -> bytes:
    first = PUBLISH | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    header = _topic_headers.get(topic, lambda: _str(topic))
    if qos:
        length = len(header) + 2 + len(payload)
        return b"".join((bytes((first,)), varint(length), header, _PACK_H.pack(pid), payload))
    return b"".join((bytes((first,)), varint(len(header) + len(payload)), header, payload))


def _numeric(host: str) -> int | None:
    """The address family of a numeric host address; None for a name."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


class WriteBatch:
    """Sessions with bytes to send, written together once per loop iteration: one loop
    callback for all of a fleet's sessions instead of one per session (each session still
    writes everything it has in one ``send()``, as before)."""

    def __init__(self) -> None:
        self._dirty: list[MqttSession] = []

    def add(self, session: MqttSession) -> None:
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self.flush)
        self._dirty.append(session)

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        if not dirty:
            return
        now = asyncio.get_running_loop().time()
        for session in dirty:
            session._flush(now)


@dataclass
class Counters:
    """Traffic of a whole fleet (shared by its sessions)."""

    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    messages_in: int = 0
    messages_out: int = 0
    connacks: int = 0
    refused: int = 0
    lost: int = 0
    up: int = 0
    """Sessions connected now (CONNACK received, connection not gone since)."""


class MqttSession(asyncio.BufferedProtocol):
    """One device's MQTT session. The owner connects it (:meth:`open`) and reconnects it.

    The callbacks, ``will`` and ``session_present`` mean what they do in
    :class:`~tether.protocol.transport.Transport`, and run on the event loop:
    ``on_message(topic, payload, retained)``, ``on_connect()``, ``on_disconnect()`` (a
    connection that had a CONNACK is gone, and not by :meth:`close`). The owner connects
    (:meth:`open`, a coroutine) and reconnects; the rest is the transport's :class:`Link`.
    """

    def __init__(
        self,
        client_id: str,
        *,
        counters: Counters,
        keepalive: int = 60,
        clean_session: bool = False,
        will: Callable[[], Will | None] | None = None,
        on_message: MessageHandler | None = None,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        batch: WriteBatch | None = None,
    ) -> None:
        """``batch``: shared by a fleet's sessions (:class:`WriteBatch`); its own by default."""
        self.client_id = client_id
        self._batch = batch if batch is not None else WriteBatch()
        self.counters = counters
        self.keepalive = keepalive
        self.clean_session = clean_session
        self.will = will
        self.on_message = on_message
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.session_present = False
        self.subscriptions: dict[str, int] = {}
        self.connected = False
        self.transport: asyncio.Transport | None = None
        self._rbuf = bytearray()
        self._wbuf: list[bytes] = []
        self._flush_pending = False
        self._pid = 0
        self._inflight: dict[int, tuple[str, bytes, int, bool]] = {}
        self._qos2_in: set[int] = set()
        self._connack: asyncio.Future[bool] | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._last_out = 0.0
        self._ping_sent = 0.0
        self._closing = False

    # --- connection ---

    async def open(self, host: str, port: int, timeout: float) -> bool:
        """Connect, send CONNECT (with a fresh will) and wait for CONNACK. True on success."""
        loop = asyncio.get_running_loop()
        self._closing = False
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps what it awaits in a
        # task of its own, two tasks per handshake (a tenth of connecting a fleet).
        try:
            async with asyncio.timeout(timeout):
                family = _numeric(host)
                if family is None:  # a name: asyncio resolves it and tries each address
                    await loop.create_connection(lambda: self, host, port)
                else:
                    await self._connect_to(loop, family, host, port)
        except (TimeoutError, OSError):
            self.counters.refused += 1
            return False
        self._connack = loop.create_future()
        if self.transport is None:  # the handshake failed already
            self._connack = None
            self.counters.refused += 1
            return False
        self._send(self.connect_packet())
        try:
            async with asyncio.timeout(timeout):
                return await self._connack
        except (TimeoutError, ConnectionError):
            self.counters.refused += 1
            self.abort()
            return False
        finally:
            self._connack = None

    async def _connect_to(self, loop: asyncio.AbstractEventLoop, family: int, host: str, port: int) -> None:
        """Connect to a numeric address. The transport is made at once on the connecting
        socket: ``loop.sock_connect`` would watch it for writability first (two more
        ``epoll_ctl`` calls, a future and a wake-up per connection). The CONNECT written
        before the handshake is done waits in the transport's buffer; a refused or failed
        handshake ends the connection before CONNACK, which :meth:`open` counts as refused."""
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            error = sock.connect_ex((host, port))
            if error not in (0, errno.EINPROGRESS):
                raise OSError(error, os.strerror(error))
            await loop.create_connection(lambda: self, sock=sock)
        except BaseException:
            sock.close()
            raise

    def connect_packet(self) -> bytes:
        """The CONNECT for a new connection, with a fresh will from the owner."""
        will = self.will() if self.will else None
        return connect_packet(
            self.client_id, clean_session=self.clean_session, keepalive=self.keepalive, will=will
        )

    def close(self, goodbye: tuple[str, bytes, int, bool] | None = None) -> None:
        """Send ``goodbye`` (if connected) and DISCONNECT, then close: the broker drops the will."""
        self._closing = True
        if self.transport is None:
            return
        if self.connected and goodbye is not None:
            topic, payload, qos, retain = goodbye
            self.publish(topic, payload, qos, retain)
        if self.connected:
            self._send(_DISCONNECT)
            self.counters.up -= 1
        self._flush()
        self.connected = False
        self.transport.close()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT (the broker publishes the will)."""
        if self.transport is not None:
            self.transport.abort()

    # --- Link ---

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        return self.publish_tracked(topic, payload, qos, retain) is not None

    def publish_tracked(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> Delivery | None:
        """Publish; a check that is true once the broker acknowledged it (PUBACK; at once for
        QoS 0), or None if not connected."""
        if not self.connected:
            return None
        pid = 0
        entry = (topic, payload, qos, retain)
        if qos:
            pid = self._next_pid()
            self._inflight[pid] = entry
        self._send(publish_packet(topic, payload, qos, retain, pid))
        self.counters.messages_out += 1
        if not qos:
            return lambda: True
        inflight = self._inflight
        return lambda: inflight.get(pid) is not entry  # identity: the packet id may be reused later

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.subscriptions[topic_filter] = qos
        if self.connected:
            self._send_subscribe([(topic_filter, qos)])

    def unsubscribe(self, topic_filter: str) -> None:
        self.subscriptions.pop(topic_filter, None)
        if self.connected:
            body = _PACK_H.pack(self._next_pid()) + _str(topic_filter)
            self._send(packet(UNSUBSCRIBE | 0x02, body))

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._rbuf.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.connected
        self.connected = False
        self.counters.up -= was
        self.transport = None
        self._wbuf.clear()
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectionError("connection lost before CONNACK"))
            return  # the opener handles a failed handshake
        if was:
            self.counters.lost += 0 if self._closing else 1
            if self.on_disconnect is not None and not self._closing:
                self.on_disconnect()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` read into this thread's buffer (:func:`_read_buffer`): handled at once,
        what is left of a packet kept, before the buffer is read into again."""
        self.data_received(_read_buffer()[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        self.counters.bytes_in += len(data)
        buf = self._rbuf
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        pos = 0
        end_all = len(view)
        try:
            while end_all - pos >= 2:
                length = 0
                shift = 0
                i = pos + 1
                complete = False
                while i < end_all:
                    byte = view[i]
                    i += 1
                    length |= (byte & 0x7F) << shift
                    if byte < 0x80:
                        complete = True
                        break
                    shift += 7
                    if shift > 21:
                        raise ProtocolError("remaining length too long")
                if not complete:
                    break
                end = i + length
                if end > end_all:
                    break
                self._packet(view[pos], bytes(view[i:end]))
                pos = end
        except ProtocolError:
            self.abort()
            return
        if buf:
            del buf[:pos]
        elif pos < end_all:
            buf += data[pos:]

    # --- internals ---

    def _next_pid(self) -> int:
        for _ in range(65535):
            self._pid = self._pid % 65535 + 1
            if self._pid not in self._inflight:
                return self._pid
        raise RuntimeError("no free packet id")

    def _send_subscribe(self, filters: list[tuple[str, int]]) -> None:
        body = _PACK_H.pack(self._next_pid()) + b"".join(_str(f) + bytes((q,)) for f, q in filters)
        self._send(packet(SUBSCRIBE | 0x02, body))

    def _send(self, data: bytes) -> None:
        self._wbuf.append(data)
        if not self._flush_pending:
            self._flush_pending = True
            self._batch.add(self)

    def _flush(self, now: float | None = None) -> None:
        """Write what was sent since the last flush, in one ``send()``; ``now``: the loop's time."""
        self._flush_pending = False
        wbuf = self._wbuf
        if not wbuf:
            return
        if self.transport is None:
            wbuf.clear()
            return
        data = b"".join(wbuf) if len(wbuf) > 1 else wbuf[0]
        wbuf.clear()
        self.counters.bytes_out += len(data)
        self.transport.write(data)
        self._last_out = asyncio.get_running_loop().time() if now is None else now

    def _packet(self, first: int, body: bytes) -> None:
        self.counters.packets_in += 1
        kind = first & 0xF0
        if kind == PUBLISH:
            qos = (first >> 1) & 0x03
            tlen = _PACK_H.unpack_from(body)[0]
            topic = body[2 : 2 + tlen].decode()
            pos = 2 + tlen
            if qos:
                pid = _PACK_H.unpack_from(body, pos)[0]
                pos += 2
                if qos == 1:
                    self._send(_ACK.pack(PUBACK, 2, pid))
                else:
                    self._send(_ACK.pack(PUBREC, 2, pid))
                    if pid in self._qos2_in:
                        return
                    self._qos2_in.add(pid)
            self.counters.messages_in += 1
            if self.on_message is not None:
                self.on_message(topic, body[pos:], bool(first & 0x01))
        elif kind == PUBACK:
            self._inflight.pop(_PACK_H.unpack_from(body)[0], None)
        elif kind == PUBREL:
            pid = _PACK_H.unpack_from(body)[0]
            self._qos2_in.discard(pid)
            self._send(_ACK.pack(PUBCOMP, 2, pid))
        elif kind == CONNACK:
            self._on_connack(body)
        elif kind == PINGRESP:
            self._ping_sent = 0.0
        elif kind in (SUBACK, UNSUBACK, PUBREC, PUBCOMP):
            pass
        else:
            raise ProtocolError(f"unexpected packet type {kind:#x}")

    def _on_connack(self, body: bytes) -> None:
        if len(body) != 2:
            raise ProtocolError("bad CONNACK")
        present, code = body[0] & 1, body[1]
        waiter = self._connack
        if code != 0:
            if waiter is not None and not waiter.done():
                waiter.set_result(False)
            self.abort()
            return
        self.counters.up += not self.connected
        self.connected = True
        self.session_present = bool(present)
        self.counters.connacks += 1
        if self.subscriptions:
            self._send_subscribe(list(self.subscriptions.items()))
        # Unacknowledged QoS 1 messages from the last connection go again, flagged DUP.
        for pid, (topic, payload, qos, retain) in sorted(self._inflight.items()):
            self._send(publish_packet(topic, payload, qos, retain, pid, dup=True))
        loop = asyncio.get_running_loop()
        self._last_out = loop.time()
        self._ping_sent = 0.0
        if self.keepalive:
            self._ping_timer = loop.call_at(self._last_out + self.keepalive, self._keepalive)
        if waiter is not None and not waiter.done():
            waiter.set_result(True)
        if self.on_connect is not None:
            self.on_connect()

    def _keepalive(self) -> None:
        """Send PINGREQ when nothing went out for a keepalive; drop a silent broker."""
        self._ping_timer = None
        if not self.connected or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._ping_sent and now - self._ping_sent >= self.keepalive:
            self.abort()  # no PINGRESP within a keepalive: the connection is dead
            return
        due = self._last_out + self.keepalive
        if now >= due - 0.001:
            self._send(_PINGREQ)
            self._flush()
            if not self._ping_sent:
                self._ping_sent = now
            due = now + self.keepalive
        self._ping_timer = loop.call_at(due, self._keepalive)
