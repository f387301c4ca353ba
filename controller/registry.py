"""Every controller command, declared once: its request model, its handler, and who may answer it.

A handler is registered where it is written, next to the other handlers of its domain::

    commands = CommandRegistry()

    @commands.command(GroupsShow, read_only=True)
    def groups_show(ctx: Context, cmd: GroupsShow) -> GroupResult: ...

and the controller answers with :data:`~.service.COMMANDS`, the union of every domain's
registry. The handler's return annotation names its result model (protocol/results.py). ``read_only`` means the command changes nothing and needs nothing that only the
leader keeps in memory, so a standby controller (``tether up --ha``) answers it from the
shared store; every other command is forwarded to the leader. ``role`` is the least role
(protocol/principals.py) a user needs to run it: by default ``viewer`` for a read-only
command and ``operator`` for any other; reads that need the leader say ``role="viewer"``, and
commands that manage users, API tokens, credentials, enrollment tokens or registries say
``role="admin"``. :meth:`~.service.Controller.execute` checks it, the one place for MQTT and
HTTP alike. Marking a write read-only
would make a standby execute it: tests/unit/test_commands.py runs every read-only command
on a store that refuses writes, and checks every command of protocol/commands.py has one
handler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, get_type_hints

from tether.protocol.commands import CommandModel
from tether.protocol.models import WireModel
from tether.protocol.principals import Role

C = TypeVar("C", bound=CommandModel)
H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class CommandHandler:
    """One registered command."""

    model: type[CommandModel]
    run: Callable[[Any, Any], Any]
    """``run(ctx, command)``: the result, or raises a TetherError (a CommandError says why)."""
    read_only: bool
    """Changes nothing and needs only the store: a standby answers it (see the module docstring)."""
    result: type[WireModel]
    """The result model (protocol/results.py), from the handler's return annotation."""
    role: Role = "operator"
    """The least role a user needs to run it (protocol/principals.py)."""

    @property
    def writes(self) -> bool:
        """Whether it may change something (needs more than a viewer): it is audited."""
        return self.role != "viewer"


class CommandRegistry:
    """Command models mapped to their handlers; each model at most once."""

    def __init__(self) -> None:
        self._handlers: dict[type[CommandModel], CommandHandler] = {}

    def command(
        self, model: type[C], *, read_only: bool = False, role: Role | None = None
    ) -> Callable[[H], H]:
        """Register the decorated function as ``model``'s handler; ``role`` defaults to
        ``viewer`` for a read-only command, else ``operator``."""
        if read_only and role not in (None, "viewer"):
            raise ValueError(f"{model.__name__}: a read-only command is for viewers")
        needed: Role = role or ("viewer" if read_only else "operator")

        def register(run: H) -> H:
            returns = get_type_hints(run).get("return")
            if not (isinstance(returns, type) and issubclass(returns, WireModel)):
                raise TypeError(f"{run.__name__} must be annotated to return a model of protocol/results.py")
            self._add(CommandHandler(model, run, read_only, returns, needed))
            return run

        return register

    def _add(self, handler: CommandHandler) -> None:
        if not (isinstance(handler.model, type) and issubclass(handler.model, CommandModel)):
            raise TypeError(f"{handler.model!r} is not a CommandModel (protocol/commands.py)")
        if handler.model in self._handlers:
            raise ValueError(f"{handler.model.__name__} has two handlers")
        self._handlers[handler.model] = handler

    @classmethod
    def of(cls, *registries: CommandRegistry) -> CommandRegistry:
        """One registry holding every handler of ``registries`` (a model registered twice is an error)."""
        merged = cls()
        for registry in registries:
            for handler in registry:
                merged._add(handler)
        return merged

    def handler(self, command: CommandModel) -> CommandHandler:
        """The handler of ``command`` (KeyError if none is registered)."""
        return self._handlers[type(command)]

    def __iter__(self) -> Iterator[CommandHandler]:
        return iter(self._handlers.values())

    def __contains__(self, model: object) -> bool:
        return model in self._handlers
