"""Controller operations: health, readiness, Prometheus metrics and JSON logs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from support.infra import wait_until
from support.procs import AgentProcess, ControllerProcess, wait_online

pytestmark = pytest.mark.e2e


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_metrics_and_json_logs(tmp_path: Path) -> None:
    """/healthz and /readyz answer 200, /metrics counts the online device, logs are JSON lines."""
    controller = ControllerProcess(tmp_path / "c", extra=["--http", "127.0.0.1:0", "--log-format", "json"])
    device = f"ops-{uuid.uuid4().hex[:6]}"
    agent = AgentProcess(controller.url, device, tmp_path / "agent")
    try:
        port = int(controller.wait_for_line(r"health and metrics on http://127.0.0.1:(\d+)/").group(1))
        base = f"http://127.0.0.1:{port}"
        assert _get(f"{base}/healthz") == (200, "ok\n")
        assert _get(f"{base}/readyz")[0] == 200
        assert _get(f"{base}/nope")[0] == 404
        wait_online(controller.url, device)
        metrics = wait_until(
            lambda: 'tether_devices{presence="online"} 1.0' in (m := _get(f"{base}/metrics")[1]) and m, 30
        )
        assert "tether_leader 1.0" in metrics
        assert 'tether_requests_total{command="devices.ls",outcome="ok"}' in metrics
        assert 'tether_messages_received_total{kind="presence"}' in metrics
        records = [json.loads(line) for line in controller.lines if line.startswith("{")]
        assert any(r["message"].startswith(f"device {device} is online") for r in records)
        assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    finally:
        agent.stop()
        controller.stop()
