"""Labels from the controller and from a device-side command drive groups; constraints drive placement."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from support.infra import wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, wait_online

pytestmark = pytest.mark.e2e

STACK = 'services:\n  s:\n    command: ["sleep", "600"]\n'
CONSTRAINED = STACK + 'x-tether:\n  placement:\n    constraints: ["role == edge", "driver == process"]\n'


def _runs(url: str, stack: str) -> set[str]:
    rows = cli_json(url, "stacks", "status", stack)["devices"]
    return {r["device"] for r in rows if r["state"] == "running"}


def test_labels_and_constraints(tmp_path: Path) -> None:
    """A labels command and `tether devices label` move devices in and out of a dynamic group;
    placement constraints restrict a stack to matching devices."""
    run = uuid.uuid4().hex[:6]
    a, b = f"lab-{run}-a", f"lab-{run}-b"
    controller = ControllerProcess(tmp_path / "c")
    url = controller.url
    agent_a = AgentProcess(
        url, a, tmp_path / a, extra=["--labels-command", f"echo zone=north-{run}; echo junk"]
    )
    agent_b = AgentProcess(url, b, tmp_path / b, labels={"role": "edge"})
    try:
        wait_online(url, a)
        wait_online(url, b)
        wait_until(lambda: cli_json(url, "devices", "show", a)["labels"] == {"zone": f"north-{run}"}, 30)
        cli_json(url, "groups", "create", "north", "--select", f"zone=north-{run}")
        (tmp_path / "s.yml").write_text(STACK)
        cli_json(
            url, "stacks", "deploy", str(tmp_path / "s.yml"), "--name", "s", "--group", "north", "--wait"
        )
        assert _runs(url, "s") == {a}

        assert cli(url, "devices", "label", b, f"zone=north-{run}").returncode == 0
        wait_until(lambda: _runs(url, "s") == {a, b}, 30, message="b joined through an operator label")
        assert cli(url, "devices", "label", b, "zone-").returncode == 0
        wait_until(lambda: _runs(url, "s") == {a}, 30, message="b left when the label was removed")
        bad = cli(url, "devices", "label", b, "nolabel")
        assert bad.returncode != 0 and "key=value" in bad.stderr

        cli_json(url, "groups", "create", "both", "--device", a, "--device", b)
        (tmp_path / "c.yml").write_text(CONSTRAINED)
        cli_json(url, "stacks", "deploy", str(tmp_path / "c.yml"), "--name", "c", "--group", "both", "--wait")
        assert _runs(url, "c") == {b}
        assert {r["device"] for r in cli_json(url, "stacks", "status", "c")["devices"]} == {b}
    finally:
        agent_a.stop()
        agent_b.stop()
        controller.stop()
