"""Fixtures of the fast unit tests: a controller on a real SQLite store, publishing to a recorder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.recording import Clock, RecordingPublisher
from tether.controller.context import Context
from tether.controller.security import ensure_operator_credentials
from tether.controller.service import Controller
from tether.controller.store import Store
from tether.controller.variables import SecretsKey


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def controller(tmp_path: Path, publisher: RecordingPublisher) -> Iterator[Controller]:
    """A leading controller on a fresh SQLite store with a secrets key, its publishes recorded, its clock still."""
    store = Store(tmp_path / "tether.db")
    controller = Controller(store, clock=Clock(), secrets=SecretsKey.load_or_create(tmp_path))
    ensure_operator_credentials(
        store, tmp_path, "mqtt://127.0.0.1:1883", 0.0
    )  # user admin, as tether up makes it
    controller.client = publisher  # type: ignore[assignment]
    controller.leading.set()
    yield controller
    store.close()


@pytest.fixture
def context(controller: Controller) -> Context:
    """What handlers get of that controller: its parts (call a handler directly with it)."""
    return controller.context
