"""Credentials end to end: `tether up` refuses anonymous clients; devices and the CLI log in.

Real processes: `tether up` (embedded broker, no --allow-anonymous), `tether-agent` and
the CLI, which reads the operator credentials `tether up` wrote (TETHER_CREDENTIALS).
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from support.infra import wait_until
from support.procs import (
    BROKERS,
    AgentProcess,
    ControllerProcess,
    cli,
    cli_json,
    device_view,
    secured_controller,
    wait_online,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(params=BROKERS)
def controller(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """`tether up` with authentication, on the embedded broker and on Mosquitto (dynamic security)."""
    with secured_controller(request.param, tmp_path) as ctl:
        monkeypatch.setenv("TETHER_CREDENTIALS", str(ctl.operator_file))
        yield ctl


def _agent(url: str, tmp_path: Path, device_id: str, credentials: Path | None) -> AgentProcess:
    extra: list[str] = []
    if credentials is not None:
        saved = json.loads(credentials.read_text())
        extra = ["--username", saved["username"], "--password", saved["password"]]
    return AgentProcess(url, device_id, tmp_path / device_id, extra=extra)


def test_operator_credentials_written_and_required(controller: ControllerProcess, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`tether up` writes operator.json (0600) and says where, in a data directory only its owner
    may enter (the database and its WAL 0600); without it the CLI is refused."""
    assert stat.S_IMODE(controller.operator_file.stat().st_mode) == 0o600
    data = controller.operator_file.parent
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("tether.db", "tether.db-wal", "controller.json"):
        if (data / name).exists():  # (no tether.db with PostgreSQL)
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    assert str(controller.operator_file.resolve()) in controller.output()
    assert cli_json(controller.url, "devices", "ls") == []
    monkeypatch.delenv("TETHER_CREDENTIALS")
    monkeypatch.setenv(
        "TETHER_CLI_CONFIG", str(data / "no-contexts.json")
    )  # nor the context `tether up` wrote
    refused = cli(controller.url, "devices", "ls")
    assert refused.returncode != 0
    assert "refused" in refused.stderr and "Traceback" not in refused.stderr
    assert "credentials: none found; looked at --credentials/TETHER_CREDENTIALS" in refused.stderr
    wrong = controller.operator_file.parent / "wrong.json"
    wrong.write_text(json.dumps({"username": "admin", "password": "nope"}))
    monkeypatch.setenv("TETHER_CREDENTIALS", str(wrong))
    assert cli(controller.url, "devices", "ls").returncode != 0
    wrong.write_text("{not json")
    broken = cli(controller.url, "devices", "ls")
    assert broken.returncode != 0 and "not JSON" in broken.stderr


def test_device_with_credentials_comes_online(controller: ControllerProcess, tmp_path: Path) -> None:
    """A device with its own credentials comes online; one without them is refused and never seen."""
    creds = tmp_path / "dev-a.json"
    cli_json(controller.url, "devices", "credentials", "dev-a", "--out", str(creds))
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    good = _agent(controller.url, tmp_path, "dev-a", creds)
    bad = _agent(controller.url, tmp_path, "dev-b", None)
    try:
        wait_online(controller.url, "dev-a")
        bad.wait_for_line(r"refused")
        assert device_view(controller.url, "dev-b") is None
    finally:
        good.stop()
        bad.stop()


def test_revoked_device_is_cut_off(controller: ControllerProcess, tmp_path: Path) -> None:
    """Revoke ends the live session, refuses the next connect and removes it from static groups."""
    creds = tmp_path / "dev-a.json"
    cli_json(controller.url, "devices", "credentials", "dev-a", "--out", str(creds))
    agent = _agent(controller.url, tmp_path, "dev-a", creds)
    try:
        wait_online(controller.url, "dev-a")
        cli_json(controller.url, "groups", "create", "edge", "--device", "dev-a")
        result = cli_json(controller.url, "devices", "revoke", "dev-a")
        assert result == {"revoked": ["dev-a"], "closed": 1}
        wait_until(
            lambda: device_view(controller.url, "dev-a")["status"] == "offline",  # type: ignore[index]
            30,
            message="revoked device offline",
        )
        agent.wait_for_line(r"refused")
        assert cli_json(controller.url, "groups", "show", "edge")["members"] == []
        removed = cli_json(controller.url, "devices", "rm", "dev-a")
        assert removed["removed"] == ["dev-a"]
        assert device_view(controller.url, "dev-a") is None
    finally:
        agent.stop()


def test_bad_credential_requests_change_nothing(controller: ControllerProcess) -> None:
    """Credentials for a reserved or malformed device id (a final newline too), or revoking an
    unknown one: one clear error."""
    for device_id in ("cli-x", "bad/id", "admin", "pi-9\n"):
        result = cli(controller.url, "devices", "credentials", device_id)
        assert result.returncode != 0 and result.stderr.startswith("tether: error:"), result.stderr
    newline = cli(controller.url, "devices", "credentials", "pi-9\n")
    assert "invalid device id 'pi-9\\n'" in newline.stderr, newline.stderr
    unknown = cli(controller.url, "devices", "revoke", "ghost")
    assert unknown.returncode != 0 and "unknown device" in unknown.stderr
    assert cli_json(controller.url, "devices", "ls") == []
