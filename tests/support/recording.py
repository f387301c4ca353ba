"""Stand-ins for the fast unit tests: a publisher that records, a clock moved by hand."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RecordingPublisher:
    """Stands for the controller's MQTT client: every publish is acknowledged and recorded."""

    connected: bool = True
    session_present: bool = True
    published: list[tuple[str, bytes, bool]] = field(default_factory=list)
    subscribed: list[str] = field(default_factory=list)
    """Topic filters subscribed (the controller's subscriptions at its start are not called here)."""
    unsubscribed: list[str] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        self.published.append((topic, payload, retain))
        return True

    def publish_confirmed(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        return self.publish(topic, payload, qos, retain)

    def publish_many(self, messages: list[tuple[str, bytes, int, bool]], timeout: float = 30.0) -> list[bool]:
        return [self.publish(t, p, q, r) for t, p, q, r in messages]

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.subscribed.append(topic_filter)

    def unsubscribe(self, topic_filter: str) -> None:
        self.unsubscribed.append(topic_filter)

    def topics(self) -> list[str]:
        return [t for t, _, _ in self.published]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
