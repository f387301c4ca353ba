"""Device messages for the fast unit tests: what an agent would publish, handed to a controller."""

from __future__ import annotations

from typing import Any

from tether.protocol import codec, topics
from tether.protocol.commands import GroupsCreate, StacksDeploy
from tether.protocol.models import (
    DesiredState,
    DeviceFacts,
    Event,
    JobResult,
    Presence,
    ReportedState,
    ServiceStatus,
    StackStatus,
)
from tether.protocol.topics import DeviceTopic

from .recording import RecordingPublisher


def online(
    controller: Any,
    device_id: str,
    labels: dict[str, str] | None = None,
    session: int = 1,
    public_key: str | None = None,
    driver: str = "process",
) -> None:
    """``device_id`` comes online (reporting ``labels`` of its own, its ``public_key`` and its
    ``driver``), as its presence message says."""
    facts = DeviceFacts(
        agent_version="1",
        driver=driver,
        arch="x86_64",
        os="linux",
        labels=labels or {},
        public_key=public_key,
    )
    controller.handle(
        topics.device(device_id, DeviceTopic.PRESENCE),
        codec.encode(Presence(device_id=device_id, status="online", session=session, facts=facts)),
    )


def desired(publisher: RecordingPublisher, device_id: str) -> DesiredState | None:
    """The last desired state published to ``device_id`` (None: none yet)."""
    topic = topics.device(device_id, DeviceTopic.DESIRED)
    found = [p for t, p, _ in publisher.published if t == topic]
    return codec.decode(found[-1], DesiredState) if found else None


def job_result(controller: Any, device_id: str, seq: int, result: JobResult) -> None:
    """``device_id`` sends ``result`` as its ``job.result`` event number ``seq``."""
    event = Event(device_id=device_id, seq=seq, kind="job.result", message="", data=result.model_dump())
    controller.handle(topics.device(device_id, DeviceTopic.EVENTS), codec.encode(event))


def report_running(controller: Any, device_id: str, generation: int, stacks: dict[str, str]) -> None:
    """``device_id`` reports ``generation`` applied, each stack (name: spec hash) running."""
    state = ReportedState(
        device_id=device_id,
        generation=generation,
        stacks={
            name: StackStatus(
                spec_hash=spec_hash, state="running", services={"web": ServiceStatus(state="running")}
            )
            for name, spec_hash in stacks.items()
        },
    )
    controller.handle(topics.device(device_id, DeviceTopic.REPORTED), codec.encode(state))


WEB = "services:\n  web:\n    image: busybox:1.36\n"


def web_on_twelve(controller: Any) -> str:
    """Stack ``web`` (``WEB``) deployed to group ``edge``: 12 online devices d-00 to d-11, d-00
    to d-04 reporting it running. Its spec hash."""
    for i in range(12):
        online(controller, f"d-{i:02}")
    controller.execute(GroupsCreate(name="edge", devices=tuple(f"d-{i:02}" for i in range(12))))
    spec_hash: str = controller.execute(StacksDeploy(name="web", group="edge", compose=WEB)).stack.spec_hash
    for i in range(5):
        record = controller.store.get_desired(f"d-{i:02}")
        assert record is not None
        report_running(controller, f"d-{i:02}", record.generation, {"web": spec_hash})
    return spec_hash
