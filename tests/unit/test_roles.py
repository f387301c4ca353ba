"""The role table: every command needs a role, reads are for viewers, and execute refuses below it."""

from __future__ import annotations

import pytest
from tether.controller.service import COMMANDS, Controller
from tether.protocol.commands import (
    DevicesCredentials,
    DevicesList,
    GroupsCreate,
    RegistriesAdd,
    StacksDeploy,
    TokensCreate,
)
from tether.protocol.errors import ErrorCode, ForbiddenError
from tether.protocol.principals import ROLES, Principal, role_allows

ADMIN_ONLY = {
    "TokensCreate",
    "TokensRemove",
    "RegistriesAdd",
    "RegistriesRemove",
    "DevicesCredentials",
    "DevicesRevoke",
}
"""Commands that manage credentials, enrollment tokens or registries (users and API tokens join them)."""


def test_every_command_has_a_role_and_reads_are_for_viewers() -> None:
    """Each handler names a known role; every read-only one is a viewer's; the admin set is as documented."""
    for handler in COMMANDS:
        assert handler.role in ROLES, handler.model.__name__
        if handler.read_only:
            assert handler.role == "viewer", handler.model.__name__
    admin = {h.model.__name__ for h in COMMANDS if h.role == "admin"}
    assert admin >= ADMIN_ONLY
    assert {"StacksDeploy", "GroupsCreate", "VarsSet", "JobsRun"} <= {
        h.model.__name__ for h in COMMANDS if h.role == "operator"
    }


def test_roles_are_ordered() -> None:
    """An admin may do what an operator may, an operator what a viewer may, never the reverse."""
    assert role_allows("admin", "operator") and role_allows("operator", "viewer")
    assert not role_allows("viewer", "operator") and not role_allows("operator", "admin")


@pytest.mark.parametrize(
    ("role", "command"),
    [
        ("viewer", GroupsCreate(name="edge", devices=("pi-1",))),
        ("viewer", StacksDeploy(name="web", group="edge", compose="services: {}\n")),
        ("operator", TokensCreate(group="edge")),
        ("operator", DevicesCredentials(device_id="pi-1")),
        ("operator", RegistriesAdd(host="r.example", sealed="x")),
    ],
)
def test_execute_refuses_below_the_commands_role(controller: Controller, role: str, command: object) -> None:
    """A principal below the command's role gets FORBIDDEN and nothing is stored."""
    who = Principal(user="ann", role=role, via="mqtt")  # type: ignore[arg-type]
    with pytest.raises(ForbiddenError) as refused:
        controller.execute(command, who)  # type: ignore[arg-type]
    assert refused.value.code == ErrorCode.FORBIDDEN
    assert "ann" in str(refused.value)
    assert controller.store.get_group("edge") is None
    assert controller.store.list_tokens() == []
    assert controller.execute(DevicesList(), who).devices == []
