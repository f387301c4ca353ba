"""The command registry: every command has one handler, and a standby answers only reads."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from pydantic import ValidationError
from support.recording import RecordingPublisher
from tether.controller.service import COMMANDS, Controller
from tether.protocol import codec, topics
from tether.protocol.commands import (
    COMMAND_ADAPTER,
    AuditList,
    CommandModel,
    DevicesList,
    DevicesPending,
    DevicesShow,
    GroupsCreate,
    GroupsList,
    GroupsRemove,
    GroupsShow,
    StacksDeploy,
    StacksList,
    StacksShow,
    StacksStatus,
    TokensCreate,
    TokensList,
    UsersList,
    UsersTokens,
    VarsGet,
    VarsList,
    VarsSet,
)
from tether.protocol.commands import (
    COMMANDS as COMMAND_MODELS,
)
from tether.protocol.errors import ErrorCode
from tether.protocol.models import Presence, Reply, Request
from tether.protocol.topics import DeviceTopic

COMPOSE = "services:\n  web:\n    image: busybox:1.36\n    command: [sleep, '3600']\n"

READ_EXAMPLES: dict[type[CommandModel], CommandModel] = {
    DevicesList: DevicesList(),
    DevicesPending: DevicesPending(),
    DevicesShow: DevicesShow(device_id="pi-1"),
    GroupsList: GroupsList(),
    GroupsShow: GroupsShow(name="edge"),
    StacksList: StacksList(),
    StacksStatus: StacksStatus(name="web"),
    StacksShow: StacksShow(name="web"),
    TokensList: TokensList(),
    VarsGet: VarsGet(path="app/db"),
    VarsList: VarsList(),
    UsersList: UsersList(),
    UsersTokens: UsersTokens(),
    AuditList: AuditList(),
}
"""A command of each read-only model, naming what :func:`populate` stores."""


def populate(controller: Controller) -> None:
    """A device, a group, a stack deployed to it, a token and a variable."""
    controller.handle(
        topics.device("pi-1", DeviceTopic.PRESENCE),
        codec.encode(Presence(device_id="pi-1", status="online", session=1)),
    )
    controller.execute(GroupsCreate(name="edge", devices=("pi-1",)))
    controller.execute(StacksDeploy(name="web", group="edge", compose=COMPOSE))
    controller.execute(TokensCreate(group="edge"))
    controller.execute(VarsSet(path="app/db", items={"host": "db.local"}))


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
    """A read-only command (answered by an HA standby) writes nothing: it succeeds on a query-only SQLite."""
    populate(controller)
    read_only = [h.model for h in COMMANDS if h.read_only]
    assert set(read_only) == set(READ_EXAMPLES), "give each read-only command an example here"
    controller.store.db.execute("PRAGMA query_only = ON")
    with pytest.raises(sqlite3.OperationalError):  # the store really refuses writes
        controller.execute(GroupsCreate(name="other", devices=("pi-2",)))
    results: dict[str, Any] = {}
    for model in read_only:
        results[model.__name__] = controller.execute(READ_EXAMPLES[model])
    assert results["DevicesShow"].device.id == "pi-1"
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
