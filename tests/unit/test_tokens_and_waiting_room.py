"""Enrollment commands on a real SQLite store: tokens, requests from enrolling devices, the waiting room."""

from __future__ import annotations

import pytest
from support.fleet import online
from support.recording import RecordingPublisher
from tether.agent.enroll import build_request, open_response
from tether.controller.service import Controller
from tether.protocol import topics
from tether.protocol.commands import (
    DevicesApprove,
    DevicesPending,
    DevicesReject,
    GroupsCreate,
    TokensCreate,
    TokensList,
    TokensRemove,
)
from tether.protocol.credentials import CredentialTable
from tether.protocol.enrollment import DeviceKey
from tether.protocol.errors import CommandError, ConflictError, ErrorCode, NotFoundError
from tether.protocol.models import DeviceFacts

FACTS = DeviceFacts(agent_version="1", driver="process", arch="armv7l", os="linux", hostname="cam-7")


@pytest.fixture
def table(controller: Controller) -> CredentialTable:
    """The broker's credential table, kept in sync by the controller."""
    controller.context.access.table = CredentialTable()
    return controller.context.access.table


def ask(controller: Controller, device_id: str, token: str, key: DeviceKey | None = None) -> DeviceKey:
    """``device_id`` publishes its enrollment request with ``token``; returns its key pair."""
    key = key or DeviceKey.generate()
    controller.handle(topics.enroll_request(device_id), build_request(device_id, token, key, FACTS))
    return key


def answers(publisher: RecordingPublisher, device_id: str) -> list[tuple[bytes, bool]]:
    topic = topics.enroll_response(device_id)
    return [(p, r) for t, p, r in publisher.published if t == topic]


def test_a_token_is_shown_once_and_the_broker_admits_it(
    controller: Controller, table: CredentialTable
) -> None:
    """tokens.create returns the secret once; tokens.ls shows it without; the broker's table knows its grant."""
    controller.execute(GroupsCreate(name="cams", devices=("pi-1",)))
    created = controller.execute(TokensCreate(group="cams", labels={"site": "a"}, uses=2))
    assert created.token.startswith("tet_") and created.used == 0 and created.uses == 2
    listed = controller.execute(TokensList()).tokens
    assert [t.id for t in listed] == [created.id]
    assert "token" not in listed[0].model_dump()
    grant = table.token_grant(created.token)
    assert grant is not None and grant.id == created.id


def test_token_refusals_name_every_problem_and_change_nothing(controller: Controller) -> None:
    """An unknown group, and unknown token ids (all of them), are refused with a code; nothing is removed."""
    with pytest.raises(NotFoundError, match="unknown group 'nope'"):
        controller.execute(TokensCreate(group="nope"))
    kept = controller.execute(TokensCreate())
    with pytest.raises(NotFoundError) as refused:
        controller.execute(TokensRemove(ids=(kept.id, "0000aaaa", "0000bbbb")))
    assert "'0000aaaa'" in str(refused.value) and "'0000bbbb'" in str(refused.value)
    assert refused.value.code == ErrorCode.NOT_FOUND
    assert [t.id for t in controller.execute(TokensList()).tokens] == [kept.id]
    assert controller.execute(TokensRemove(ids=(kept.id,))).removed == [kept.id]


def test_an_approved_device_gets_sealed_credentials_labels_and_group(
    controller: Controller, publisher: RecordingPublisher, table: CredentialTable
) -> None:
    """A request waits in the room; approval pins the labels, joins the token's group and publishes
    credentials only the device can open, which the broker accepts."""
    controller.execute(GroupsCreate(name="cams", devices=("pi-1",)))
    token = controller.execute(TokensCreate(group="cams", labels={"site": "a"})).token
    key = ask(controller, "cam-7", token)
    pending = controller.execute(DevicesPending()).devices
    assert [(p.id, p.state, p.hostname, p.labels.get("site")) for p in pending] == [
        ("cam-7", "pending", "cam-7", "a")
    ]
    assert answers(publisher, "cam-7") == []
    assert controller.execute(DevicesApprove(device_ids=("cam-7",), labels={"role": "cam"})).approved == [
        "cam-7"
    ]
    [(payload, retained)] = answers(publisher, "cam-7")
    grant = open_response(payload, key, "cam-7")
    assert retained and grant.status == "approved" and grant.password
    assert table.authenticate("cam-7", grant.password, "tether-cam-7") is not None
    device = controller.store.get_device("cam-7")
    assert device is not None and device.pinned_labels == {"site": "a", "role": "cam"}
    group = controller.store.get_group("cams")
    assert group is not None and group.devices == ("cam-7", "pi-1")
    assert controller.execute(DevicesPending()).devices == []
    with pytest.raises(ConflictError, match="'cam-7' is already approved"):
        controller.execute(DevicesApprove(device_ids=("cam-7",)))


def test_the_retained_answer_is_cleared_once_the_device_is_online(
    controller: Controller, publisher: RecordingPublisher
) -> None:
    """An auto-approved device's answer is retained until it comes online with its credentials."""
    token = controller.execute(TokensCreate(auto_approve=True)).token
    ask(controller, "cam-8", token)
    assert [r for _, r in answers(publisher, "cam-8")] == [True]
    online(controller, "cam-8")
    assert answers(publisher, "cam-8")[-1] == (b"", True)
    entry = controller.store.get_enrollment("cam-8")
    assert entry is not None and entry.cleared and entry.sealed is None


def test_bad_requests_change_nothing_and_say_why(
    controller: Controller, publisher: RecordingPublisher, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong token or a reserved id: no entry, no answer, the reason logged."""
    ask(controller, "cam-9", "tet_00000000_wrong")
    ask(controller, "cli-9", controller.execute(TokensCreate()).token)
    assert controller.store.list_enrollments() == []
    assert answers(publisher, "cam-9") == [] and answers(publisher, "cli-9") == []
    assert "enrollment of cam-9 refused: unknown or removed enrollment token" in caplog.text
    assert "enrollment of cli-9 refused: device id 'cli-9' is reserved" in caplog.text


def test_reject_and_approve_refusals(controller: Controller, publisher: RecordingPublisher) -> None:
    """Rejecting publishes a sealed refusal; approving nothing, both ids and --all, or unknown ids is refused."""
    token = controller.execute(TokensCreate()).token
    key = ask(controller, "cam-1", token)
    assert controller.execute(DevicesReject(device_ids=("cam-1",))).rejected == ["cam-1"]
    [(payload, _)] = answers(publisher, "cam-1")
    assert open_response(payload, key, "cam-1").status == "rejected"
    with pytest.raises(ConflictError, match="'cam-1' is not pending"):
        controller.execute(DevicesReject(device_ids=("cam-1",)))
    with pytest.raises(CommandError, match="not both"):
        controller.execute(DevicesApprove(device_ids=("cam-1",), all=True))
    with pytest.raises(CommandError, match="--select goes with --all"):
        controller.execute(DevicesApprove(device_ids=("cam-1",), selector="arch=armv7l"))
    with pytest.raises(
        NotFoundError, match="'x1' is not in the waiting room; 'x2' is not in the waiting room"
    ):
        controller.execute(DevicesApprove(device_ids=("x1", "x2")))
    assert controller.execute(DevicesApprove(all=True)).approved == []
