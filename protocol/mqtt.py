"""The one module that imports paho: an MQTT 3.1.1 client with a small interface.

Theory of operation
-------------------
:class:`MqttClient` owns one paho client and one thread. The thread connects to the
configured brokers in turn; after a failed attempt or a lost connection it waits a
capped exponential backoff with full jitter (:mod:`.backoff`) and tries the next broker.
It implements :class:`~.transport.Transport` (the contract is there). The will is set anew before every CONNECT (MQTT 3.1.1 section 3.1.2.5), because callers
put a per-connection session number in it. Subscriptions are remembered and renewed
on every CONNACK, whatever the broker kept of the session (section 3.2.2.2).

Callbacks (``on_connect``, ``on_message``) run on the client thread and must not block:
callers hand the work to their own thread. Nothing here trusts that an incoming topic
matches one of our subscriptions; callers classify topics with :func:`topics.parse`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from .backoff import Backoff
from .codec import MAX_PACKET_SIZE, packet_size
from .errors import ConfigError, TransportError
from .transport import Delivery, MessageHandler, Will

log = logging.getLogger(__name__)

__all__ = ["BrokerAddress", "MqttClient", "Will", "parse_broker_url", "tls_context"]

_HOST_RE = re.compile(r"\A[A-Za-z0-9._:-]+\Z")
"""A host name, an IPv4 or an (unbracketed) IPv6 literal."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker listens. ``tls`` for ``mqtts://``."""

    host: str
    port: int
    tls: bool = False

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://host:port``, ``mqtts://host:port`` or ``host[:port]``."""
    text = url.strip()
    if "://" not in text:
        text = "mqtt://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid broker URL {url!r}: {exc}") from exc
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"invalid broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError(f"invalid broker URL {url!r}: no host")
    if not _HOST_RE.match(parts.hostname):
        raise ConfigError(f"invalid broker URL {url!r}: bad host {parts.hostname!r}")
    tls = parts.scheme in ("mqtts", "ssl")
    return BrokerAddress(parts.hostname, port or (8883 if tls else 1883), tls)


RECV_SIZE = 65536
COALESCE_LIMIT = 65536
MAX_INFLIGHT = 1000
"""QoS 1 messages sent and not yet acknowledged, at most (paho queues the rest in order)."""


def _fits(topic: str, payload: bytes, qos: int) -> bool:
    """Whether a PUBLISH fits the brokers' limit; logs the refusal (a broker would close the
    connection over it, and a client that published it again on reconnect would loop)."""
    size = packet_size(2 + len(topic.encode()) + (2 if qos else 0) + len(payload))
    if size <= MAX_PACKET_SIZE:
        return True
    log.error(
        "not publishing %d bytes on %s: larger than the %d-byte packet limit", size, topic, MAX_PACKET_SIZE
    )
    return False


class _Paho(paho.Client):
    """paho's client with its socket I/O batched; the MQTT protocol handling is paho's own.

    paho reads a packet with three or more ``recv`` calls (its first byte, each byte of its
    length, then the rest) and writes each packet with its own ``send``; every packet
    queued from the network thread also writes a byte to paho's wake-up socket pair. For a
    controller taking 30,000 reports and events during a deploy to 10,000 devices (and a
    PUBACK for each), that was about a third of its CPU. Here, reads come from a buffer
    filled by one ``recv`` of up to :data:`RECV_SIZE` bytes, a read pass goes on while the
    buffer holds data (``select`` cannot see it), and packets waiting to be written are
    joined into one ``send`` where paho has nothing to do after writing them (every packet
    but a QoS 0 PUBLISH, whose write completes it, and DISCONNECT). All socket I/O happens on
    the client's own thread (:meth:`MqttClient.start`), so only that thread touches the
    buffers; packets queued on it need no wake-up, since its loop writes before it waits.

    Incoming PUBLISH packets of QoS 0 and 1 that lie whole in the buffer are read here
    (:meth:`_read_publishes`) rather than by paho, which makes a message object, a dict and
    a PUBACK packet each and takes locks for every one (about 20 us a message, the
    controller's main cost while a fleet reports): the topic, packet id and payload are
    sliced out of the buffer, handed to :attr:`deliver`, and the PUBACKs of the messages
    handed over are queued as one write after them, as paho would (without manual acks, a
    PUBACK once the callback returned). Anything else goes to paho: any other packet, QoS 2,
    a packet not yet whole in the buffer (split across reads), an empty topic, a length that
    does not add up, a topic that is not UTF-8.

    Outgoing QoS 1 messages of :meth:`MqttClient.publish_many` (a deploy's desired states) are
    handed over by :meth:`publish_batch` and the inflight window is refilled by
    :meth:`_update_inflight`, with paho's bookkeeping (``_out_messages``, packet ids, states,
    the inflight count) so that paho still resends them on a new connection; only the
    per-message objects, locks, log formatting and wake-ups are saved.
    """

    _rbuf = b""
    _rpos = 0
    _wake_pending = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batch_queued: collections.deque[paho.MQTTMessage] = collections.deque()
        """Messages :meth:`publish_batch` left queued (window full), in order."""

    _loop_thread: int | None = None
    deliver: Callable[[str, bytes, bool], None] | None = None
    """Takes each message the fast path reads (topic, payload, retained); None: paho reads all."""

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(max(bufsize, RECV_SIZE))
            if len(data) <= bufsize:
                return data  # all of it (b"" when the connection closed)
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start : self._rpos]

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0
        super()._sock_close()

    def reconnect(self) -> paho.MQTTErrorCode:
        self._rbuf, self._rpos = b"", 0
        return super().reconnect()

    def _packet_read(self) -> paho.MQTTErrorCode:
        if self.deliver is not None and self._in_packet["command"] == 0:  # between packets
            if self._rpos >= len(self._rbuf):
                # Fill the buffer first, so that its first packet can take the fast path too.
                # No data, an error or the end of the stream: paho's own read below meets it
                # again and reports it as it always does.
                with contextlib.suppress(OSError):
                    self._rbuf, self._rpos = super()._sock_recv(RECV_SIZE), 0
            if self._rpos < len(self._rbuf):
                count, rc = self._read_publishes(self.deliver)
                if count:
                    if rc == paho.MQTT_ERR_SUCCESS and self._rpos >= len(self._rbuf):
                        # A whole read handled: the loop writes (PUBACKs, replies) before it
                        # reads again. paho's loop_read would read on, up to one packet per
                        # message in flight, each a buffer's worth here.
                        return paho.MQTT_ERR_AGAIN
                    return rc
        return super()._packet_read()

    def _read_publishes(self, deliver: Callable[[str, bytes, bool], None]) -> tuple[int, paho.MQTTErrorCode]:
        """Read the PUBLISH packets (QoS 0 and 1) and PUBACKs at the head of the buffer, up
        to the first packet that is anything else or not whole; return how many, and paho's
        result of sending what the PUBACKs let go (inflight window)."""
        buf, pos, end = self._rbuf, self._rpos, len(self._rbuf)
        acks: list[bytes] = []
        acked: list[int] = []
        count = 0
        rc = paho.MQTT_ERR_SUCCESS
        while pos < end and self._rbuf is buf:  # (a handler that disconnects empties the buffer)
            header = buf[pos]
            if header == paho.PUBACK:  # for a message of ours: paho's bookkeeping, below
                if pos + 4 > end or buf[pos + 1] != 2 or self.on_publish is not None:
                    break
                acked.append((buf[pos + 2] << 8) | buf[pos + 3])
                self._rpos = pos = pos + 4
                count += 1
                continue
            if header & 0xF0 != paho.PUBLISH or header & 0x06 > 0x02:  # not a PUBLISH of QoS 0 or 1
                break
            at, length, shift = pos + 1, 0, 0
            while True:  # the remaining length: 1 to 4 bytes, 7 bits each
                if at >= end or shift > 21:
                    length = -1
                    break
                byte = buf[at]
                at += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            stop = at + length
            if length < 2 or stop > end:
                break
            topic_end = at + 2 + ((buf[at] << 8) | buf[at + 1])
            qos = header & 0x06
            payload_start = topic_end + 2 if qos else topic_end
            if topic_end == at + 2 or payload_start > stop:
                break
            try:
                topic = buf[at + 2 : topic_end].decode()
            except UnicodeDecodeError:
                break
            if acked:  # as paho: the PUBACKs before a message are handled before it
                rc = self._published(acked)
                acked = []
                if rc != paho.MQTT_ERR_SUCCESS:
                    break
            self._rpos = pos = stop
            deliver(topic, buf[payload_start:stop], bool(header & 0x01))
            if qos:
                acks.append(_PUBACK.pack(paho.PUBACK, 2, (buf[topic_end] << 8) | buf[topic_end + 1]))
            count += 1
        if count:
            with self._msgtime_mutex:
                self._last_bytes_received = paho.time_func()
            if acks:
                self._packet_queue(paho.PUBACK, b"".join(acks), 0, 1)
            if acked and rc == paho.MQTT_ERR_SUCCESS:
                rc = self._published(acked)
        return count, rc

    def _published(self, mids: list[int]) -> paho.MQTTErrorCode:
        """What paho's ``_handle_pubackcomp`` does for each of ``mids`` (no ``on_publish``
        set), with the inflight window refilled once rather than once per PUBACK: paho walks
        every message kept to find the queued ones, each time."""
        released = False
        with self._out_message_mutex:
            for mid in mids:
                message = self._out_messages.pop(mid, None)
                if message is None:
                    continue  # not ours (any more): paho ignores it too
                message.info._set_as_published()
                if message.qos > 0:
                    self._inflight_messages -= 1
                    released = True
            if released and self._max_inflight_messages > 0:
                return self._update_inflight()
        return paho.MQTT_ERR_SUCCESS

    def _update_inflight(self) -> paho.MQTTErrorCode:
        """paho's (the inflight window refilled with queued messages, in order; called with
        ``_out_message_mutex`` held), the QoS 1 PUBLISH packets it sends joined into one write
        rather than each formatted, logged and queued by ``_send_publish``.

        paho walks every message kept, the ones in flight first (up to the window), to find
        the queued ones, at every refill. While every message not in flight is one that
        :meth:`publish_batch` queued (the count says so), they are taken from its own queue
        instead, in the same order; anything else (messages paho queued, states changed by a
        reconnect) takes the walk."""
        queued = self._batch_queued
        packets = bytearray()
        if queued and len(self._out_messages) - self._inflight_messages == len(queued):
            while queued and self._inflight_messages < self._max_inflight_messages:
                m = queued[0]
                if m.state != paho.mqtt_ms_queued or self._sock is None:
                    break  # not what the count says: the walk below
                queued.popleft()
                self._inflight_messages += 1
                m.state = paho.mqtt_ms_wait_for_puback
                _pack_publish(self, packets, m._topic, m.payload, m.retain, m.mid, m.dup)
            else:
                if packets:
                    self._packet_queue(paho.PUBLISH | 0x02, bytes(packets), 0, 1)
                return paho.MQTT_ERR_SUCCESS
        rc = self._walk_inflight(packets)
        while queued and queued[0].state != paho.mqtt_ms_queued:  # sent (in order), or reset
            queued.popleft()
        return rc

    def _walk_inflight(self, packets: bytearray) -> paho.MQTTErrorCode:
        """:meth:`_update_inflight` by paho's walk; ``packets``: those to send before."""
        for m in self._out_messages.values():
            if self._inflight_messages >= self._max_inflight_messages:
                break
            if m.qos > 0 and m.state == paho.mqtt_ms_queued:
                if m.qos != 1 or m.properties is not None:  # QoS 2 (not used here): paho's, from here on
                    if packets:
                        self._packet_queue(paho.PUBLISH | 0x02, bytes(packets), 0, 1)
                    return super()._update_inflight()
                if self._sock is None:  # as paho's _send_publish
                    return paho.MQTT_ERR_NO_CONN
                self._inflight_messages += 1
                m.state = paho.mqtt_ms_wait_for_puback
                _pack_publish(self, packets, m._topic, m.payload, m.retain, m.mid, m.dup)
        if packets:
            self._packet_queue(paho.PUBLISH | 0x02, bytes(packets), 0, 1)
        return paho.MQTT_ERR_SUCCESS

    def loop_read(self, max_packets: int = 1) -> paho.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        while rc == paho.MQTT_ERR_SUCCESS and self._sock is not None and self._rpos < len(self._rbuf):
            rc = super().loop_read(max_packets)
        return rc

    def loop_write(self) -> paho.MQTTErrorCode:
        queue = self._out_packet
        if len(queue) > 1:
            merged: list[Any] = []
            for _ in range(len(queue)):  # other threads only append: what is here now, in order
                packet = queue.popleft()
                last = merged[-1] if merged else None
                if (
                    last is not None
                    and _joinable(last)
                    and _joinable(packet)
                    and last["to_process"] + packet["to_process"] <= COALESCE_LIMIT
                ):
                    last["packet"] = bytes(last["packet"][last["pos"] :]) + bytes(
                        packet["packet"][packet["pos"] :]
                    )
                    last["pos"] = 0
                    last["to_process"] = len(last["packet"])
                else:
                    merged.append(packet)
            queue.extendleft(reversed(merged))
        return super().loop_write()

    def _packet_queue(
        self,
        command: int,
        packet: bytes | bytearray,
        mid: int,
        qos: int,
        info: paho.MQTTMessageInfo | None = None,
    ) -> paho.MQTTErrorCode:
        on_loop = self._loop_thread == threading.get_ident()
        if not on_loop and (self._thread is None or self._on_socket_register_write is not None):
            return super()._packet_queue(command, packet, mid, qos, info)
        self._out_packet.append(
            {
                "command": command,
                "mid": mid,
                "qos": qos,
                "pos": 0,
                "to_process": len(packet),
                "packet": packet,
                "info": info,
            }
        )
        # On the network thread (a PUBACK while reading, say) its loop writes what is queued
        # before it waits again: no wake-up. From another thread, one wake-up byte until the
        # loop looks at the queue again (want_write, at the start of each pass), not one per
        # packet: a system call each, 10,000 of them for a deploy's event acknowledgements.
        if not on_loop and not self._wake_pending and self._sockpairW is not None:
            self._wake_pending = True
            with contextlib.suppress(BlockingIOError):  # full: the loop wakes anyway (paho's too)
                self._sockpairW.send(paho.sockpair_data)
        return paho.MQTT_ERR_SUCCESS

    def want_write(self) -> bool:
        if self._loop_thread == threading.get_ident():
            # The loop's pass begins (paho's _loop asks this first): packets queued from now
            # on are not seen by this pass's select, so they wake it again.
            self._wake_pending = False
        return super().want_write()

    def publish_untracked(self, topic: bytes, payload: bytes, retain: bool) -> bool:
        """Queue a QoS 0 PUBLISH as paho's ``publish`` would, without the ``MQTTMessageInfo``
        (and its ``Condition``) nobody awaits; False without a socket (paho's ``MQTT_ERR_NO_CONN``).
        Such packets are joined with the others in one write (:func:`_joinable`)."""
        if self._sock is None:
            return False
        mid = self._mid_generate()  # paho numbers QoS 0 messages too
        packet = bytearray()
        _pack_publish(self, packet, topic, payload, retain)
        self._packet_queue(paho.PUBLISH, bytes(packet), mid, 0, _UNTRACKED)
        return True

    def publish_batch(self, messages: list[tuple[bytes, bytes, bool]]) -> list[_Tracked | None]:
        """Publish QoS 1 messages (topic, payload, retained) as paho's ``publish`` would, in
        one go; per message, its tracker (None: not handed over, as paho's ``MQTT_ERR_QUEUE_SIZE``).

        paho's ``publish`` makes per message an :class:`MQTTMessageInfo` with a
        ``threading.Condition`` of its own, takes three locks, formats a debug log line and
        wakes the network thread through its socket pair (a system call): about 10 us on the
        caller's thread, and the caller then waits on each message's condition in turn. Here the
        same bookkeeping is done for the whole batch under one lock: each message is in
        ``_out_messages`` with its packet id and state, the inflight count is paho's, so paho
        itself refills the window, resends on reconnect (DUP set) and hands PUBACKs to
        :meth:`_Tracked._set_as_published` as for any message; the packets sent now (up to the
        inflight window) are queued as one write and the network thread woken once. Nothing is
        handed over while there is no socket (paho would keep them for the next connection:
        the caller publishes again instead, as it does for every message not acknowledged)."""
        batch = _Batch()
        out: list[_Tracked | None] = []
        packets = bytearray()
        now = paho.time_func()
        with self._out_message_mutex:
            if self._sock is None:
                return [None] * len(messages)
            kept = self._out_messages
            for topic, payload, retain in messages:
                mid = self._mid_generate()
                if mid in kept:  # 65,535 messages unacknowledged: paho refuses it too
                    out.append(None)
                    continue
                info = _Tracked(mid, batch)
                message = _message(mid, topic, payload, retain, info, now)
                kept[mid] = message
                if self._max_inflight_messages == 0 or self._inflight_messages < self._max_inflight_messages:
                    self._inflight_messages += 1
                    message.state = paho.mqtt_ms_wait_for_puback
                    _pack_publish(self, packets, topic, payload, retain, mid)
                else:
                    self._batch_queued.append(message)  # state queued: sent by _update_inflight
                batch.left += 1
                out.append(info)
            if packets:
                self._packet_queue(paho.PUBLISH | 0x02, bytes(packets), 0, 1)
        if batch.left == 0:
            batch.done.set()
        return out


class _Untracked(paho.MQTTMessageInfo):
    """The ``MQTTMessageInfo`` of QoS 0 messages nobody awaits (:meth:`_Paho.publish_untracked`):
    paho marks it published once the packet is written; nothing to do."""

    __slots__ = ()

    def __init__(self) -> None:  # paho's makes a Condition: not needed
        self.mid = 0
        self.rc = paho.MQTT_ERR_SUCCESS
        self._published = True
        self._iterpos = 0

    def _set_as_published(self) -> None:
        pass


_UNTRACKED = _Untracked()


def _pack_publish(
    client: paho.Client,
    packets: bytearray,
    topic: bytes,
    payload: bytes | bytearray,
    retain: bool,
    mid: int | None = None,
    dup: bool = False,
) -> None:
    """Append the PUBLISH packet paho's ``_send_publish`` makes (MQTT 3.1.1) to ``packets``:
    QoS 1 with packet id ``mid``, QoS 0 without one (None)."""
    qos = 0 if mid is None else 0x02
    packets.append(paho.PUBLISH | (0x08 if dup else 0) | qos | (1 if retain else 0))
    client._pack_remaining_length(packets, 2 + len(topic) + len(payload) + (0 if mid is None else 2))
    packets += _MID.pack(len(topic))
    packets += topic
    if mid is not None:
        packets += _MID.pack(mid)
    packets += payload


def _message(
    mid: int, topic: bytes, payload: bytes, retain: bool, info: _Tracked, now: float
) -> paho.MQTTMessage:
    """paho's ``MQTTMessage`` of an outgoing QoS 1 message, as its ``publish`` fills it in,
    without the ``MQTTMessageInfo`` (and its ``Condition``) its constructor makes."""
    message = paho.MQTTMessage.__new__(paho.MQTTMessage)
    message.timestamp = now
    message.state = paho.mqtt_ms_queued
    message.dup = False
    message.mid = mid
    message._topic = topic
    message.payload = payload
    message.qos = 1
    message.retain = retain
    message.info = info
    message.properties = None
    return message


class _Batch:
    """The messages of one :meth:`_Paho.publish_batch` not acknowledged yet; ``done`` once none is."""

    __slots__ = ("done", "left")

    def __init__(self) -> None:
        self.left = 0
        self.done = threading.Event()

    def acknowledged(self) -> None:
        """One more acknowledged (on the network thread: the only one that handles PUBACKs)."""
        self.left -= 1
        if self.left <= 0:
            self.done.set()


class _Tracked(paho.MQTTMessageInfo):
    """paho's ``MQTTMessageInfo`` for a message of a :meth:`_Paho.publish_batch`: whether the
    broker acknowledged it, its batch counting down (the batch is awaited, not each message)."""

    __slots__ = ("_batch",)

    def __init__(self, mid: int, batch: _Batch) -> None:  # paho's makes a Condition: not needed
        self.mid = mid
        self.rc = paho.MQTT_ERR_SUCCESS
        self._published = False
        self._iterpos = 0
        self._batch = batch

    def _set_as_published(self) -> None:
        if not self._published:
            self._published = True
            self._batch.acknowledged()

    def wait_for_publish(self, timeout: float | None = None) -> None:
        self._batch.done.wait(timeout)

    def is_published(self) -> bool:
        return self._published


_PUBACK = struct.Struct("!BBH")
_MID = struct.Struct("!H")
"""A two-byte integer (MQTT 3.1.1 section 1.5.2): a packet id, a string's length."""


def _acknowledged(info: paho.MQTTMessageInfo, timeout: float) -> bool:
    """Wait up to ``timeout`` for the broker's acknowledgement of one message. paho's errors are
    mapped here, once: a ``RuntimeError`` (the connection went away) or a ``ValueError`` (the
    message was never queued) mean it was not acknowledged."""
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError):
        return False
    return info.is_published()


def _topic_bytes(topic: str) -> bytes:
    """A topic to publish on, encoded; the ``ValueError`` paho's ``publish`` raises if it cannot be."""
    encoded = topic.encode()
    if not encoded:
        raise ValueError("Invalid topic.")
    paho.Client._raise_for_invalid_topic(encoded)
    return encoded


def _joinable(packet: Any) -> bool:
    """Whether paho does nothing after writing ``packet`` but move on to the next."""
    kind: int = packet["command"] & 0xF0
    if kind == paho.PUBLISH and packet["qos"] == 0:
        return packet["info"] is _UNTRACKED  # paho marks a QoS 0 message published once written
    return kind != paho.DISCONNECT


def tls_context(ca_file: str | None, client_cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    """A client TLS context verifying the server (against ``ca_file``, else the system's CAs),
    presenting ``client_cert`` (certificate file, key file) if given. A missing or wrong file
    is a :class:`ConfigError` that names it."""
    if ca_file is not None:
        _check_pem("CA file", ca_file, "CERTIFICATE-----")
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"CA file {ca_file}: {_reason(exc)}") from exc
    if client_cert is not None:
        cert, key = client_cert
        _check_pem("client certificate", cert, "CERTIFICATE-----")
        _check_pem("client key", key, "PRIVATE KEY-----")
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise ConfigError(f"client key {key} does not belong to client certificate {cert}") from exc
            raise ConfigError(f"client certificate {cert} / key {key}: {_reason(exc)}") from exc
    return ctx


def _check_pem(label: str, path: str, marker: str) -> None:
    try:
        with open(path, "rb") as f:
            text = f.read(1_000_000)
    except OSError as exc:
        raise ConfigError(f"{label} {path}: {_reason(exc)}") from exc
    if marker.encode() not in text:
        what = "private key" if "KEY" in marker else "certificate"
        raise ConfigError(f"{label} {path} is not a PEM {what}")


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)


class MqttClient:
    """One MQTT 3.1.1 session to one of several brokers, kept alive by a background thread:
    the paho :class:`~.transport.Transport`."""

    def __init__(
        self,
        brokers: list[BrokerAddress],
        client_id: str,
        *,
        clean_session: bool = True,
        keepalive: int = 60,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        will: Callable[[], Will | None] | None = None,
        on_message: MessageHandler | None = None,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        client_cert: tuple[str, str] | None = None,
    ) -> None:
        """``ca_file``: the CA that signed an ``mqtts://`` broker's certificate (default: the
        system's); ``client_cert``: (certificate file, key file) to present (mTLS identity)."""
        if not brokers:
            raise ConfigError("no broker configured")
        self.brokers = list(brokers)
        self.client_id = client_id
        self.keepalive = keepalive
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self.will = will
        self.on_message = on_message
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._gave_up = threading.Event()
        self._session_ok = False
        self._refused = False
        self.last_error: str | None = None
        self.current_broker: BrokerAddress | None = None
        self.session_present = False
        """From the last CONNACK: the broker still had our session (MQTT 3.1.1 section 3.2.2.2)."""
        self._thread: threading.Thread | None = None
        self._paho = _Paho(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
        )
        self._paho.max_inflight_messages_set(MAX_INFLIGHT)
        self._paho.max_queued_messages_set(0)
        if username is not None:
            self._paho.username_pw_set(username, password)
        if any(b.tls for b in self.brokers):
            self._paho.tls_set_context(tls_context(ca_file, client_cert))
        elif client_cert is not None:
            raise ConfigError("a client certificate needs an mqtts:// broker")
        self._paho.on_connect = self._handle_connect
        self._paho.on_message = self._handle_message
        self._paho.deliver = self._deliver
        self._paho.on_disconnect = self._handle_disconnect

    # --- lifecycle ---

    def start(self) -> None:
        """Start connecting in the background."""
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id}", daemon=True)
        # paho writes from the caller's thread unless it believes a loop thread runs: tell it
        # ours does, so publishes are queued and our thread, woken through paho's socket pair,
        # does all the socket I/O. An SSL socket must not be written by one thread while
        # another reads it (OpenSSL corrupts the stream: "bad record mac"), and _Paho's
        # buffers belong to one thread.
        self._paho._thread = self._thread
        self._thread.start()

    def connect(self, timeout: float = 10.0) -> None:
        """Start and wait until connected; raise :class:`TransportError` if that fails."""
        self.start()
        if not self.wait_connected(timeout):
            self.stop()
            if self.last_error:  # it names the broker
                raise TransportError(f"cannot connect to broker {self.last_error}")
            tried = ", ".join(b.url() for b in self.brokers)
            raise TransportError(f"cannot connect to broker {tried}: timed out")

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (True), or until the client gave up or ``timeout`` passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._connected.is_set():
            if self._gave_up.is_set():
                return False
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._connected.wait(0.05 if remaining is None else min(0.05, remaining))
        return True

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, publish_first: tuple[str, bytes, int, bool] | None = None) -> None:
        """Disconnect cleanly (no will is published) and stop the thread.

        ``publish_first`` is sent and awaited before the DISCONNECT, for a goodbye message.
        """
        if publish_first is not None and self.connected:
            topic, payload, qos, retain = publish_first
            _acknowledged(self._paho.publish(topic, payload, qos=qos, retain=retain), 2.0)
        self._stop.set()
        self._paho.disconnect()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
            if not self._thread.is_alive():  # it may have left before the DISCONNECT was queued
                with contextlib.suppress(Exception):
                    self._paho.loop_write()

    # --- messaging ---

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        with self._lock:
            self._subscriptions[topic_filter] = qos
        if self.connected:
            self._paho.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
        if self.connected:
            self._paho.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Hand a message to the client; False if not connected (the caller re-publishes later)."""
        if not self.connected or not _fits(topic, payload, qos):
            return False
        if qos == 0 and self._paho.on_publish is None:
            return self._paho.publish_untracked(_topic_bytes(topic), payload, retain)
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == paho.MQTT_ERR_SUCCESS

    def publish_tracked(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> Delivery | None:
        """Publish without waiting; return a check that is true once the broker acknowledged it
        (PUBACK for QoS 1), or None if the message could not be handed over (not connected)."""
        if not self.connected or not _fits(topic, payload, qos):
            return None
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return None
        return info.is_published

    def publish_confirmed(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> bool:
        """Publish and wait for the broker's acknowledgement (PUBACK for QoS 1)."""
        if not self.connected or not _fits(topic, payload, qos):
            return False
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == paho.MQTT_ERR_SUCCESS and _acknowledged(info, timeout)

    def publish_many(self, messages: list[tuple[str, bytes, int, bool]], timeout: float = 30.0) -> list[bool]:
        """Publish a batch without waiting between messages, then await every acknowledgement.

        Returns, per message, whether the broker acknowledged it within ``timeout``. A batch
        of QoS 1 messages (a deploy's desired states) takes :meth:`_Paho.publish_batch`.
        """
        if not self.connected:
            return [False] * len(messages)
        if all(q == 1 for _, _, q, _ in messages):
            return self._publish_batch(messages, timeout)
        infos = [
            self._paho.publish(t, p, qos=q, retain=r) if _fits(t, p, q) else None for t, p, q, r in messages
        ]
        deadline = time.monotonic() + timeout
        results = []
        for info in infos:
            results.append(
                info is not None
                and info.rc == paho.MQTT_ERR_SUCCESS
                and _acknowledged(info, max(0.0, deadline - time.monotonic()))
            )
        return results

    def _publish_batch(self, messages: list[tuple[str, bytes, int, bool]], timeout: float) -> list[bool]:
        """:meth:`publish_many` for QoS 1 messages: handed over at once, the batch awaited."""
        fits = [_fits(t, p, 1) for t, p, _, _ in messages]
        wanted = []
        for (topic, payload, _, retain), ok in zip(messages, fits, strict=True):
            if ok:
                wanted.append((_topic_bytes(topic), payload, retain))
        tracked = iter(self._paho.publish_batch(wanted))
        infos = [next(tracked) if ok else None for ok in fits]
        waiting = [info for info in infos if info is not None]
        if waiting:
            waiting[0].wait_for_publish(timeout)  # the batch's, not this message's
        return [info is not None and info.is_published() for info in infos]

    # --- internals ---

    def _run(self) -> None:
        self._paho._loop_thread = threading.get_ident()
        attempt = 0
        index = 0
        while not self._stop.is_set():
            broker = self.brokers[index % len(self.brokers)]
            self.current_broker = broker
            will = self.will() if self.will else None
            self._paho.will_clear()
            if will is not None:
                self._paho.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
            self._session_ok = False
            self._refused = False
            try:
                self._paho.connect(broker.host, broker.port, keepalive=self.keepalive)
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._failed(f"{broker.url()}: {exc}")
            else:
                rc = paho.MQTT_ERR_SUCCESS
                while not self._stop.is_set():
                    rc = self._paho.loop(timeout=0.5)
                    if rc != paho.MQTT_ERR_SUCCESS:
                        break
                else:  # stopping: write what stop() queued (the DISCONNECT) before leaving
                    with contextlib.suppress(Exception):
                        self._paho.loop_write()
                self._connected.clear()
                if not self._stop.is_set() and not self._refused:
                    reason = paho.error_string(rc)
                    if not self._session_ok:
                        hint = (
                            "is the broker using TLS? use mqtts://"
                            if not broker.tls
                            else "a TLS or protocol mismatch, or the broker refused us"
                        )
                        self._failed(f"{broker.url()}: connection closed before CONNACK ({reason}; {hint})")
                    else:
                        log.warning("connection to %s lost: %s", broker.url(), reason)
            if self._stop.is_set():
                break
            if not self.reconnect:
                self._gave_up.set()
                break
            if self._session_ok:
                attempt = 0
            else:
                attempt += 1
                index += 1
            self._stop.wait(self.backoff.delay(attempt))

    def _failed(self, error: str) -> None:
        """A connection attempt failed: a warning when the reason is new, then quieter (a client
        that does not reconnect raises it from :meth:`connect` instead)."""
        if error != self.last_error and self.reconnect:
            log.warning("cannot connect: %s", error)
        else:
            log.debug("cannot connect: %s", error)
        self.last_error = error

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            self._refused = True
            self._failed(
                f"{self.current_broker.url() if self.current_broker else '?'} refused: {reason_code}"
            )
            client.disconnect()
            return
        self._session_ok = True
        self.last_error = None
        self.session_present = bool(getattr(flags, "session_present", False))
        with self._lock:
            subs = list(self._subscriptions.items())
        if subs:
            client.subscribe(subs)
        self._connected.set()
        if self.on_connect:
            try:
                self.on_connect()
            except Exception:
                log.exception("on_connect handler failed")

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        was = self._connected.is_set()
        self._connected.clear()
        if was and self.on_disconnect:
            try:
                self.on_disconnect()
            except Exception:
                log.exception("on_disconnect handler failed")

    def _handle_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        try:
            topic = message.topic
        except UnicodeDecodeError:  # a broker should have refused it (MQTT 3.1.1 section 1.5.3)
            log.warning("dropped a message whose topic is not UTF-8: %r", message._topic[:200])
            return
        self._deliver(topic, bytes(message.payload), bool(message.retain))

    def _deliver(self, topic: str, payload: bytes, retained: bool) -> None:
        """Hand one message to :attr:`on_message` (on the client thread, for paho and for
        :class:`_Paho`'s fast path alike); the PUBACK of a QoS 1 message follows the return."""
        if self.on_message is None:
            return
        try:
            self.on_message(topic, payload, retained)
        except Exception:
            log.exception("message handler failed for %s", topic)
