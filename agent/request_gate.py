"""Requests to this device (``.../requests``): checked here, on the agent's thread, before
remote operations (:mod:`.remote`) see them.

A payload that is not a msgpack map, or whose ``reply_to`` is not a
``tether/v1/clients/{client_id}/replies`` topic, is logged and ignored: the agent never
publishes a reply anywhere else. Anything else that is wrong (no ``id``, an unknown
``kind``, a bad field) gets ``ok: false`` with one line saying what; so does every request
to an agent without remote operations (the simulator). A valid request goes to ``execute``.

No threads and no I/O beyond the reply published through the :class:`~tether.protocol.transport.Link`:
:class:`~.core.AgentCore` imports this module, not :mod:`.remote`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from tether.protocol import codec, topics
from tether.protocol.device_api import DEVICE_COMMAND_ADAPTER, DeviceReply
from tether.protocol.errors import PayloadError
from tether.protocol.models import Request, WireModel
from tether.protocol.topics import DeviceTopic
from tether.protocol.transport import Link

log = logging.getLogger(__name__)

Execute = Callable[[Request, Any], None]
"""Carry out a validated request's command (:meth:`~.remote.RemoteOps.execute`)."""


class _Envelope(WireModel):
    """Just enough of a request to answer it when the rest is wrong."""

    id: Any = None
    reply_to: Any = None


def publish_reply(link: Link, reply_to: str, reply: DeviceReply) -> bool:
    """Answer a request on its (checked) reply topic."""
    return link.publish(reply_to, codec.encode(reply), qos=1)


def subscription_qos(topic_filter: str) -> int:
    """QoS 0 for the requests topic: the agent's session is persistent, and a request must
    not be queued by the broker while the device is away and carried out long after its
    client gave up (a restart an hour late). QoS 1 for everything else."""
    parsed = topics.parse(topic_filter)
    return 0 if parsed is not None and parsed.device_topic == DeviceTopic.REQUESTS else 1


def handle_request(payload: bytes, device_id: str, link: Link, execute: Execute | None) -> None:
    """One message from this device's requests topic (on the agent's thread)."""
    try:
        envelope = codec.decode(payload, _Envelope)
    except PayloadError as exc:
        log.warning("ignoring a device request: %s", exc)
        return
    reply_to = envelope.reply_to if isinstance(envelope.reply_to, str) else None
    parsed = topics.parse(reply_to) if reply_to else None
    if reply_to is None or parsed is None or parsed.kind != "replies":
        log.warning("ignoring a device request: reply_to %r is not a client reply topic", envelope.reply_to)
        return
    request_id = envelope.id if isinstance(envelope.id, str) else ""
    try:
        request = codec.decode(payload, Request)
        command = DEVICE_COMMAND_ADAPTER.validate_python(request.command)
    except PayloadError as exc:
        error = f"invalid request: {exc}"
    except ValidationError as exc:
        error = f"invalid request: command: {codec.describe(exc)}"
    else:
        if execute is None:
            error = f"device {device_id} does not take remote operations (this agent has them disabled)"
        else:
            execute(request, command)
            return
    log.warning("device request %s refused: %s", request_id or "(no id)", error)
    publish_reply(link, reply_to, DeviceReply(id=request_id, ok=False, error=error))
