"""The ``/api/v1`` routes: one route, one command of protocol/commands.py, one result model.

Every route is declared with its command, in the command registry (controller/registry.py:
``@commands.command(Model, http=Route(...))``), and made by :func:`command_route`: the path's
parameters, the query's and the JSON body's fields are a command model's own fields (the body
refuses fields the command does not have); the command runs through
:meth:`~tether.controller.service.Controller.submit`, exactly as an MQTT request does, and its
result model is the response model. No route carries logic of its own: a new command declares
its route where its handler is registered, and the OpenAPI document (docs/openapi.json)
follows (``scripts/gen-api-docs``). The few routes below that are not one command each
(streams, a YAML body) are written out.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request, Response
from fastapi.sse import format_sse_event
from pydantic import ConfigDict, create_model
from starlette.responses import StreamingResponse
from tether.controller.fleet_events import KINDS
from tether.controller.registry import CommandRegistry, Route
from tether.controller.rollout import ACTIVE_STATES
from tether.controller.service import COMMANDS
from tether.protocol import codec
from tether.protocol import commands as c
from tether.protocol.commands import CommandModel, RolloutStrategy
from tether.protocol.errors import CommandError, ConflictError
from tether.protocol.models import WireModel
from tether.protocol.results import DeploymentResult, StackDeployed

from .auth import Principal, request_principal
from .events import TooManyStreams, fleet_stream
from .problems import RESPONSES, StillRunning, Unavailable

SUBMIT_TIMEOUT = 60.0
"""Seconds a command may wait for the controller's thread before the answer is 503."""
FOLLOW_POLL = 1.0
"""Seconds between two looks at a followed deployment."""

router = APIRouter(responses=RESPONSES)


async def run(request: Request, command: CommandModel, principal: Principal) -> Any:
    """``command`` carried out by the controller (its result model, or the TetherError raised)."""
    future = request.app.state.controller.submit(command, principal)
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), SUBMIT_TIMEOUT)
    except TimeoutError:
        raise Unavailable(
            f"the controller did not answer {getattr(command, 'kind', '?')} within {SUBMIT_TIMEOUT:.0f}s"
        ) from None


_BODIES: dict[tuple[type[CommandModel], tuple[str, ...]], type[WireModel]] = {}


def body_model(model: type[CommandModel], left_out: Sequence[str]) -> type[WireModel]:
    """The JSON body of a route of ``model``: its fields but ``kind`` and ``left_out`` (taken from
    the path or the query), refusing any other field (a typo is an error, not ignored)."""
    key = (model, tuple(sorted(left_out)))
    if key not in _BODIES:
        fields: dict[str, Any] = {
            name: (info.annotation, info)
            for name, info in model.model_fields.items()
            if name != "kind" and name not in left_out
        }
        _BODIES[key] = create_model(  # type: ignore[call-overload]
            f"{model.__name__}Body",
            __base__=WireModel,
            __config__=None,
            __doc__=model.__doc__,
            **fields,
        )
        _BODIES[key].model_config = ConfigDict(frozen=True, extra="forbid")
        _BODIES[key].model_rebuild(force=True)
    return _BODIES[key]


def _params(route: Route) -> list[str]:
    """The path's parameters (``{name}`` or ``{name:path}``)."""
    return [part[1:-1].split(":")[0] for part in route.path.split("/") if part.startswith("{")]


def command_route(model: type[CommandModel], route: Route) -> Callable[..., Any]:
    """The endpoint of ``route``, running ``model`` (its signature tells FastAPI its parameters and body)."""
    fields = model.model_fields
    path_params = _params(route)
    query = list(route.query)
    if route.method in ("GET", "DELETE"):  # no body: every other field is a query parameter
        taken = {*path_params, *route.lists.values(), *route.fixed, "kind"}
        query += [n for n in fields if n not in taken and n not in query]
    left_out = [*path_params, *query, *route.lists.values(), *route.fixed]
    has_body = route.body and any(n != "kind" and n not in left_out for n in fields)
    parameters = [
        inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request),
        inspect.Parameter("response", inspect.Parameter.KEYWORD_ONLY, annotation=Response),
        inspect.Parameter(
            "principal",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[Principal, Depends(request_principal)],
        ),
    ]
    for name in path_params:
        target = route.lists.get(name, name)
        info = fields[target]
        annotation = str if name in route.lists else info.annotation
        parameters.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[annotation, Path(description=info.description)],
            )
        )
    for name in query:
        info = fields[name]
        default = info.get_default(call_default_factory=True)
        parameters.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[info.annotation, Query(description=info.description)],
                default=list(default) if isinstance(default, tuple) else default,
            )
        )
    if route.wait:
        parameters.append(WAIT_PARAMETER)
    if has_body:
        parameters.append(
            inspect.Parameter(
                "body",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[body_model(model, left_out), Body()],
            )
        )

    async def endpoint(request: Request, response: Response, principal: Principal, **values: Any) -> Any:
        data: dict[str, Any] = dict(route.fixed)
        wait_s = values.pop("wait_s", None)
        body = values.pop("body", None)
        if body is not None:
            data.update(body.model_dump(exclude_unset=True))
        for name, value in values.items():
            target = route.lists.get(name)
            data[target or name] = (value,) if target else value
        result = await run(request, model.model_validate(data), principal)
        await _deployment_started(request, response, result, wait_s, principal)
        return result

    endpoint.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    endpoint.__name__ = (route.fixed.get("kind") or fields["kind"].default or model.__name__).replace(
        ".", "_"
    )
    return endpoint


WAIT_OK = ("succeeded", "staged")
WAIT_DESCRIPTION = (
    "Answer once the deployment has ended, waiting at most this many seconds: 200 when it "
    "succeeded (or staged), 409 when it failed, was reverted, superseded, paused or awaits "
    "promotion, 504 when it still runs (a CI job's one curl)"
)
WAIT_PARAMETER = inspect.Parameter(
    "wait_s",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=Annotated[
        float | None,
        Query(gt=0, le=3600, description=WAIT_DESCRIPTION),
    ],
    default=None,
)


async def _deployment_started(
    request: Request, response: Response, result: Any, wait_s: float | None, principal: Principal
) -> None:
    """A result naming a deployment it started: ``Location`` points at it; ``wait_s`` waits for it."""
    deployment = getattr(result, "deployment", None)
    if isinstance(deployment, int):
        response.headers["Location"] = f"{request.scope.get('root_path', '')}/api/v1/deployments/{deployment}"
        if wait_s is not None:
            await wait_for(request, deployment, wait_s, principal)


async def wait_for(request: Request, deployment: int, wait_s: float, principal: Principal) -> None:
    """Return once deployment ``deployment`` is no longer running and succeeded (or is staged);
    raise a ConflictError when it ended otherwise, Unavailable (504) when ``wait_s`` passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    command = c.DeploymentsStatus(id=deployment, limit=0)  # its state: no device's row built
    while True:
        view = (await run(request, command, principal)).deployment
        if view.state not in ("staging", "running"):
            if view.state in WAIT_OK:
                return
            reason = f": {view.message}" if view.message else ""
            raise ConflictError(f"deployment {deployment} of stack {view.stack} is {view.state}{reason}")
        if loop.time() >= deadline or await request.is_disconnected():
            raise StillRunning(
                f"deployment {deployment} of stack {view.stack} still {view.state} after {wait_s:g}s"
            )
        await asyncio.sleep(FOLLOW_POLL)


def add_routes(router: APIRouter, registry: CommandRegistry) -> None:
    """Add every route declared in ``registry`` (each command's ``http``) to ``router``."""
    for handler, route in registry.routes():
        endpoint = command_route(handler.model, route)
        router.add_api_route(
            route.path,
            endpoint,
            operation_id=endpoint.__name__,
            methods=[route.method],
            response_model=handler.result,
            status_code=route.status,
            summary=route.summary,
            description=inspect.cleandoc(handler.model.__doc__ or route.summary),
            tags=[route.tag] if route.tag else None,
            response_model_exclude_none=False,
        )


class EventStream(StreamingResponse):
    """Server-sent events (``text/event-stream``), written by the route itself."""

    media_type = "text/event-stream"


def sse(event: str, data: Any, id: str | None = None) -> bytes:
    """One server-sent event, its data as JSON."""
    return format_sse_event(data_str=json.dumps(data, separators=(",", ":")), event=event, id=id)


FOLLOW_DOC = {
    200: {
        "description": "`deployment` events, each a DeploymentResult as JSON, once per change, until "
        "the deployment is no longer active",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


# Before the generic routes: /deployments/{id}/follow must not be read as an action.
@router.get(
    "/deployments/{id}/follow",
    operation_id="deployments_follow",
    tags=["deployments"],
    summary="Follow a deployment (server-sent events): its view each time it changes, until it ends",
    response_class=EventStream,
    response_model=None,
    responses=FOLLOW_DOC,  # type: ignore[arg-type]
)
async def deployments_follow(
    request: Request,
    principal: Annotated[Principal, Depends(request_principal)],
    id: Annotated[int, Path(ge=1, le=c.MAX_ID)],
) -> EventStream:
    command = c.DeploymentsStatus(id=id)
    first: DeploymentResult = await run(request, command, principal)  # a 404 before the stream starts

    async def events() -> AsyncIterator[bytes]:
        last: str | None = None
        current = first
        while True:
            data = current.model_dump(mode="json")
            text = json.dumps(data, sort_keys=True)
            if text != last:
                last = text
                yield sse("deployment", data, str(current.deployment.updated))
            if current.deployment.state not in ACTIVE_STATES or await request.is_disconnected():
                return
            await asyncio.sleep(FOLLOW_POLL)
            current = await run(request, command, principal)

    return EventStream(events())


YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "text/plain")


@router.post(
    "/stacks/{name}/compose",
    tags=["stacks"],
    operation_id="stacks_deploy_yaml",
    summary="Deploy a Compose file sent as it is (application/yaml): stacks.deploy for curl",
    description="The request body is the Compose file itself (`curl --data-binary @compose.yml "
    "-H 'Content-Type: application/yaml'`); the group, the rollout strategy's fields and `wait_s` "
    "come in the query. Otherwise exactly `POST /stacks/{name}/deploy`.",
    response_model=StackDeployed,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {t: {"schema": {"type": "string"}} for t in YAML_TYPES},
        }
    },
)
async def stacks_deploy_yaml(
    request: Request,
    response: Response,
    principal: Annotated[Principal, Depends(request_principal)],
    name: Annotated[str, Path()],
    group: Annotated[str, Query(description="The group to deploy to")],
    strategy: Annotated[RolloutStrategy, Query()],
    wait_s: Annotated[float | None, Query(gt=0, le=3600, description=WAIT_DESCRIPTION)] = None,
) -> Any:
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media not in YAML_TYPES:
        raise HTTPException(415, f"send the Compose file as application/yaml, not {media or 'nothing'}")
    body = await request.body()
    if len(body) > codec.MAX_PAYLOAD:
        raise HTTPException(413, f"the Compose file exceeds {codec.MAX_PAYLOAD} bytes")
    try:
        compose = body.decode()
    except UnicodeDecodeError:
        raise CommandError("the Compose file is not UTF-8") from None
    command = c.StacksDeploy(name=name, group=group, compose=compose, strategy=strategy)
    result: StackDeployed = await run(request, command, principal)
    await _deployment_started(request, response, result, wait_s, principal)
    return result


EVENTS_DOC = {
    200: {
        "description": "The fleet's events as they happen: `event:` the kind (device.online, "
        "deployment.failed, ... see docs/architecture.md, Fleet events), `data:` the event as JSON "
        "(seq, kind, subject, at, data); `events.lost` when the client fell behind (re-read state)",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


@router.get(
    "/events",
    operation_id="events",
    tags=["events"],
    summary="The fleet's events (server-sent events) from now on",
    response_class=EventStream,
    response_model=None,
    responses=EVENTS_DOC,  # type: ignore[arg-type]
)
async def fleet_events(
    request: Request,
    principal: Annotated[Principal, Depends(request_principal)],
    kinds: Annotated[
        list[str] | None, Query(description="Only these kinds (repeat the parameter); all if absent")
    ] = None,
) -> EventStream:
    unknown = sorted(set(kinds or ()) - set(KINDS))
    if unknown:
        raise CommandError(f"unknown event kind(s): {', '.join(unknown)} (known: {', '.join(KINDS)})")
    try:
        stream = await fleet_stream(request, request.app.state.controller.bus, kinds)
    except TooManyStreams as exc:
        raise Unavailable(str(exc)) from None
    response = EventStream(stream)
    response.headers["X-Accel-Buffering"] = "no"
    return response


add_routes(router, COMMANDS)
