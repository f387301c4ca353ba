"""A deploy request is answered once its stack and deployment are stored; desired states follow
the reply, and a controller that takes the lead recomputes them (a crash in between loses nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.fleet import WEB, desired, online, report_running
from support.recording import Clock, RecordingPublisher
from tether.controller.models import DesiredRecord
from tether.controller.service import Controller
from tether.controller.store import Store
from tether.controller.variables import SecretsKey
from tether.protocol import codec, topics
from tether.protocol.commands import GroupsCreate, StacksDeploy
from tether.protocol.models import Reply, Request


def _deploy(controller: Controller) -> None:
    """Stack web to group edge, as a CLI's request over MQTT."""
    command = StacksDeploy(name="web", group="edge", compose=WEB).model_dump(mode="json")
    request = Request(id="r-1", reply_to=topics.replies("cli-1"), command=command)
    controller.handle(topics.REQUESTS, codec.encode(request))


def test_desired_states_are_recomputed_and_published_after_the_reply(
    controller: Controller, publisher: RecordingPublisher
) -> None:
    """The reply comes before any desired state is published, every device of the group has
    its desired state stored and published once the request is handled."""
    controller.execute(GroupsCreate(name="edge", devices=("d-1", "d-2")))
    for device_id in ("d-1", "d-2"):
        online(controller, device_id)
    start = len(publisher.published)
    _deploy(controller)
    published = publisher.topics()[start:]
    reply = published.index(topics.replies("cli-1"))
    assert codec.decode(publisher.published[start + reply][1], Reply).ok
    firsts = [published.index(topics.device(d, topics.DeviceTopic.DESIRED)) for d in ("d-1", "d-2")]
    assert all(i > reply for i in firsts)
    stack = controller.store.get_stack("web")
    assert stack is not None
    for device_id in ("d-1", "d-2"):
        record = controller.store.get_desired(device_id)
        assert record is not None and [r.spec_hash for r in record.stacks] == [stack.spec_hash]
        state = desired(publisher, device_id)
        assert state is not None and state.generation == record.generation


def test_the_records_published_after_the_recompute_are_the_ones_it_stored(
    controller: Controller, publisher: RecordingPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a deploy's recompute, publishing takes the records it committed instead of
    reading every row back (at 10,000 devices a tenth of publishing them): one read of the
    desired rows in the whole request, the recompute's own. What is published is what is
    stored: every record, the new ones and one left unpublished before (another device's,
    unchanged by the deploy), published once and marked so, with its stored generation."""
    controller.execute(GroupsCreate(name="edge", devices=("d-1", "d-2")))
    for device_id in ("d-1", "d-2", "d-3"):
        online(controller, device_id)
    controller.store.put_desired(DesiredRecord(device_id="d-3", generation=4))  # not published yet
    controller.context.publisher._published_generations()  # read once per leadership: not counted
    reads: list[int] = []
    read = controller.store.list_desired
    monkeypatch.setattr(controller.store, "list_desired", lambda: reads.append(1) or read())
    start = len(publisher.published)
    _deploy(controller)
    assert len(reads) == 1
    stored = read()
    assert [r.device_id for r in stored] == ["d-1", "d-2", "d-3"]
    for record in stored:
        sent = [
            t
            for t, _, _ in publisher.published[start:]
            if t == topics.device(record.device_id, topics.DeviceTopic.DESIRED)
        ]
        state = desired(publisher, record.device_id)
        assert record.published and len(sent) == 1
        assert state is not None and state.generation == record.generation and state.stacks == record.stacks


def test_a_crash_after_the_reply_still_rolls_the_deploy_out(
    tmp_path: Path, store: Store, publisher: RecordingPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller stops between its reply and the recompute (it fails there): the deploy is
    stored and answered, no desired state yet; the next controller to lead on that store
    recomputes every device's at its first connection and publishes them."""
    secrets = SecretsKey.load_or_create(tmp_path)
    first = Controller(store, clock=Clock(), secrets=secrets)
    first.client = publisher  # type: ignore[assignment]
    first.leading.set()
    first.execute(GroupsCreate(name="edge", devices=("d-1",)))
    online(first, "d-1")
    monkeypatch.setattr(first.context.scheduler, "recompute", lambda device_ids=None: 1 / 0)  # stops there
    _deploy(first)
    reply = [p for t, p, _ in publisher.published if t == topics.replies("cli-1")]
    assert len(reply) == 1 and codec.decode(reply[0], Reply).ok
    assert store.get_stack("web") is not None and store.latest_deployments()["web"].stack == "web"
    assert store.get_desired("d-1") is None and desired(publisher, "d-1") is None

    after = RecordingPublisher()
    second = Controller(store, clock=Clock(), secrets=secrets)
    second.client = after  # type: ignore[assignment]
    second._become_leader()
    second.handle("\x00connected", b"")  # its first connection (as the inbox hands it over)
    record = store.get_desired("d-1")
    stack = store.get_stack("web")
    assert record is not None and stack is not None
    assert [r.spec_hash for r in record.stacks] == [stack.spec_hash]
    state = desired(after, "d-1")
    assert state is not None and state.generation == record.generation


def test_a_failed_recompute_after_the_reply_is_retried_by_the_tick(
    controller: Controller, publisher: RecordingPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recompute after an answered deploy fails once (a store error) while the controller
    keeps leading: no desired state yet; the next tick tries again and the device gets it."""
    controller.execute(GroupsCreate(name="edge", devices=("d-1",)))
    online(controller, "d-1")
    scheduler = controller.context.scheduler
    real = scheduler.recompute
    monkeypatch.setattr(scheduler, "recompute", lambda device_ids=None: 1 / 0)
    _deploy(controller)
    assert controller.store.get_desired("d-1") is None and desired(publisher, "d-1") is None
    controller.tick()  # still failing: nothing yet, and it is not forgotten
    assert controller.store.get_desired("d-1") is None
    monkeypatch.setattr(scheduler, "recompute", real)
    controller.tick()
    record = controller.store.get_desired("d-1")
    stack = controller.store.get_stack("web")
    assert record is not None and stack is not None
    assert [r.spec_hash for r in record.stacks] == [stack.spec_hash]
    state = desired(publisher, "d-1")
    assert state is not None and state.generation == record.generation


def test_each_device_is_published_its_own_desired_state_when_records_are_shared(
    controller: Controller, publisher: RecordingPublisher
) -> None:
    """A recompute makes one record per set of parts and copies it for the devices with the
    same parts (controller/scheduling.py): each device still gets its own id, its own next
    generation (one reports a later one applied) and its own stacks (two groups overlapping),
    published under its own topic, stored as a validated record would be."""
    controller.execute(GroupsCreate(name="edge", devices=("d-1", "d-2", "d-3", "d-4")))
    controller.execute(GroupsCreate(name="core", devices=("d-3", "d-4", "d-5", "d-6")))
    devices = [f"d-{i}" for i in range(1, 7)]
    for device_id in devices:
        online(controller, device_id)
    controller.execute(StacksDeploy(name="web", group="edge", compose=WEB))
    controller.execute(StacksDeploy(name="api", group="core", compose=WEB.replace("web:", "api:")))
    web1 = controller.store.get_stack("web")
    assert web1 is not None
    report_running(controller, "d-2", 7, {"web": web1.spec_hash})  # ahead of what was published
    controller.execute(StacksDeploy(name="web", group="edge", compose=WEB.replace("1.36", "1.37")))
    web, api = controller.store.get_stack("web"), controller.store.get_stack("api")
    assert web is not None and api is not None and web.spec_hash != web1.spec_hash
    expected = {
        "d-1": [("web", web.spec_hash)],
        "d-2": [("web", web.spec_hash)],
        "d-3": [("api", api.spec_hash), ("web", web.spec_hash)],
        "d-4": [("api", api.spec_hash), ("web", web.spec_hash)],
        "d-5": [("api", api.spec_hash)],
        "d-6": [("api", api.spec_hash)],
    }
    generations = {}
    for device_id in devices:
        record = controller.store.get_desired(device_id)
        assert record is not None and record.device_id == device_id
        assert record == DesiredRecord.model_validate(record.model_dump())
        assert [(r.name, r.spec_hash) for r in record.stacks] == expected[device_id]
        state = desired(publisher, device_id)
        assert state is not None and state.device_id == device_id
        assert state.generation == record.generation
        assert [(r.name, r.spec_hash) for r in state.stacks] == expected[device_id]
        generations[device_id] = record.generation
    assert generations == {"d-1": 2, "d-2": 9, "d-3": 3, "d-4": 3, "d-5": 1, "d-6": 1}
