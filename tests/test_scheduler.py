"""Scheduling: group membership and the stacks each device should run."""

from __future__ import annotations

import pytest
from tether.controller.models import Group, Stack
from tether.controller.scheduler import desired_jobs, desired_stacks, members
from tether.controller.selectors import Attributes
from tether.protocol.errors import CommandError
from tether.protocol.models import ServiceSpec, StackRef, StackSpec

SPEC = StackSpec(services=(ServiceSpec(name="web", image="web:1"),))
TRUSTED = {
    "pi-1": {"site": "berlin", "arch": "arm64"},
    "pi-2": {"site": "berlin", "arch": "amd64"},
    "pi-3": {"site": "paris"},
    "pi-4": {},
}
LABELS = {d: Attributes(trusted=labels) for d, labels in TRUSTED.items()}


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
    labels = dict(LABELS)
    assert members(group, labels) == ["pi-1", "pi-2"]
    labels["pi-3"] = Attributes(trusted={"site": "berlin"})
    labels["pi-1"] = Attributes(trusted={"site": "paris", "arch": "arm64"})
    assert members(group, labels) == ["pi-2", "pi-3"]
    assert sorted(desired_stacks(stacks, {"berlin": group}, labels)) == ["pi-2", "pi-3"]


def test_invalid_selector_in_a_stored_group_raises() -> None:
    """A group whose selector does not parse raises CommandError (the refusal of a bad selector) rather than matching nothing."""
    with pytest.raises(CommandError):
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


def test_a_selector_matches_only_trusted_labels_unless_the_group_trusts_devices() -> None:
    """A label or fact a device reports about itself puts it in no group (nor its stacks or
    jobs) unless the group trusts device labels; a trusted label wins over a reported one."""
    labels = {
        "honest": Attributes(trusted={"pool": "pB"}),
        "liar": Attributes(reported={"pool": "pB", "arch": "arm64"}),
        "overridden": Attributes(trusted={"pool": "pA"}, reported={"pool": "pB"}),
    }
    strict = Group(name="pb", selector="pool=pB")
    trusting = strict.model_copy(update={"trust_device_labels": True})
    assert members(strict, labels) == ["honest"]
    assert members(trusting, labels) == ["honest", "liar"]
    assert members(Group(name="arm", selector="arch=arm64"), labels) == []
    assert members(Group(name="none", selector="!pool"), labels) == ["liar"]  # absent from its trusted labels
    assert sorted(desired_stacks([stack("secret-app", "pb")], {"pb": strict}, labels)) == ["honest"]
    from tether.controller.models import Job
    from tether.protocol.models import JobSpec

    job = Job(name="j", group="pb", spec=JobSpec(name="j", command=("true",), run_id="r1"))
    assert sorted(desired_jobs([job], {"pb": strict}, labels)) == ["honest"]
    assert dict(labels["overridden"]) == {"pool": "pA"}
