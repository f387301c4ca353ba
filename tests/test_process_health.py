"""The process driver runs Compose healthchecks against host processes."""

from __future__ import annotations

from pathlib import Path

from support.infra import wait_until
from tether.agent.drivers.process import ProcessDriver
from tether.controller.compose import parse_compose

SPEC = """
services:
  ok:
    command: ["sleep", "60"]
    healthcheck: {test: ["CMD", "true"], interval: 0.2s, retries: 1}
  bad:
    command: ["sleep", "60"]
    healthcheck: {test: "echo db refused >&2; exit 1", interval: 0.2s, retries: 2}
  plain:
    command: ["sleep", "60"]
"""


def test_healthchecks_of_host_processes(tmp_path: Path) -> None:
    """A passing check makes a process healthy, a failing one unhealthy (with the check's output);
    no check, no health."""
    spec = parse_compose(SPEC)
    driver = ProcessDriver("hc", tmp_path)
    try:
        for service in spec.services:
            driver.create("s", spec, service)
        health = wait_until(
            lambda: (
                (h := {o.service: o.health for o in driver.observe()})["ok"] == "healthy"
                and h["bad"] == "unhealthy"
                and h
            ),
            15,
        )
        assert health["plain"] is None
        outputs = {o.service: o.health_output for o in driver.observe()}
        assert outputs == {"ok": None, "bad": "db refused", "plain": None}
    finally:
        for instance in driver.observe():
            driver.remove(instance, 1)
        driver.close()
