"""``stacks ls`` counts from what the leading controller keeps (the fleet view, the desired
records written) say the same as the devices' stored desired and reported states."""

from __future__ import annotations

import pytest
from support.recording import RecordingPublisher
from tether.controller.inbox import message as queued
from tether.controller.service import Controller
from tether.controller.stacks import _stack_counts_read
from tether.controller.store import Store
from tether.protocol import codec, topics
from tether.protocol.commands import GroupsCreate, StacksDeploy, StacksList
from tether.protocol.models import DeviceFacts, Presence, ReportedState, StackStatus
from tether.protocol.topics import DeviceTopic

pytestmark = pytest.mark.store

COMPOSE = "services:\n  {name}:\n    image: busybox:1.36\n    command: [sleep, '3600']\n"
FACTS = DeviceFacts(agent_version="1", driver="process", arch="x86_64", os="linux", labels={"site": "a"})


def counts(controller: Controller) -> dict[str, tuple[int, int]]:
    """What ``stacks ls`` answers, checked against the counts read from the store."""
    listed = {s.name: (s.devices, s.running) for s in controller.execute(StacksList()).stacks}
    assert listed == _stack_counts_read(controller.context, sorted(listed)), (
        "kept counts differ from the store's"
    )
    return listed


def report(
    controller: Controller, device_id: str, generation: int, error: str | None = None, **stacks: str
) -> None:
    """``device_id`` reports ``generation`` with each stack (name=state) at its desired version."""
    desired = controller.context.store.get_desired(device_id)
    assert desired is not None
    hashes = {r.name: r.spec_hash for r in desired.stacks} | {"gone": "0" * 64}
    body = ReportedState(
        device_id=device_id,
        generation=generation,
        error=error,
        stacks={n: StackStatus(spec_hash=hashes[n], state=state) for n, state in stacks.items()},  # type: ignore[arg-type]
    )
    assert (
        controller._ingest(*queued(topics.device(device_id, DeviceTopic.REPORTED), codec.encode(body)))
        is None
    )


def test_stacks_ls_counts_stay_true_as_reports_desired_states_and_the_controller_change(
    store_target: str,
) -> None:
    """Counts kept by the leader match the store's after reports (running, converging, rejected,
    a stack no longer desired), a second deploy (desired records written), a device forgotten,
    a restarted controller and a standby (which reads the store)."""
    store = Store(store_target)
    controller = Controller(store)
    controller.client = RecordingPublisher()  # type: ignore[assignment]
    controller.leading.set()
    controller.execute(GroupsCreate(name="edge", selector="site=a", trust_device_labels=True))
    controller.execute(StacksDeploy(name="web", group="edge", compose=COMPOSE.format(name="web")))
    assert counts(controller) == {"web": (0, 0)}
    assert controller.context.scheduler.stack_counts() is not None  # the leader counts from memory
    for i in range(6):
        message = Presence(device_id=f"d-{i}", status="online", session=1, facts=FACTS)
        assert (
            controller._ingest(*queued(topics.device(f"d-{i}", DeviceTopic.PRESENCE), codec.encode(message)))
            is None
        )
    controller._publish_deferred()
    generation = store.desired_generation("d-0")
    assert generation is not None
    assert counts(controller) == {"web": (6, 0)}  # pending everywhere
    report(controller, "d-0", generation, web="running")
    report(controller, "d-1", generation, web="converging")
    report(controller, "d-2", generation - 1, error="bad")  # rejected: an error on an older generation
    report(controller, "d-3", generation, web="running", gone="running")  # a stack nobody deploys
    assert counts(controller) == {"web": (6, 2)}
    report(controller, "d-1", generation, web="running")
    assert counts(controller) == {"web": (6, 3)}

    controller.execute(StacksDeploy(name="db", group="edge", compose=COMPOSE.format(name="db")))
    controller._publish_deferred()
    again = store.desired_generation("d-0")
    assert again is not None and again > generation
    assert counts(controller) == {"db": (6, 0), "web": (6, 3)}
    report(controller, "d-0", again, web="running", db="running")
    report(controller, "d-4", again, web="running", db="failed")
    assert counts(controller) == {"db": (6, 1), "web": (6, 4)}
    with store.transaction():
        store.forget_device("d-4")
    assert counts(controller) == {"db": (5, 1), "web": (5, 3)}

    store.close()
    store = Store(store_target)
    restarted = Controller(store)
    restarted.client = RecordingPublisher()  # type: ignore[assignment]
    restarted.leading.set()
    assert counts(restarted) == {"db": (5, 1), "web": (5, 3)}
    report(restarted, "d-5", again, web="running", db="running")
    assert counts(restarted) == {"db": (5, 2), "web": (5, 4)}
    restarted.leading.clear()  # a standby reads the store
    assert restarted.context.scheduler.stack_counts() is None
    assert counts(restarted) == {"db": (5, 2), "web": (5, 4)}
    store.close()
