"""Tether's embedded MQTT broker (amqtt), for a controller started without ``--broker``."""

from .embedded import EmbeddedBroker

__all__ = ["EmbeddedBroker"]
