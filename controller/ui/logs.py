"""Remote operations from the dashboard: a service's logs followed (``tether logs -f``), a restart.

A device has no inbound port: the dashboard reaches it through the broker, as the CLI does
(docs/topics.md, "Remote operations"). Each follow opens its own short MQTT session with the
controller's credentials, sends the device a ``logs`` request with ``follow``, extends the
lease while the browser listens, and cancels it when the browser goes away; a restart is
one request and its reply.
"""

from __future__ import annotations

import queue
import time
import uuid
from typing import Any

from tether.protocol import codec, topics
from tether.protocol.device_api import DeviceReply, LogsCommand, StreamCommand
from tether.protocol.errors import PayloadError, TetherError
from tether.protocol.models import Request
from tether.protocol.mqtt import MqttClient
from tether.protocol.topics import DeviceTopic

LEASE_S = 60.0
"""The stream's lease, extended every third of it while the browser listens."""
SILENT_S = 30.0
"""A device that sends nothing (not even the heartbeat) this long is taken as gone."""


class DeviceSession:
    """A short MQTT session with the controller's credentials to ask ``device_id`` something."""

    def __init__(self, controller: Any, device_id: str) -> None:
        brokers = getattr(controller.client, "brokers", None)
        if not brokers:
            raise TetherError("this controller has no broker connection to reach the device through")
        username, password = controller.credentials or (None, None)
        self.client_id = f"tether-controller-ui-{uuid.uuid4().hex[:12]}"
        self.reply_topic = topics.replies(self.client_id)
        self.requests = topics.device(device_id, DeviceTopic.REQUESTS)
        self.device_id = device_id
        self._replies: queue.Queue[bytes] = queue.Queue()
        self._mqtt = MqttClient(
            list(brokers),
            client_id=self.client_id,
            clean_session=True,
            reconnect=False,
            keepalive=30,
            username=username,
            password=password,
            ca_file=str(controller.ca_file) if controller.ca_file else None,
            client_cert=controller.access.client_cert,
            on_message=lambda topic, payload, _retained: self._replies.put(payload),
        )
        self._mqtt.subscribe(self.reply_topic)
        try:
            self._mqtt.connect(10.0)
        except BaseException:
            self._mqtt.stop()
            raise

    def _send(self, command: Any) -> str:
        request_id = uuid.uuid4().hex
        request = Request(id=request_id, reply_to=self.reply_topic, command=command.model_dump(mode="json"))
        if not self._mqtt.publish_confirmed(self.requests, codec.encode(request), qos=1, timeout=10.0):
            raise TetherError("lost the connection to the broker while asking the device")
        return request_id

    def _reply(self, wait: float) -> DeviceReply | None:
        try:
            payload = self._replies.get(timeout=wait)
        except queue.Empty:
            return None
        try:
            return codec.decode(payload, DeviceReply)
        except PayloadError:
            return None

    def ask(self, command: Any, timeout: float = 30.0) -> dict[str, Any]:
        """One request, its reply's result (raises TetherError if the device says no or is silent)."""
        request_id = self._send(command)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            reply = self._reply(left)
            if reply is not None and reply.id == request_id:
                if not reply.ok:
                    raise TetherError(reply.error or f"device {self.device_id} refused")
                return reply.result if isinstance(reply.result, dict) else {}
        raise TetherError(f"device {self.device_id} did not answer within {timeout:g}s")

    def close(self) -> None:
        self._mqtt.stop()


class LogFollow(DeviceSession):
    """One ``logs`` follow of ``stack`` (or one ``service``) on ``device_id``: call :meth:`next`."""

    def __init__(
        self, controller: Any, device_id: str, stack: str, service: str | None, tail: int = 100
    ) -> None:
        super().__init__(controller, device_id)
        command = LogsCommand(stack=stack, service=service, tail=tail, follow=True, duration=LEASE_S)
        self._renew_at = time.monotonic() + LEASE_S / 3
        self._heard = time.monotonic()
        self._seen = 0
        try:
            self.request_id = self._send(command)
        except BaseException:
            self._mqtt.stop()
            raise

    def next(self, wait: float) -> dict[str, Any] | None:
        """The next message of the stream (``{"text", "service"}``, or ``{"end": reason}`` last);
        None if nothing came within ``wait`` seconds. Extends the lease as it goes."""
        if time.monotonic() >= self._renew_at:
            self._send(StreamCommand(request_id=self.request_id, action="extend", duration=LEASE_S))
            self._renew_at = time.monotonic() + LEASE_S / 3
        reply = self._reply(wait)
        if reply is None:
            if time.monotonic() - self._heard > SILENT_S:
                return {"end": f"device {self.device_id} stopped answering"}
            return None
        if reply.id != self.request_id or (reply.seq and reply.seq <= self._seen):
            return None  # another request's, or a duplicate (QoS 1)
        self._heard = time.monotonic()
        self._seen = max(self._seen, reply.seq)
        result = reply.result if isinstance(reply.result, dict) else {}
        if not reply.ok:
            return {"end": reply.error or "the device refused"}
        if not reply.more:
            return {"end": str(result.get("end") or "ended")}
        return {"service": result.get("service") or "", "text": str(result.get("text") or "")}

    def close(self) -> None:
        """Cancel the stream (a courtesy: its lease ends it anyway) and close the session."""
        try:
            self._send(StreamCommand(request_id=self.request_id, action="cancel"))
        except TetherError:
            pass
        finally:
            self._mqtt.stop()
