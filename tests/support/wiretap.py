"""A client subscribed to ``#`` on a broker that allows anonymous clients: proves what crosses it."""

from __future__ import annotations

import threading

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


class Wiretap:
    """A client subscribed to ``#``: every topic and payload the broker delivers."""

    def __init__(self, port: int) -> None:
        self.seen = bytearray()
        self.count = 0
        self.last: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("#", 1)
        self.client.loop_start()

    def _on_message(self, client: object, userdata: object, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.seen += msg.topic.encode() + b"\n" + msg.payload + b"\n"
            self.count += 1
            self.last[msg.topic] = msg.payload

    def latest(self, topic: str) -> bytes | None:
        with self.lock:
            return self.last.get(topic)

    def saw(self, text: str) -> bool:
        with self.lock:
            return text.encode() in self.seen

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
