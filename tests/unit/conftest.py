"""Fixtures of the fast unit tests: a real SQLite store, publishes recorded, a clock moved by hand;
the handlers' parts on it (``context``, no controller), or a whole leading controller."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.recording import Clock, RecordingPublisher
from tether.controller.context import Context
from tether.controller.parts import build_context
from tether.controller.security import ensure_operator_credentials
from tether.controller.service import Controller
from tether.controller.store import Store
from tether.controller.variables import SecretsKey


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh SQLite store with user admin, as tether up makes it."""
    store = Store(tmp_path / "tether.db")
    ensure_operator_credentials(store, tmp_path, "mqtt://127.0.0.1:1883", 0.0)
    yield store
    store.close()


@pytest.fixture
def context(store: Store, tmp_path: Path, publisher: RecordingPublisher) -> Context:
    """What handlers get, wired as a leading controller's (controller/parts.py) but without one:
    call a handler directly with it. A secrets key, publishes recorded, the clock still."""
    leading = threading.Event()
    leading.set()
    return build_context(
        store,
        clock=Clock(),
        client=lambda: publisher,  # type: ignore[arg-type,return-value]
        leading=leading,
        secrets=SecretsKey.load_or_create(tmp_path),
    )


@pytest.fixture
def controller(store: Store, tmp_path: Path, publisher: RecordingPublisher) -> Controller:
    """A leading controller on that store with a secrets key, its publishes recorded, its clock
    still (its own parts: ``controller.context``, not the ``context`` fixture)."""
    controller = Controller(store, clock=Clock(), secrets=SecretsKey.load_or_create(tmp_path))
    controller.client = publisher  # type: ignore[assignment]
    controller.leading.set()
    return controller
