"""Errors of the embedded broker."""

from __future__ import annotations

from tether.protocol.errors import TetherError


class BrokerStartError(TetherError):
    """The embedded broker could not start (port in use, bad address, unsupported amqtt...)."""
