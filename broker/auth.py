"""Authentication and topic ACL for the embedded amqtt broker: thin plugins over pure policy.

amqtt 0.12.1 calls every auth plugin's ``authenticate(session=...)`` on CONNECT (all
non-None answers must be True) and every topic plugin's ``topic_filtering(session=,
topic=, action=)`` on SUBSCRIBE (the filter), PUBLISH (the topic) and RECEIVE (each
delivery, retained messages included). Both plugins here delegate at once to a
:class:`~tether.protocol.credentials.CredentialTable` (in the broker's process, the copy of
the controller's table that :class:`~tether.broker.embedded.BrokerTable` keeps up to date;
the broker never touches the database) and to the pure rules of
:mod:`tether.protocol.acl`. The table is passed through the plugin configuration as an
object (``{"table": table}``).

With client certificates (``tether up --require-client-cert``) the auth plugin takes the
verified certificate's common name as the session's username, whatever the client sent
(like Mosquitto's ``use_identity_as_username``), and ignores the password: the TLS
handshake proved the identity, and the table still decides whether that user exists and
is not revoked.

Password logins are throttled per username (:mod:`tether.protocol.lockout`, the policy
HTTP logins follow too): after 5 failures in a row the username's CONNECTs are refused
(CONNACK 5, not authorized) without running the slow KDF for 30 s, doubling up to 15 min;
the address that last logged in as it successfully is exempt until it fails, so guessing a
device's name elsewhere does not keep the device off. Each lockout is logged once.
Enrollment usernames (``enroll-{token id}``) are not throttled: their password is a 256-bit
fleet token checked by a fast hash, and throttling them would let anyone block enrollment.

RECEIVE is allowed for any identity the table still knows: what a client receives was
checked when it subscribed, and a revoked or removed user receives nothing more, even
before :func:`disconnect_users` has closed its connection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from tether.protocol.acl import may_publish, may_subscribe
from tether.protocol.credentials import ENROLL_PREFIX, TOKEN_USER_PREFIX, CredentialTable
from tether.protocol.lockout import Lockout, LockoutPolicy

log = logging.getLogger(__name__)

__all__ = ["TetherAuthPlugin", "TetherTopicPlugin", "auth_plugins", "disconnect_users"]


def auth_plugins(
    table: CredentialTable, *, client_certs: bool = False, lockout: Lockout | None = None
) -> dict[str, Any]:
    """The ``plugins`` section of an amqtt configuration that enforces ``table``.

    ``client_certs``: identities come from client certificates (their common names).
    ``lockout``: the throttling of failed password logins (None: one with the default policy)."""
    throttle = lockout if lockout is not None else Lockout.of(LockoutPolicy())
    return {
        f"{__name__}.TetherAuthPlugin": {"table": table, "client_certs": client_certs, "lockout": throttle},
        f"{__name__}.TetherTopicPlugin": {"table": table},
    }


class TetherAuthPlugin(BaseAuthPlugin):
    """Accept a CONNECT only with a valid, unrevoked username/password (or anonymously if allowed)."""

    @dataclass
    class Config:
        table: Any = None
        client_certs: bool = False
        lockout: Any = None

    async def authenticate(self, *, session: Session) -> bool | None:
        table: CredentialTable = self.context.config.table  # type: ignore[union-attr]
        if self.context.config.client_certs:  # type: ignore[union-attr]
            return self._authenticate_certificate(table, session)
        lockout: Lockout = self.context.config.lockout  # type: ignore[union-attr]
        user, address = session.username, session.remote_address or ""
        throttled = bool(user) and not user.startswith((ENROLL_PREFIX, TOKEN_USER_PREFIX))
        if throttled and lockout.locked(user, address) > 0:
            return False  # no KDF run; logged once when the lockout began
        identity = table.authenticate(user, session.password, session.client_id or "")
        if identity is None and throttled:
            window = lockout.failed(user, address)
            if window > 0:
                log.warning(
                    "locked out MQTT logins of user %r for %.0f s after repeated failures (the last from %s)",
                    user,
                    window,
                    address,
                )
        elif throttled:
            lockout.succeeded(user, address)
        if identity is None:
            log.warning(
                "refused connection from %s (client %r, user %r): bad credentials or client id",
                session.remote_address,
                session.client_id,
                session.username,
            )
            return False
        return True

    def _authenticate_certificate(self, table: CredentialTable, session: Session) -> bool:
        name = certificate_name(session)
        identity = table.authenticate_certificate(name, session.client_id or "") if name else None
        if identity is None:
            log.warning(
                "refused connection from %s (client %r, certificate %r): %s",
                session.remote_address,
                session.client_id,
                name,
                "no client certificate" if name is None else "unknown or revoked user, or bad client id",
            )
            return False
        session.username, session.password = name, None  # the certificate's name is the username
        return True


def certificate_name(session: Session) -> str | None:
    """The common name of the session's verified client certificate, or None without one."""
    ssl_object = session.ssl_object
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class TetherTopicPlugin(BaseTopicPlugin):
    """Allow a SUBSCRIBE or PUBLISH only if :mod:`tether.protocol.acl` does."""

    @dataclass
    class Config:
        table: Any = None

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        table: CredentialTable = self.context.config.table  # type: ignore[union-attr]
        if session is None or topic is None:
            return False
        if not session.username and table.allow_anonymous:
            return True  # `tether up --allow-anonymous`: anonymous clients may do anything
        identity = table.identity(session.username, session.client_id or "")
        if identity is None:
            return False
        if action == Action.RECEIVE:
            return True
        if action == Action.SUBSCRIBE:
            stacks = table.stacks_of(identity.name) if identity.role == "device" else ()
            allowed = may_subscribe(identity, topic, stacks)
        else:
            allowed = may_publish(identity, topic)
        if not allowed:
            log.warning(
                "denied %s on %s to %s %r (client %r)",
                action.value if action else "?",
                topic,
                identity.role,
                identity.name,
                session.client_id,
            )
        return allowed


async def disconnect_users(broker: Broker, usernames: set[str]) -> int:
    """Close the live connections of ``usernames`` at once; how many were closed.

    Their wills are checked again before they go out: a revoked or removed user's will is
    dropped (the controller publishes a revoked device's ``offline`` itself); nothing is
    queued for their persistent sessions afterwards, since RECEIVE is refused to unknown users.
    """
    closed = 0
    for session, handler in list(broker._sessions.values()):  # amqtt has no public accessor
        if session.username in usernames and session.transitions.state == "connected":
            abort = getattr(handler, "abort", None)
            if abort is not None:  # TetherHandler: closes the socket; its session loop ends it
                abort()
            else:
                await handler.stop()
            closed += 1
    return closed
