"""The web dashboard's pages (docs/ui.md): server-rendered, every state read through the controller's commands.

Each page runs the commands the API and the CLI run (``controller.submit``: the same
``execute``, role checks and audit as an MQTT or HTTP API request) and renders their result models (protocol/results.py) with Jinja2
(autoescaped: device-reported strings are attacker-controlled). A page asked for with the
``X-Tether-Fragment`` header answers with its ``<main>`` only: static/tether.js re-fetches it
when the fleet event stream (``/api/v1/events``) says something changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import hmac
import json
import re
import secrets
import shlex
import time
import urllib.parse
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError
from tether.controller.fleet_events import KINDS, LOST
from tether.controller.http import auth
from tether.protocol import codec
from tether.protocol.client import ask
from tether.protocol.commands import (
    AuditList,
    CommandModel,
    DeploymentsAction,
    DeploymentsList,
    DeploymentsStatus,
    DevicesApprove,
    DevicesLabel,
    DevicesList,
    DevicesMetrics,
    DevicesPending,
    DevicesReject,
    DevicesShow,
    DevicesTop,
    GroupsCreate,
    GroupsList,
    GroupsRemove,
    JobsList,
    JobsLogs,
    JobsRemove,
    JobsRun,
    JobsStatus,
    RegistriesAdd,
    RegistriesList,
    RegistriesRemove,
    RolloutStrategy,
    StacksDeploy,
    StacksList,
    StacksPlan,
    StacksShow,
    StacksStatus,
    TokensCreate,
    TokensList,
    TokensRemove,
    UsersAdd,
    UsersList,
    UsersPasswd,
    UsersRemove,
    VarsKey,
    VarsList,
    VarsRemove,
    VarsSet,
)
from tether.protocol.device_api import RestartCommand
from tether.protocol.enrollment import seal_text
from tether.protocol.errors import CommandError, NotFoundError, TetherError

from .logs import LogFollow, device_client

COOKIE = auth.SESSION_COOKIE
SUBMIT_TIMEOUT = 30.0
"""Seconds a page waits for the controller's answer to a command."""
PAGE_SIZE = 50
"""Devices per page of the device list and of a stack's devices."""
DEPLOYMENT_ROWS = 200
"""Devices a deployment's page lists (its counts cover them all)."""
ATTENTION = ("failed", "paused", "awaiting-promotion", "staging", "staged", "running")
"""Deployment states the overview lists (active ones, and failures)."""

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
SECURE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}

router = APIRouter(include_in_schema=False)
_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("tether.controller.ui", "templates"),
    autoescape=True,  # every template, whatever its name: device strings are escaped everywhere
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    delta = max(0.0, time.time() - ts)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if delta >= size:
            return f"{int(delta // size)}{unit} ago"
    return f"{int(delta)}s ago"


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else "—"


def _size(value: Any) -> str:
    if not isinstance(value, int | float):
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "?"


_templates.filters["ago"] = _ago
_templates.filters["when"] = _when
_templates.filters["size"] = _size
_templates.filters["quote_arg"] = shlex.quote


# --- plumbing ------------------------------------------------------------------------------


def _controller(request: Request) -> Any:
    return request.app.state.controller


def _address(request: Request) -> str:
    return request.client.host if request.client else ""


def _session(request: Request) -> auth.Session | None:
    """The request's session (the HTTP API's: controller/http/auth.py, so the cookie also opens
    the event stream the pages listen to), its user read again from the store: a user removed
    since has none, a changed role applies at once."""
    return auth.session(_controller(request), request.cookies.get(COOKIE), _address(request))


def _secure(response: Response) -> Response:
    for name, value in SECURE_HEADERS.items():
        response.headers[name] = value
    return response


def _login_first(request: Request) -> Response:
    target = "/ui/login?" + urlencode({"next": request.url.path})
    return _secure(RedirectResponse(target, status_code=303))


def _render(
    request: Request, template: str, session: auth.Session | None, code: int = 200, **values: Any
) -> Response:
    fragment = request.headers.get("X-Tether-Fragment") == "1"
    who = session.principal if session else None
    html = _templates.get_template(template).render(
        fragment=fragment,
        who=who,
        csrf=session.csrf if session else "",
        can_operate=who is not None and who.may("operator"),
        can_admin=who is not None and who.may("admin"),
        path=request.url.path,
        event_kinds=" ".join(KINDS),
        lost_kind=LOST,
        **values,
    )
    return _secure(HTMLResponse(html, status_code=code))


def _run(request: Request, session: auth.Session, command: CommandModel) -> Any:
    """``command`` run as the session's user, as an MQTT or HTTP API request is: its result,
    or raises its TetherError."""
    return _controller(request).submit(command, session.principal).result(SUBMIT_TIMEOUT)


def _error_page(request: Request, session: auth.Session | None, exc: Exception) -> Response:
    status = 404 if isinstance(exc, NotFoundError) else 403 if _forbidden(exc) else 400
    return _render(request, "error.html", session, code=status, message=str(exc))


def _forbidden(exc: Exception) -> bool:
    return str(getattr(exc, "code", "")) == "forbidden"


async def _form(request: Request, session: auth.Session) -> dict[str, Any]:
    """The posted form, its CSRF token checked (raises _Forbidden on a missing or wrong one)."""
    form = await request.form()
    if not auth.csrf_ok(session, form.get("csrf") if isinstance(form.get("csrf"), str) else None):  # type: ignore[arg-type]
        raise PermissionError("the form's CSRF token is missing or wrong: reload the page and try again")
    return {k: form.getlist(k) if k in ("device", "ids") else form.get(k) for k in form}


def _refused(request: Request, session: auth.Session | None, message: str) -> Response:
    return _render(request, "error.html", session, code=403, message=message)


class _LoginFirst(Exception):
    """No session: the page answers with the login page's redirect (see :func:`mount`)."""


class _Refused(Exception):
    """A posted form's CSRF token is missing or wrong: the page answers 403 (see :func:`mount`)."""

    def __init__(self, session: auth.Session, message: str) -> None:
        super().__init__(message)
        self.session = session


def _signed_in(request: Request) -> auth.Session:
    """Every page's first step: the request's session, or the login page's redirect."""
    session = _session(request)
    if session is None:
        raise _LoginFirst
    return session


Signed = Annotated[auth.Session, Depends(_signed_in)]


async def _posted(request: Request, session: Signed) -> dict[str, Any]:
    """Every form's first step after the session: the posted form, its CSRF token checked."""
    try:
        return await _form(request, session)
    except PermissionError as exc:
        raise _Refused(session, str(exc)) from None


Posted = Annotated[dict[str, Any], Depends(_posted)]


def mount(app: FastAPI) -> None:
    """Mount the pages on ``app``, with the answers of their two dependencies' refusals."""

    def login_first(request: Request, exc: Exception) -> Response:
        return _login_first(request)

    def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _Refused)
        return _refused(request, exc.session, str(exc))

    app.add_exception_handler(_LoginFirst, login_first)
    app.add_exception_handler(_Refused, refused)
    app.include_router(router)


# --- static files and login ----------------------------------------------------------------


@router.get("/ui/static/{name}")
def static(name: str) -> Response:
    suffix = name[name.rfind(".") :] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in STATIC_TYPES:
        return Response("not found\n", status_code=404, media_type="text/plain")
    try:
        data = resources.files("tether.controller.ui").joinpath("static", name).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return Response("not found\n", status_code=404, media_type="text/plain")
    response = _secure(Response(data, media_type=STATIC_TYPES[suffix]))
    response.headers["Cache-Control"] = "no-cache"
    return response


@router.get("/")
def root() -> Response:
    return _secure(RedirectResponse("/ui/", status_code=303))


def _safe_next(target: str | None) -> str:
    """Only a path of this UI: never another site (an open redirect)."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/"


LOGIN_COOKIE = "tether_login"


def _login_form(request: Request, target: str, error: str | None, status: int = 200) -> Response:
    """The login page, its form's CSRF token doubled in a cookie (no session to keep it in yet)."""
    token = secrets.token_urlsafe(24)
    response = _render(request, "login.html", None, code=status, next=target, error=error, login_csrf=token)
    response.set_cookie(
        LOGIN_COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https",
        path="/ui/login", max_age=3600,
    )  # fmt: skip
    return response


@router.get("/ui/login")
def login_page(request: Request, next: str | None = None) -> Response:
    return _login_form(request, _safe_next(next), None)


@router.post("/ui/login")
async def login(request: Request) -> Response:
    form = await request.form()
    user, password = str(form.get("user") or ""), str(form.get("password") or "")
    target = _safe_next(str(form.get("next") or ""))
    token, expected = str(form.get("csrf") or ""), request.cookies.get(LOGIN_COOKIE) or ""
    if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
        return _login_form(request, target, "the login form expired: log in again", status=403)
    who = await asyncio.to_thread(
        auth.check_password, _controller(request), user, password, _address(request)
    )
    if who is None:
        return _login_form(request, target, "wrong user name or password", status=401)
    cookie, _csrf = auth.create_session(_controller(request), who)
    response = _secure(RedirectResponse(target, status_code=303))
    response.delete_cookie(LOGIN_COOKIE, path="/ui/login")
    response.set_cookie(
        COOKIE,
        cookie,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
        max_age=int(auth.SESSION_S),
    )
    return response


@router.post("/ui/logout")
async def logout(request: Request) -> Response:
    session = await asyncio.to_thread(_session, request)
    if session is not None:
        try:
            await _form(request, session)
        except PermissionError as exc:
            return _refused(request, session, str(exc))
        auth.drop_session(session.cookie)
    response = _secure(RedirectResponse("/ui/login", status_code=303))
    response.delete_cookie(COOKIE, path="/")
    return response


# --- overview and devices ------------------------------------------------------------------


@router.get("/ui/")
def overview(request: Request, session: Signed) -> Response:
    try:
        counted = _run(request, session, DevicesList(limit=0))
        offline = _run(request, session, DevicesList(presence="offline", limit=10))
        deployments = _run(request, session, DeploymentsList()).deployments
        stacks = _run(request, session, StacksList()).stacks
        pending = [p for p in _run(request, session, DevicesPending()).devices if p.state == "pending"]
        # Per stack, its failing devices: counted by the store, not by reading every report.
        failing: list[tuple[str, Any]] = []
        failing_count = 0
        for stack in stacks:
            status = _run(request, session, StacksStatus(name=stack.name, states=("failed",), limit=10))
            failing_count += status.counts.get("failed", 0)
            failing += [(stack.name, row) for row in status.devices]
    except TetherError as exc:
        return _error_page(request, session, exc)
    attention = [d for d in deployments if d.state in ATTENTION][:20]
    return _render(
        request,
        "overview.html",
        session,
        total=counted.total or 0,
        presence=counted.by_presence or {},
        failing=failing[:20],
        failing_count=failing_count,
        offline=offline.devices,
        offline_count=offline.matched or 0,
        attention=attention,
        stacks=stacks,
        pending=pending,
    )


@router.get("/ui/devices")
def devices(
    request: Request,
    session: Signed,
    q: str = "",
    presence: str = "",
    state: str = "",
    group: str = "",
    after: str = "",
    page: int = 1,
) -> Response:
    query = {"q": q, "presence": presence, "state": state, "group": group}
    try:
        found = _run(
            request,
            session,
            DevicesList(
                search=q or None,
                presence=presence or None,  # type: ignore[arg-type]
                state=state or None,  # type: ignore[arg-type]
                group=group or None,
                after=after or None,
                limit=PAGE_SIZE,
            ),
        )
        groups = _run(request, session, GroupsList()).groups
    except (TetherError, ValidationError) as exc:
        return _error_page(request, session, exc)
    filters = {k: v for k, v in query.items() if v}
    matched = found.matched or 0
    return _render(
        request,
        "devices.html",
        session,
        rows=found.devices,
        matched=matched,
        total=found.total or 0,
        by_presence=found.by_presence or {},
        page=max(1, page),
        pages=max(1, -(-matched // PAGE_SIZE)),
        first_link="/ui/devices?" + urlencode(filters) if after else None,
        next_link="/ui/devices?" + urlencode({**filters, "after": found.next, "page": max(1, page) + 1})
        if found.next
        else None,
        query=query,
        groups=[g.name for g in groups],
    )


@router.get("/ui/devices/{device_id}")
def device(request: Request, session: Signed, device_id: str, done: str = "") -> Response:
    try:
        shown = _run(request, session, DevicesShow(device_id=device_id)).device
        groups = [g.name for g in _run(request, session, GroupsList()).groups if device_id in g.members]
    except (TetherError, ValidationError) as exc:
        return _error_page(request, session, exc)
    reported = shown.reported or {}
    sample = None
    charts: list[dict[str, Any]] = []
    with contextlib.suppress(TetherError):  # a standby forwards none (the samples are the leader's)
        rows = _run(request, session, DevicesTop(device_ids=(device_id,))).devices
        sample = rows[0].sample if rows else None
        history = _run(request, session, DevicesMetrics(device_id=device_id))
        charts = [
            chart
            for name, title in (("cpu", "CPU"), ("mem", "Memory"), ("disk", "Disk"))
            if (chart := sparkline(title, getattr(history, name), history.start, history.step_s)) is not None
        ]
    return _render(
        request,
        "device.html",
        session,
        device=shown,
        groups=groups,
        reported=reported,
        stacks=reported.get("stacks") or {},
        downloads=reported.get("downloads") or {},
        events=list(reversed(shown.events[-50:])),
        done=done,
        sample=sample,
        charts=charts,
    )


SPARK_W, SPARK_H = 288, 48
"""A chart's size in SVG units (4 per point of 72)."""


def sparkline(title: str, points: list[float | None], start: float, step: float) -> dict[str, Any] | None:
    """A series (% from 0 to 100, None: no sample) as an inline SVG chart: its polylines (one per
    run of points without a gap) and the numbers as text. None if the series has no point. Pure."""
    known = [p for p in points if p is not None]
    if not known:
        return None
    dx = SPARK_W / max(1, len(points) - 1)
    lines: list[str] = []
    run: list[tuple[float, float]] = []
    for i, value in enumerate([*points, None]):
        if value is not None:
            run.append((i * dx, SPARK_H - value / 100 * SPARK_H))
            continue
        if len(run) == 1:  # a lone point: a short flat stroke so that it shows
            run.append((run[0][0] + 2, run[0][1]))
        if run:
            lines.append(" ".join(f"{x:.1f},{y:.1f}" for x, y in run))
        run = []
    latest = next(p for p in reversed(points) if p is not None)
    return {
        "title": title,
        "lines": lines,
        "latest": latest,
        "min": min(known),
        "max": max(known),
        "mean": sum(known) / len(known),
        "start": start,
        "hours": len(points) * step / 3600,
        "width": SPARK_W,
        "height": SPARK_H,
    }


def _restart(controller: Any, device_id: str, stack: str, service: str | None) -> str:
    with device_client(controller) as client:
        result = ask(client, device_id, RestartCommand(stack=stack, service=service), timeout=30.0) or {}
    done = []
    for svc in result.get("services") or []:
        if svc.get("error") or not svc.get("new"):
            raise TetherError(f"{stack}/{svc.get('service')}: {svc.get('error') or 'no new instance yet'}")
        done.append(f"{stack}/{svc.get('service')}")
    return "restarted " + ", ".join(done) if done else "nothing to restart"


@router.post("/ui/devices/{device_id}/restart")
async def restart(request: Request, session: Signed, form: Posted, device_id: str) -> Response:
    """Restart a stack's services (or one) on the device: new instances, as ``tether devices restart``."""
    if not session.principal.may("operator"):
        return _refused(request, session, "restarting a service needs the operator role")
    stack, service = str(form.get("stack") or ""), str(form.get("service") or "") or None
    try:
        done = await asyncio.to_thread(_restart, _controller(request), device_id, stack, service)
    except (TetherError, ValidationError, OSError) as exc:
        return _render(request, "error.html", session, code=502, message=f"{device_id}: {exc}")
    target = f"/ui/devices/{urllib.parse.quote(device_id)}?" + urlencode({"done": done})
    return _secure(RedirectResponse(target, status_code=303))


@router.post("/ui/devices/{device_id}/labels")
def label(request: Request, session: Signed, form: Posted, device_id: str) -> Response:
    """Set and remove operator labels (trusted: selector groups match them), as ``tether devices label``."""
    try:
        command = DevicesLabel(
            device_id=device_id, set=_labels(form.get("set")), remove=_words(form.get("remove"))
        )
        _run(request, session, command)
    except (TetherError, ValidationError) as exc:
        message = f"invalid: {codec.describe(exc)}" if isinstance(exc, ValidationError) else str(exc)
        return _render(request, "error.html", session, code=403 if _forbidden(exc) else 400, message=message)
    target = f"/ui/devices/{urllib.parse.quote(device_id)}?" + urlencode({"done": "labels changed"})
    return _secure(RedirectResponse(target, status_code=303))


@router.get("/ui/devices/{device_id}/logs")
async def follow_logs(request: Request, device_id: str, stack: str, service: str = "") -> Response:
    """A service's logs as server-sent events: the last lines, then what it writes (``end`` last).

    Needs the operator role, as ``tether logs`` does: logs may hold what a viewer should not see."""
    session = await asyncio.to_thread(_session, request)
    if session is None:
        return _secure(Response("log in first\n", status_code=401, media_type="text/plain"))
    if not session.principal.may("operator"):
        return _refused(request, session, "following logs needs the operator role")

    def end(reason: str) -> bytes:
        return f"event: end\ndata: {json.dumps({'end': reason})}\n\n".encode()

    async def stream() -> AsyncIterator[bytes]:
        yield b"retry: 600000\n: logs\n\n"
        try:
            follow = await asyncio.to_thread(
                LogFollow, _controller(request), device_id, stack, service or None
            )
        except (TetherError, ValidationError, OSError) as exc:
            yield end(str(exc))
            return
        try:
            while not await request.is_disconnected():
                message = await asyncio.to_thread(follow.next, 1.0)
                if message is None:
                    continue
                if "end" in message:
                    yield end(str(message["end"]))
                    return
                yield f"data: {json.dumps(message)}\n\n".encode()
        finally:
            await asyncio.to_thread(follow.close)

    response = _secure(StreamingResponse(stream(), media_type="text/event-stream"))
    response.headers["X-Accel-Buffering"] = "no"
    return response


# --- stacks and deployments ----------------------------------------------------------------


@router.get("/ui/stacks")
def stacks(request: Request, session: Signed) -> Response:
    try:
        found = _run(request, session, StacksList()).stacks
    except TetherError as exc:
        return _error_page(request, session, exc)
    return _render(request, "stacks.html", session, stacks=found)


@router.get("/ui/stacks/{name}")
def stack(
    request: Request,
    session: Signed,
    name: str,
    version: int | None = None,
    against: int | None = None,
    state: str = "",
    after: str = "",
) -> Response:
    try:
        status = _run(
            request,
            session,
            StacksStatus(name=name, limit=PAGE_SIZE, after=after or None, states=(state,) if state else ()),
        )
        shown = _run(request, session, StacksShow(name=name, version=version))
        other = _run(request, session, StacksShow(name=name, version=against)) if against else None
        deployments = _run(request, session, DeploymentsList(stack=name)).deployments[:10]
    except (TetherError, ValidationError) as exc:
        return _error_page(request, session, exc)
    diff = None
    if other is not None:
        diff = list(
            difflib.unified_diff(
                other.compose.splitlines(),
                shown.compose.splitlines(),
                f"{name} version {other.version}",
                f"{name} version {shown.version}",
                lineterm="",
            )
        )
    return _render(
        request,
        "stack.html",
        session,
        name=name,
        stack_status=status,
        state=state,
        next_link=f"/ui/stacks/{urllib.parse.quote(name)}?"
        + urlencode({"state": state, "after": status.next})
        if status.next
        else None,
        shown=shown,
        other=other,
        diff=diff,
        deployments=deployments,
        versions=list(range(shown.current, 0, -1)),
    )


def _strategy(form: dict[str, Any]) -> RolloutStrategy:
    values: dict[str, Any] = {"kind": form.get("strategy") or "all-at-once"}
    for field, key in (("max_parallel", "max_parallel"), ("canary", "canary")):
        if form.get(key):
            values[field] = form[key]
    if form.get("min_healthy"):
        values["min_healthy_time_s"] = form["min_healthy"]
    values["auto_revert"] = form.get("auto_revert") == "on"
    values["auto_promote"] = form.get("auto_promote") == "on"
    return RolloutStrategy.model_validate(values)


def _problems(message: str) -> tuple[str, list[str]]:
    """A refusal as a headline and its problems: ``stack 'x': 3 problems ...:`` then ``- ...`` lines."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return lines[0].removesuffix(":"), [line.removeprefix("- ") for line in lines[1:]]
    return "", lines or [message]


@router.get("/ui/deploy")
def deploy_page(request: Request, session: Signed, name: str = "", group: str = "") -> Response:
    if not session.principal.may("operator"):
        return _refused(request, session, "deploying needs the operator role")
    compose = ""
    if name:
        try:
            shown = _run(request, session, StacksShow(name=name))
            compose, group = shown.compose, group or shown.group
        except (TetherError, ValidationError):
            pass  # a new stack
    try:
        groups = [g.name for g in _run(request, session, GroupsList()).groups]
    except TetherError as exc:
        return _error_page(request, session, exc)
    form = {"name": name, "group": group, "compose": compose, "strategy": "all-at-once"}
    return _render(
        request, "deploy.html", session, form=form, groups=groups, plan=None, errors=[], headline=""
    )


@router.post("/ui/deploy")
def deploy(request: Request, session: Signed, form: Posted) -> Response:
    if not session.principal.may("operator"):
        return _refused(request, session, "deploying needs the operator role")
    name, group, compose = (str(form.get(k) or "") for k in ("name", "group", "compose"))
    compose = compose.replace("\r\n", "\n")
    form = {**form, "compose": compose}
    groups: list[str] = []
    errors: list[str] = []
    headline = ""
    plan = None
    try:
        groups = [g.name for g in _run(request, session, GroupsList()).groups]
        strategy = _strategy(form)
        if form.get("action") == "deploy":
            deployed = _run(
                request, session, StacksDeploy(name=name, group=group, compose=compose, strategy=strategy)
            )
            target = f"/ui/deployments/{deployed.deployment}" if deployed.deployment else f"/ui/stacks/{name}"
            return _secure(RedirectResponse(target, status_code=303))
        plan = _run(request, session, StacksPlan(name=name, group=group, compose=compose))
    except ValidationError as exc:
        errors = [f"invalid: {codec.describe(exc)}"]
    except TetherError as exc:
        headline, errors = _problems(str(exc))
    status = 400 if errors else 200
    return _render(
        request,
        "deploy.html",
        session,
        code=status,
        form=form,
        groups=groups,
        plan=plan,
        errors=errors,
        headline=headline,
    )


@router.get("/ui/deployments")
def deployments(request: Request, session: Signed) -> Response:
    try:
        found = _run(request, session, DeploymentsList()).deployments[:100]
    except TetherError as exc:
        return _error_page(request, session, exc)
    return _render(request, "deployments.html", session, deployments=found)


@router.get("/ui/deployments/{deployment_id}")
def deployment(request: Request, session: Signed, deployment_id: int) -> Response:
    try:
        shown = _run(request, session, DeploymentsStatus(id=deployment_id, limit=DEPLOYMENT_ROWS)).deployment
        status = _run(request, session, StacksStatus(name=shown.stack, limit=DEPLOYMENT_ROWS))
    except (TetherError, ValidationError) as exc:
        return _error_page(request, session, exc)
    rows = {r.device: r for r in status.devices}
    devices = sorted((shown.devices or {}).items())[:DEPLOYMENT_ROWS]
    return _render(
        request,
        "deployment.html",
        session,
        deployment=shown,
        rows=rows,
        devices=devices,
        more=max(0, sum(shown.counts.values()) - len(devices)),  # counts: over every device
    )


@router.post("/ui/deployments/{deployment_id}/{action}")
def deployment_action(
    request: Request, session: Signed, form: Posted, deployment_id: int, action: str
) -> Response:
    if not session.principal.may("operator"):
        return _refused(request, session, f"{action} needs the operator role")
    try:
        command = DeploymentsAction(kind=f"deployments.{action}", id=deployment_id)  # type: ignore[arg-type]
        done = _run(request, session, command).deployment
    except (TetherError, ValidationError) as exc:
        return _error_page(request, session, exc)
    return _secure(RedirectResponse(f"/ui/deployments/{done.id}", status_code=303))


# --- waiting room and the rest -------------------------------------------------------------


@router.get("/ui/pending")
def pending(request: Request, session: Signed, done: str = "") -> Response:
    try:
        found = _run(request, session, DevicesPending()).devices
    except TetherError as exc:
        return _error_page(request, session, exc)
    return _render(request, "pending.html", session, devices=found, done=done)


@router.post("/ui/pending")
def decide(request: Request, session: Signed, form: Posted) -> Response:
    if not session.principal.may("operator"):
        return _refused(request, session, "approving devices needs the operator role")
    ids = tuple(str(i) for i in form.get("device") or ())
    if not ids:
        return _render(request, "error.html", session, code=400, message="select at least one device")
    try:
        if form.get("action") == "reject":
            rejected = _run(request, session, DevicesReject(device_ids=ids)).rejected
            done = f"rejected {len(rejected)}"
        else:
            approved = _run(request, session, DevicesApprove(device_ids=ids)).approved
            done = f"approved {len(approved)}"
    except (TetherError, ValidationError) as exc:
        return _error_page(request, session, exc)
    return _secure(RedirectResponse("/ui/pending?" + urlencode({"done": done}), status_code=303))


_LISTS: dict[str, tuple[type[CommandModel], str, str]] = {
    "groups": (GroupsList, "groups", "Groups"),
    "tokens": (TokensList, "tokens", "Enrollment tokens"),
    "variables": (VarsList, "variables", "Variables"),
    "registries": (RegistriesList, "registries", "Registry credentials"),
    "jobs": (JobsList, "jobs", "Jobs"),
    "users": (UsersList, "users", "Users"),
    "audit": (AuditList, "records", "Audit log"),
}


@router.get("/ui/jobs/{name}")
def job(request: Request, session: Signed, name: str) -> Response:
    """A job: each device's latest run, and the latest runs with their output."""
    try:
        status = _run(request, session, JobsStatus(name=name))
        runs = _run(request, session, JobsLogs(name=name, limit=50)).results
    except (TetherError, ValidationError) as exc:
        return _error_page(request, session, exc)
    return _render(request, "job.html", session, status=status, runs=runs)


def _listing(request: Request, session: auth.Session, what: str, code: int = 200, **values: Any) -> Response:
    model, attribute, title = _LISTS[what]
    try:
        rows = getattr(_run(request, session, model()), attribute)
    except TetherError as exc:
        return _error_page(request, session, exc)
    if what == "audit":
        rows = list(reversed(rows))
    values.setdefault("shown_once", None)
    values.setdefault("once_for", "")
    values.setdefault("errors", [])
    return _render(request, f"{what}.html", session, code=code, rows=rows, title=title, **values)


@router.get("/ui/{what}")
def listing(request: Request, what: str) -> Response:
    if what not in _LISTS:
        return _secure(Response("not found\n", status_code=404, media_type="text/plain"))
    session = _session(request)
    if session is None:
        return _login_first(request)
    return _listing(request, session, what)


def _words(text: Any) -> tuple[str, ...]:
    return tuple(w for w in re.split(r"[\s,]+", str(text or "")) if w)


def _labels(text: Any) -> dict[str, str]:
    """``key=value`` pairs separated by spaces or commas (a pair without ``=`` is an error)."""
    labels = {}
    for pair in _words(text):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"label {pair!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def _items(text: Any) -> dict[str, str]:
    """``KEY=VALUE`` lines (a value may hold spaces and ``=``; blank lines are skipped)."""
    items = {}
    for line in str(text or "").replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"line {line[:40]!r}: expected KEY=VALUE")
        items[key.strip()] = value
    return items


def _scope(form: dict[str, Any]) -> dict[str, str | None]:
    return {
        "group": str(form.get("group") or "").strip() or None,
        "device_id": str(form.get("device_id") or "").strip() or None,
    }


def _manage(
    what: str, action: str, form: dict[str, Any], target: str, public_key: str | None = None
) -> CommandModel:
    """The command a management form asks for (pydantic and CommandError say what is wrong).
    ``public_key``: the controller's, a secret variable's values are sealed to (as the CLI does)."""
    if (what, action) == ("variables", "create"):
        path, items = str(form.get("path") or ""), _items(form.get("items"))
        if public_key is not None:
            sealed = seal_text(public_key, json.dumps(items))
            return VarsSet(path=path, secret=True, sealed=sealed, **_scope(form))
        return VarsSet(path=path, items=items, **_scope(form))
    if (what, action) == ("registries", "create"):
        if public_key is None:
            raise CommandError("registry credentials need the controller's key")
        login = {"username": str(form.get("username") or ""), "password": str(form.get("password") or "")}
        return RegistriesAdd(
            host=str(form.get("host") or ""), sealed=seal_text(public_key, json.dumps(login)), **_scope(form)
        )
    if (what, action) == ("registries", "rm"):
        return RegistriesRemove(host=str(form.get("host") or ""), **_scope(form))
    if (what, action) == ("variables", "rm"):
        return VarsRemove(path=str(form.get("path") or ""), **_scope(form))
    if (what, action) == ("groups", "create"):
        selector = str(form.get("selector") or "").strip() or None
        return GroupsCreate(
            name=str(form.get("name") or ""),
            devices=_words(form.get("devices")),
            selector=selector,
            trust_device_labels=form.get("trust") == "on",
        )
    if (what, action) == ("groups", "rm"):
        return GroupsRemove(name=target)
    if (what, action) == ("tokens", "create"):
        return TokensCreate(
            group=str(form.get("group") or "").strip() or None,
            labels=_labels(form.get("labels")),
            auto_approve=form.get("auto_approve") == "on",
            uses=form.get("uses") or None,
            expires_s=float(form["expires_h"]) * 3600 if form.get("expires_h") else None,
        )
    if (what, action) == ("tokens", "rm"):
        return TokensRemove(ids=(target,))
    if (what, action) == ("jobs", "create"):
        try:
            command = tuple(shlex.split(str(form.get("command") or "")))
        except ValueError as exc:
            raise CommandError(f"command: {exc} (quote as a shell would)") from None
        values: dict[str, Any] = {}
        if form.get("timeout_s"):
            values["timeout_s"] = form["timeout_s"]
        return JobsRun(
            name=str(form.get("name") or "").strip(),
            group=str(form.get("group") or "").strip(),
            command=command,
            image=str(form.get("image") or "").strip() or None,
            **values,
        )
    if (what, action) == ("jobs", "rm"):
        return JobsRemove(name=target)
    if (what, action) == ("users", "create"):
        return UsersAdd(name=str(form.get("name") or ""), role=form.get("role") or "viewer")  # type: ignore[arg-type]
    if (what, action) == ("users", "passwd"):  # a new random password; with a role, that too
        return UsersPasswd(name=target, role=form.get("role") or None)  # type: ignore[arg-type]
    if (what, action) == ("users", "rm"):
        return UsersRemove(name=target)
    raise CommandError(f"the dashboard cannot {action} {what}")


def _managed(
    request: Request, session: auth.Session, form: dict[str, Any], what: str, action: str, target: str
) -> Response:
    if what not in _LISTS:
        return _secure(Response("not found\n", status_code=404, media_type="text/plain"))
    try:
        secret = action == "create" and (
            (what == "variables" and form.get("secret") == "on") or what == "registries"
        )
        public_key = _run(request, session, VarsKey()).public_key if secret else None
        command = _manage(what, action, form, target, public_key)
        result = _run(request, session, command)
    except ValidationError as exc:
        return _listing(request, session, what, code=400, errors=[f"invalid: {codec.describe(exc)}"])
    except TetherError as exc:
        if _forbidden(exc):
            return _error_page(request, session, exc)
        return _listing(request, session, what, code=400, errors=[str(exc)])
    # What is shown once (a token's secret, a new user's password) is rendered, never redirected to.
    once = getattr(result, "token", None) or getattr(result, "password", None)
    if once:
        user = getattr(result, "user", None)
        once_for = getattr(user, "name", "") if action == "passwd" else ""
        return _listing(request, session, what, shown_once=str(once), once_for=once_for)
    if what == "jobs" and action == "create":  # the job's page, where its results arrive
        return _secure(RedirectResponse(f"/ui/jobs/{urllib.parse.quote(result.job.name)}", status_code=303))
    return _secure(RedirectResponse(f"/ui/{what}", status_code=303))


@router.post("/ui/{what}")
def manage_create(request: Request, session: Signed, form: Posted, what: str) -> Response:
    return _managed(request, session, form, what, "create", "")


@router.post("/ui/users/{name}/passwd")
def users_passwd(request: Request, session: Signed, form: Posted, name: str) -> Response:
    """A user's new random password (shown once), and its new role if one is posted (users.passwd)."""
    return _managed(request, session, form, "users", "passwd", name)


@router.post("/ui/{what}/{target}/rm")
def manage_remove(request: Request, session: Signed, form: Posted, what: str, target: str) -> Response:
    return _managed(request, session, form, what, "rm", target)
