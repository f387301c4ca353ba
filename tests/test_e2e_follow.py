"""Deployments can be followed again: Ctrl-C during --wait leaves the deployment going, `status --follow`
picks it up, a --wait timeout says the same, and promote/rollback wait with --wait (issue 18)."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from support.procs import PY, AgentProcess, ControllerProcess, _Proc, cli, wait_online

pytestmark = pytest.mark.e2e

STACK = """
services:
  app:
    command: ["sh", "-c", "echo {mark}; exec sleep 600"]
    restart: always
"""


def test_ctrl_c_timeout_and_follow_again(tmp_path: Path) -> None:
    """Ctrl-C during --wait exits 130 saying the deployment goes on and how to follow it; following
    it again ends in success; --timeout takes 5m-style durations and its expiry says the same."""
    controller = ControllerProcess(tmp_path / "ctl")
    agent = AgentProcess(controller.url, "follow-1", tmp_path / "agent")
    try:
        url = controller.url
        wait_online(url, "follow-1")
        assert cli(url, "groups", "create", "one", "--device", "follow-1").returncode == 0
        created = cli(url, "groups", "create", "none", "--select", "nobody=here")
        assert "(0 members now)" in created.stdout, created.stdout
        stack = tmp_path / "app.yml"
        stack.write_text(STACK.format(mark="v1"))
        argv = [PY, "-m", "tether.cli.main", "stacks", "deploy", str(stack), "--name", "app", "--group", "one",
                "--min-healthy-time", "8s", "--wait", "--broker", url]  # fmt: skip
        waiting = _Proc(argv, tmp_path / "wait.log")
        try:
            waiting.wait_for_line(r"follow-1: updating \(batch 1\), healthy in", 60)
            waiting.signal(signal.SIGINT)
            assert waiting.proc.wait(20) == 130
        finally:
            waiting.stop()
        line = waiting.wait_for_line(r"stopped following; deployment (\d+) goes on")
        deployment = line.group(1)
        assert f"(tether deployments status {deployment} --follow)" in waiting.output()

        followed = cli(url, "deployments", "status", deployment, "--follow", "--timeout", "2m")
        assert followed.returncode == 0, followed.stdout + followed.stderr
        assert "follow-1: healthy (batch 1)" in followed.stdout
        assert f"deployment {deployment} of app: succeeded" in followed.stdout
        strategy = next(s for s in followed.stdout.splitlines() if s.startswith("strategy:"))
        assert strategy == "strategy:   all-at-once (healthy after 8s, deadline 5m, downloads within 1d)"
        version = re.search(r"version:\s+- -> ([0-9a-f]{12})", followed.stdout)
        assert version, followed.stdout
        # What the agent said of this version, from `deployments events`: the service created.
        events = cli(url, "deployments", "events", deployment)
        assert events.returncode == 0, events.stderr
        created = next(ln for ln in events.stdout.splitlines() if "service.created" in ln)
        assert created.startswith("follow-1") and "app/app" in created, events.stdout
        assert f"created and started (version {version.group(1)})" in created, events.stdout

        stack.write_text(STACK.format(mark="v2"))
        planned = cli(url, "stacks", "deploy", str(stack), "--name", "app", "--group", "one", "--dry-run")
        assert planned.returncode == 0, planned.stderr
        assert "--- app version 1 (deployed)" in planned.stdout and "+++ app (this deploy)" in planned.stdout
        assert any(ln.startswith("+") and "v2" in ln for ln in planned.stdout.splitlines()), planned.stdout
        assert any(ln.startswith("-") and "v1" in ln for ln in planned.stdout.splitlines()), planned.stdout
        timed_out = cli(url, "stacks", "deploy", str(stack), "--name", "app", "--group", "one",
                        "--min-healthy-time", "8s", "--wait", "--timeout", "2s")  # fmt: skip
        assert timed_out.returncode == 1
        m = re.search(r"timed out after 2s; deployment (\d+) goes on and still waits for follow-1 "
                      r"\(tether deployments status (\d+) --follow\)", timed_out.stderr)  # fmt: skip
        assert m and m.group(1) == m.group(2), timed_out.stderr
        bad = cli(
            url,
            "stacks",
            "deploy",
            str(stack),
            "--name",
            "app",
            "--group",
            "one",
            "--wait",
            "--timeout",
            "soon",
        )
        assert bad.returncode == 2 and "Invalid value for '--timeout': invalid duration 'soon'" in bad.stderr

        shown = cli(url, "stacks", "show", "app", "--version", "1")
        # The file as the CLI resolved and sent it (tether stacks config): version 1's command.
        assert shown.returncode == 0 and "echo v1; exec sleep 600" in shown.stdout, shown.stdout
        assert "v2" not in shown.stdout and shown.stdout.startswith("services:")
        assert "# stack app version 1 (current: 2)" in shown.stderr
        rolled = cli(url, "deployments", "rollback", m.group(1), "--wait", "--timeout", "90")
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        assert re.search(r"deployment \d+ succeeded", rolled.stdout), rolled.stdout

        # A service that cannot start: the deployment's status lists what the device said.
        stack.write_text('services:\n  app:\n    command: ["/nonexistent/program"]\n')
        failed = cli(url, "stacks", "deploy", str(stack), "--name", "app", "--group", "one", "--wait",
                     "--healthy-deadline", "5s")  # fmt: skip
        assert failed.returncode == 1, failed.stdout + failed.stderr
        broken = re.search(r"deployment (\d+) \(all-at-once\)", failed.stdout)
        assert broken, failed.stdout
        status = cli(url, "deployments", "status", broken.group(1))
        assert status.returncode == 0, status.stderr
        assert "events since the deployment began:" in status.stdout, status.stdout
        event = next(
            ln for ln in status.stdout.splitlines() if ln.startswith("follow-1") and "action.failed" in ln
        )
        assert "app/app" in event and "/nonexistent/program" in event, status.stdout
    finally:
        agent.stop()
        controller.stop()
