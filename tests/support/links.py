"""A fake MQTT link for agent-core unit tests: keeps what the core publishes."""

from __future__ import annotations

from collections.abc import Callable

from tether.protocol import codec
from tether.protocol.models import Event, ReportedState


class RecordingLink:
    """A link that keeps what was published; set ``connected`` to False to refuse publishes."""

    connected = True

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        if not self.connected:
            return False
        self.published.append((topic, payload))
        return True

    def publish_tracked(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> Callable[[], bool] | None:
        """Kept like :meth:`publish`; acknowledged by the broker at once."""
        return (lambda: True) if self.publish(topic, payload, qos, retain) else None

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        return None

    def unsubscribe(self, topic_filter: str) -> None:
        return None

    def reports(self) -> list[ReportedState]:
        return [codec.decode(p, ReportedState) for t, p in self.published if t.endswith("/reported")]

    def report(self) -> ReportedState:
        """The last report; fails if there was none."""
        reports = self.reports()
        assert reports, "nothing reported"
        return reports[-1]

    def events(self, kind: str | None = None) -> list[Event]:
        found = [
            e
            for t, p in self.published
            if t.endswith("/events")
            for e in codec.decode_many(p, Event, 1000, "seq")
        ]
        return [e for e in found if kind is None or e.kind == kind]
