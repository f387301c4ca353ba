"""Replicas and the disconnect policy with real agents: replace a lost device, and on its
return keep the original (which never stopped) and stop the replacement."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from support.infra import Mosquitto, wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, pool_group

pytestmark = pytest.mark.e2e

STACK = """
services:
  replica:
    command: ["sh", "-c", "echo $$$$ > pid; exec sleep 600"]
    restart: always
x-tether:
  replicas: 2
  disconnect:
    lost_after: 2s
    replace: true
    reconcile: keep_original
"""


def _running(url: str) -> dict[str, Any]:
    rows = cli_json(url, "stacks", "status", "rep")["devices"]
    return {r["device"]: r for r in rows if r["state"] == "running"}


def _pid(agent_dir: Path) -> int:
    return int((agent_dir / "work" / "rep" / "replica" / "pid").read_text())


def test_replicas_replace_lost_device_and_keep_original(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """2 replicas on 3 devices: a lost device is replaced; on reconnect the count is 2 again."""
    run = uuid.uuid4().hex[:6]
    names = [f"rep-{run}-{i}" for i in range(3)]
    controller = ControllerProcess(tmp_path / "controller", broker=mosquitto.url)
    agents = {n: AgentProcess(mosquitto.url, n, tmp_path / n, labels={"pool": run}) for n in names}
    try:
        pool_group(mosquitto.url, run, *names)
        stack = tmp_path / "rep.yml"
        stack.write_text(STACK)
        deploy = cli(
            mosquitto.url,
            "stacks",
            "deploy",
            str(stack),
            "--name",
            "rep",
            "--group",
            "pool",
            "--wait",
            "--min-healthy-time",
            "1s",
            "--timeout",
            "60",
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        # Not "all devices of the group": 2 replicas of 3 members.
        assert "stack rep is running: 2 replicas in group pool" in deploy.stdout, deploy.stdout
        first = wait_until(lambda: len(r := _running(mosquitto.url)) == 2 and r, 30)
        spare = next(n for n in names if n not in first)
        victim = sorted(first)[0]
        victim_pid = _pid(tmp_path / victim)

        agents[victim].kill()  # the device vanishes; its workload keeps running
        replaced = wait_until(
            lambda: spare in (r := _running(mosquitto.url)) and r,
            60,
            interval=0.2,
            message="replacement placed",
        )
        assert replaced[spare]["role"] == "replacement"

        agents[victim] = AgentProcess(mosquitto.url, victim, tmp_path / victim, labels={"pool": run})
        final = wait_until(
            lambda: set(r := _running(mosquitto.url)) == set(first) and r,
            60,
            interval=0.2,
            message="back to originals",
        )
        assert len(final) == 2
        assert _pid(tmp_path / victim) == victim_pid  # the original never stopped
        rows = cli_json(mosquitto.url, "stacks", "status", "rep")["devices"]
        wait_until(
            lambda: (
                spare
                not in {r["device"] for r in cli_json(mosquitto.url, "stacks", "status", "rep")["devices"]}
            ),
            30,
        )
        assert {r["device"] for r in rows} >= set(first)
    finally:
        for agent in agents.values():
            agent.stop()
        controller.stop()
