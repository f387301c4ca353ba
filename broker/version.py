"""The one amqtt version Tether's broker fixes are for; checked without importing amqtt."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .errors import BrokerStartError

__all__ = ["AMQTT_VERSION", "UnsupportedAmqttVersion", "check_amqtt_version"]

AMQTT_VERSION = "0.12.1"
"""The only amqtt version these overrides were written and tested against."""


class UnsupportedAmqttVersion(BrokerStartError):
    """The installed amqtt is not the version Tether's broker fixes were built on."""


def check_amqtt_version() -> str:
    """Return the installed amqtt version; raise :class:`UnsupportedAmqttVersion` if it is not ours."""
    try:
        installed = version("amqtt")
    except PackageNotFoundError as exc:
        raise UnsupportedAmqttVersion("amqtt is not installed (pip install 'tether[controller]')") from exc
    if installed != AMQTT_VERSION:
        raise UnsupportedAmqttVersion(
            f"Tether's embedded broker overrides internals of amqtt {AMQTT_VERSION}, but amqtt "
            f"{installed} is installed; refusing to start it (the stock amqtt broker leaks retained "
            f"messages between devices). Install amqtt=={AMQTT_VERSION}, or run Mosquitto and start "
            "the controller with --broker mqtt://HOST:PORT."
        )
    return installed
