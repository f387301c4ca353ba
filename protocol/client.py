"""Request/response over MQTT 3.1.1: the reply topic and correlation id ride in the payload.

Any integration can do the same: subscribe to ``tether/v1/clients/{client_id}/replies``,
publish a :class:`Request` to ``tether/v1/controller/requests/{user}`` (the user it logged in
as: only that user may publish there, so the controller knows who asks) and match the reply's ``id``.

A device is asked the same way, on its ``requests`` topic (:func:`ask`; a log stream:
:class:`LogStream`). The CLI (cli/) and the controller's dashboard (controller/ui/logs.py)
share this session, which is why it lives here rather than in cli/ (the controller does
not import the CLI: tests/test_import_boundaries.py).
"""

from __future__ import annotations

import contextlib
import queue
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel
from tether.protocol import codec, topics
from tether.protocol.errors import PayloadError, RequestError, RequestTimeout, TetherError
from tether.protocol.models import Reply, Request
from tether.protocol.mqtt import BrokerAddress, MqttClient, parse_broker_url
from tether.protocol.topics import DeviceTopic
from tether.protocol.transport import Transport

if TYPE_CHECKING:
    from tether.protocol.device_api import DeviceReply, LogsCommand
    from tether.protocol.log_follow import Event

# The device API (protocol/device_api.py, protocol/log_follow.py) is imported where a device
# is asked, not here: most CLI calls only ask the controller (docs/performance.md, "Sixth
# pass: the CLI").

R = TypeVar("R", bound=Reply)


class ControllerClient:
    """A short-lived MQTT session that sends requests to the controller."""

    def __init__(
        self,
        broker_url: str,
        timeout: float = 10.0,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        client_cert: tuple[str, str] | None = None,
        transport: Transport | None = None,
        brokers: Sequence[BrokerAddress] | None = None,
        client_prefix: str = "tether-cli",
    ) -> None:
        """``transport``: the session to use (tests), instead of a paho client to ``broker_url``
        (or to ``brokers``, in turn); ``client_prefix``: of the client id (the broker's ACL
        wants ``tether-controller`` for the controller's credentials)."""
        self.timeout = timeout
        self.broker_url, self.ca_file, self.username = broker_url, ca_file, username
        # Our own request topic; without a username (an anonymous broker) the shared one.
        self.requests = topics.user_requests(username) if username else topics.REQUESTS
        self.client_id = f"{client_prefix}-{uuid.uuid4().hex[:12]}"
        self.reply_topic = topics.replies(self.client_id)
        self._replies: queue.Queue[bytes] = queue.Queue()
        self.watched: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._watching: set[str] = set()
        self._mqtt: Transport = transport or MqttClient(
            list(brokers) if brokers else [parse_broker_url(broker_url)],
            client_id=self.client_id,
            clean_session=True,
            reconnect=False,
            keepalive=30,
            username=username,
            password=password,
            ca_file=ca_file,
            client_cert=client_cert,
        )
        self._mqtt.on_message = self._on_message
        self._mqtt.subscribe(self.reply_topic)
        try:
            self._mqtt.connect(timeout)
        except BaseException:
            self._mqtt.stop()
            raise

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic == self.reply_topic:
            self._replies.put(payload)
        elif topic in self._watching:
            self.watched.put((topic, payload))

    def watch(self, topic: str) -> None:
        """Also receive messages on ``topic`` (exact, no wildcards) into :attr:`watched`."""
        self._watching.add(topic)
        self._mqtt.subscribe(topic)

    def send(self, topic: str, command: BaseModel, timeout: float = 10.0) -> str:
        """Publish a request for ``command`` on ``topic`` (a device's requests topic); return its id.

        Replies come to :meth:`receive`. :meth:`request` is the controller's round trip.
        ``timeout`` bounds the wait for the broker's acknowledgement.
        """
        request_id = uuid.uuid4().hex
        request = Request(id=request_id, reply_to=self.reply_topic, command=command.model_dump(mode="json"))
        if not self._mqtt.publish_confirmed(topic, codec.encode(request), qos=1, timeout=timeout):
            raise RequestError("lost the connection to the broker while sending the request")
        return request_id

    def receive(self, request_id: str, timeout: float, model: type[R]) -> R | None:
        """The next reply to ``request_id`` decoded as ``model``, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                payload = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            try:
                reply = codec.decode(payload, model)
            except PayloadError:
                continue
            if reply.id == request_id:
                return reply

    def request(self, command: BaseModel, timeout: float | None = None) -> Any:
        """Send ``command`` to the controller; return the reply's result or raise :class:`RequestError`
        (its ``code`` says why the controller refused it).

        One deadline covers the round trip: replies to earlier requests do not extend it."""
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        request_id = self.send(self.requests, command, timeout=wait)
        reply = self.receive(request_id, max(0.0, deadline - time.monotonic()), Reply)
        if reply is None:
            raise RequestTimeout(
                f"no reply from the controller within {wait:g}s (is `tether up` running on this broker? "
                "A controller older than this CLI does not read per-user request topics: upgrade it)"
            )
        if not reply.ok:
            raise RequestError(reply.error or "request failed", code=reply.code)
        return reply.result

    def close(self) -> None:
        self._mqtt.stop()

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- asking a device ------------------------------------------------------------------------


def send(client: ControllerClient, device_id: str, command: BaseModel, timeout: float = 10.0) -> str:
    """Publish ``command`` to the device; return the request id."""
    return client.send(topics.device(device_id, DeviceTopic.REQUESTS), command, timeout=timeout)


def answer(client: ControllerClient, device_id: str, request_id: str, timeout: float) -> DeviceReply:
    """The device's next reply to ``request_id``; TetherError if it does not come or says no."""
    from tether.protocol.device_api import DeviceReply

    reply = client.receive(request_id, timeout, DeviceReply)
    if reply is None:
        raise RequestTimeout(f"device {device_id} did not answer within {timeout:g}s")
    if not reply.ok:
        raise RequestError(reply.error or f"device {device_id}: request failed")
    return reply


def ask(client: ControllerClient, device_id: str, command: BaseModel, timeout: float | None = None) -> Any:
    """One request, one reply: the result."""
    request_id = send(client, device_id, command)
    return answer(client, device_id, request_id, client.timeout if timeout is None else timeout).result


class LogStream:
    """A ``logs`` follow (``command``, with ``follow``) of ``device_id`` through ``client``: the
    I/O around :class:`~tether.protocol.log_follow.LogFollower` (see it for the arguments).
    ``tether logs -f`` and the dashboard's log page both read it with :meth:`next`."""

    def __init__(
        self,
        client: ControllerClient,
        device_id: str,
        command: LogsCommand,
        *,
        answer_s: float,
        idle_s: float,
        limit_s: float | None = None,
    ) -> None:
        from tether.protocol.log_follow import LogFollower

        self.client, self.device_id = client, device_id
        request_id = send(client, device_id, command)
        self.follower = LogFollower(
            device_id, request_id, time.monotonic(), answer_s=answer_s, idle_s=idle_s, limit_s=limit_s
        )

    def next(self, wait: float) -> Event | None:
        """What the stream says next (None: nothing within ``wait`` seconds, or nothing new)."""
        from tether.protocol.device_api import DeviceReply

        due = self.follower.due(time.monotonic())
        if due is not None:
            send(self.client, self.device_id, due)
        reply = self.client.receive(self.follower.request_id, wait, DeviceReply)
        if reply is None:
            return self.follower.silence(time.monotonic())
        return self.follower.take(reply, time.monotonic())

    def cancel(self, timeout: float = 2.0) -> None:
        """Cancel the stream: a courtesy (the device's lease ends it anyway), so no error."""
        from tether.protocol.device_api import StreamCommand

        with contextlib.suppress(TetherError):
            send(
                self.client,
                self.device_id,
                StreamCommand(request_id=self.follower.request_id, action="cancel"),
                timeout,
            )
