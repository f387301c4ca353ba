"""Tether's embedded MQTT broker (amqtt 0.12.1 with Tether's fixes), for a controller started without ``--broker``.

It runs in a child process of the controller (``broker/embedded.py``, ``broker/child.py``);
importing this package does not import amqtt."""

from .embedded import BrokerTable, EmbeddedBroker
from .errors import BrokerStartError

__all__ = ["BrokerStartError", "BrokerTable", "EmbeddedBroker"]
