"""Identifiers: one pattern per kind of name, each only ever matched in full. Pure.

Every identifier that crosses a trust boundary (device ids, stack, service and group
names, client ids, usernames, token ids, variable paths and keys, label keys...) is
checked against one of these, on every path (CLI, controller commands, enrollment, agent
configuration, wire models), so that the same string is accepted or refused everywhere.

Python's ``$`` also matches just before a final newline (``re.match(r"^a$", "a\\n")``
matches), which once let ``pi-9\\n`` through as a device id and into Mosquitto's ACL file.
So :attr:`Identifier.regex` is anchored with ``\\A``/``\\Z`` (safe with ``match``,
``search`` and ``fullmatch`` alike). :attr:`Identifier.pattern` is the ``^...$`` form for
pydantic's ``Field(pattern=...)``: pydantic-core uses Rust's regex engine, where ``$``
matches only at the very end of the text (``tests/test_names.py`` pins both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CLIENT_ID",
    "CONFIG_NAME",
    "DEVICE_ID",
    "HTTP_HOST",
    "LABEL_KEY",
    "NAME",
    "REGISTRY_HOST",
    "SIGNAL",
    "SPEC_HASH",
    "TOKEN_ID",
    "USERNAME",
    "VAR_KEY",
    "VAR_PATH",
    "VAR_REF",
    "Identifier",
    "registry_of",
]


@dataclass(frozen=True)
class Identifier:
    """One kind of identifier: ``body`` is the regular expression without anchors."""

    what: str
    body: str
    hint: str
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(rf"\A(?:{self.body})\Z"))

    @property
    def pattern(self) -> str:
        """For pydantic ``Field(pattern=...)`` (Rust regex: ``$`` is the end of the text)."""
        return f"^(?:{self.body})$"

    def ok(self, value: Any) -> bool:
        """Whether ``value`` is a string that is, in full, one of these."""
        return isinstance(value, str) and self.regex.fullmatch(value) is not None

    def problem(self, value: Any) -> str | None:
        """None if ``value`` is fine, else one line saying what is wrong (``value`` shown escaped)."""
        if self.ok(value):
            return None
        return f"invalid {self.what} {value!r}: {self.hint}"


DEVICE_ID = Identifier(
    "device id",
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
    "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
)
USERNAME = Identifier(
    "username",
    DEVICE_ID.body,
    "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
)
"""A broker user stored by the controller: a device id, ``admin``, ``controller-{hex}``."""
CLIENT_ID = Identifier(
    "client id",
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}",
    "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
)
NAME = Identifier(
    "name",
    r"[a-z0-9][a-z0-9_.-]{0,62}",
    "use 1-63 lower-case letters, digits, '_', '.' or '-', starting with a letter or digit",
)
"""Stack, service, group, job and volume names: usable in container names and topics."""
CONFIG_NAME = Identifier(
    "config name",
    r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}",
    "use 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit",
)
SPEC_HASH = Identifier("stack hash", r"[0-9a-f]{64}", "64 lower-case hexadecimal digits")
TOKEN_ID = Identifier("token id", r"[0-9a-f]{8}", "8 lower-case hexadecimal digits")
LABEL_KEY = Identifier(
    "label key",
    r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}",
    "use 1-63 letters, digits, '.', '_', '/' or '-', starting with a letter or digit",
)
VAR_KEY = Identifier("variable key", r"[A-Za-z0-9_.-]+", "use letters, digits, '_', '.' or '-'")
VAR_PATH = Identifier(
    "variable path",
    rf"{VAR_KEY.body}(?:/{VAR_KEY.body})*",
    "use letters, digits, '_', '.', '-', and '/' between parts",
)
VAR_REF = Identifier(
    "variable reference",
    rf"{VAR_PATH.body}/{VAR_KEY.body}",
    "write PATH/KEY (letters, digits, '_', '.', '-', and '/' between parts)",
)
SIGNAL = Identifier("signal", r"SIG[A-Z0-9]+", "a signal name such as SIGHUP")
REGISTRY_HOST = Identifier(
    "registry host",
    r"(?:localhost|[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*)(?::[0-9]{1,5})?",
    "write the registry as image references name it: HOST or HOST:PORT (docker.io for Docker Hub)",
)
"""An image registry as image references name it: ``registry.example:5000``, ``docker.io``."""
DOCKER_HUB = "docker.io"
HTTP_HOST = Identifier(
    "HTTP host",
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*|\[[0-9A-Fa-f:.]{2,45}\])"
    r"(?::[0-9]{1,5})?",
    "HOST or HOST:PORT: a host name, IPv4 address or [IPv6] address",
)
"""An HTTP ``Host`` header: where a device reached ``tether up --http`` (the served install script's URLs)."""


def registry_of(image: str) -> str:
    """The registry an image reference names, as Docker reads it: a first component with a
    dot, a colon or ``localhost`` is a host (``registry.example:5000/app:1``); otherwise the
    image is on Docker Hub (``busybox``, ``library/busybox``)."""
    host, sep, _ = image.partition("/")
    if sep and ("." in host or ":" in host or host == "localhost"):
        return host
    return DOCKER_HUB
