"""A command added the documented way (docs/architecture.md, Where to extend): a request model,
a result model and one registered handler with its route, and nothing else, is answered by its
handler on the ``context`` fixture (no controller), over Controller.execute and over HTTP."""

# No ``from __future__ import annotations``: the handler below names a model defined in a
# fixture, which only eager annotations can resolve.

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from pydantic import Field
from support.read_only import example, run_reads
from support.recording import Clock, RecordingPublisher
from tether.controller.context import Context, require
from tether.controller.http import create_app
from tether.controller.http.api import add_routes
from tether.controller.http.app import API_PREFIX
from tether.controller.models import Group
from tether.controller.registry import CommandRegistry, Route
from tether.controller.security import ensure_operator_credentials
from tether.controller.service import COMMANDS, Controller
from tether.controller.store import Store
from tether.protocol import commands as protocol_commands
from tether.protocol.commands import CommandModel
from tether.protocol.errors import NotFoundError
from tether.protocol.models import WireModel


class GroupSize(WireModel):
    """The result model (protocol/results.py in real life): how many devices a group lists."""

    name: str
    devices: int


@pytest.fixture
def size_command(monkeypatch: pytest.MonkeyPatch) -> tuple[type[CommandModel], CommandRegistry]:
    """The throwaway command's model and a fresh registry holding its one handler."""
    monkeypatch.setattr(protocol_commands, "COMMANDS", [])  # the model joins this list, not the real one

    class GroupsSize(CommandModel):
        """How many devices a group lists."""

        kind: Literal["groups.size"] = "groups.size"
        name: str = Field(max_length=64, description="The group")

    commands = CommandRegistry(tag="groups")

    @commands.command(GroupsSize, read_only=True, http=Route("GET", "/groups/{name}/size", "A group's size"))
    def groups_size(ctx: Context, cmd: GroupsSize) -> GroupSize:
        group = require(ctx.store.get_group(cmd.name), "group", cmd.name)
        return GroupSize(name=group.name, devices=len(group.devices))

    return GroupsSize, commands


def test_a_new_handler_runs_on_the_context_fixture(
    context: Context, size_command: tuple[type[CommandModel], CommandRegistry]
) -> None:
    """The handler's fast unit test needs no controller: its registered handler, called with the
    parts of tests/unit/conftest.py on a real store, answers and refuses as registered."""
    model, commands = size_command
    with context.store.transaction():
        context.store.create_group(Group(name="edge", devices=("pi-1", "pi-2", "pi-3")))
    handler = commands.handler(model(name="edge"))
    assert (handler.read_only, handler.result) == (True, GroupSize)
    assert handler.run(context, model(name="edge")) == GroupSize(name="edge", devices=3)
    with pytest.raises(NotFoundError, match="unknown group 'nope'"):
        handler.run(context, model(name="nope"))


@pytest.fixture
def sized(
    tmp_path: Path, size_command: tuple[type[CommandModel], CommandRegistry]
) -> Iterator[tuple[Controller, type[CommandModel]]]:
    """A leading controller answering the throwaway registry, on a real SQLite store with group ``edge``."""
    model, commands = size_command
    store = Store(tmp_path / "tether.db")
    controller = Controller(store, clock=Clock(), commands=commands)
    controller.leading.set()
    with store.transaction():
        store.create_group(Group(name="edge", devices=("pi-1", "pi-2")))
    yield controller, model
    store.close()


def test_a_new_command_runs_through_execute(sized: tuple[Controller, type[CommandModel]]) -> None:
    """Its handler answers with its result model, and an unknown name is one not_found refusal."""
    controller, model = sized
    assert controller.execute(model(name="edge")) == GroupSize(name="edge", devices=2)
    with pytest.raises(NotFoundError, match="unknown group 'nope'"):
        controller.execute(model(name="nope"))
    assert controller.commands.handler(model(name="edge")).role == "viewer"  # read_only: viewers may


def test_a_new_read_only_command_is_checked_to_write_nothing(
    store: Store, publisher: RecordingPublisher, size_command: tuple[type[CommandModel], CommandRegistry]
) -> None:
    """test_commands.py's check covers it as registered, no example written by hand: run from its
    route (``groups/{name}`` names the group that check stores), it answers on a store that refuses writes."""
    model, commands = size_command
    controller = Controller(store, clock=Clock(), commands=CommandRegistry.of(COMMANDS, commands))
    controller.client = publisher  # type: ignore[assignment]
    controller.leading.set()
    assert example(controller.commands.handler(model(name="x"))) == model(name="edge")
    assert run_reads(controller)["GroupsSize"] == GroupSize(name="edge", devices=1)


def test_a_new_command_has_its_http_route(
    sized: tuple[Controller, type[CommandModel]], tmp_path: Path
) -> None:
    """The route declared with the handler is served, documented in OpenAPI, and answered by a viewer."""
    controller, _ = sized
    ensure_operator_credentials(controller.store, tmp_path, "mqtt://127.0.0.1:1883", 0.0)
    password = json.loads((tmp_path / "operator.json").read_text())["password"]
    app = create_app(controller)
    router = APIRouter()
    add_routes(router, controller.commands)
    app.include_router(router, prefix=API_PREFIX)
    client = TestClient(app, base_url="http://127.0.0.1")
    client.auth = ("admin", password)
    answer = client.get(f"{API_PREFIX}/groups/edge/size")
    assert answer.status_code == 200 and answer.json() == {"name": "edge", "devices": 2}
    missing = client.get(f"{API_PREFIX}/groups/nope/size")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    operation = app.openapi()["paths"][f"{API_PREFIX}/groups/{{name}}/size"]["get"]
    assert operation["operationId"] == "groups_size" and operation["tags"] == ["groups"]
