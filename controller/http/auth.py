"""Who is asking over HTTP: :func:`authenticate`, the one check every ``/api`` route runs.

Three ways in, each naming a user of ``tether users`` (controller/users.py):

* ``Authorization: Bearer tta_...``: an API token (``tether users token``), at most its scope's
  rights; unknown, expired, revoked or of a removed user: 401.
* ``Authorization: Basic``: a user's name and password, checked against the hash the store
  keeps (the broker checks the same one) with the slow KDF and a constant-time compare.
  Failures lock the user out for a while (:class:`~tether.protocol.lockout.Lockout`, the policy the
  embedded broker applies to MQTT logins too: 5 in a row, then 30 s doubling up to 15 min), so a password cannot be guessed at speed.
* the web UI's session cookie: :func:`create_session` after a login, :func:`session` on each
  request (its principal and its CSRF token, which every form must carry: :func:`csrf_ok`). Sessions live in the controller's memory (a restart logs everyone out)
  and end after :data:`SESSION_S` idle seconds or :func:`drop_session`.

Every principal is read from the store when the request arrives, so a user removed or given
another role (``tether users rm``/``passwd --role``) is refused or demoted at once, sessions
and tokens included. Routes only ever see the :class:`Principal` returned.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request
from tether.controller import users
from tether.protocol.credentials import VerifiedPasswords, verify_password
from tether.protocol.lockout import Lockout

if TYPE_CHECKING:
    from tether.controller.service import Controller

from tether.protocol.principals import Principal

STORE_TIMEOUT = 30.0
CHALLENGE = {"WWW-Authenticate": 'Basic realm="tether", charset="UTF-8"'}
SESSION_COOKIE = "tether_session"
SESSION_S = 12 * 3600.0
"""How long a UI session lasts without activity."""
MAX_SESSIONS = 10_000

LOCKOUT = Lockout()
"""Failed password checks over HTTP (the web UI's login included), per user."""
VERIFIED = VerifiedPasswords(64)
"""Passwords verified over HTTP (a CI job's every request would otherwise pay the KDF)."""


def _unauthenticated(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers=CHALLENGE)


def _basic(value: str) -> tuple[str, str]:
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise _unauthenticated("the Basic credentials are not base64 of USER:PASSWORD") from None
    if not sep:
        raise _unauthenticated("the Basic credentials are not base64 of USER:PASSWORD")
    return user, password


def _on_controller(ctx: Controller, fn: Any) -> Any:
    """Run a store read on the controller's thread (the store is used from one thread)."""
    return ctx.call(fn).result(STORE_TIMEOUT)


def check_password(ctx: Controller, user: str, password: str, address: str) -> Principal | None:
    """The principal ``user`` is with ``password`` (None: wrong, unknown, or locked out).

    The KDF runs on the caller's thread, not the controller's."""
    if LOCKOUT.locked(user) > 0:
        return None
    credential = _on_controller(ctx, lambda: ctx.store.get_credential(user))
    if credential is None:  # as slow as a wrong password: whether a user exists does not show
        verify_password(password, users.DUMMY_HASH)
    if (
        credential is None
        or credential.revoked
        or not VERIFIED.verify(user, password, credential.password_hash)
    ):
        LOCKOUT.failed(user)
        return None
    LOCKOUT.succeeded(user)
    return _on_controller(ctx, lambda: users.principal_of(ctx.store, user, "http", address))  # type: ignore[no-any-return]


def authenticate(
    ctx: Controller, authorization: str | None, cookie_session: str | None, address: str
) -> Principal:
    """The principal the request's credentials name; HTTPException(401) if they name none.

    Blocking (reads the store on the controller's thread, then maybe runs a slow KDF):
    FastAPI runs it on its thread pool. ``cookie_session``: the UI's session cookie, used
    when there is no ``Authorization`` header."""
    if not authorization:
        if cookie_session:
            return _session_principal(session(ctx, cookie_session, address))
        raise _unauthenticated("credentials required (Authorization: Bearer API-TOKEN, or HTTP Basic)")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        token = value.strip()
        principal = _on_controller(ctx, lambda: users.token_principal(ctx.store, token, ctx.clock(), address))
        if principal is None:
            raise _unauthenticated("unknown, expired or revoked API token")
        return principal  # type: ignore[no-any-return]
    if scheme.lower() != "basic":
        raise _unauthenticated("use Authorization: Bearer API-TOKEN (tether users token) or HTTP Basic")
    user, password = _basic(value)
    locked = LOCKOUT.locked(user)
    if locked > 0:
        raise _unauthenticated(f"too many failed logins: try again in {locked:.0f}s")
    principal = check_password(ctx, user, password, address)
    if principal is None:
        raise _unauthenticated("wrong user or password")
    return principal


@dataclass
class _Session:
    user: str
    csrf: str
    expires: float


_sessions: dict[str, _Session] = {}  # sha256 of the cookie -> session
_sessions_lock = threading.Lock()


def _key(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()


def create_session(ctx: Controller, principal: Principal) -> tuple[str, str]:
    """A new cookie session for ``principal`` (after its password was checked): the cookie's
    value and the session's CSRF token (forms carry it; :func:`csrf_ok` checks it)."""
    cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = time.time()
    with _sessions_lock:
        live = {k: s for k, s in _sessions.items() if s.expires > now}
        if len(live) >= MAX_SESSIONS:  # the oldest idle ones go
            for k in sorted(live, key=lambda k: live[k].expires)[: len(live) - MAX_SESSIONS + 1]:
                del live[k]
        live[_key(cookie)] = _Session(principal.user, csrf, now + SESSION_S)
        _sessions.clear()
        _sessions.update(live)
    return cookie, csrf


def _live_session(cookie: str) -> _Session | None:
    now = time.time()
    with _sessions_lock:
        found = _sessions.get(_key(cookie))
        if found is None or found.expires <= now:
            _sessions.pop(_key(cookie), None)
            return None
        found.expires = now + SESSION_S
        return found


@dataclass(frozen=True)
class Session:
    """A live cookie session: its user as the store has it now, and its forms' CSRF token."""

    cookie: str
    principal: Principal
    csrf: str


def session(ctx: Controller, cookie: str | None, address: str = "") -> Session | None:
    """The live session of ``cookie`` (one look-up, which extends it), its user read from the
    store now (None: no cookie, no such session, it expired, or its user is gone)."""
    found = _live_session(cookie) if cookie else None
    if found is None or cookie is None:
        return None
    principal = _on_controller(ctx, lambda: users.principal_of(ctx.store, found.user, "http", address))
    if principal is None:
        drop_session(cookie)
        return None
    return Session(cookie, principal, found.csrf)


def _session_principal(found: Session | None) -> Principal:
    if found is None:
        raise _unauthenticated("the session ended: log in again")
    return found.principal


def csrf_ok(found: Session | None, token: str | None) -> bool:
    """Whether ``token`` is the CSRF token of the session ``found`` (constant-time compare)."""
    return (
        found is not None and token is not None and hmac.compare_digest(found.csrf.encode(), token.encode())
    )


def drop_session(cookie: str) -> None:
    """Log out: the session ends now."""
    with _sessions_lock:
        _sessions.pop(_key(cookie), None)


CSRF_HEADER = "x-tether-csrf"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def request_principal(request: Request) -> Principal:
    """The FastAPI dependency every /api route takes: :func:`authenticate` on the request.

    A request that changes something (not GET/HEAD/OPTIONS) authenticated by the session
    cookie alone must carry the session's CSRF token in ``X-Tether-CSRF``: a cookie is sent
    by the browser to any page's request, the header only by the UI's own script."""
    ctx = request.app.state.controller
    address = request.client.host if request.client else ""
    authorization = request.headers.get("authorization")
    cookie = request.cookies.get(SESSION_COOKIE)
    if authorization or not cookie:
        return authenticate(ctx, authorization, None, address)
    found = session(ctx, cookie, address)
    if request.method not in SAFE_METHODS and not csrf_ok(found, request.headers.get(CSRF_HEADER)):
        raise HTTPException(403, "a cookie session's write needs its CSRF token (X-Tether-CSRF)")
    return _session_principal(found)
