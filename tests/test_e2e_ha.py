"""Two controllers on one PostgreSQL and one Mosquitto: one leads; killing it hands over."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
from support.infra import Mosquitto, wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, wait_online

pytestmark = [pytest.mark.e2e, pytest.mark.store]

STACK = 'services:\n  s:\n    command: ["sh", "-c", "echo {v} > version; exec sleep 600"]\n'


def test_failover_to_standby(tmp_path: Path, mosquitto: Mosquitto, postgres_url: str) -> None:
    """SIGKILL the leader: the standby leads within seconds; deploys before and after apply once each.
    Over HTTP the standby answers reads and refuses writes (503) until it leads."""
    url = mosquitto.url
    first = ControllerProcess(tmp_path / "c1", broker=url, db=postgres_url, extra=["--ha"])
    second = ControllerProcess(
        tmp_path / "c2", broker=url, db=postgres_url, extra=["--ha", "--http", "127.0.0.1:0"]
    )
    device = f"ha-{uuid.uuid4().hex[:6]}"
    agent = AgentProcess(url, device, tmp_path / "agent")
    try:
        first.wait_for_line(r"controller ready \(leader")
        second.wait_for_line(r"controller ready \(standby")
        wait_online(url, device)
        # Writes reach the leader whichever controller takes the request.
        cli_json(url, "groups", "create", "solo", "--device", device)
        stack = tmp_path / "s.yml"
        stack.write_text(STACK.format(v="v1"))
        deploy = cli(
            url,
            "stacks",
            "deploy",
            str(stack),
            "--name",
            "s",
            "--group",
            "solo",
            "--wait",
            "--min-healthy-time",
            "1s",
            "--timeout",
            "60",
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        for _ in range(6):  # reads are answered by either controller
            assert [s["name"] for s in cli_json(url, "stacks", "ls")] == ["s"]
        before = cli_json(url, "devices", "show", device)
        port = int(second.wait_for_line(r"health and metrics on http://127.0.0.1:(\d+)/").group(1))
        password = json.loads((tmp_path / "c1" / "operator.json").read_text())["password"]
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", auth=("admin", password), timeout=30)
        assert [s["name"] for s in api.get("/stacks").json()["stacks"]] == ["s"]
        refused = api.post("/groups", json={"name": "later", "selector": "x=1"})
        assert refused.status_code == 503 and refused.json()["code"] == "unavailable", refused.text

        first.kill()
        killed = time.monotonic()
        second.wait_for_line(r"this controller leads", timeout=30)
        print(f"\nHA handover after SIGKILL: {time.monotonic() - killed:.2f}s")
        assert api.post("/groups", json={"name": "later", "selector": "x=1"}).status_code == 201

        stack.write_text(STACK.format(v="v2"))
        update = cli(
            url,
            "stacks",
            "deploy",
            str(stack),
            "--name",
            "s",
            "--group",
            "solo",
            "--wait",
            "--min-healthy-time",
            "1s",
            "--timeout",
            "60",
        )
        assert update.returncode == 0, update.stdout + update.stderr
        after = wait_until(
            lambda: (
                (d := cli_json(url, "devices", "show", device))["applied_generation"]
                == d["desired_generation"]
                and d
            ),
            30,
        )
        assert after["desired_generation"] == before["desired_generation"] + 1
        assert (tmp_path / "agent" / "work" / "s" / "s" / "version").read_text().strip() == "v2"
        assert [(s["name"], s["version"]) for s in cli_json(url, "stacks", "ls")] == [("s", 2)]
    finally:
        agent.stop()
        second.stop()
        first.stop()


def test_second_controller_on_one_sqlite_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite serves one controller: a second one on the same data dir says so and exits."""
    monkeypatch.delenv("TETHER_DB", raising=False)
    first = ControllerProcess(tmp_path / "c")
    try:
        result = cli(first.url, "up", "--data-dir", str(tmp_path / "c"), "--port", "0")
        assert result.returncode != 0
        assert "another controller is using" in result.stderr
    finally:
        first.stop()
