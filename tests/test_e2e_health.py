"""Truthful health with real agents: crash loops are never reported healthy, first deploys included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.infra import remove_tether_containers, wait_until
from support.procs import cli, cli_json, pool_device

pytestmark = pytest.mark.e2e

# v1 runs; v2 crashes 2 s after every start (exit code 3), restarted by the agent each time.
STABLE = (
    'services:\n  app:\n    command: ["sh", "-c", "echo v1 > version; exec sleep 600"]\n    restart: always\n'
)
CRASHING = (
    "services:\n  app:\n"
    '    command: ["sh", "-c", "echo v2 > version; echo cannot open /etc/app.conf; sleep 2; exit 3"]\n'
    "    restart: always\n"
)


def _version(agent_dir: Path) -> str | None:
    try:
        return (agent_dir / "work" / "app" / "app" / "version").read_text().strip()
    except OSError:
        return None


def _deploy(url: str, stack: Path, *flags: str) -> Any:
    return cli(url, "stacks", "deploy", str(stack), "--name", "app", "--group", "pool", *flags, timeout=200)


def test_update_crashing_within_min_healthy_time_is_reverted(tmp_path: Path) -> None:
    """An update whose service crashes every 2 s (restart: always) never counts as healthy under
    --min-healthy-time 10s; --auto-revert moves the device back, and --wait says why (exit code,
    restarts, the service's last output)."""
    with pool_device(tmp_path, "crash") as (url, device):
        stack = tmp_path / "app.yml"
        stack.write_text(STABLE)
        good = _deploy(url, stack, "--wait", "--min-healthy-time", "1s")
        assert good.returncode == 0, good.stdout + good.stderr
        stack.write_text(CRASHING)
        bad = _deploy(url, stack, "--min-healthy-time", "10s", "--auto-revert", "--wait", "--timeout", "150")
        assert bad.returncode != 0, bad.stdout + bad.stderr
        assert "reverted" in bad.stderr
        assert "exit code 3" in bad.stderr and "cannot open /etc/app.conf" in bad.stderr
        assert "healthy in" in bad.stdout  # the countdown was shown, and never reached its end
        deployments = cli_json(url, "deployments", "ls", "--stack", "app")
        assert [d["state"] for d in deployments[:2]] == ["reverted", "succeeded"]
        assert "healthy" not in deployments[0]["counts"]
        wait_until(lambda: _version(tmp_path / device) == "v1", 60, message="device back on v1")


def test_first_deploy_of_a_crash_loop_fails_wait(tmp_path: Path) -> None:
    """A first deployment whose service crash-loops fails --wait (exit status 1) with the reason,
    instead of being reported running on every device."""
    with pool_device(tmp_path, "first") as (url, device):
        stack = tmp_path / "app.yml"
        stack.write_text(CRASHING)
        result = _deploy(url, stack, "--min-healthy-time", "5s", "--wait", "--timeout", "150")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "failed" in result.stderr and "exit code 3" in result.stderr
        assert "is running on" not in result.stdout
        status = cli(url, "stacks", "status", "app")
        assert "exit code 3" in status.stdout


DOCKER_CRASHING = """
services:
  web:
    image: tether-test/busybox:1
    command: ["sh", "-c", "echo listening failed: port in use; sleep 1; exit 7"]
    restart: always
"""


@pytest.mark.docker
def test_first_docker_deploy_of_a_crash_loop_fails_wait(
    docker_engine: Any, busybox_image: str, tmp_path: Path
) -> None:
    """With the docker driver too, a crash-looping first deployment fails --wait, naming the exit
    code and the container's last output."""
    try:
        with pool_device(tmp_path, "dcrash", driver="docker") as (url, device):
            stack = tmp_path / "web.yml"
            stack.write_text(DOCKER_CRASHING)
            result = cli(
                url, "stacks", "deploy", str(stack), "--name", "web", "--group", "pool",
                "--min-healthy-time", "5s", "--wait", "--timeout", "150", timeout=200,
            )  # fmt: skip
            assert result.returncode == 1, result.stdout + result.stderr
            assert "exit code 7" in result.stderr and "port in use" in result.stderr
            deployment = cli_json(url, "deployments", "ls", "--stack", "web")[0]
            assert deployment["state"] == "failed"
    finally:
        remove_tether_containers(docker_engine, "dcrash-")
