"""Safe rollouts with real agents: rolling batches, holds, offline devices, canary auto-revert."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from support.infra import remove_tether_containers, wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, pool_group

pytestmark = pytest.mark.e2e
# Not on PostgreSQL too (scripts/test's second pass): every line of controller/store.py and
# lease.py these run on PostgreSQL (deployments, their reverts, stacks) is run there by the
# store-level tests and the other `store` tests (coverage compared per line).

PROCESS = 'services:\n  app:\n    command: ["sh", "-c", "echo {v} > version; exec sleep 600"]\n    restart: always\n'


def _version(agent_dir: Path) -> str | None:
    try:
        return (agent_dir / "work" / "app" / "app" / "version").read_text().strip()
    except OSError:
        return None


def _deploy(url: str, stack: Path, *flags: str) -> dict[str, Any]:
    return cli_json(url, "stacks", "deploy", str(stack), "--name", "app", "--group", "pool", *flags)


def test_rolling_hold_and_offline(tmp_path: Path) -> None:
    """Rolling never updates more than max_parallel devices at once; a held device waits for its
    release; an offline device does not block and gets the final version when it returns."""
    run = uuid.uuid4().hex[:6]
    names = [f"roll-{run}-{i}" for i in range(4)]
    controller = ControllerProcess(tmp_path / "controller")
    url = controller.url
    agents = {n: AgentProcess(url, n, tmp_path / n, labels={"pool": run}) for n in names}
    try:
        pool_group(url, run, *names)
        stack = tmp_path / "app.yml"
        stack.write_text(PROCESS.format(v="v1"))
        _deploy(url, stack, "--wait", "--min-healthy-time", "0s")
        assert {_version(tmp_path / n) for n in names} == {"v1"}

        held = names[3]
        agents[held].run_cli(["--hold"])
        stack.write_text(PROCESS.format(v="v2"))
        result = _deploy(
            url, stack, "--strategy", "rolling", "--max-parallel", "2", "--min-healthy-time", "1s"
        )
        deployment = result["deployment"]
        most = 0
        states: dict[str, set[str]] = {}

        def settled() -> bool:
            nonlocal most
            d = cli_json(url, "deployments", "status", str(deployment))
            most = max(most, sum(r["state"] == "updating" for r in d["devices"].values()))
            for dev, r in d["devices"].items():
                states.setdefault(dev, set()).add(r["state"])
            return d["state"] == "succeeded"

        wait_until(settled, 90, interval=0.1, message="rolling deployment succeeded")
        assert 1 <= most <= 2
        assert "held" in states[held]
        final = cli_json(url, "deployments", "status", str(deployment))["devices"]
        assert sorted(r["batch"] for d, r in final.items() if d != held) == [1, 1, 2]
        assert _version(tmp_path / held) == "v1"
        agents[held].run_cli(["--release"])
        wait_until(lambda: _version(tmp_path / held) == "v2", 30, message="held device updated after release")

        # An offline device: pending (offline), not blocking; updated when it returns.
        away = names[2]
        agents[away].stop()
        wait_until(lambda: cli_json(url, "devices", "show", away)["status"] == "offline", 30)
        stack.write_text(PROCESS.format(v="v3"))
        result = _deploy(url, stack, "--wait", "--min-healthy-time", "0s")
        d = cli_json(url, "deployments", "status", str(result["deployment"]))
        assert d["state"] == "succeeded" and d["devices"][away]["state"] == "pending (offline)"
        assert _version(tmp_path / away) == "v2"
        agents[away] = AgentProcess(url, away, tmp_path / away, labels={"pool": run})
        wait_until(
            lambda: _version(tmp_path / away) == "v3", 30, message="offline device got the final version"
        )
    finally:
        for agent in agents.values():
            agent.stop()
        controller.stop()


WEB = """
services:
  web:
    image: tether-test/busybox:1
    command: ["sh", "-c", "echo {v} > /tmp/v; exec sleep 600"]
    restart: always
    healthcheck:
      test: ["CMD", "{check}"]
      interval: 1s
      timeout: 1s
      retries: 1
"""


@pytest.mark.docker
def test_canary_failing_healthcheck_is_reverted(
    docker_engine: Any, busybox_image: str, tmp_path: Path
) -> None:
    """A canary whose new version fails its healthcheck is reverted; every device ends on the old version."""
    run = uuid.uuid4().hex[:6]
    names = [f"can-{run}-{i}" for i in range(3)]
    controller = ControllerProcess(tmp_path / "controller")
    url = controller.url
    agents = [AgentProcess(url, n, tmp_path / n, driver="docker", labels={"pool": run}) for n in names]
    try:
        pool_group(url, run, *names)
        stack = tmp_path / "web.yml"
        stack.write_text(WEB.format(v="v1", check="true"))
        good = cli_json(
            url,
            "stacks",
            "deploy",
            str(stack),
            "--name",
            "app",
            "--group",
            "pool",
            "--wait",
            "--min-healthy-time",
            "1s",
        )
        good_hash = good["stack"]["spec_hash"]
        stack.write_text(WEB.format(v="v2", check="false"))
        bad = cli(
            url, "stacks", "deploy", str(stack), "--name", "app", "--group", "pool",
            "--strategy", "canary", "--canary", "1", "--auto-revert", "--auto-promote",
            "--min-healthy-time", "2s", "--healthy-deadline", "60s", "--wait", "--timeout", "120",
        )  # fmt: skip
        assert bad.returncode != 0
        assert "reverted" in bad.stderr
        assert cli_json(url, "stacks", "ls")[0]["spec_hash"] == good_hash
        wait_until(
            lambda: {r["state"] for r in cli_json(url, "stacks", "status", "app")["devices"]} == {"running"},
            60,
            message="every device back on the healthy version",
        )
        reported = [
            cli_json(url, "devices", "show", n)["reported"]["stacks"]["app"]["spec_hash"] for n in names
        ]
        assert reported == [good_hash] * 3
        deployments = cli_json(url, "deployments", "ls", "--stack", "app")
        assert [d["state"] for d in deployments[:2]] == ["reverted", "succeeded"]
        assert deployments[0]["counts"].get("failed") == 1  # the canary; the others never moved
    finally:
        for agent in agents:
            agent.stop()
        controller.stop()
        remove_tether_containers(docker_engine, "can-")
