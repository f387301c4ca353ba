"""Tether's embedded MQTT broker (amqtt 0.12.1 with Tether's fixes), for a controller started without ``--broker``."""

from .embedded import EmbeddedBroker
from .errors import BrokerStartError

__all__ = ["BrokerStartError", "EmbeddedBroker"]
