"""Remote operations from the dashboard: a service's logs followed (``tether logs -f``), a restart.

A device has no inbound port: the dashboard reaches it through the broker, as the CLI does
(docs/topics.md, "Remote operations"), with the CLI's request session (protocol/client.py)
logged in with the controller's credentials, one per operation. A follow is
:class:`~tether.protocol.client.LogStream`, as in ``tether logs -f`` (the lease extended
while the browser listens, cancelled when it goes away); a restart is one request and its
reply.
"""

from __future__ import annotations

from typing import Any

from tether.protocol.client import ControllerClient, LogStream
from tether.protocol.device_api import LogsCommand
from tether.protocol.errors import TetherError
from tether.protocol.log_follow import LEASE_S, Ended, Failed

SILENT_S = 30.0
"""A device that sends nothing (not even the heartbeat) this long is taken as gone."""


def device_client(controller: Any) -> ControllerClient:
    """A short MQTT session with the controller's credentials, to ask a device something."""
    brokers = getattr(controller.client, "brokers", None)
    if not brokers:
        raise TetherError("this controller has no broker connection to reach the device through")
    username, password = controller.credentials or (None, None)
    return ControllerClient(
        "",
        brokers=list(brokers),
        client_prefix="tether-controller-ui",
        username=username,
        password=password,
        ca_file=str(controller.ca_file) if controller.ca_file else None,
        client_cert=controller.context.access.client_cert,
    )


class LogFollow:
    """One ``logs`` follow of ``stack`` (or one ``service``) on ``device_id``: call :meth:`next`."""

    def __init__(
        self, controller: Any, device_id: str, stack: str, service: str | None, tail: int = 100
    ) -> None:
        command = LogsCommand(stack=stack, service=service, tail=tail, follow=True, duration=LEASE_S)
        self.client = device_client(controller)
        try:
            self.stream = LogStream(self.client, device_id, command, answer_s=SILENT_S, idle_s=SILENT_S)
        except BaseException:
            self.client.close()
            raise

    def next(self, wait: float) -> dict[str, Any] | None:
        """The next output of the stream (``{"text", "service"}``, or ``{"end": reason}`` last);
        None if none came within ``wait`` seconds."""
        event = self.stream.next(wait)
        if isinstance(event, Failed):
            return {"end": event.message}
        if isinstance(event, Ended):
            return {"end": event.reason}
        if event is None or not event.text:
            return None
        return {"service": event.service, "text": event.text}

    def close(self) -> None:
        """Cancel the stream and close the session."""
        try:
            self.stream.cancel()
        finally:
            self.client.close()
