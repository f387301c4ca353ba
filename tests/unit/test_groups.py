"""Group commands on a real SQLite store: what is stored, published and refused."""

from __future__ import annotations

import pytest
from support.fleet import desired, online
from support.recording import RecordingPublisher
from tether.controller.service import Controller
from tether.protocol.commands import (
    CommandModel,
    GroupsCreate,
    GroupsList,
    GroupsRemove,
    GroupsShow,
    GroupsTrust,
    StacksDeploy,
    StacksRemove,
)
from tether.protocol.errors import ConflictError, TetherError
from tether.protocol.results import Removed

COMPOSE = "services:\n  web:\n    image: busybox:1.36\n"


def test_a_static_group_lists_its_devices_and_stacks(controller: Controller) -> None:
    """groups.create stores a static group (ids sorted, deduplicated); show and ls give its members and stacks."""
    result = controller.execute(GroupsCreate(name="edge", devices=("pi-2", "pi-1", "pi-2")))
    assert result.group.devices == ["pi-1", "pi-2"]
    assert result.group.members == ["pi-1", "pi-2"]
    controller.execute(StacksDeploy(name="web", group="edge", compose=COMPOSE))
    shown = controller.execute(GroupsShow(name="edge")).group
    assert (shown.kind, shown.stacks) == ("static", ["web"])
    assert [g.name for g in controller.execute(GroupsList()).groups] == ["edge"]


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (GroupsCreate(name="g"), "either devices or a selector"),
        (GroupsCreate(name="g", devices=("pi-1",), selector="role=x"), "either devices or a selector"),
        (GroupsCreate(name="g", devices=("pi-1",), trust_device_labels=True), "only a selector group"),
        (GroupsCreate(name="G!", devices=("pi-1",)), "invalid group name 'G!'"),
        (GroupsCreate(name="g", selector="=x"), "invalid selector term '=x'"),
        (GroupsCreate(name="g", devices=("a/b",)), "a/b"),
        (GroupsShow(name="nope"), "unknown group 'nope'"),
        (GroupsRemove(name="nope"), "unknown group 'nope'"),
        (GroupsTrust(name="nope"), "unknown group 'nope'"),
    ],
)
def test_bad_group_commands_are_refused_and_store_nothing(
    controller: Controller, command: CommandModel, error: str
) -> None:
    """Each bad group command gets one error naming the problem; no group is stored."""
    with pytest.raises(TetherError, match=error):
        controller.execute(command)
    assert controller.store.list_groups() == []


def test_a_selector_group_trusts_device_labels_only_when_told(
    controller: Controller, publisher: RecordingPublisher
) -> None:
    """A device's own label joins it to a selector group only after groups.trust; its desired state follows."""
    online(controller, "pi-1", labels={"role": "cam"})
    controller.execute(GroupsCreate(name="cams", selector="role=cam"))
    controller.execute(StacksDeploy(name="web", group="cams", compose=COMPOSE))
    assert controller.execute(GroupsShow(name="cams")).group.members == []
    assert desired(publisher, "pi-1") is None
    trusted = controller.execute(GroupsTrust(name="cams", trust=True)).group
    assert (trusted.members, trusted.trust_device_labels) == (["pi-1"], True)
    state = desired(publisher, "pi-1")
    assert state is not None and [s.name for s in state.stacks] == ["web"]
    controller.execute(GroupsTrust(name="cams", trust=False))
    state = desired(publisher, "pi-1")
    assert state is not None and state.stacks == ()


def test_a_static_group_cannot_trust_and_a_used_group_cannot_go(controller: Controller) -> None:
    """groups.trust refuses a static group; groups.rm refuses a group with stacks, then removes it once they are gone."""
    controller.execute(GroupsCreate(name="edge", devices=("pi-1",)))
    with pytest.raises(ConflictError, match="is static"):
        controller.execute(GroupsTrust(name="edge"))
    controller.execute(StacksDeploy(name="web", group="edge", compose=COMPOSE))
    with pytest.raises(ConflictError, match="still has stacks: web"):
        controller.execute(GroupsRemove(name="edge"))
    controller.execute(StacksRemove(name="web"))
    assert controller.execute(GroupsRemove(name="edge")) == Removed(removed="edge")
    assert controller.store.get_group("edge") is None
