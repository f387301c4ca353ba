"""What the web UI needs of the controller, its users and the HTTP API, in one place.

The UI runs every command through ``controller.submit(command, principal)`` (the same
``execute``, role checks and audit as an MQTT or HTTP API request), and logs users in with
the HTTP API's sessions (controller/http/auth.py: the password check with its lockout, the
session cookie and its CSRF token), so the cookie also opens the API's event stream
(``/api/v1/events``) the pages listen to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tether.controller.http import auth
from tether.protocol.principals import Principal, Role

COOKIE = auth.SESSION_COOKIE
SESSION_S = auth.SESSION_S
"""How long a UI session lasts without activity."""


def can(who: Principal, role: Role) -> bool:
    """``who`` has ``role`` or more."""
    return who.may(role)


@dataclass(frozen=True)
class Session:
    """A logged-in browser: its user as the store has it now, and its forms' CSRF token."""

    cookie: str
    principal: Principal
    csrf: str


def check_password(controller: Any, user: str, password: str, address: str) -> Principal | None:
    """The principal ``user`` logs in as with ``password`` (None: refused, or locked out)."""
    return auth.check_password(controller, user, password, address)


def login(controller: Any, who: Principal) -> str:
    """A new session for ``who``: the cookie's value."""
    cookie, _csrf = auth.create_session(controller, who)
    return cookie


def session(controller: Any, cookie: str | None, address: str) -> Session | None:
    """The live session of ``cookie`` (None: none, expired, or its user is gone)."""
    if not cookie:
        return None
    who = auth.session_principal(controller, cookie, address)
    csrf = auth.session_csrf(cookie) if who is not None else None
    return Session(cookie, who, csrf) if who is not None and csrf is not None else None


def logout(cookie: str) -> None:
    auth.drop_session(cookie)


def csrf_ok(session: Session, token: str | None) -> bool:
    return auth.csrf_ok(session.cookie, token)


def submit(controller: Any, command: Any, who: Any, timeout: float = 30.0) -> Any:
    """Run ``command`` as ``who`` on the controller's thread; its result, or raises its TetherError."""
    return controller.submit(command, who).result(timeout)
