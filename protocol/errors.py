"""Every exception Tether raises on purpose derives from :class:`TetherError`.

TetherError
├── PayloadError        a message on the wire could not be decoded or validated
├── TopicError          a topic or device id is malformed
├── ComposeError        a Compose file is invalid or uses something unsupported
├── ConfigError         a local configuration file, flag or variable is invalid
├── TransportError      the MQTT broker cannot be reached or refused us
├── RequestError        a request to the controller failed (``code``: the reply's error code)
│   └── RequestTimeout  no reply from the controller in time
├── CommandError        the controller refused a command: the request is invalid
│   ├── NotFoundError   it names something the controller does not have
│   ├── ConflictError   it clashes with the current state (exists, in use, not now)
│   └── ForbiddenError  the user's role does not allow it
├── StoreError          the controller's state store refused an operation
└── DriverError         a runtime driver could not carry out an action

A refused controller command comes back in its reply with one of the :class:`ErrorCode`
codes, so programs (the CLI among them) switch on the code, never on the message.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class ErrorCode(StrEnum):
    """Why a controller command failed: ``Reply.code`` (an older controller sends none)."""

    INVALID = "invalid"
    """The request is wrong (a bad field, a bad Compose file): fix it before sending it again."""
    NOT_FOUND = "not_found"
    """It names something the controller does not have (a device, a group, a stack...)."""
    CONFLICT = "conflict"
    """It clashes with the current state: the name is taken, the thing is in use, or its
    state does not allow it (only an active deployment can be paused...)."""
    FORBIDDEN = "forbidden"
    """The user's role does not allow the command (protocol/principals.py)."""
    TOO_LARGE = "too_large"
    """The result does not fit in one message (ask for less)."""
    INTERNAL = "internal"
    """A bug in the controller: its log has the traceback."""


class TetherError(Exception):
    """Root of every error raised on purpose by Tether."""


class PayloadError(TetherError):
    """A message on the wire could not be decoded or validated."""


class TopicError(TetherError):
    """A topic or a device id is malformed."""


class ComposeError(TetherError):
    """A Compose file is invalid or uses a key Tether does not support.

    ``problems`` lists every problem found (each naming the service and key); the message
    says them all."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


class ConfigError(TetherError):
    """A configuration file, command-line flag or environment variable is invalid."""


class TransportError(TetherError):
    """The MQTT broker cannot be reached or refused the connection."""


class RequestError(TetherError):
    """A request to the controller was refused or failed; ``code`` is the reply's error code
    (None when the request failed on the way, or the controller is older)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class RequestTimeout(RequestError):
    """The controller did not reply in time."""


class CommandError(TetherError):
    """The controller refused a command: the request is invalid (``code``: :attr:`ErrorCode.INVALID`)."""

    code: ClassVar[ErrorCode] = ErrorCode.INVALID


class NotFoundError(CommandError):
    """A command names something the controller does not have."""

    code = ErrorCode.NOT_FOUND


class ConflictError(CommandError):
    """A command clashes with the current state (the name is taken, the thing in use...)."""

    code = ErrorCode.CONFLICT


class ForbiddenError(CommandError):
    """The user's role does not allow the command (a viewer asked for a write...)."""

    code = ErrorCode.FORBIDDEN


class StoreError(TetherError):
    """The controller's state store refused an operation (unknown name, duplicate, ...)."""


class DriverError(TetherError):
    """A runtime driver could not carry out an action."""
