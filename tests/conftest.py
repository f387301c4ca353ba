"""Shared fixtures: a Docker engine, the local busybox image, a private mosquitto broker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.infra import MOSQUITTO_BIN, Mosquitto, docker_client, ensure_busybox_image


def _required(var: str) -> bool:
    return os.environ.get(var) == "1"


@pytest.fixture(scope="session")
def docker_engine() -> Any:
    client = docker_client()
    if client is None:
        if _required("TETHER_REQUIRE_DOCKER"):
            pytest.fail("TETHER_REQUIRE_DOCKER=1 but no Docker engine answers ping() (is dockerd running?)")
        pytest.skip("no Docker engine reachable (set TETHER_REQUIRE_DOCKER=1 to fail instead)")
    return client


@pytest.fixture(scope="session")
def busybox_image(docker_engine: Any) -> str:
    return ensure_busybox_image(docker_engine)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    if not os.access(MOSQUITTO_BIN, os.X_OK):
        if _required("TETHER_REQUIRE_MOSQUITTO"):
            pytest.fail(f"TETHER_REQUIRE_MOSQUITTO=1 but {MOSQUITTO_BIN} is missing")
        pytest.skip(f"{MOSQUITTO_BIN} not installed (set TETHER_REQUIRE_MOSQUITTO=1 to fail instead)")
    with Mosquitto(tmp_path) as broker:
        yield broker


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A private PostgreSQL cluster for the session (skipped where none is installed)."""
    from support.infra import Postgres, _pg_bin

    if _pg_bin("initdb") is None:
        if _required("TETHER_REQUIRE_POSTGRES"):
            pytest.fail("TETHER_REQUIRE_POSTGRES=1 but PostgreSQL is not installed")
        pytest.skip("PostgreSQL not installed (set TETHER_REQUIRE_POSTGRES=1 to fail instead)")
    with Postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: Any) -> str:
    """A fresh, empty database for one test."""
    import uuid

    return str(postgres_server.create_database(f"t_{uuid.uuid4().hex[:12]}"))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store's target, once per backend: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return str(tmp_path / "tether.db")


def pytest_configure(config: pytest.Config) -> None:
    """Processes that module- and session-scoped fixtures start get a CLI configuration of the
    session's too (the fixture below gives each test its own): never the user's."""
    import tempfile

    os.environ["TETHER_CLI_CONFIG"] = str(Path(tempfile.mkdtemp(prefix="tether-cli-config-")) / "config.json")


@pytest.fixture(autouse=True)
def _cli_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test has a CLI configuration of its own (the contexts `tether up` writes): never the
    user's, never another test's."""
    monkeypatch.setenv("TETHER_CLI_CONFIG", str(tmp_path / "tether-cli-config.json"))
    monkeypatch.delenv("TETHER_CONTEXT", raising=False)


@pytest.fixture(autouse=True)
def _controller_database(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """With TETHER_TEST_DB=postgres, every controller a test starts uses a fresh PostgreSQL database."""
    if os.environ.get("TETHER_TEST_DB") == "postgres":
        monkeypatch.setenv("TETHER_DB", request.getfixturevalue("postgres_url"))


_UNIT = Path(__file__).parent / "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/unit/ are marked ``unit``: fast, in-process, no broker nor process started."""
    for item in items:
        if item.path.is_relative_to(_UNIT):
            item.add_marker(pytest.mark.unit)
