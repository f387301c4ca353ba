"""The process driver applies the Compose keys that mean something for a host process:
user, working_dir, environment, ulimits and stop_signal (real processes, read back from their
output)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.infra import wait_until
from tether.agent.drivers.process import ProcessDriver
from tether.controller.compose import parse_compose

SCRIPT = (
    'echo "dir=$(pwd) uid=$(id -u) nofile=$(ulimit -n) mode=$MODE"; '
    'trap "echo stopped-by-INT; exit 0" INT; while true; do sleep 0.1; done'
)


def run(tmp_path: Path, name: str, keys: str) -> str:
    """Start one service with ``keys``, return its first output line; stop it."""
    spec = parse_compose(
        f"services:\n  {name}:\n"
        f"    command: [sh, -c, {SCRIPT.replace('$', '$$')!r}]\n"  # $$: a literal $ in Compose
        "    environment: {MODE: keys}\n"
        "    stop_signal: INT\n"
        "    stop_grace_period: 5s\n" + keys
    )
    driver = ProcessDriver("pk", tmp_path / "data")
    assert driver.unsupported(spec) == []
    service = spec.services[0]
    driver.create("s", spec, service)
    (instance,) = [i for i in driver.observe() if i.service == name]
    line = wait_until(lambda: driver.logs(instance, 10).strip(), 10, message="first line")
    driver.remove(instance, service.stop_grace_period_s)
    log = (tmp_path / "data" / "processes" / f"s.{name}.log").read_text()
    assert "stopped-by-INT" in log, log  # stop_signal, not SIGTERM
    return line.splitlines()[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_user_and_working_dir(tmp_path: Path) -> None:
    """user and working_dir reach the process, with its environment."""
    work = tmp_path / "work"
    work.mkdir()
    line = run(tmp_path, "app", f"    user: '65534'\n    working_dir: {work}\n")
    assert line.startswith(f"dir={work} uid=65534 ") and line.endswith(" mode=keys")


def test_ulimits(tmp_path: Path) -> None:
    """ulimits are set on the process itself before it runs its command."""
    line = run(tmp_path, "lim", "    ulimits: {nofile: 64}\n")
    assert " nofile=64 " in line, line
