"""Webhooks on a real SQLite store with a recording sender: offline threshold, flaps, back,
outage summaries, signatures, retries and the delivery log; bad input refused whole."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fleet import online
from support.recording import Clock, RecordingPublisher
from tether.controller import notify
from tether.controller.service import Controller
from tether.controller.store import Store
from tether.controller.variables import SecretsKey
from tether.protocol import codec, topics
from tether.protocol.commands import NotifyAdd, NotifyList, NotifyLog, NotifyRemove, NotifyTest
from tether.protocol.enrollment import seal_text
from tether.protocol.errors import CommandError
from tether.protocol.models import Presence
from tether.protocol.topics import DeviceTopic

SECRET = "s3cret-value"


class Receiver:
    """Stands for the endpoint: records each post; fails while ``down``."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, bytes, dict[str, str]]] = []
        self.down = False
        self.lock = threading.Lock()

    def __call__(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int | None, str | None]:
        with self.lock:
            if self.down:
                return None, "ConnectionRefusedError: refused"
            self.posts.append((url, body, headers))
            return 200, None

    def bodies(self) -> list[dict]:  # type: ignore[type-arg]
        with self.lock:
            return [json.loads(b) for _, b, _ in self.posts]


@pytest.fixture
def receiver(controller: Controller) -> Iterator[Receiver]:
    recv = Receiver()
    controller.context.notifier.send = recv
    controller.context.notifier.start()
    yield recv
    controller.context.notifier.stop()


def _add(
    controller: Controller, on: tuple[str, ...], offline_after_s: float = 60.0, secret: bool = True
) -> str:
    assert controller.context.secrets is not None
    sealed = (
        seal_text(controller.context.secrets.public_key, json.dumps({"secret": SECRET})) if secret else None
    )
    cmd = NotifyAdd(url="http://hooks.example/x", on=on, offline_after_s=offline_after_s, sealed=sealed)  # type: ignore[arg-type]
    return controller.execute(cmd).webhook.id


def _presence(controller: Controller, device_id: str, status: str, session: int) -> None:
    message = Presence(device_id=device_id, status=status, session=session)  # type: ignore[arg-type]
    controller.handle(topics.device(device_id, DeviceTopic.PRESENCE), codec.encode(message))


def _settle(controller: Controller, until: object, timeout: float = 5.0) -> None:
    """Tick the notifier until ``until()`` holds (the sender thread answers in between)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        controller.context.notifier.tick()
        if until():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError("not settled in time")


def test_offline_fires_after_the_threshold_once_and_back_fires_a_flap_does_not(
    controller: Controller, receiver: Receiver
) -> None:
    """A device offline past offline_after fires once, then device.online when back; one that comes
    back under the threshold fires nothing; bodies are signed as documented."""
    clock: Clock = controller.clock  # type: ignore[assignment]
    _add(controller, ("device.offline", "device.online"))
    online(controller, "pi-1", session=1)
    online(controller, "pi-2", session=1)
    _presence(controller, "pi-2", "offline", 1)  # flaps: back after 30 s
    clock.now += 30
    online(controller, "pi-2", session=2)
    _presence(controller, "pi-1", "offline", 1)
    clock.now += 59
    controller.context.notifier.tick()
    time.sleep(0.05)
    controller.context.notifier.tick()
    assert receiver.bodies() == []
    clock.now += 2
    _settle(controller, lambda: len(receiver.bodies()) == 1)
    body = receiver.bodies()[0]
    assert (body["kind"], body["subject"], body["data"]["offline_for"]) == (
        "device.offline",
        "devices/pi-1",
        61.0,
    )
    clock.now += 600
    controller.context.notifier.tick()
    online(controller, "pi-1", session=2)
    _settle(controller, lambda: len(receiver.bodies()) == 2)
    assert [b["kind"] for b in receiver.bodies()] == ["device.offline", "device.online"]
    url, raw, headers = receiver.posts[0]
    assert notify.verify(SECRET, headers[notify.TIMESTAMP_HEADER], raw, headers[notify.SIGNATURE_HEADER])
    assert not notify.verify("wrong", headers[notify.TIMESTAMP_HEADER], raw, headers[notify.SIGNATURE_HEADER])
    log = controller.execute(NotifyLog()).deliveries
    assert [d.state for d in log] == ["delivered", "delivered"]


def test_a_fleet_wide_outage_is_a_few_posts_and_one_summary(
    controller: Controller, receiver: Receiver
) -> None:
    """200 devices going offline at once: BURST posts, then one summary naming how many more."""
    clock: Clock = controller.clock  # type: ignore[assignment]
    _add(controller, ("device.offline",), offline_after_s=10)
    for n in range(200):
        online(controller, f"d{n}", session=1)
    for n in range(200):
        _presence(controller, f"d{n}", "offline", 1)
    clock.now += 11
    controller.context.notifier.tick()
    clock.now += notify.WINDOW_S
    _settle(controller, lambda: len(receiver.bodies()) == notify.BURST + 1)
    time.sleep(0.1)
    controller.context.notifier.tick()
    bodies = receiver.bodies()
    assert len(bodies) == notify.BURST + 1
    summary = bodies[-1]
    assert summary["kind"] == "summary"
    assert summary["data"]["kind"] == "device.offline" and summary["data"]["count"] == 200 - notify.BURST
    assert len(summary["data"]["subjects"]) == notify.SUMMARY_SUBJECTS


def test_a_failed_delivery_is_retried_with_backoff_until_delivered(
    controller: Controller, receiver: Receiver
) -> None:
    """A test message to an endpoint that is down stays pending with its error and a later next_at,
    and is delivered once the endpoint is back."""
    clock: Clock = controller.clock  # type: ignore[assignment]
    webhook = _add(controller, ("deployment.failed",), secret=False)
    receiver.down = True
    queued = controller.execute(NotifyTest(id=webhook)).delivery
    _settle(controller, lambda: controller.execute(NotifyLog()).deliveries[0].attempts == 1)
    failed = controller.execute(NotifyLog(id=webhook)).deliveries[0]
    assert failed.state == "pending" and failed.last_error == "ConnectionRefusedError: refused"
    assert failed.next_at is not None and clock.now <= failed.next_at <= clock.now + notify.BACKOFF.ceiling(0)
    receiver.down = False
    clock.now += notify.BACKOFF.ceiling(0)
    _settle(controller, lambda: controller.execute(NotifyLog()).deliveries[0].state == "delivered")
    assert receiver.bodies()[0]["delivery"] == queued.id and receiver.bodies()[0]["kind"] == "test"
    assert notify.SIGNATURE_HEADER not in receiver.posts[0][2]  # no secret: unsigned
    assert controller.execute(NotifyList()).webhooks[0].deliveries == {
        "pending": 0,
        "delivered": 1,
        "failed": 0,
    }


def test_bad_webhooks_are_refused_with_every_problem_and_the_secret_is_never_shown(
    controller: Controller,
) -> None:
    """A bad URL and an empty secret are named together; ls shows only that a secret is set; rm removes."""
    assert controller.context.secrets is not None
    empty = seal_text(controller.context.secrets.public_key, json.dumps({"secret": ""}))
    with pytest.raises(CommandError) as refused:
        controller.execute(NotifyAdd(url="ftp://x", on=("device.offline",), sealed=empty))
    assert "scheme must be http or https" in str(refused.value) and "the secret is empty" in str(
        refused.value
    )
    assert controller.execute(NotifyList()).webhooks == []
    webhook = _add(controller, ("device.offline",))
    listed = controller.execute(NotifyList()).model_dump_json()
    assert SECRET not in listed and '"signed":true' in listed
    controller.execute(NotifyRemove(id=webhook))
    with pytest.raises(CommandError, match="unknown webhook"):
        controller.execute(NotifyTest(id=webhook))


def test_a_restarted_controller_sends_what_was_pending_and_tells_a_device_s_return(
    controller: Controller, tmp_path: Path
) -> None:
    """Pending deliveries outlive the controller; a device offline past the threshold before the
    restart is not announced again, and its return after it is."""
    clock: Clock = controller.clock  # type: ignore[assignment]
    webhook = _add(controller, ("device.offline", "device.online"), offline_after_s=10)
    online(controller, "pi-1", session=1)
    _presence(controller, "pi-1", "offline", 1)
    clock.now += 11
    controller.context.notifier.tick()  # device.offline queued; the endpoint is never reached
    queued = controller.execute(NotifyTest(id=webhook)).delivery
    assert [d.state for d in controller.execute(NotifyLog()).deliveries] == ["pending", "pending"]
    controller.store.close()

    store = Store(tmp_path / "tether.db")
    again = Controller(store, clock=clock, secrets=SecretsKey.load_or_create(tmp_path))
    again.client = RecordingPublisher()  # type: ignore[assignment]
    again.leading.set()
    recv = Receiver()
    again.context.notifier.send = recv
    again.context.notifier.start()
    try:
        _settle(again, lambda: len(recv.bodies()) == 2)
        assert sorted(b["kind"] for b in recv.bodies()) == ["device.offline", "test"]
        assert queued.id in {b["delivery"] for b in recv.bodies()}
        clock.now += 60
        again.context.notifier.tick()
        online(again, "pi-1", session=2)
        _settle(again, lambda: len(recv.bodies()) == 3)
        assert recv.bodies()[-1]["kind"] == "device.online"
        assert [b["kind"] for b in recv.bodies()].count("device.offline") == 1
    finally:
        again.context.notifier.stop()
        store.close()


def test_the_slack_body_is_only_text_and_the_json_body_carries_the_delivery_id() -> None:
    """--format slack posts {"text"} (what Slack's incoming webhooks take); json posts the whole message."""
    from tether.controller.models import Delivery

    data = {"stack": "web", "service": "api", "restarts": 5, "reason": "exit 1"}
    text = notify.describe("service.crashloop", "devices/pi-1", data)
    delivery = Delivery(
        id=7,
        webhook="wh-1",
        kind="service.crashloop",
        subject="devices/pi-1",
        payload={"kind": "service.crashloop", "subject": "devices/pi-1", "data": data, "text": text},
    )
    assert json.loads(notify.render(delivery, "slack")) == {
        "text": "device pi-1: web/api is crash looping: exit 1"
    }
    body = json.loads(notify.render(delivery, "json"))
    assert body["delivery"] == 7 and body["data"] == data and body["text"] == text
