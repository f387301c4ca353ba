"""The API documents generated from the models: OpenAPI (HTTP) and AsyncAPI (MQTT).

``docs/openapi.json`` is the HTTP API's OpenAPI 3.1 document, as ``/api/v1/openapi.json``
serves it; ``docs/asyncapi.json`` describes the MQTT topics (docs/topics.md) in AsyncAPI 3.0
with payload schemas made from the same pydantic models the controller and agents use.
tests/unit/test_api_docs.py fails when the checked-in files differ from these; regenerate them
with ``scripts/gen-api-docs``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import models_json_schema
from tether.protocol import __version__, topics
from tether.protocol.commands import COMMAND_ADAPTER
from tether.protocol.device_api import DEVICE_COMMAND_ADAPTER, MetricsSample
from tether.protocol.models import (
    DesiredState,
    EnrollmentRequest,
    EnrollmentResponse,
    Event,
    EventsAcked,
    Presence,
    Reply,
    ReportedState,
    Request,
    StackDefinition,
)

ROOT = Path(__file__).resolve().parents[2]
OPENAPI_FILE = ROOT / "docs" / "openapi.json"
ASYNCAPI_FILE = ROOT / "docs" / "asyncapi.json"


def openapi_document() -> dict[str, Any]:
    """The HTTP API's OpenAPI document (what ``/api/v1/openapi.json`` serves)."""
    from .app import create_app

    return create_app(None).openapi()  # type: ignore[arg-type]  # routes only read it per request


def _device(kind: topics.DeviceTopic) -> str:
    return topics.all_devices(kind).replace("+", "{device_id}")


# (channel, address, direction, message, its model, retained, QoS, description)
_CHANNELS: tuple[tuple[str, str, str, str, Any, bool, int, str], ...] = (
    ("desired", _device(topics.DeviceTopic.DESIRED), "send", "DesiredState",
     DesiredState, True, 1, "What a device should run: the controller publishes, the agent receives."),
    ("reported", _device(topics.DeviceTopic.REPORTED), "receive", "ReportedState",
     ReportedState, True, 1, "What a device runs, as its agent reports it."),
    ("presence", _device(topics.DeviceTopic.PRESENCE), "receive", "Presence",
     Presence, True, 1, "online/offline, with the agent's session number (offline: its will)."),
    ("events", _device(topics.DeviceTopic.EVENTS), "receive", "Event",
     Event, False, 1, "Events of a device (numbered; the controller acknowledges them on acked): "
     "one Event, or a batch of them, a msgpack array of Events oldest first (what agents send)."),
    ("acked", _device(topics.DeviceTopic.ACKED), "send", "EventsAcked",
     EventsAcked, True, 0, "The events of a device the controller has stored."),
    ("metrics", _device(topics.DeviceTopic.METRICS), "receive", "MetricsSample",
     MetricsSample, False, 0, "A device's resource usage, every metrics interval."),
    ("deviceRequests", _device(topics.DeviceTopic.REQUESTS), "send", "DeviceRequest",
     Request, False, 1, "Remote operations answered by the agent itself (logs, restart, facts...)."),
    ("stackDefinitions", f"{topics.ROOT}/stacks/{{spec_hash}}", "send", "StackDefinition",
     StackDefinition, True, 1, "A stack version, sent once and referenced by its hash."),
    ("userRequests", topics.USER_REQUESTS.replace("+", "{user}"), "receive", "ControllerRequest",
     Request, False, 1, "Commands to the controller from user {user} (the broker lets only that "
     "user publish here); the reply goes to the request's reply_to."),
    ("controllerRequests", topics.REQUESTS, "receive", "ControllerRequest",
     Request, False, 1, "Commands from older clients, run as user admin."),
    ("leaderRequests", topics.LEADER_REQUESTS, "receive", "ControllerRequest",
     Request, False, 1, "Writes a standby controller hands to the leader, unchanged (older clients')."),
    ("userLeaderRequests", topics.LEADER_REQUESTS + "/{user}", "receive", "ControllerRequest",
     Request, False, 1, "Writes of user {user} a standby controller hands to the leader, unchanged."),
    ("replies", f"{topics.ROOT}/clients/{{client_id}}/replies", "send", "Reply",
     Reply, False, 1, "A command's reply, on the client's own reply topic."),
    ("enrollRequests", topics.ALL_ENROLL_REQUESTS.replace("+", "{device_id}"), "receive", "EnrollmentRequest",
     EnrollmentRequest, False, 1, "A device asking to join with an enrollment token."),
    ("enrollResponses", topics.ALL_ENROLL_REQUESTS.replace("+", "{device_id}").replace("/request", "/response"), "send", "EnrollmentResponse",
     EnrollmentResponse, True, 1, "The controller's answer to an enrolling device."),
)  # fmt: skip


def _schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    """(per model name, its schema reference) and the shared definitions."""
    models = sorted({entry[4] for entry in _CHANNELS}, key=lambda m: m.__name__)
    refs, top = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    definitions: dict[str, Any] = dict(top.get("$defs", {}))
    for name, adapter in (("Command", COMMAND_ADAPTER), ("DeviceCommand", DEVICE_COMMAND_ADAPTER)):
        schema = TypeAdapter.json_schema(adapter, ref_template="#/components/schemas/{model}")
        definitions.update(schema.pop("$defs", {}))
        definitions[name] = schema
    return {m.__name__: refs[(m, "validation")] for m in models}, definitions


def asyncapi_document() -> dict[str, Any]:
    """The MQTT topics (docs/topics.md) as an AsyncAPI 3.0 document, from the wire models."""
    refs, schemas = _schemas()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for channel, address, action, message, model, retained, qos, description in _CHANNELS:
        parameters = {p.strip("{}"): {"description": f"the {p.strip('{}').replace('_', ' ')}"}
                      for p in address.split("/") if p.startswith("{")}  # fmt: skip
        payload = refs[model.__name__]
        if message in ("ControllerRequest", "DeviceRequest"):
            command = "Command" if message == "ControllerRequest" else "DeviceCommand"
            payload = {
                "allOf": [payload, {"properties": {"command": {"$ref": f"#/components/schemas/{command}"}}}]
            }
        messages[message] = {  # the same message on several channels: described once
            "name": message,
            "contentType": "application/msgpack",
            "payload": payload,
        }
        channels[channel] = {
            "address": address,
            "description": description,
            "messages": {message: {"$ref": f"#/components/messages/{message}"}},
            **({"parameters": parameters} if parameters else {}),
        }
        operations[f"{action}{channel[0].upper()}{channel[1:]}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "bindings": {"mqtt": {"qos": qos, "retain": retained, "bindingVersion": "0.2.0"}},
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Tether MQTT API",
            "version": __version__,
            "description": "Tether's topics (docs/topics.md), from the controller's point of view "
            "(send: it publishes; receive: it subscribes). Payloads are msgpack maps of the "
            "schemas below (generated from protocol/ models by scripts/gen-api-docs).",
        },
        "defaultContentType": "application/msgpack",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    """``--write``: write both documents; ``--check``: exit 1 if a checked-in one differs."""
    wanted = {OPENAPI_FILE: render(openapi_document()), ASYNCAPI_FILE: render(asyncapi_document())}
    stale = [p for p, text in wanted.items() if not p.is_file() or p.read_text() != text]
    if "--write" in argv:
        for path in stale:
            path.write_text(wanted[path])
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    for path in stale:
        print(f"{path.relative_to(ROOT)} is out of date: run scripts/gen-api-docs", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
