"""The agent's remote operations on the fake driver: validation, replies, streams, restart, facts."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.infra import wait_until
from tether.agent.core import AgentCore
from tether.agent.drivers.fake import LABEL_LOGS, FakeDriver
from tether.agent.metrics import LiveMetrics, Sampler
from tether.agent.remote import RemoteOps
from tether.agent.store import MemoryStore
from tether.protocol import codec, topics
from tether.protocol.device_api import DeviceReply, MetricsSample
from tether.protocol.models import DesiredState, Request, ServiceSpec, StackDefinition, StackRef, StackSpec
from tether.protocol.topics import DeviceTopic

DEVICE = "unit-1"
REPLY_TO = topics.replies("cli-unit")
REQUESTS = topics.device(DEVICE, DeviceTopic.REQUESTS)
LOGS = "one\ntwo\nthree\n"


class RecordingLink:
    """A connected link that records what is published, from any thread."""

    connected = True

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.published: list[tuple[str, bytes, int, bool]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        with self.lock:
            self.published.append((topic, payload, qos, retain))
        return True

    def publish_tracked(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> Callable[[], bool] | None:
        """Kept like :meth:`publish`; acknowledged by the broker at once."""
        self.publish(topic, payload, qos, retain)
        return lambda: True

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        return None

    def unsubscribe(self, topic_filter: str) -> None:
        return None

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _q, _r in self.published if t == topic]

    def replies(self, request_id: str) -> list[DeviceReply]:
        found = [codec.decode(p, DeviceReply) for p in self.on(REPLY_TO)]
        return [r for r in found if r.id == request_id]

    def topics(self) -> set[str]:
        with self.lock:
            return {t for t, _p, _q, _r in self.published}


def make_core(tmp_path: Path, remote: bool = True, **ops: Any) -> tuple[AgentCore, FakeDriver, RecordingLink]:
    driver = FakeDriver(DEVICE)
    link = RecordingLink()
    core = AgentCore(DEVICE, {}, driver, MemoryStore(), link)
    spec = StackSpec(
        services=(
            ServiceSpec(name="db", image="fake:1", labels={LABEL_LOGS: "db ready\n"}),
            ServiceSpec(name="app", image="fake:1", labels={LABEL_LOGS: LOGS}, depends_on=("db",)),
        )
    )
    definition = StackDefinition(spec_hash=spec.spec_hash(), spec=spec)
    desired = DesiredState(
        device_id=DEVICE, generation=1, stacks=(StackRef(name="web", spec_hash=spec.spec_hash()),)
    )
    core.handle(topics.device(DEVICE, DeviceTopic.DESIRED), codec.encode(desired))
    core.handle(topics.stack(definition.spec_hash), codec.encode(definition))
    core.reconcile_once()
    link.published.clear()  # the setup's events and report
    if remote:
        live = LiveMetrics(
            topics.device(DEVICE, DeviceTopic.METRICS), link.publish, lambda: Sampler(tmp_path)
        )
        core.remote = RemoteOps(core, tmp_path, live=live, **ops)
    return core, driver, link


@pytest.fixture
def device(tmp_path: Path) -> Iterator[tuple[AgentCore, FakeDriver, RecordingLink]]:
    core, driver, link = make_core(tmp_path)
    yield core, driver, link
    assert core.remote is not None
    core.remote.close()


def send(core: AgentCore, command: dict[str, Any], request_id: str = "r1", reply_to: str = REPLY_TO) -> None:
    request = Request(id=request_id, reply_to=reply_to, command=command)
    core.handle(REQUESTS, codec.encode(request))


def reply(link: RecordingLink, request_id: str = "r1") -> DeviceReply:
    return wait_until(
        lambda: next(iter(link.replies(request_id)), None), 10, message=f"reply to {request_id}"
    )


def test_agent_subscribes_to_its_requests_topic(device: tuple[AgentCore, FakeDriver, RecordingLink]) -> None:
    """The requests topic is one of the agent's standing subscriptions; the metrics topic parses."""
    core, _driver, _link = device
    assert REQUESTS in core.subscriptions()
    assert topics.parse(REQUESTS) == topics.ParsedTopic(
        "device", device_id=DEVICE, device_topic=DeviceTopic.REQUESTS
    )
    assert topics.parse(f"tether/v1/devices/{DEVICE}/requests/x") is None


def test_logs_of_a_stack_and_of_one_service_with_tail(
    device: tuple[AgentCore, FakeDriver, RecordingLink],
) -> None:
    """The services' output comes back in start order; tail cuts it; one service can be asked for."""
    core, _driver, link = device
    send(core, {"kind": "logs", "stack": "web"})
    result = reply(link).result
    assert [(p["service"], p["text"]) for p in result["logs"]] == [("db", "db ready\n"), ("app", LOGS)]
    send(core, {"kind": "logs", "stack": "web", "service": "app", "tail": 2}, "r2")
    assert reply(link, "r2").result["logs"] == [{"service": "app", "text": "two\nthree\n"}]


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        ({"kind": "logs", "stack": "nope"}, "stack 'nope' is not on device unit-1"),
        ({"kind": "logs", "stack": "web", "service": "nope"}, "has no service 'nope'"),
        ({"kind": "restart", "stack": "nope"}, "stack 'nope' is not deployed on device unit-1"),
        ({"kind": "logs", "stack": "web", "tail": -1}, "invalid request: command: logs.tail"),
        ({"kind": "reboot"}, "invalid request: command: "),
        ({"stack": "web"}, "invalid request: command: "),
        ({"kind": "stream", "request_id": "zz", "action": "cancel"}, "no stream zz"),
    ],
)
def test_bad_commands_get_one_line_errors(
    device: tuple[AgentCore, FakeDriver, RecordingLink], command: dict[str, Any], needle: str
) -> None:
    """Unknown stacks, services, kinds and invalid fields are answered ok=false with a clear line."""
    core, _driver, link = device
    send(core, command)
    answer = reply(link)
    assert not answer.ok and answer.error is not None and needle in answer.error and "\n" not in answer.error


def test_malformed_envelopes_are_answered_only_on_a_reply_topic(
    device: tuple[AgentCore, FakeDriver, RecordingLink],
) -> None:
    """No id but a good reply_to: an error reply. Garbage or a bad reply_to: silence, nowhere."""
    core, _driver, link = device
    core.handle(REQUESTS, codec.encode(DeviceReply(id="x", ok=True)))  # a map without reply_to
    core.handle(REQUESTS, b"\xc1\xc1 not msgpack")
    core.handle(REQUESTS, b"")
    for bad in (topics.device(DEVICE, DeviceTopic.DESIRED), "tether/v1/controller/requests", "x/y", "#"):
        send(core, {"kind": "facts"}, "bad", reply_to=bad)
    assert link.published == []
    core.handle(REQUESTS, codec.encode(Request.model_construct(id=None, reply_to=REPLY_TO, command={})))
    answer = reply(link, "")
    assert not answer.ok and "invalid request: Request: id" in (answer.error or "")
    assert link.topics() == {REPLY_TO}


def test_an_agent_without_remote_operations_says_so(tmp_path: Path) -> None:
    """A core without RemoteOps (the simulator) answers with an error instead of staying silent."""
    core, _driver, link = make_core(tmp_path, remote=False)
    send(core, {"kind": "facts"})
    answer = reply(link)
    assert not answer.ok and "does not take remote operations" in (answer.error or "")


def test_follow_streams_new_output_until_cancelled(
    device: tuple[AgentCore, FakeDriver, RecordingLink],
) -> None:
    """A stream: an opening chunk, the tail, what is written later, then a last message on cancel."""
    core, driver, link = device
    send(core, {"kind": "logs", "stack": "web", "service": "app", "tail": 1, "follow": True}, "f1")
    wait_until(lambda: any((r.result or {}).get("text") == "three\n" for r in link.replies("f1")), 10)
    app = next(i for i in driver.observe() if i.service == "app")
    driver.emit(app.id, "four\n")
    wait_until(lambda: any((r.result or {}).get("text") == "four\n" for r in link.replies("f1")), 10)
    send(core, {"kind": "stream", "request_id": "f1", "action": "extend", "duration": 120}, "e1")
    assert reply(link, "e1").ok
    send(core, {"kind": "stream", "request_id": "f1", "action": "cancel"}, "c1")
    assert reply(link, "c1").ok
    last = wait_until(lambda: next((r for r in link.replies("f1") if not r.more), None), 10)
    assert last.ok and last.result == {"end": "cancelled", "dropped": 0}
    messages = link.replies("f1")
    assert [m.seq for m in messages] == list(range(1, len(messages) + 1))
    assert all(m.more for m in messages[:-1])
    assert messages[0].result == {"service": None, "text": "", "services": ["app"]}


def test_another_client_cannot_control_a_stream(device: tuple[AgentCore, FakeDriver, RecordingLink]) -> None:
    """Streams are keyed by the client's reply topic: someone else's cancel is refused."""
    core, _driver, link = device
    send(core, {"kind": "logs", "stack": "web", "follow": True}, "f2")
    other = topics.replies("cli-other")
    send(core, {"kind": "stream", "request_id": "f2", "action": "cancel"}, "c2", reply_to=other)
    answer = wait_until(lambda: next(iter(link.on(other)), None), 10)
    assert "no stream f2" in (codec.decode(answer, DeviceReply).error or "")
    assert not any(not r.more for r in link.replies("f2"))


def test_a_stream_ends_when_its_lease_runs_out(device: tuple[AgentCore, FakeDriver, RecordingLink]) -> None:
    """Without an extension a stream ends after its duration, saying so."""
    core, _driver, link = device
    send(core, {"kind": "logs", "stack": "web", "follow": True, "duration": 0.5}, "f3")
    last = wait_until(lambda: next((r for r in link.replies("f3") if not r.more), None), 10)
    assert last.result == {"end": "duration", "dropped": 0}


def test_operations_beyond_the_limit_are_refused(tmp_path: Path) -> None:
    """With every slot taken by a stream, the next slow operation is answered 'busy'."""
    core, _driver, link = make_core(tmp_path, max_operations=1)
    assert core.remote is not None
    try:
        send(core, {"kind": "logs", "stack": "web", "follow": True}, "f4")
        wait_until(lambda: link.replies("f4"), 10)
        send(core, {"kind": "facts"}, "r5")
        assert "is busy" in (reply(link, "r5").error or "")
    finally:
        core.remote.close()
    last = wait_until(lambda: next((r for r in link.replies("f4") if not r.more), None), 10)
    assert last.result == {"end": "stopped", "dropped": 0}


def test_restart_replaces_the_instances(device: tuple[AgentCore, FakeDriver, RecordingLink]) -> None:
    """restart removes the service's instance and reconciles at once: a new instance id."""
    core, driver, link = device
    before = {i.service: i.id for i in driver.observe()}
    send(core, {"kind": "restart", "stack": "web", "service": "app"})
    result = reply(link).result
    after = {i.service: i.id for i in driver.observe()}
    assert result["services"] == [
        {"service": "app", "old": before["app"], "new": after["app"], "error": None}
    ]
    assert after["app"] != before["app"] and after["db"] == before["db"]
    send(core, {"kind": "restart", "stack": "web"}, "r2")
    assert [s["service"] for s in reply(link, "r2").result["services"]] == ["db", "app"]
    assert set({i.service: i.id for i in driver.observe()}.values()).isdisjoint(after.values())


def test_facts_and_presence_facts(
    device: tuple[AgentCore, FakeDriver, RecordingLink], tmp_path: Path
) -> None:
    """facts reads the host; the online presence carries the static part of it."""
    core, _driver, link = device
    send(core, {"kind": "facts"})
    facts = reply(link).result
    assert facts["cpu_count"] >= 1 and facts["memory_total"] > 0 and facts["disk_total"] > 0
    assert (
        facts["disk_path"] == str(tmp_path) and facts["driver"] == "fake" and facts["docker_version"] is None
    )
    presence = core.facts()
    assert presence.cpu_count == facts["cpu_count"] and presence.memory_total == facts["memory_total"]


def test_live_metrics_publish_full_samples(device: tuple[AgentCore, FakeDriver, RecordingLink]) -> None:
    """metrics.live: an acknowledgement, then full samples on the metrics topic at QoS 0."""
    core, _driver, link = device
    send(core, {"kind": "metrics.live", "duration": 5})
    assert reply(link).result["interval"] == 1.0
    topic = topics.device(DEVICE, DeviceTopic.METRICS)
    samples = wait_until(lambda: len(link.on(topic)) >= 2 and link.on(topic), 10)
    decoded = [codec.decode(s, MetricsSample) for s in samples]
    assert all(s.full and s.mem_total for s in decoded)
    assert {q for t, _p, q, r in link.published if t == topic} == {0}


def test_a_stream_is_rate_limited_and_says_what_it_left_out(
    device: tuple[AgentCore, FakeDriver, RecordingLink],
) -> None:
    """Output beyond the burst allowance is left out, marked in the text and counted at the end."""
    core, driver, link = device
    send(core, {"kind": "logs", "stack": "web", "service": "app", "tail": 0, "follow": True}, "f5")
    wait_until(lambda: link.replies("f5"), 10)
    app = next(i for i in driver.observe() if i.service == "app")
    driver.emit(app.id, "x" * 1023 + "\n" + ("y" * 1023 + "\n") * 600)
    wait_until(lambda: sum(len((r.result or {}).get("text", "")) for r in link.replies("f5")) >= 500_000, 10)
    send(core, {"kind": "stream", "request_id": "f5", "action": "cancel"}, "c5")
    last = wait_until(lambda: next((r for r in link.replies("f5") if not r.more), None), 10)
    text = "".join((r.result or {}).get("text", "") for r in link.replies("f5"))
    assert 0 < last.result["dropped"] < 100_000
    assert text.startswith(f"[tether: {last.result['dropped']} bytes of output left out (rate limit)]\ny")
    assert "x" not in text and all(
        len((r.result or {}).get("text", "").encode()) <= 32 * 1024 for r in link.replies("f5")
    )


def test_a_large_log_is_cut_to_its_most_recent_part(
    device: tuple[AgentCore, FakeDriver, RecordingLink],
) -> None:
    """More than the reply limit: the newest output comes back, whole lines, marked truncated."""
    core, driver, link = device
    app = next(i for i in driver.observe() if i.service == "app")
    driver.emit(app.id, "".join(f"line {n:06d} {'z' * 90}\n" for n in range(8000)))
    send(core, {"kind": "logs", "stack": "web", "service": "app", "tail": None})
    result = reply(link).result
    text = result["logs"][0]["text"]
    assert result["truncated"] and len(text.encode()) <= 512 * 1024
    assert text.startswith("line ") and text.endswith(f"line 007999 {'z' * 90}\n")
