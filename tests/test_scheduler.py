"""Scheduling: group membership and the stacks each device should run."""

from __future__ import annotations

import pytest
from tether.controller.models import Group, Stack
from tether.controller.scheduler import desired_stacks, members
from tether.protocol.errors import StoreError
from tether.protocol.models import ServiceSpec, StackRef, StackSpec

SPEC = StackSpec(services=(ServiceSpec(name="web", image="web:1"),))
LABELS = {
    "pi-1": {"site": "berlin", "arch": "arm64"},
    "pi-2": {"site": "berlin", "arch": "amd64"},
    "pi-3": {"site": "paris"},
    "pi-4": {},
}


def stack(name: str, group: str, spec_hash: str = "a" * 64) -> Stack:
    return Stack(name=name, group=group, spec_hash=spec_hash, spec=SPEC, compose="")


def test_static_group_members_are_its_devices_sorted_and_deduplicated() -> None:
    """A static group's members are its named devices, sorted, known or not, whatever their labels."""
    group = Group(name="g", devices=("pi-3", "never-seen", "pi-1", "pi-3"))
    assert members(group, LABELS) == ["never-seen", "pi-1", "pi-3"]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("site=berlin", ["pi-1", "pi-2"]),
        ("site=berlin,arch=arm64", ["pi-1"]),
        ("site!=berlin", ["pi-3", "pi-4"]),
        ("site", ["pi-1", "pi-2", "pi-3"]),
        ("!site", ["pi-4"]),
        ("site=tokyo", []),
    ],
)
def test_selector_group_members_are_matching_known_devices(selector: str, expected: list[str]) -> None:
    """A selector group's members are the known devices whose labels match, sorted."""
    assert members(Group(name="g", selector=selector), LABELS) == expected


def test_selector_membership_follows_label_changes() -> None:
    """Relabelling a device moves it into or out of a selector group (and its stacks)."""
    group = Group(name="berlin", selector="site=berlin")
    stacks = [stack("web", "berlin")]
    labels = {k: dict(v) for k, v in LABELS.items()}
    assert members(group, labels) == ["pi-1", "pi-2"]
    labels["pi-3"]["site"] = "berlin"
    labels["pi-1"]["site"] = "paris"
    assert members(group, labels) == ["pi-2", "pi-3"]
    assert sorted(desired_stacks(stacks, {"berlin": group}, labels)) == ["pi-2", "pi-3"]


def test_invalid_selector_in_a_stored_group_raises() -> None:
    """A group whose selector does not parse raises StoreError rather than matching nothing."""
    with pytest.raises(StoreError):
        members(Group(name="g", selector="site=a=b"), LABELS)


def test_desired_stacks_maps_each_device_to_its_stacks_sorted_by_name() -> None:
    """Each targeted device gets the refs of every stack on any of its groups, sorted by name."""
    groups = {
        "all-berlin": Group(name="all-berlin", selector="site=berlin"),
        "arm": Group(name="arm", selector="arch=arm64"),
        "lab": Group(name="lab", devices=("pi-3", "pi-9")),
    }
    stacks = [
        stack("zeta", "arm", "1" * 64),
        stack("web", "all-berlin", "2" * 64),
        stack("alpha", "arm", "3" * 64),
        stack("lab-tools", "lab", "4" * 64),
    ]
    result = desired_stacks(stacks, groups, LABELS)
    assert result == {
        "pi-1": (
            StackRef(name="alpha", spec_hash="3" * 64),
            StackRef(name="web", spec_hash="2" * 64),
            StackRef(name="zeta", spec_hash="1" * 64),
        ),
        "pi-2": (StackRef(name="web", spec_hash="2" * 64),),
        "pi-3": (StackRef(name="lab-tools", spec_hash="4" * 64),),
        "pi-9": (StackRef(name="lab-tools", spec_hash="4" * 64),),
    }
    for refs in result.values():
        assert [r.name for r in refs] == sorted(r.name for r in refs)


def test_stacks_on_missing_groups_are_ignored() -> None:
    """A stack whose group does not exist targets no device and does not fail."""
    groups = {"lab": Group(name="lab", devices=("pi-1",))}
    result = desired_stacks([stack("orphan", "deleted"), stack("web", "lab")], groups, LABELS)
    assert result == {"pi-1": (StackRef(name="web", spec_hash="a" * 64),)}
    assert desired_stacks([stack("orphan", "deleted")], groups, LABELS) == {}
