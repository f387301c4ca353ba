"""Every controller command, declared once: its request model, its handler, who may answer
it, and its HTTP route.

A handler is registered where it is written, next to the other handlers of its domain::

    commands = CommandRegistry(tag="groups")

    @commands.command(GroupsShow, read_only=True, http=Route("GET", "/groups/{name}", "A group"))
    def groups_show(ctx: Context, cmd: GroupsShow) -> GroupResult: ...

and the controller answers with :data:`~.service.COMMANDS`, the union of every domain's
registry. The handler's return annotation names its result model (protocol/results.py). ``read_only`` means the command changes nothing and needs nothing that only the
leader keeps in memory, so a standby controller (``tether up --ha``) answers it from the
shared store; every other command is forwarded to the leader. ``role`` is the least role
(protocol/principals.py) a user needs to run it: by default ``viewer`` for a read-only
command and ``operator`` for any other; reads that need the leader say ``role="viewer"``, and
commands that manage users, API tokens, credentials, enrollment tokens or registries say
``role="admin"``. :meth:`~.service.Controller.execute` checks it, the one place for MQTT and
HTTP alike. ``http`` is the command's ``/api/v1`` route (a :class:`Route`, or several):
controller/http/api.py makes every registered route, and docs/openapi.json is generated from
them (``scripts/gen-api-docs``). Marking a write read-only
would make a standby execute it: tests/unit/test_commands.py runs every read-only command
on a store that refuses writes, and checks every command of protocol/commands.py has one
handler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, get_type_hints

from tether.protocol.commands import CommandModel
from tether.protocol.models import WireModel
from tether.protocol.principals import Role

C = TypeVar("C", bound=CommandModel)
H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True)
class Route:
    """A command's ``/api/v1`` route: ``method path`` runs the command with the path's, the
    query's and the JSON body's fields (controller/http/api.py makes it)."""

    method: str
    path: str
    """Below ``/api/v1``; ``{field}`` takes a field of the command (``{field:path}`` with slashes)."""
    summary: str = ""
    """The operation's one line in the OpenAPI document (its description is the command's docstring)."""
    tag: str = ""
    """The OpenAPI tag (the resource); empty: its registry's ``tag``."""
    query: Sequence[str] = ()
    """Fields taken from the query string (the rest that are not in the path come in the body;
    a GET's or a DELETE's all come from the query)."""
    body: bool = True
    fixed: Mapping[str, Any] = field(default_factory=dict)
    """Fields set by the route itself (the ``kind`` of a model with several)."""
    lists: Mapping[str, str] = field(default_factory=dict)
    """A path parameter that fills a list field of one item: {parameter: field}."""
    status: int = 200
    wait: bool = False
    """Takes ``wait_s``: answer once the deployment the command started has ended."""


@dataclass(frozen=True, slots=True)
class CommandHandler:
    """One registered command."""

    model: type[CommandModel]
    run: Callable[..., Any]
    """``run(ctx, command)``: the result, or raises a TetherError (a CommandError says why)."""
    read_only: bool
    """Changes nothing and needs only the store: a standby answers it (see the module docstring)."""
    result: type[WireModel]
    """The result model (protocol/results.py), from the handler's return annotation."""
    role: Role = "operator"
    """The least role a user needs to run it (protocol/principals.py)."""
    routes: tuple[Route, ...] = ()
    """Its ``/api/v1`` routes (each with its tag)."""
    prepare: Callable[[Any, Any], Any] | None = None
    """``prepare(ctx, command)``: slow work that needs no store (deriving a password's hash),
    done off the controller's thread before the command reaches it; what it returns, or the
    TetherError it raised, is given to ``run(ctx, command, prepared)``, which raises that error
    (so the refusal is checked for its role and audited like any other). Without it (a direct
    :meth:`~.service.Controller.execute`), ``run(ctx, command)`` prepares itself."""

    @property
    def writes(self) -> bool:
        """Whether it may change something (needs more than a viewer): it is audited."""
        return self.role != "viewer"


class CommandRegistry:
    """Command models mapped to their handlers; each model at most once."""

    def __init__(self, tag: str = "") -> None:
        """``tag``: the OpenAPI tag of its routes that name none (the domain's resource)."""
        self.tag = tag
        self._handlers: dict[type[CommandModel], CommandHandler] = {}

    def command(
        self,
        model: type[C],
        *,
        read_only: bool = False,
        role: Role | None = None,
        http: Route | Sequence[Route] = (),
        prepare: Callable[[Any, Any], Any] | None = None,
    ) -> Callable[[H], H]:
        """Register the decorated function as ``model``'s handler; ``role`` defaults to
        ``viewer`` for a read-only command, else ``operator``; ``http``: its route(s);
        ``prepare``: see :attr:`CommandHandler.prepare`."""
        if read_only and role not in (None, "viewer"):
            raise ValueError(f"{model.__name__}: a read-only command is for viewers")
        needed: Role = role or ("viewer" if read_only else "operator")
        routes = (http,) if isinstance(http, Route) else tuple(http)
        routes = tuple(r if r.tag else replace(r, tag=self.tag) for r in routes)

        def register(run: H) -> H:
            returns = get_type_hints(run).get("return")
            if not (isinstance(returns, type) and issubclass(returns, WireModel)):
                raise TypeError(f"{run.__name__} must be annotated to return a model of protocol/results.py")
            self._add(CommandHandler(model, run, read_only, returns, needed, routes, prepare))
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

    def routes(self) -> Iterator[tuple[CommandHandler, Route]]:
        """Every route of every command, with its command's handler, in registration order."""
        for handler in self._handlers.values():
            for route in handler.routes:
                yield handler, route

    def __iter__(self) -> Iterator[CommandHandler]:
        return iter(self._handlers.values())

    def __contains__(self, model: object) -> bool:
        return model in self._handlers
