"""The command registry: every command has one handler, and a standby answers only reads."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from support.read_only import populate, run_reads
from support.recording import RecordingPublisher
from tether.controller.service import COMMANDS, Controller
from tether.protocol import codec, topics
from tether.protocol.commands import (
    COMMAND_ADAPTER,
    CommandModel,
    GroupsCreate,
    GroupsList,
    GroupsRemove,
)
from tether.protocol.commands import (
    COMMANDS as COMMAND_MODELS,
)
from tether.protocol.errors import ErrorCode
from tether.protocol.models import Reply, Request


def test_every_command_model_has_one_handler() -> None:
    """Each CommandModel of protocol/commands.py is registered, and the wire union holds each of its kinds."""
    assert set(COMMAND_MODELS) == {h.model for h in COMMANDS}
    kinds = [kind for model in COMMAND_MODELS for kind in model.kinds()]
    assert len(kinds) == len(set(kinds))
    for model in COMMAND_MODELS:
        for kind in model.kinds():
            try:
                COMMAND_ADAPTER.validate_python({"kind": kind})
            except ValidationError as exc:  # fields missing, but the kind is known
                assert all(e["type"] != "union_tag_invalid" for e in exc.errors()), kind
            assert COMMANDS.handler(model.model_construct(kind=kind)).model is model
    with pytest.raises(ValidationError) as unknown:
        COMMAND_ADAPTER.validate_python({"kind": "devices.reboot"})
    assert unknown.value.errors()[0]["type"] == "union_tag_invalid"


def test_every_read_only_command_runs_on_a_store_that_refuses_writes(controller: Controller) -> None:
    """A read-only command (answered by an HA standby) writes nothing: an example of each, derived
    from its route (support/read_only.py), answers on a query-only SQLite."""
    results = run_reads(controller)
    assert set(results) == {h.model.__name__ for h in COMMANDS if h.read_only}
    assert len(results) >= 14  # devices, groups, stacks, tokens, variables, users, audit
    assert results["DevicesShow"].device.id == "pi-1"
    assert results["GroupsShow"].group.name == "edge"
    assert results["StacksStatus"].stack.name == "web"
    assert results["VarsGet"].variable.items == {"host": "db.local"}
    assert "groups.create" in [r.command for r in results["AuditList"].records]


def request(command: CommandModel, reply_to: str = "tether/v1/clients/cli-1/replies") -> bytes:
    return codec.encode(Request(id="r-1", reply_to=reply_to, command=command.model_dump(mode="json")))


def test_a_standby_answers_reads_and_forwards_writes(
    controller: Controller, publisher: RecordingPublisher
) -> None:
    """Not leading, the controller replies to a read itself and passes a write to the leader untouched."""
    controller.leading.clear()
    controller.handle(topics.REQUESTS, request(GroupsList()))
    write = request(GroupsCreate(name="edge", devices=("pi-1",)))
    controller.handle(topics.REQUESTS, write)
    (reply_topic, reply, _), (forward_topic, forwarded, _) = publisher.published
    assert reply_topic == "tether/v1/clients/cli-1/replies"
    assert codec.decode(reply, Reply).result == {"groups": []}
    assert (forward_topic, forwarded) == (topics.LEADER_REQUESTS, write)
    assert controller.store.get_group("edge") is None


@pytest.mark.parametrize(
    ("command", "code", "error"),
    [
        ({"kind": "groups.show", "name": "nope"}, ErrorCode.NOT_FOUND, "unknown group 'nope'"),
        ({"kind": "groups.show"}, ErrorCode.INVALID, "invalid request: "),
        (
            {"kind": "groups.create", "name": "g"},
            ErrorCode.INVALID,
            "a group needs either devices or a selector",
        ),
        ({"kind": "devices.reboot"}, ErrorCode.INVALID, "invalid request: "),
    ],
)
def test_a_refusal_comes_back_with_its_code(
    controller: Controller,
    publisher: RecordingPublisher,
    command: dict[str, Any],
    code: ErrorCode,
    error: str,
) -> None:
    """A refused command's reply carries the error code programs switch on, beside the message."""
    payload = codec.encode(Request(id="r-1", reply_to="tether/v1/clients/cli-1/replies", command=command))
    controller.handle(topics.REQUESTS, payload)
    ((_, data, _),) = publisher.published
    reply = codec.decode(data, Reply)
    assert (reply.ok, reply.code) == (False, code)
    assert reply.error is not None and reply.error.startswith(error)


def test_a_conflict_has_its_own_code(controller: Controller, publisher: RecordingPublisher) -> None:
    """Removing a group that still has stacks is a conflict, not a bad request."""
    populate(controller)
    publisher.published.clear()
    controller.handle(topics.REQUESTS, request(GroupsRemove(name="edge")))
    ((_, data, _),) = publisher.published
    assert codec.decode(data, Reply).code == ErrorCode.CONFLICT
