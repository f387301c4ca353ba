"""Credential commands on a real SQLite store: issuing, revoking and forgetting devices."""

from __future__ import annotations

import pytest
from support.fleet import online
from support.recording import RecordingPublisher
from tether.controller.security import OPERATOR_USER
from tether.controller.service import Controller
from tether.protocol import codec, topics
from tether.protocol.commands import DevicesCredentials, DevicesRemove, DevicesRevoke, GroupsCreate
from tether.protocol.credentials import Credential, CredentialTable, hash_password
from tether.protocol.errors import CommandError, ConflictError, ErrorCode, NotFoundError
from tether.protocol.models import Presence
from tether.protocol.topics import DeviceTopic


@pytest.fixture
def table(controller: Controller) -> CredentialTable:
    """The broker's credential table, kept in sync by the controller; live connections counted."""
    controller.context.access.table = CredentialTable()
    return controller.context.access.table


def test_credentials_are_shown_once_and_rotate(controller: Controller, table: CredentialTable) -> None:
    """devices.credentials gives a password the broker accepts; asking again replaces it."""
    first = controller.execute(DevicesCredentials(device_id="pi-1"))
    assert (first.device_id, first.username) == ("pi-1", "pi-1") and first.certificate is None
    assert set(first.model_dump()) == {"device_id", "username", "password"}
    assert first.password and table.authenticate("pi-1", first.password, "tether-pi-1") is not None
    second = controller.execute(DevicesCredentials(device_id="pi-1"))
    assert second.password and second.password != first.password
    assert table.authenticate("pi-1", first.password, "tether-pi-1") is None
    assert table.authenticate("pi-1", second.password, "tether-pi-1") is not None


def test_credential_refusals_carry_a_code(controller: Controller) -> None:
    """A reserved id is invalid, another user's name or a certificate without a CA a conflict; nothing is stored."""
    controller.store.put_credential(
        Credential(OPERATOR_USER, "operator", OPERATOR_USER, hash_password("x")), 0.0
    )
    with pytest.raises(CommandError, match="reserved") as reserved:
        controller.execute(DevicesCredentials(device_id="cli-1"))
    assert reserved.value.code == ErrorCode.INVALID
    with pytest.raises(ConflictError, match="'admin' is the name of a operator user"):
        controller.execute(DevicesCredentials(device_id=OPERATOR_USER))
    with pytest.raises(ConflictError, match="does not sign client certificates"):
        controller.execute(DevicesCredentials(device_id="pi-2", certificate=True))
    assert [c.username for c in controller.store.list_credentials()] == [OPERATOR_USER]


def test_a_certificate_is_signed_by_what_tether_up_plugs_in(
    controller: Controller, table: CredentialTable
) -> None:
    """With a signer, devices.credentials --certificate returns its PEMs and admits the device by certificate."""
    controller.context.access.issue_certificate = lambda name: (f"CERT {name}", f"KEY {name}", "CA")
    result = controller.execute(DevicesCredentials(device_id="pi-3", certificate=True))
    assert result.model_dump() == {
        "device_id": "pi-3",
        "username": "pi-3",
        "certificate": "CERT pi-3",
        "key": "KEY pi-3",
        "ca": "CA",
    }
    assert table.authenticate_certificate("pi-3", "tether-pi-3") is not None


def test_revoking_closes_connections_says_offline_and_leaves_static_groups(
    controller: Controller, publisher: RecordingPublisher, table: CredentialTable
) -> None:
    """devices.revoke refuses unknown ids (all named, nothing changed); a revoked device is locked out."""
    password = controller.execute(DevicesCredentials(device_id="pi-1")).password
    assert password is not None
    online(controller, "pi-1")
    controller.execute(GroupsCreate(name="edge", devices=("pi-1", "pi-2")))
    closed: list[set[str]] = []
    controller.context.access.disconnect_users = lambda users: closed.append(users) or len(users)
    with pytest.raises(NotFoundError) as unknown:
        controller.execute(DevicesRevoke(device_ids=("pi-1", "pi-8", "pi-9")))
    assert "'pi-8'" in str(unknown.value) and "'pi-9'" in str(unknown.value)
    assert closed == [] and table.authenticate("pi-1", password, "tether-pi-1") is not None
    result = controller.execute(DevicesRevoke(device_ids=("pi-1",)))
    assert (result.revoked, result.closed) == (["pi-1"], 1) and closed == [{"pi-1"}]
    assert table.authenticate("pi-1", password, "tether-pi-1") is None
    presence_topic = topics.device("pi-1", DeviceTopic.PRESENCE)
    said = [codec.decode(p, Presence) for t, p, r in publisher.published if t == presence_topic and r]
    assert said and said[-1].status == "offline"
    group = controller.store.get_group("edge")
    assert group is not None and group.devices == ("pi-2",)


def test_removing_a_device_forgets_it_and_clears_its_retained_messages(
    controller: Controller, publisher: RecordingPublisher, table: CredentialTable
) -> None:
    """devices.rm deletes the credentials and the device, its usage samples and history, and publishes
    empty retained messages on its topics."""
    from tether.protocol.device_api import MetricsSample

    controller.execute(DevicesCredentials(device_id="pi-1"))
    online(controller, "pi-1")
    controller.handle(
        topics.device("pi-1", DeviceTopic.METRICS), codec.encode(MetricsSample(at=1.0, cpu=5.0))
    )
    assert "pi-1" in controller.context.device_metrics and "pi-1" in controller.context.device_history.rings
    result = controller.execute(DevicesRemove(device_ids=("pi-1",)))
    assert (
        "pi-1" not in controller.context.device_metrics
        and "pi-1" not in controller.context.device_history.rings
    )
    assert (result.removed, result.cleared) == (["pi-1"], True)
    assert controller.store.get_device("pi-1") is None and controller.store.get_credential("pi-1") is None
    assert table.get("pi-1") is None
    cleared = {t for t, p, r in publisher.published if p == b"" and r}
    assert {
        topics.device("pi-1", DeviceTopic.DESIRED),
        topics.device("pi-1", DeviceTopic.PRESENCE),
        topics.device("pi-1", DeviceTopic.REPORTED),
        topics.enroll_response("pi-1"),
    } <= cleared


def test_devices_with_the_same_stacks_share_one_set_in_the_access_table() -> None:
    """The stacks each device may fetch are kept as one set per distinct set of hashes (most of
    a fleet runs the same stacks), however they were given; a device's own change is its own."""
    table = CredentialTable()
    table.set_stacks({"a": {"h1"}, "b": frozenset({"h1"})})
    table.set_stacks({"c": ["h1"], "d": {"h1", "h2"}})
    assert table.stacks_of("a") == table.stacks_of("c") == frozenset({"h1"})
    assert table.stacks_of("a") is table.stacks_of("b") is table.stacks_of("c")
    assert table.stacks_of("d") == frozenset({"h1", "h2"})
    table.set_stacks({"a": {"h2"}})
    assert (table.stacks_of("a"), table.stacks_of("b")) == (frozenset({"h2"}), frozenset({"h1"}))
