"""Fixtures of the fault suite: the backend, a fleet per test, and the results file.

The backend is ``netns`` where network namespaces work (root, iproute2, nftables), else the
loopback ``proxy``; ``TETHER_FAULTS_BACKEND=proxy`` forces the proxy, and
``TETHER_REQUIRE_NETNS=1`` (CI) turns a missing namespace capability into a failure instead
of a fallback. Each scenario's measurements go to ``bench/results/faults.json`` and to a
table at the end of the run, whatever pytest's capture settings.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.infra import MOSQUITTO_BIN

from .fleet import Fleet, NetnsBackend, ProxyBackend
from .netns import unavailable_reason

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "faults.json"
_results: list[dict[str, Any]] = []


@pytest.fixture(scope="session")
def backend_name() -> str:
    """``netns`` or ``proxy`` (see the module docstring)."""
    forced = os.environ.get("TETHER_FAULTS_BACKEND", "")
    reason = unavailable_reason()
    if reason is not None and os.environ.get("TETHER_REQUIRE_NETNS") == "1":
        pytest.fail(f"TETHER_REQUIRE_NETNS=1 but network namespaces are unavailable: {reason}")
    if forced == "proxy":
        return "proxy"
    if forced == "netns" and reason is not None:
        pytest.skip(f"TETHER_FAULTS_BACKEND=netns but {reason}")
    return "netns" if reason is None else "proxy"


@pytest.fixture(autouse=True)
def _controller_database(monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller runs in the hub namespace: it keeps its state in SQLite, whatever
    TETHER_TEST_DB asks of the rest of the suite (a PostgreSQL on the root namespace's
    loopback is out of its reach)."""
    monkeypatch.delenv("TETHER_DB", raising=False)


@pytest.fixture
def fleet_prerequisites() -> None:
    """Mosquitto is installed (skip without it, fail with TETHER_REQUIRE_MOSQUITTO=1)."""
    if not os.access(MOSQUITTO_BIN, os.X_OK):
        if os.environ.get("TETHER_REQUIRE_MOSQUITTO") == "1":
            pytest.fail(f"TETHER_REQUIRE_MOSQUITTO=1 but {MOSQUITTO_BIN} is missing")
        pytest.skip(f"{MOSQUITTO_BIN} not installed")


@pytest.fixture
def fleet(tmp_path: Path, backend_name: str, fleet_prerequisites: None) -> Iterator[Fleet]:
    """A running broker and controller on a fresh network; agents are started by the test."""
    backend = NetnsBackend(tmp_path) if backend_name == "netns" else ProxyBackend(tmp_path)
    fleet = Fleet(backend, tmp_path)
    try:
        fleet.start()
        yield fleet
    finally:
        try:
            fleet.stop()
        finally:
            backend.close()


@pytest.fixture
def embedded_fleet(tmp_path: Path, backend_name: str) -> Iterator[Fleet]:
    """Like ``fleet``, with the controller's embedded broker instead of Mosquitto."""
    backend = NetnsBackend(tmp_path) if backend_name == "netns" else ProxyBackend(tmp_path)
    fleet = Fleet(backend, tmp_path, embedded=True)
    try:
        fleet.start()
        yield fleet
    finally:
        try:
            fleet.stop()
        finally:
            backend.close()


@pytest.fixture
def record(request: pytest.FixtureRequest, backend_name: str) -> Callable[..., dict[str, Any]]:
    """``record(scenario, converge_s=..., **details)``: print one result and keep it for the JSON file."""

    def add(scenario: str, **details: Any) -> dict[str, Any]:
        entry = {"scenario": scenario, "test": request.node.name, "backend": backend_name, **details}
        _results.append(entry)
        converge = details.get("converge_s")
        print(
            f"[faults] {scenario}: "
            + (f"converged {converge:.1f}s after healing" if converge is not None else "")
            + f" {json.dumps({k: v for k, v in details.items() if k != 'converge_s'})}"
        )
        return entry

    return add


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _results:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"machine": platform.machine(), "kernel": platform.release(), "cpus": os.cpu_count()},
        "scenarios": _results,
    }
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _results:
        return
    tr = terminalreporter
    tr.section("fault scenarios: time to converge after healing")
    for r in _results:
        converge = r.get("converge_s")
        shown = f"{converge:6.1f}s" if converge is not None else "     -"
        events = r.get("events")
        detail = (
            f"events {events['produced']} produced, {len(events['lost'])} lost, "
            f"{events['duplicates_on_wire']} duplicate(s) dropped"
            if events
            else "events not checked"
        )
        if r.get("known_bug"):
            detail += " (known bug: see docs/reliability.md)"
        tr.write_line(f"{r['scenario']:<34} {r['backend']:<6} {shown}  {detail}")
    tr.write_line(f"(written to {RESULTS})")
