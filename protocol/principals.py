"""Who asks: the user behind a controller command, and what that user may do.

A :class:`Principal` is what :meth:`tether.controller.service.Controller.execute` is given
with every command: the user (as the broker or the HTTP API authenticated it, never as a
request claims), the user's :data:`Role`, and the door the command came through. Roles are
ordered: a viewer reads; an operator also deploys and operates devices; an admin also
manages users, API tokens, device credentials, enrollment tokens and registries.
Each command's role is declared where its handler is registered (controller/registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Role = Literal["viewer", "operator", "admin"]
Via = Literal["mqtt", "http", "internal"]
ROLES: tuple[Role, ...] = get_args(Role)
"""Every role, from least to most allowed."""


def role_allows(role: Role, needed: Role) -> bool:
    """Whether a user of ``role`` may run a command that needs ``needed``."""
    return ROLES.index(role) >= ROLES.index(needed)


@dataclass(frozen=True)
class Principal:
    """The authenticated user behind a command: name, role, the door (``via``) and where
    from (``address``: the MQTT client id or the HTTP client's address)."""

    user: str
    role: Role
    via: Via
    address: str = ""

    def may(self, needed: Role) -> bool:
        """Whether this principal may run a command that needs ``needed``."""
        return role_allows(self.role, needed)


INTERNAL = Principal(user="tether", role="admin", via="internal")
"""The controller itself (tests, ``tether up``'s own calls): every command is allowed."""
