"""Stack and deployment commands on a real SQLite store: versions, plans, status, rollouts."""

from __future__ import annotations

import pytest
from support.fleet import desired, online, report_running, web_on_twelve
from support.recording import RecordingPublisher
from tether.controller import stacks as stacks_module
from tether.controller.service import Controller
from tether.protocol import codec, topics
from tether.protocol.commands import (
    CommandModel,
    DeploymentsAction,
    DeploymentsEvents,
    DeploymentsList,
    DeploymentsStatus,
    GroupsCreate,
    RolloutStrategy,
    StacksDeploy,
    StacksList,
    StacksPlan,
    StacksRemove,
    StacksShow,
    StacksStatus,
)
from tether.protocol.errors import ComposeError, ConflictError, ErrorCode, NotFoundError, TetherError
from tether.protocol.models import Event, Reply, Request
from tether.protocol.results import Removed, ServiceChange

V1 = "services:\n  web:\n    image: busybox:1.36\n"
V2 = "services:\n  web:\n    image: busybox:1.37\n  db:\n    image: busybox:1.36\n"


@pytest.fixture
def edge(controller: Controller) -> Controller:
    """The controller with group ``edge`` of two online devices."""
    online(controller, "pi-1")
    online(controller, "pi-2")
    controller.execute(GroupsCreate(name="edge", devices=("pi-1", "pi-2")))
    return controller


def test_a_deploy_reaches_every_member_and_status_follows_reports(
    edge: Controller, publisher: RecordingPublisher
) -> None:
    """stacks.deploy stores version 1 and publishes it; status shows pending until a device reports it running."""
    result = edge.execute(StacksDeploy(name="web", group="edge", compose=V1))
    assert (result.changed, result.devices, result.stack.version) == (True, ["pi-1", "pi-2"], 1)
    spec_hash = result.stack.spec_hash
    for device_id in ("pi-1", "pi-2"):
        state = desired(publisher, device_id)
        assert state is not None and [(s.name, s.spec_hash) for s in state.stacks] == [("web", spec_hash)]
    rows = {r.device: r for r in edge.execute(StacksStatus(name="web")).devices}
    assert {d: r.state for d, r in rows.items()} == {"pi-1": "pending", "pi-2": "pending"}
    report_running(edge, "pi-1", rows["pi-1"].desired_generation, {"web": spec_hash})
    rows = {r.device: r for r in edge.execute(StacksStatus(name="web")).devices}
    assert (rows["pi-1"].state, rows["pi-2"].state) == ("running", "pending")
    (listed,) = edge.execute(StacksList()).stacks
    assert (listed.name, listed.devices, listed.running) == ("web", 2, 1)


def test_the_same_file_again_changes_nothing(edge: Controller, publisher: RecordingPublisher) -> None:
    """Deploying an unchanged file starts no deployment and publishes nothing."""
    first = edge.execute(StacksDeploy(name="web", group="edge", compose=V1))
    published = len(publisher.published)
    again = edge.execute(StacksDeploy(name="web", group="edge", compose=V1))
    assert (again.changed, again.deployment, again.stack.version) == (False, None, 1)
    assert len(publisher.published) == published
    assert [d.id for d in edge.execute(DeploymentsList()).deployments] == [first.deployment]


def test_a_plan_names_each_service_change_and_stores_nothing(edge: Controller) -> None:
    """stacks.plan against version 1: web replaced, db added, version 2 next; the stack stays at version 1."""
    edge.execute(StacksDeploy(name="web", group="edge", compose=V1))
    plan = edge.execute(StacksPlan(name="web", group="edge", compose=V2))
    assert plan.services == [
        ServiceChange(name="web", change="replaced"),
        ServiceChange(name="db", change="added"),
    ]
    assert (plan.version, plan.changed, plan.devices) == (2, True, ["pi-1", "pi-2"])
    stack = edge.store.get_stack("web")
    assert stack is not None and stack.version == 1
    back = edge.execute(StacksPlan(name="web", group="edge", compose=V1))
    assert (back.services, back.changed) == ([ServiceChange(name="web", change="kept")], False)


def test_a_plan_reports_every_problem_at_once(edge: Controller) -> None:
    """A bad name, an unknown group and a bad file come back in one error."""
    with pytest.raises(ComposeError) as refused:
        edge.execute(StacksPlan(name="Bad!", group="nope", compose="services: {web: {}}\n"))
    message = str(refused.value)
    assert "invalid stack name 'Bad!'" in message and "unknown group 'nope'" in message
    assert "web" in message
    assert edge.store.list_stacks() == []


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (StacksDeploy(name="Bad!", group="edge", compose=V1), "invalid stack name 'Bad!'"),
        (StacksDeploy(name="web", group="nope", compose=V1), "unknown group 'nope'"),
        (StacksDeploy(name="web", group="edge", compose="services: [\n"), "stack 'web'"),
        (StacksStatus(name="nope"), "unknown stack 'nope'"),
        (StacksRemove(name="nope"), "unknown stack 'nope'"),
        (DeploymentsStatus(id=99), "unknown deployment 99"),
        (DeploymentsAction(kind="deployments.pause", id=99), "unknown deployment 99"),
    ],
)
def test_bad_stack_commands_are_refused_and_store_nothing(
    edge: Controller, command: CommandModel, error: str
) -> None:
    """Each bad stack or deployment command is one error naming the problem; nothing is stored."""
    with pytest.raises(TetherError, match=error):
        edge.execute(command)
    assert edge.store.list_stacks() == [] and edge.store.list_deployments(None) == []


def test_a_stack_stays_in_its_group_until_removed(edge: Controller, publisher: RecordingPublisher) -> None:
    """A stack cannot move to another group; stacks.rm takes it off every device."""
    edge.execute(GroupsCreate(name="other", devices=("pi-3",)))
    edge.execute(StacksDeploy(name="web", group="edge", compose=V1))
    with pytest.raises(ConflictError, match="already deployed to group 'edge'"):
        edge.execute(StacksDeploy(name="web", group="other", compose=V1))
    assert edge.execute(StacksRemove(name="web")) == Removed(removed="web")
    state = desired(publisher, "pi-1")
    assert state is not None and state.stacks == ()


def test_a_canary_deployment_pauses_resumes_and_rolls_back(
    edge: Controller, publisher: RecordingPublisher
) -> None:
    """Pause and resume change the active deployment's state; rollback deploys version 1 again as version 3."""
    v1 = edge.execute(StacksDeploy(name="web", group="edge", compose=V1))
    canary = RolloutStrategy(kind="canary", canary=1)
    v2 = edge.execute(StacksDeploy(name="web", group="edge", compose=V2, strategy=canary))
    deployment = v2.deployment
    paused = edge.execute(DeploymentsAction(kind="deployments.pause", id=deployment)).deployment
    assert paused.state == "paused"
    resumed = edge.execute(DeploymentsAction(kind="deployments.resume", id=deployment)).deployment
    assert resumed.state != "paused"
    with pytest.raises(ConflictError, match="not waiting for a switch"):
        edge.execute(DeploymentsAction(kind="deployments.switch", id=deployment))
    with pytest.raises(ConflictError, match="only the active deployment"):
        edge.execute(DeploymentsAction(kind="deployments.pause", id=v1.deployment))
    back = edge.execute(DeploymentsAction(kind="deployments.rollback", id=deployment)).deployment
    assert (back.from_hash, back.to_hash) == (v2.stack.spec_hash, v1.stack.spec_hash)
    stack = edge.store.get_stack("web")
    assert stack is not None and (stack.version, stack.spec_hash) == (3, v1.stack.spec_hash)
    shown = edge.execute(DeploymentsStatus(id=back.id)).deployment
    assert set(shown.devices) == {"pi-1", "pi-2"}
    superseded = edge.execute(DeploymentsStatus(id=deployment)).deployment
    assert superseded.state == "superseded"


WEB = "services:\n  web:\n    image: busybox:1.36\n    ports: ['8080:80']\n"
BOARD = "services:\n  board:\n    image: busybox:1.36\n    ports: ['127.0.0.1:8080:81', '9000:90/udp']\n"


def test_a_port_another_stack_publishes_on_a_device_is_refused_naming_both(controller: Controller) -> None:
    """Two stacks publishing one host port on a docker device: the second deploy (and its plan) is
    refused naming both stacks, services and the device; other addresses, protocols and process
    devices do not clash."""
    for device_id, driver in (("d-1", "docker"), ("d-2", "docker"), ("p-1", "process")):
        online(controller, device_id, driver=driver)
    controller.execute(GroupsCreate(name="both", devices=("d-1", "d-2", "p-1")))
    controller.execute(GroupsCreate(name="procs", devices=("p-1",)))
    controller.execute(StacksDeploy(name="web", group="both", compose=WEB))
    with pytest.raises(ConflictError) as refused:
        controller.execute(StacksDeploy(name="board", group="both", compose=BOARD))
    assert str(refused.value) == (
        "stack 'board': port 8080/tcp of service 'board' is taken by stack 'web' (service 'web') on d-1, d-2"
    )
    with pytest.raises(ComposeError, match="port 8080/tcp of service 'board' is taken by stack 'web'"):
        controller.execute(StacksPlan(name="board", group="both", compose=BOARD))
    assert [s.name for s in controller.execute(StacksList()).stacks] == ["web"]  # nothing stored
    # Process-driver devices publish nothing; another protocol or port is free; the stack itself may change.
    controller.execute(StacksDeploy(name="board", group="procs", compose=BOARD))
    udp = "services:\n  dns:\n    image: busybox:1.36\n    ports: ['8080:53/udp']\n"
    controller.execute(StacksDeploy(name="dns", group="both", compose=udp))
    controller.execute(
        StacksDeploy(name="web", group="both", compose=WEB.replace("busybox:1.36", "busybox:1.37"))
    )


def test_show_prints_each_versions_file(edge: Controller) -> None:
    """stacks.show gives the current file, an earlier version's, and one error for a version that
    does not exist; a removed and redeployed stack starts its history again."""
    edge.execute(StacksDeploy(name="web", group="edge", compose=V1))
    edge.execute(StacksDeploy(name="web", group="edge", compose=V2))
    current = edge.execute(StacksShow(name="web"))
    assert (current.version, current.current, current.compose) == (2, 2, V2)
    first = edge.execute(StacksShow(name="web", version=1))
    assert (first.version, first.current, first.compose) == (1, 2, V1)
    with pytest.raises(NotFoundError, match="stack 'web' has no version 3 \\(the current one is 2\\)"):
        edge.execute(StacksShow(name="web", version=3))
    with pytest.raises(NotFoundError, match="unknown stack 'nope'"):
        edge.execute(StacksShow(name="nope"))
    edge.execute(StacksRemove(name="web"))
    edge.execute(StacksDeploy(name="web", group="edge", compose=V2))
    with pytest.raises(NotFoundError, match="has no version 2"):
        edge.execute(StacksShow(name="web", version=2))


def test_deployment_events_are_the_devices_words_about_it(edge: Controller) -> None:
    """deployments.events gives, per device in order, its events about the deployment's stack and
    version (a lagging device clock too) and its errors, not other stacks', earlier ones' or the
    next deployment's; not healthy devices first; an unknown device is one clear error."""
    clock = edge.clock
    v1 = edge.execute(StacksDeploy(name="web", group="edge", compose=V1))
    clock.now += 100  # type: ignore[attr-defined]
    v2 = edge.execute(StacksDeploy(name="web", group="edge", compose=V2))
    start = clock()
    seq = iter(range(1, 100))

    def said(device: str, at: float, kind: str, **fields: object) -> None:
        event = Event(device_id=device, seq=next(seq), kind=kind, message=kind, at=at, **fields)  # type: ignore[arg-type]
        edge.store.add_event(device, event.seq, event.model_dump_json())

    new, old = v2.stack.spec_hash, v1.stack.spec_hash
    said("pi-1", start - 50, "service.created", stack="web", service="web", spec_hash=old)  # v1's
    said("pi-1", start - 10, "service.created", stack="web", service="web", spec_hash=new)  # clock lags
    said("pi-1", start + 1, "desired.accepted")  # info, about no stack
    said("pi-1", start + 2, "service.restarted", stack="web", service="db", spec_hash=new)
    said("pi-1", start + 3, "service.created", stack="other", service="x")
    said("pi-1", start + 4, "storage.error", level="error")
    said("pi-2", start + 5, "service.healthy", stack="web", service="web", spec_hash=new)
    events = edge.execute(DeploymentsEvents(id=v2.deployment))
    assert [e["kind"] for e in events.devices["pi-1"]] == [
        "service.created",
        "service.restarted",
        "storage.error",
    ]
    assert events.devices["pi-1"][0]["spec_hash"] == new
    assert [e["kind"] for e in events.devices["pi-2"]] == ["service.healthy"]
    assert events.more == 0
    one = edge.execute(DeploymentsEvents(id=v2.deployment, device_id="pi-2", devices=1))
    assert list(one.devices) == ["pi-2"]
    assert list(edge.execute(DeploymentsEvents(id=v2.deployment, devices=1)).devices) == ["pi-1"]
    earlier = edge.execute(DeploymentsEvents(id=v1.deployment)).devices["pi-1"]
    assert [e["spec_hash"] for e in earlier] == [old], "the next deployment's events are not v1's"
    with pytest.raises(NotFoundError, match="device pi-9 is not part of deployment"):
        edge.execute(DeploymentsEvents(id=v2.deployment, device_id="pi-9"))


@pytest.fixture
def fleet12(controller: Controller) -> tuple[Controller, str]:
    """Stack ``web`` deployed to 12 online devices, d-00 to d-04 running it; its spec hash."""
    spec_hash = web_on_twelve(controller)
    return controller, spec_hash


def test_status_pages_cover_every_device_once_with_counts_over_all(
    fleet12: tuple[Controller, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """stacks.status with a limit: pages in device id order chained by next, counts always over every device."""
    controller, _ = fleet12
    seen, after, pages = [], None, 0
    while True:
        page = controller.execute(StacksStatus(name="web", after=after, limit=5))
        assert (page.counts, page.total) == ({"pending": 7, "running": 5}, 12)
        seen += [r.device for r in page.devices]
        pages += 1
        if page.next is None:
            break
        after = page.next
    assert (seen, pages) == ([f"d-{i:02}" for i in range(12)], 3)
    running = controller.execute(StacksStatus(name="web", limit=100, states=("running",)))
    assert [r.device for r in running.devices] == [f"d-{i:02}" for i in range(5)] and running.next is None
    summary = controller.execute(StacksStatus(name="web", limit=0))
    assert (summary.devices, summary.counts, summary.next) == ([], {"pending": 7, "running": 5}, None)
    whole = controller.execute(StacksStatus(name="web"))
    assert [r.device for r in whole.devices] == seen and whole.next is None
    monkeypatch.setattr(stacks_module, "STATUS_PAGE_BYTES", 1)  # a page ends early rather than grow
    small = controller.execute(StacksStatus(name="web", limit=5))
    assert ([r.device for r in small.devices], small.next) == (["d-00"], "d-00")


def _ask(
    controller: Controller,
    publisher: RecordingPublisher,
    command: StacksStatus | DeploymentsStatus,
    limit: int,
) -> Reply:
    """``command`` as a CLI's request over MQTT: its reply, in no more than ``limit`` bytes."""
    reply_to = topics.replies("cli-1")
    payload = Request(id="r-1", reply_to=reply_to, command=command.model_dump(mode="json"))
    controller.handle(topics.REQUESTS, codec.encode(payload))
    topic, data, _ = publisher.published[-1]
    assert topic == reply_to and len(data) <= limit
    return codec.decode(data, Reply)


def test_a_status_past_the_message_limit_is_read_in_pages(
    fleet12: tuple[Controller, str], publisher: RecordingPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fleet whose status is over the message limit: one reply is too_large, the pages of a limit all fit."""
    controller, _ = fleet12
    monkeypatch.setattr(codec, "MAX_PAYLOAD", 2000)  # 12 rows of this stack no longer fit
    monkeypatch.setattr(stacks_module, "STATUS_PAGE_BYTES", 1000)

    assert _ask(controller, publisher, StacksStatus(name="web"), 2000).code == ErrorCode.TOO_LARGE
    devices, after, pages = [], None, 0
    while True:
        reply = _ask(controller, publisher, StacksStatus(name="web", after=after, limit=5000), 2000)
        assert reply.ok and reply.result is not None, reply.error
        devices += [r["device"] for r in reply.result["devices"]]
        pages += 1
        if (after := reply.result.get("next")) is None:
            break
    assert devices == [f"d-{i:02}" for i in range(12)] and pages > 1


def _rolled(controller: Controller) -> int:
    """Stack web's deployment moved on: d-00 to d-04 healthy, the 7 others updating. Its id."""
    controller.advance_deployments()  # d-00..d-04 report it running: their healthy timers start
    controller.clock.now += 11  # type: ignore[attr-defined]  # past min_healthy_time
    controller.advance_deployments()
    return controller.store.latest_deployments()["web"].id


def test_deployment_status_pages_cover_every_device_once_with_counts_over_all(
    fleet12: tuple[Controller, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """deployments.status with a limit: pages in device id order chained by next, counts over every device."""
    controller, _ = fleet12
    deployment_id = _rolled(controller)
    seen: list[str] = []
    after, pages = None, 0
    while True:
        page = controller.execute(DeploymentsStatus(id=deployment_id, after=after, limit=5))
        assert page.deployment.counts == {"healthy": 5, "updating": 7}
        seen += list(page.deployment.devices or {})
        pages += 1
        if page.next is None:
            break
        after = page.next
    assert (seen, pages) == ([f"d-{i:02}" for i in range(12)], 3)
    updating = controller.execute(DeploymentsStatus(id=deployment_id, limit=100, states=("updating",)))
    assert list(updating.deployment.devices or {}) == [f"d-{i:02}" for i in range(5, 12)]
    assert updating.next is None
    summary = controller.execute(DeploymentsStatus(id=deployment_id, limit=0))
    assert (summary.deployment.devices, summary.next) == ({}, None)
    whole = controller.execute(DeploymentsStatus(id=deployment_id))
    assert list(whole.deployment.devices or {}) == seen and whole.next is None
    assert "next" not in whole.model_dump(mode="json"), "an unpaged reply is as before paging"
    assert whole.deployment.devices["d-00"]["state"] == "healthy"  # type: ignore[index]
    monkeypatch.setattr(stacks_module, "STATUS_PAGE_BYTES", 1)  # a page ends early rather than grow
    small = controller.execute(DeploymentsStatus(id=deployment_id, limit=5))
    assert (list(small.deployment.devices or {}), small.next) == (["d-00"], "d-00")


def test_a_deployment_past_the_message_limit_is_read_in_pages(
    fleet12: tuple[Controller, str], publisher: RecordingPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment whose status is over the message limit: one reply is too_large, the pages of a limit all fit."""
    controller, _ = fleet12
    deployment_id = _rolled(controller)
    monkeypatch.setattr(codec, "MAX_PAYLOAD", 1200)  # 12 devices' rows no longer fit
    monkeypatch.setattr(stacks_module, "STATUS_PAGE_BYTES", 500)

    assert _ask(controller, publisher, DeploymentsStatus(id=deployment_id), 1200).code == ErrorCode.TOO_LARGE
    devices: list[str] = []
    after, pages = None, 0
    while True:
        reply = _ask(
            controller, publisher, DeploymentsStatus(id=deployment_id, after=after, limit=5000), 1200
        )
        assert reply.ok and reply.result is not None, reply.error
        devices += list(reply.result["deployment"]["devices"])
        pages += 1
        if (after := reply.result.get("next")) is None:
            break
    assert devices == [f"d-{i:02}" for i in range(12)] and pages > 1


def test_observations_asked_again_are_updated_where_devices_reported(fleet12: tuple[Controller, str]) -> None:
    """Scheduler.observe for the same devices again: the devices that reported since show it, the others
    are kept, and every observation is what the fleet view says of its device."""
    controller, spec_hash = fleet12
    scheduler = controller.context.scheduler
    ids = {f"d-{i:02}" for i in range(12)} | {"d-99"}  # d-99: not in the fleet
    fleet = scheduler.fleet_view()
    first = scheduler.observe("web", ids, fleet)
    assert first["d-07"].state is None and first["d-00"].state == "running"
    record = controller.store.get_desired("d-07")
    assert record is not None
    report_running(controller, "d-07", record.generation, {"web": spec_hash})
    fleet = scheduler.fleet_view()
    again = scheduler.observe("web", set(ids), fleet)
    assert again is first, "brought up to date, not rebuilt"
    assert again["d-07"].state == "running" and again["d-07"].spec_hash == spec_hash
    assert again["d-99"].online is False
    assert {d: again[d] for d in fleet} == {d: seen.observe("web") for d, seen in fleet.items()}
    fewer = scheduler.observe("web", ids - {"d-00"}, fleet)
    assert "d-00" not in fewer and fewer["d-07"] == again["d-07"]
