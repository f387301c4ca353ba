"""Every exception Tether raises on purpose derives from :class:`TetherError`.

TetherError
├── PayloadError        a message on the wire could not be decoded or validated
├── TopicError          a topic or device id is malformed
├── ComposeError        a Compose file is invalid or uses something unsupported
├── ConfigError         a local configuration file, flag or variable is invalid
├── TransportError      the MQTT broker cannot be reached or refused us
├── RequestError        a request to the controller failed
│   └── RequestTimeout  no reply from the controller in time
├── StoreError          the controller's state store refused an operation
└── DriverError         a runtime driver could not carry out an action
"""


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
    """A request to the controller was refused or failed."""


class RequestTimeout(RequestError):
    """The controller did not reply in time."""


class StoreError(TetherError):
    """The controller's state store refused an operation (unknown name, duplicate, ...)."""


class DriverError(TetherError):
    """A runtime driver could not carry out an action."""
