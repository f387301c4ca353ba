"""What the fleet view keeps per device is shared where devices report alike (issue 21's memory)."""

from __future__ import annotations

from tether.controller.fleet import Seen
from tether.controller.fleet_events import ReportSummary
from tether.controller.models import Device, Group, Stack
from tether.controller.rollout import Observation
from tether.controller.scheduler import desired_stacks
from tether.controller.selectors import Attributes
from tether.protocol import topics
from tether.protocol.models import ReportedState, ServiceStatus, StackSpec, StackStatus

V1 = "a" * 64


def _seen(device_id: str, state: str = "running", restarts: int = 0) -> Seen:
    status = StackStatus(
        spec_hash=V1, state=state, services={"web": ServiceStatus(state="running", restarts=restarts)}
    )
    reported = ReportedState(device_id=device_id, generation=1, stacks={"app": status})
    return Seen.of(Device(id=device_id, status="online", reported=reported))


def test_devices_reporting_alike_share_their_stacks_and_observations() -> None:
    """Two devices running a stack without a blip share the dict of what they report and the
    observation a step makes of it (equal to one made afresh); a device whose stack restarted
    keeps its own, with its report for explain()."""
    a, b, c = _seen("d1"), _seen("d2"), _seen("d3", restarts=2)
    assert a.stacks is b.stacks and a.stacks == {"app": a.stacks["app"]}
    assert a.observe("app") is b.observe("app")
    assert a.observe("app") == Observation(online=True, spec_hash=V1, state="running")
    assert c.stacks is not a.stacks and c.stacks["app"].status is not None
    assert c.observe("app").restarts == 2 and c.observe("app").status is not None
    assert _seen("d4", state="failed").observe("app").state == "failed"


def test_device_ids_from_topics_are_one_string_per_device() -> None:
    """Every topic of a device parses to the same device id object (kept as a key in many maps)."""
    ids = [
        topics.parse("/".join(["tether", "v1", "devices", "dev-" + str(7), kind]))
        for kind in ("presence", "reported")
    ]
    assert ids[0] is not None and ids[1] is not None
    assert ids[0].device_id == "dev-7" and ids[0].device_id is ids[1].device_id


def test_devices_of_one_stack_share_its_desired_tuple() -> None:
    """desired_stacks gives the devices of one stack version one tuple, two stacks sorted by name."""
    group = Group(name="g", devices=("d1", "d2"))
    spec = StackSpec.model_validate({"services": [{"name": "web", "image": "nginx"}]})
    stacks = [
        Stack(name=name, group="g", spec_hash=h, spec=spec, compose="", created=0.0, updated=0.0)
        for name, h in (("web", V1), ("db", "b" * 64))
    ]
    one = desired_stacks(stacks[:1], {"g": group}, {"d1": Attributes(), "d2": Attributes()})
    assert one["d1"] is one["d2"] and [r.spec_hash for r in one["d1"]] == [V1]
    two = desired_stacks(stacks, {"g": group}, {"d1": Attributes()})
    assert [r.name for r in two["d1"]] == ["db", "web"]


def test_equal_report_summaries_are_one_object() -> None:
    """Devices reporting alike keep one event summary between them; another generation, another."""

    def summary(device_id: str, generation: int) -> ReportSummary:
        status = StackStatus(spec_hash=V1, state="running", services={"web": ServiceStatus(state="running")})
        return ReportSummary.of(
            ReportedState(device_id=device_id, generation=generation, stacks={"app": status})
        )

    assert summary("d1", 3) is summary("d2", 3)
    assert summary("d3", 4) is not summary("d1", 3) and summary("d3", 4).generation == 4
