"""The topic ACL (pure): no device can read or steer another, or act as the controller."""

from __future__ import annotations

import pytest
from tether.protocol import names
from tether.protocol.acl import (
    Identity,
    client_id_allowed,
    covers,
    may_publish,
    may_subscribe,
)

R = "tether/v1"
A = Identity("device", "dev-a")
OP = Identity("operator", "admin", client_id="tether-cli-1")
CTL = Identity("controller", "controller")
ENR = Identity("enrolling", "new-1")
HASH = "a" * 64


@pytest.mark.parametrize(
    ("pattern", "flt", "expected"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/+/c", True),
        ("a/b/c", "a/+/c", False),
        ("a/#", "a/b/#", True),
        ("a/+/c", "a/#", False),
        ("a/+", "a/b/c", False),
        ("a/+/c", "a/b", False),
    ],
)
def test_covers(pattern: str, flt: str, expected: bool) -> None:
    """A pattern covers a filter only when every topic the filter matches is matched."""
    assert covers(pattern, flt) is expected


def test_device_reads_only_its_own_topics_and_assigned_stacks() -> None:
    """A device subscribes to its own desired/presence/requests and its assigned stacks, exactly."""
    assert may_subscribe(A, f"{R}/devices/dev-a/desired")
    assert may_subscribe(A, f"{R}/devices/dev-a/requests")
    assert may_subscribe(A, f"{R}/stacks/{HASH}", {HASH})
    assert not may_subscribe(A, f"{R}/stacks/{HASH}", set())
    assert not may_subscribe(A, f"{R}/devices/dev-b/desired")
    assert not may_subscribe(A, f"{R}/devices/+/desired")
    assert not may_subscribe(A, f"{R}/#")
    assert not may_subscribe(A, "#")


def test_device_writes_only_as_itself() -> None:
    """A device publishes its own presence/reported/events/metrics and replies; nothing else."""
    for kind in ("presence", "reported", "events", "metrics"):
        assert may_publish(A, f"{R}/devices/dev-a/{kind}")
        assert not may_publish(A, f"{R}/devices/dev-b/{kind}")
    assert may_publish(A, f"{R}/clients/tether-cli-1/replies")
    assert not may_publish(A, f"{R}/devices/dev-a/desired")
    assert not may_publish(A, f"{R}/stacks/{HASH}")
    assert not may_publish(A, f"{R}/controller/requests")
    assert not may_publish(A, f"{R}/devices/dev-a/+")


def test_each_user_sends_controller_requests_on_its_own_topic_only() -> None:
    """The broker, not the payload, says who asks: a user publishes requests on its own topic; a
    viewer reaches no device; only admin keeps the shared topic of older CLIs."""
    bob = Identity("operator", "bob", client_id="tether-cli-2")
    ann = Identity("viewer", "ann", client_id="tether-cli-3")
    assert may_publish(bob, f"{R}/controller/requests/bob") and may_publish(
        ann, f"{R}/controller/requests/ann"
    )
    for who in (bob, ann):
        assert not may_publish(who, f"{R}/controller/requests/admin")
        assert not may_publish(who, f"{R}/controller/requests")
        assert not may_publish(who, f"{R}/controller/leader/{who.name}")
    assert may_publish(OP, f"{R}/controller/requests/admin")
    assert may_publish(bob, f"{R}/devices/dev-a/requests") and not may_publish(
        ann, f"{R}/devices/dev-a/requests"
    )
    assert may_subscribe(ann, f"{R}/clients/tether-cli-3/replies") and may_subscribe(
        ann, f"{R}/devices/+/events"
    )
    assert not may_subscribe(ann, f"{R}/clients/tether-cli-2/replies")
    assert client_id_allowed(ann) and not client_id_allowed(
        Identity("viewer", "ann", client_id="tether-dev-a")
    )


def test_operator_rights() -> None:
    """Operators send requests and watch devices; they cannot write device state."""
    assert may_publish(OP, f"{R}/controller/requests")
    assert may_publish(OP, f"{R}/devices/dev-a/requests")
    assert not may_publish(OP, f"{R}/devices/dev-a/desired")
    assert may_subscribe(OP, f"{R}/clients/tether-cli-1/replies")
    assert not may_subscribe(OP, f"{R}/clients/tether-cli-2/replies")
    assert may_subscribe(OP, f"{R}/devices/+/presence")
    assert not may_subscribe(OP, f"{R}/devices/+/desired")
    assert not may_subscribe(OP, f"{R}/devices/#")


def test_enrolling_and_controller() -> None:
    """An enrolling device only talks on its enrollment topics; the controller may do anything."""
    assert may_publish(ENR, f"{R}/enroll/new-1/request")
    assert not may_publish(ENR, f"{R}/enroll/new-2/request")
    assert may_subscribe(ENR, f"{R}/enroll/new-1/response")
    assert not may_subscribe(ENR, f"{R}/devices/new-1/desired")
    assert may_subscribe(CTL, f"{R}/devices/+/presence")
    assert may_subscribe(CTL, f"$share/tether-controllers/{R}/controller/requests")
    assert may_publish(CTL, f"{R}/devices/dev-a/desired")
    assert not may_subscribe(CTL, "$SYS/#")


@pytest.mark.parametrize("client_id", ["+", "#", "a/b", "x+", "cli\n", "cli\x1b[2K", "cli\u200b"])
def test_client_id_is_one_topic_level(client_id: str) -> None:
    """A client id with a wildcard, '/' or a non-printable character is never allowed, and never
    lets an operator subscribe to replies beyond its own (client id '+' read everyone's)."""
    assert names.CLIENT_ID.problem(client_id) is not None
    op = Identity("operator", "admin", client_id)
    assert not client_id_allowed(op)
    assert not may_subscribe(op, f"{R}/clients/{client_id}/replies")
    assert not may_subscribe(op, f"{R}/clients/+/replies")
    assert client_id_allowed(Identity("operator", "admin", "tether-cli-1"))
    assert may_subscribe(Identity("operator", "admin", "dashboard-1"), f"{R}/clients/dashboard-1/replies")
