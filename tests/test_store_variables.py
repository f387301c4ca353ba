"""Variables in the controller's store, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tether.controller.models import Variable
from tether.controller.store import Store

pytestmark = pytest.mark.store


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    target = (
        str(request.getfixturevalue("postgres_url")) if request.param == "postgresql" else tmp_path / "t.db"
    )
    s = Store(target)
    yield s
    s.close()


def test_variables_by_scope_and_path(store: Store) -> None:
    fleet = Variable(scope="fleet", path="db", items={"user": "app"}, keys=("user",))
    group = Variable(scope="group:edge", path="db", secret=True, sealed="c2VhbGVk", keys=("password",))
    store.put_variable(fleet)
    store.put_variable(group)
    assert store.get_variable("fleet", "db") == fleet
    assert store.get_variable("group:edge", "db") == group
    assert store.get_variable("device:x", "db") is None
    store.put_variable(fleet.model_copy(update={"version": 2}))
    assert store.get_variable("fleet", "db").version == 2  # type: ignore[union-attr]
    store.delete_variable("fleet", "db")
    assert store.list_variables() == [group]


def test_forgetting_a_device_removes_its_variables_only(store: Store) -> None:
    """``_`` in a device id is not a wildcard: forgetting a_b leaves aXb's variables."""
    mine = Variable(scope="device:aXb", path="site", items={"k": "1"}, keys=("k",))
    other = Variable(scope="device:a_b", path="site", items={"k": "2"}, keys=("k",))
    fleet = Variable(scope="fleet", path="site", items={"k": "3"}, keys=("k",))
    for v in (mine, other, fleet):
        store.put_variable(v)
    store.forget_device("a_b")
    assert sorted(v.scope for v in store.list_variables()) == ["device:aXb", "fleet"]
    store.forget_device("aXb")
    assert [v.scope for v in store.list_variables()] == ["fleet"]
