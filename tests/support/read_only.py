"""The check that every read-only command writes nothing, for any registry: a controller's store
holding one of each resource, then each read-only command of its registry run on it once the
store refuses writes, with an example derived from the command's route (nothing to write by hand
for a new command: tests/unit/test_commands.py runs it on every command, test_new_command.py on
a new one)."""

from __future__ import annotations

import re
import sqlite3
from typing import Any

import pytest
from pydantic import ValidationError
from tether.controller.registry import CommandHandler
from tether.controller.service import Controller
from tether.protocol import codec, topics
from tether.protocol.commands import CommandModel, GroupsCreate, StacksDeploy, TokensCreate, VarsSet
from tether.protocol.models import Presence
from tether.protocol.topics import DeviceTopic

COMPOSE = "services:\n  web:\n    image: busybox:1.36\n    command: [sleep, '3600']\n"

STORED = {"devices": "pi-1", "groups": "edge", "stacks": "web", "variables": "app/db", "users": "admin"}
"""What :func:`populate` stores of each resource (an ``/api/v1`` path segment or route tag), by
the name a command's field gives it."""

_PARAMETER = re.compile(r"\{(\w+)(?::path)?\}")


def populate(controller: Controller) -> None:
    """A device, a group, a stack deployed to it, a token and a variable (and user admin, made by
    the fixture)."""
    controller.handle(
        topics.device("pi-1", DeviceTopic.PRESENCE),
        codec.encode(Presence(device_id="pi-1", status="online", session=1)),
    )
    controller.execute(GroupsCreate(name="edge", devices=("pi-1",)))
    controller.execute(StacksDeploy(name="web", group="edge", compose=COMPOSE))
    controller.execute(TokensCreate(group="edge"))
    controller.execute(VarsSet(path="app/db", items={"host": "db.local"}))


def example(handler: CommandHandler) -> CommandModel:
    """A command of ``handler``'s model naming what :func:`populate` stored: each required field
    that is a parameter of its route (``/groups/{name}/size``) names the stored one of the
    resource before it (``groups``: ``edge``); any other required field, that of the route's tag."""
    values: dict[str, Any] = {}
    for route in handler.routes:
        segments = route.path.strip("/").split("/")
        for before, segment in zip([route.tag, *segments], segments, strict=False):
            found = _PARAMETER.fullmatch(segment)
            if found and before in STORED:
                values.setdefault(found[1], STORED[before])
    tags = [r.tag for r in handler.routes if r.tag in STORED]
    for name, field in handler.model.model_fields.items():
        if field.is_required() and name not in values and tags:
            values[name] = STORED[tags[0]]
    return handler.model(**values)


def run_reads(controller: Controller) -> dict[str, Any]:
    """Populate ``controller``'s store, make it refuse writes, then run an :func:`example` of each
    read-only command of its registry: each must answer (a write fails with SQLite's error, a
    refusal with its own; either means the command is no read or its example is wrong). Its
    results, by the model's name."""
    populate(controller)
    controller.store.db.execute("PRAGMA query_only = ON")
    with pytest.raises(sqlite3.OperationalError):  # the store really refuses writes
        controller.execute(GroupsCreate(name="other", devices=("pi-2",)))
    results: dict[str, Any] = {}
    for handler in controller.commands:
        if handler.read_only:
            try:
                command = example(handler)
            except ValidationError as exc:
                raise AssertionError(
                    f"read-only {handler.model.__name__}: no example from its routes (add what populate"
                    f" stores of its resource to STORED): {exc}"
                ) from exc
            try:
                results[handler.model.__name__] = controller.execute(command)
            except Exception as exc:
                raise AssertionError(
                    f"read-only {command!r} failed on a store that refuses writes: {exc}"
                ) from exc
    return results
