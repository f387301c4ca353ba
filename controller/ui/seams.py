"""What the web UI needs of the controller, its users and roles, in one place.

The UI runs every command through ``controller.submit(command, principal)`` (the same
``execute``, role checks and audit as an MQTT or HTTP API request), checks passwords with
the controller's users (controller/users.py: the same check, with a lockout after repeated
failures), and keeps its cookie sessions here, in memory: a restart of ``tether up`` logs
everyone out.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from tether.controller import users
from tether.controller.users import Lockout
from tether.protocol.principals import Principal, Role

SESSION_S = 12 * 3600.0
"""How long a UI session lasts without activity."""

STORE_TIMEOUT_S = 30.0


def can(who: Principal, role: Role) -> bool:
    """``who`` has ``role`` or more."""
    return who.may(role)


@dataclass
class Session:
    principal: Principal
    csrf: str
    expires: float


class LocalSessions:
    """Cookie sessions kept in memory (the stand-in for the users engineer's store of sessions)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def create(self, who: Principal) -> tuple[str, str]:
        cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self._lock:
            now = time.time()
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
            self._sessions[cookie] = Session(who, csrf, now + SESSION_S)
        return cookie, csrf

    def get(self, cookie: str) -> Session | None:
        with self._lock:
            found = self._sessions.get(cookie)
            if found is None or found.expires <= time.time():
                self._sessions.pop(cookie, None)
                return None
            found.expires = time.time() + SESSION_S
            return found

    def drop(self, cookie: str) -> None:
        with self._lock:
            self._sessions.pop(cookie, None)


SESSIONS = LocalSessions()


LOCKOUT = Lockout()
"""Failed dashboard logins per user: locked out for a while after several in a row."""


def check_password(controller: Any, user: str, password: str, address: str) -> Principal | None:
    """The principal ``user`` logs in as with ``password`` (None: refused, or locked out):
    the controller's users (controller/users.py), read on the controller's thread."""
    found: Principal | None = controller.call(
        lambda: users.check_password(controller.store, LOCKOUT, user, password, "http", address)
    ).result(STORE_TIMEOUT_S)
    return found


def current(controller: Any, who: Principal) -> Principal | None:
    """``who`` as the store has the user now: None once removed or revoked; its role as changed."""
    found: Principal | None = controller.call(
        lambda: users.principal_of(controller.store, who.user, "http", who.address)
    ).result(STORE_TIMEOUT_S)
    return found


def csrf_ok(session: Session, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(session.csrf.encode(), token.encode())


def submit(controller: Any, command: Any, who: Any, timeout: float = 30.0) -> Any:
    """Run ``command`` as ``who`` on the controller's thread; its result, or raises its TetherError."""
    return controller.submit(command, who).result(timeout)
