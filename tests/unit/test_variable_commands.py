"""Variable and registry commands on a real SQLite store: scopes, secrets sealed end to end, refusals."""

from __future__ import annotations

import json
import re

import pytest
from support.fleet import desired, online
from support.recording import RecordingPublisher
from tether.controller.service import Controller
from tether.controller.store import Store
from tether.protocol.commands import (
    GroupsCreate,
    RegistriesAdd,
    RegistriesList,
    RegistriesRemove,
    StacksDeploy,
    VarsGet,
    VarsKey,
    VarsList,
    VarsRemove,
    VarsSet,
)
from tether.protocol.enrollment import new_private_key, open_text, public_key_b64, seal_text
from tether.protocol.errors import StoreError

USES_DB = "services:\n  web:\n    image: busybox:1.36\n    environment:\n      DB: ${var:app/db/host}\n"
PRIVATE = "services:\n  web:\n    image: registry.example.com/web:1\n"


@pytest.fixture
def edge(controller: Controller) -> Controller:
    """The controller with group ``edge`` of one online device, ``pi-1``, whose key is ``controller.device_key``."""
    key = new_private_key()
    online(controller, "pi-1", public_key=public_key_b64(key))
    controller.execute(GroupsCreate(name="edge", devices=("pi-1",)))
    controller.device_key = key  # type: ignore[attr-defined]
    return controller


def test_a_device_gets_its_own_value_before_its_groups_and_the_fleets(
    edge: Controller, publisher: RecordingPublisher
) -> None:
    """A reference resolves to the device's variable, else the group's, else the fleet's; each change republishes."""
    edge.execute(VarsSet(path="app/db", items={"host": "fleet.db"}))
    edge.execute(StacksDeploy(name="web", group="edge", compose=USES_DB))

    def bound() -> str | None:
        state = desired(publisher, "pi-1")
        assert state is not None
        (binding,) = state.vars
        return binding.value

    assert bound() == "fleet.db"
    edge.execute(VarsSet(path="app/db", items={"host": "group.db"}, group="edge"))
    assert bound() == "group.db"
    edge.execute(VarsSet(path="app/db", items={"host": "own.db"}, device_id="pi-1"))
    assert bound() == "own.db"
    edge.execute(VarsRemove(path="app/db", device_id="pi-1"))
    assert bound() == "group.db"
    scopes = [(v.path, v.scope) for v in edge.execute(VarsList()).variables]
    assert scopes == [("app/db", "fleet"), ("app/db", "group:edge")]


def test_a_secret_is_stored_sealed_and_reaches_the_device_sealed_to_its_key(
    edge: Controller, publisher: RecordingPublisher
) -> None:
    """vars.set --secret: the store holds ciphertext only, replies never show values, the device opens its own copy."""
    public_key = edge.execute(VarsKey()).public_key
    sealed = seal_text(public_key, json.dumps({"host": "s3cret.db"}))
    result = edge.execute(VarsSet(path="app/db", secret=True, sealed=sealed))
    assert result.changed and "items" not in result.variable
    stored = edge.store.get_variable("fleet", "app/db")
    assert stored is not None and stored.items == {} and "s3cret" not in (stored.sealed or "")
    assert "items" not in edge.execute(VarsGet(path="app/db")).variable
    edge.execute(StacksDeploy(name="web", group="edge", compose=USES_DB))
    state = desired(publisher, "pi-1")
    assert state is not None
    (binding,) = state.vars
    assert binding.value is None and binding.sealed is not None
    assert open_text(edge.device_key, binding.sealed, "test") == "s3cret.db"  # type: ignore[attr-defined]


def test_a_value_in_use_cannot_be_removed_and_a_deploy_needs_every_value(edge: Controller) -> None:
    """A deploy whose reference has no value is refused; so is removing the value a running stack uses."""
    with pytest.raises(StoreError, match="app/db/host"):
        edge.execute(StacksDeploy(name="web", group="edge", compose=USES_DB))
    assert edge.store.get_stack("web") is None
    edge.execute(VarsSet(path="app/db", items={"host": "db.local"}))
    edge.execute(StacksDeploy(name="web", group="edge", compose=USES_DB))
    with pytest.raises(StoreError, match="stack 'web' uses"):
        edge.execute(VarsRemove(path="app/db"))
    assert edge.execute(VarsGet(path="app/db")).variable.items == {"host": "db.local"}


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (VarsSet(path="bad path", items={"k": "v"}), "invalid variable path 'bad path'"),
        (VarsSet(path="app", items={}), "give at least one KEY=VALUE"),
        (VarsSet(path="app", items={"bad key": "v"}), "invalid key 'bad key'"),
        (VarsSet(path="app", items={"k": "v"}, group="nope"), "unknown group 'nope'"),
        (VarsSet(path="app", secret=True, items={"k": "v"}), "must be sealed"),
        (VarsSet(path="app", sealed="x"), "only for a secret"),
        (VarsSet(path="app", secret=True, sealed="not a sealed box"), "sealed"),
        (VarsGet(path="app"), re.escape("no variable app (fleet)")),
        (VarsRemove(path="app"), re.escape("no variable app (fleet)")),
    ],
)
def test_bad_variable_commands_are_refused_and_store_nothing(
    edge: Controller, command: VarsSet | VarsGet | VarsRemove, error: str
) -> None:
    """Each bad vars command is one error naming the problem; no variable is stored."""
    with pytest.raises(StoreError, match=error):
        edge.execute(command)
    assert edge.store.list_variables() == []


def test_without_a_secrets_key_secrets_and_registries_are_refused(tmp_path: object) -> None:
    """A controller without a secrets key refuses vars.key, secrets and registry credentials, by name."""
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    store = Store(tmp_path / "plain.db")
    controller = Controller(store)
    controller.leading.set()
    for command in (
        VarsKey(),
        VarsSet(path="app", secret=True, sealed="x"),
        RegistriesAdd(host="registry.example.com", sealed="x"),
    ):
        with pytest.raises(StoreError, match="no secrets key"):
            controller.execute(command)
    store.close()


def registry_sealed(controller: Controller, username: str = "ci", password: str = "pw") -> str:
    public_key = controller.execute(VarsKey()).public_key
    return seal_text(public_key, json.dumps({"username": username, "password": password}))


def test_registry_credentials_reach_only_devices_whose_images_use_the_host(
    edge: Controller, publisher: RecordingPublisher
) -> None:
    """registries.add: a device running an image from the host gets the credentials sealed to its key; rm takes them away."""
    result = edge.execute(RegistriesAdd(host="Registry.Example.com", sealed=registry_sealed(edge)))
    assert result.registry.host == "registry.example.com" and result.changed
    again = edge.execute(RegistriesAdd(host="registry.example.com", sealed=registry_sealed(edge)))
    assert not again.changed
    edge.execute(StacksDeploy(name="busy", group="edge", compose=USES_DB.replace("${var:app/db/host}", "x")))
    state = desired(publisher, "pi-1")
    assert state is not None and state.registries == ()
    edge.execute(StacksDeploy(name="web", group="edge", compose=PRIVATE))
    state = desired(publisher, "pi-1")
    assert state is not None
    (auth,) = state.registries
    assert auth.host == "registry.example.com" and auth.sealed is not None
    opened = json.loads(open_text(edge.device_key, auth.sealed, "test"))  # type: ignore[attr-defined]
    assert opened == {"username": "ci", "password": "pw"}
    assert [r.host for r in edge.execute(RegistriesList()).registries] == ["registry.example.com"]
    assert "sealed" not in edge.execute(RegistriesList()).registries[0]
    edge.execute(RegistriesRemove(host="registry.example.com"))
    state = desired(publisher, "pi-1")
    assert state is not None and state.registries == ()


def test_bad_registry_credentials_are_refused_together(edge: Controller) -> None:
    """Every problem with the sealed credentials is named in one error; nothing is stored."""
    with pytest.raises(StoreError) as refused:
        edge.execute(RegistriesAdd(host="registry.example.com", sealed=registry_sealed(edge, "a:b", "")))
    assert "the password is empty" in str(refused.value) and "must not contain ':'" in str(refused.value)
    with pytest.raises(StoreError, match="no registry registry.example.com"):
        edge.execute(RegistriesRemove(host="registry.example.com"))
    assert edge.store.list_registries() == []
