"""Who is asking over HTTP: :func:`authenticate`, the one check every ``/api`` route runs.

Until users exist (issue 19's users part) one identity is accepted: HTTP Basic with the
operator credential of ``tether up`` (user ``admin``, the password of ``operator.json``),
checked against the hash the store keeps, as the broker checks it. The users part replaces
the body of :func:`authenticate` (users, API tokens, cookie sessions); routes only ever see
the :class:`Principal` it returns.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request
from tether.protocol.credentials import verify_password

if TYPE_CHECKING:
    from tether.controller.service import Controller

from tether.protocol.principals import Principal

OPERATOR_USER = "admin"
STORE_TIMEOUT = 30.0
CHALLENGE = {"WWW-Authenticate": 'Basic realm="tether", charset="UTF-8"'}
_verified: dict[tuple[str, str], str] = {}  # (user, sha256 of the password) -> the hash it matched
_verified_lock = threading.Lock()
_MAX_VERIFIED = 64


def _unauthenticated(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers=CHALLENGE)


def _basic(authorization: str) -> tuple[str, str]:
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        raise _unauthenticated("only HTTP Basic authentication is accepted")
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise _unauthenticated("the Basic credentials are not base64 of USER:PASSWORD") from None
    if not sep:
        raise _unauthenticated("the Basic credentials are not base64 of USER:PASSWORD")
    return user, password


def _check(user: str, password: str, password_hash: str) -> bool:
    """``verify_password`` (a slow KDF), remembered for the same password and stored hash."""
    key = (user, hashlib.sha256(password.encode()).hexdigest())
    with _verified_lock:
        if _verified.get(key) == password_hash:
            return True
    if not verify_password(password, password_hash):
        return False
    with _verified_lock:
        if len(_verified) >= _MAX_VERIFIED:
            _verified.clear()
        _verified[key] = password_hash
    return True


def authenticate(
    ctx: Controller, authorization: str | None, cookie_session: str | None, address: str
) -> Principal:
    """The principal the request's credentials name; HTTPException(401) if they name none.

    Blocking (reads the store on the controller's thread, then runs a slow KDF): FastAPI runs
    it on its thread pool. ``cookie_session``: the UI's session cookie (not accepted yet)."""
    if not authorization:
        raise _unauthenticated("credentials required (HTTP Basic)")
    user, password = _basic(authorization)
    credential: Any = ctx.call(lambda: ctx.store.get_credential(user)).result(STORE_TIMEOUT)
    if (
        user != OPERATOR_USER
        or credential is None
        or credential.revoked
        or credential.role != "operator"
        or not _check(user, password, credential.password_hash)
    ):
        raise _unauthenticated("wrong user or password")
    return Principal(user=user, role="admin", via="http", address=address)


SESSION_COOKIE = "tether_session"


def request_principal(request: Request) -> Principal:
    """The FastAPI dependency every /api route takes: :func:`authenticate` on the request."""
    client = request.client
    return authenticate(
        request.app.state.controller,
        request.headers.get("authorization"),
        request.cookies.get(SESSION_COOKIE),
        client.host if client else "",
    )
