"""What the web UI needs of the HTTP API and of users, in one place (notes: the seams of issues 19/20).

The UI runs every command through ``controller.submit(command, principal)`` (the same
``execute`` an MQTT request runs), logs users in through ``controller/http/auth.py``
(``authenticate``; ``create_session``/``session_principal`` for the cookie), and streams
the fleet event bus at ``/api/v1/events``. Where one of those has not landed yet, the
stand-in here does the least that keeps the UI honest: the ``admin`` operator credential,
sessions kept in memory.
"""

from __future__ import annotations

import hmac
import importlib
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from tether.protocol.credentials import verify_password

SESSION_S = 12 * 3600.0
"""How long a UI session lasts without activity."""

Role = Literal["viewer", "operator", "admin"]
ROLE_RANK: dict[str, int] = {"viewer": 0, "operator": 1, "admin": 2}


def _optional(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


@dataclass(frozen=True)
class _Principal:
    """Stand-in for protocol/principals.py's Principal until it lands."""

    user: str
    role: Role
    via: Literal["mqtt", "http", "internal"]
    address: str = ""


Principal: Any = _optional("tether.protocol.principals", "Principal") or _Principal


def principal(user: str, role: str, address: str) -> Any:
    """A principal of the UI (``via`` http)."""
    return Principal(user=user, role=role, via="http", address=address)


def can(who: Any, role: str) -> bool:
    """``who`` has ``role`` or more."""
    return ROLE_RANK.get(str(who.role), -1) >= ROLE_RANK[role]


@dataclass
class Session:
    principal: Any
    csrf: str
    expires: float


class LocalSessions:
    """Cookie sessions kept in memory (the stand-in for the users engineer's store of sessions)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def create(self, who: Any) -> tuple[str, str]:
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


def check_password(controller: Any, user: str, password: str, address: str) -> Any | None:
    """The principal ``user`` logs in as with ``password`` (None: refused).

    The users engineer's ``authenticate`` (HTTP Basic built from the form) when it is
    there; until then the ``admin`` operator credential of the store.
    """
    authenticate = _optional("tether.controller.http.auth", "authenticate")
    if authenticate is not None:
        import base64

        basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        try:
            return authenticate(controller, basic, None, address)
        except Exception:  # an HTTPException(401): refused, nothing more to say
            return None
    credential = controller.store.get_credential(user)
    if credential is None or credential.revoked or credential.role != "operator":
        return None
    if not verify_password(password, credential.password_hash):
        return None
    return principal(user, "admin", address)


def csrf_ok(session: Session, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(session.csrf.encode(), token.encode())


def submit(controller: Any, command: Any, who: Any, timeout: float = 30.0) -> Any:
    """Run ``command`` as ``who`` on the controller's thread; its result, or raises its TetherError."""
    return controller.submit(command, who).result(timeout)
