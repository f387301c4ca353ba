"""The transport seam: what the agent, the controller and the CLI need of an MQTT session.

Theory of operation
-------------------
Everything above the socket talks to the broker through the two protocols here, never to
paho: :class:`Link` (publish, subscribe, is the session up) is all an I/O-free core such as
:class:`~tether.agent.core.AgentCore` may use; :class:`Transport` adds the session's
lifecycle and callbacks, for the code that owns one. Three implementations keep the same
semantics and are held to them by one contract suite (tests/test_transport_contract.py):

* :class:`tether.protocol.mqtt.MqttClient`: paho, one background thread (agents, the
  controller, the CLI);
* :class:`tether.sim.mqtt.MqttSession`: asyncio, thousands on one event loop (the fleet
  simulator), whose devices run the same :class:`AgentCore` through the same :class:`Link`;
* ``tests/support/memory_broker.py``: an in-memory broker with retained messages and wills,
  for fast tests.

The contract:

* ``publish`` hands a message over and returns False when it cannot (not connected, larger
  than the packet limit): the caller publishes again later; nothing is queued while away.
* ``publish_tracked`` is a publish whose completion the caller can observe: it returns a
  :data:`Delivery` check, true once the broker acknowledged the message (PUBACK for QoS 1,
  MQTT 3.1.1 section 4.3.2; at once for QoS 0), or None when it was not handed over. The
  check is polled from the caller's own thread, so single-threaded cores need no locks.
* Subscriptions are remembered and renewed after every CONNACK, whatever the broker kept
  of the session (section 3.2.2.2).
* The will (:class:`Will`) comes from a callback asked before every CONNECT, because the
  agent puts a per-connection session number in it (section 3.1.2.5). The broker publishes
  it when the connection ends without DISCONNECT; a clean stop sends DISCONNECT, which
  discards it (section 3.14.4).

This module does no I/O and imports nothing beyond the standard library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Delivery", "Link", "MessageHandler", "Transport", "Will"]


@dataclass(frozen=True)
class Will:
    """A last-will message, published by the broker if we vanish without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


MessageHandler = Callable[[str, bytes, bool], None]
"""``on_message(topic, payload, retained)``, called on the transport's own thread."""

Delivery = Callable[[], bool]
"""A tracked publish's completion: true once the broker acknowledged the message."""


class Link(Protocol):
    """Publishing and subscribing through a session someone else runs (what a core sees)."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Hand a message over; False if it could not be (the caller publishes it again later)."""
        ...

    def publish_tracked(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> Delivery | None:
        """Publish without waiting; a check that is true once the broker acknowledged it, or
        None if it could not be handed over (not connected)."""
        ...

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        ...

    def unsubscribe(self, topic_filter: str) -> None: ...


class Transport(Link, Protocol):
    """A session the caller owns: callbacks, the will, start and stop, confirmed publishes.

    Callbacks run on the transport's thread and must not block. ``will`` is asked before
    every CONNECT."""

    on_message: MessageHandler | None
    on_connect: Callable[[], None] | None
    on_disconnect: Callable[[], None] | None
    will: Callable[[], Will | None] | None
    session_present: bool
    """From the last CONNACK: the broker still had our session (MQTT 3.1.1 section 3.2.2.2)."""

    def start(self) -> None:
        """Start connecting in the background."""
        ...

    def connect(self, timeout: float = 10.0) -> None:
        """Start and wait until connected; raise :class:`~.errors.TransportError` if that fails."""
        ...

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (True), or until it gave up or ``timeout`` passed (False)."""
        ...

    def stop(self, publish_first: tuple[str, bytes, int, bool] | None = None) -> None:
        """Disconnect cleanly (the will is discarded); ``publish_first`` goes out before."""
        ...

    def publish_confirmed(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> bool:
        """Publish and wait up to ``timeout`` for the broker's acknowledgement."""
        ...

    def publish_many(self, messages: list[tuple[str, bytes, int, bool]], timeout: float = 30.0) -> list[bool]:
        """Publish a batch without waiting in between; per message, whether it was acknowledged."""
        ...
