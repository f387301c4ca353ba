"""Controller operations: health, readiness, Prometheus metrics and JSON logs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from support.infra import wait_until
from support.procs import AgentProcess, ControllerProcess, cli, wait_online

pytestmark = pytest.mark.e2e


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_metrics_and_json_logs(tmp_path: Path) -> None:
    """/healthz and /readyz answer 200, /metrics counts the online device (and no login lockouts), logs are JSON lines."""
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
        for door in ("http", "mqtt"):  # the embedded broker's count crosses from its process
            assert f'tether_login_lockouts_total{{door="{door}"}} 0.0' in metrics
        assert 'tether_requests_total{command="devices.ls",outcome="ok"}' in metrics
        assert 'tether_messages_received_total{kind="presence"}' in metrics
        records = [json.loads(line) for line in controller.lines if line.startswith("{")]
        assert any(r["message"].startswith(f"device {device} is online") for r in records)
        assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    finally:
        agent.stop()
        controller.stop()


def _value(metrics: str, series: str) -> float | None:
    line = next((ln for ln in metrics.splitlines() if ln.startswith(series + " ")), None)
    return float(line.split()[-1]) if line else None


def test_metrics_of_devices_jobs_and_deployments(tmp_path: Path) -> None:
    """/metrics: each device's resources from its samples (bytes, CPU as a ratio, labelled by device
    only), job runs by outcome counted once each, and tether_deployments without removed stacks."""
    controller = ControllerProcess(tmp_path / "c", extra=["--http", "127.0.0.1:0"])
    device = f"ops-{uuid.uuid4().hex[:6]}"
    agent = AgentProcess(controller.url, device, tmp_path / "agent", extra=["--metrics-interval", "1"])
    try:
        port = int(controller.wait_for_line(r"health and metrics on http://127.0.0.1:(\d+)/").group(1))
        url = f"http://127.0.0.1:{port}/metrics"
        wait_online(controller.url, device)
        assert cli(controller.url, "groups", "create", "ops", "--device", device).returncode == 0
        for name, code in (("ok", 0), ("bad", 2)):
            assert (
                cli(
                    controller.url, "jobs", "run", name, "--group", "ops", "--", "sh", "-c", f"exit {code}"
                ).returncode
                == 0
            )
        stack = tmp_path / "s.yml"
        stack.write_text('services:\n  s:\n    command: ["sleep", "600"]\n')
        deployed = cli(controller.url, "stacks", "deploy", str(stack), "--name", "gone", "--group", "ops", "--wait",
                       "--min-healthy-time", "1s")  # fmt: skip
        assert deployed.returncode == 0, deployed.stderr
        metrics = wait_until(
            lambda: (
                _value(m := _get(url)[1], 'tether_job_runs_total{outcome="failed"}') == 1.0
                and _value(m, f'tether_device_memory_bytes{{device="{device}"}}') is not None
                and _value(m, 'tether_deployments{state="succeeded"}') == 1.0
                and m
            ),
            60,
            0.5,
            "job runs, device gauges and the deployment in /metrics",
        )
        assert _value(metrics, 'tether_job_runs_total{outcome="succeeded"}') == 1.0
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
        assert _value(metrics, f'tether_device_memory_bytes{{device="{device}"}}') == total
        cpu = _value(metrics, f'tether_device_cpu_ratio{{device="{device}"}}')
        assert cpu is not None and 0.0 <= cpu <= 1.0
        assert "# TYPE tether_device_disk_used_bytes gauge" in metrics
        assert not any("tether_device_" in ln and "stack" in ln for ln in metrics.splitlines())

        assert cli(controller.url, "stacks", "rm", "gone", "--wait").returncode == 0

        def none_counted() -> bool:
            m = _get(url)[1]
            return all(
                (_value(m, f'tether_deployments{{state="{state}"}}') or 0.0) == 0.0
                for state in ("running", "succeeded")
            )

        wait_until(
            none_counted,
            40,
            0.5,
            "the removed stack no longer counted",
        )
    finally:
        agent.stop()
        controller.stop()
