"""Labels drive groups only where the operator vouches for them; constraints drive placement.

Real processes: `tether up` (embedded broker), `tether-agent`s with the process driver, the CLI.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from support.infra import wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, wait_online
from tether.protocol import codec
from tether.protocol.models import DesiredState

pytestmark = pytest.mark.e2e

STACK = 'services:\n  s:\n    command: ["sleep", "600"]\n'
CONSTRAINED = STACK + 'x-tether:\n  placement:\n    constraints: ["role == edge", "driver == process"]\n'
SECRET_STACK = """
services:
  app:
    command: ["sh", "-c", 'echo "$$PASSWORD" > {out}/$$$$.seen; exec sleep 600']
    environment:
      PASSWORD: ${{var:db/password}}
"""


def _runs(url: str, stack: str) -> set[str]:
    rows = cli_json(url, "stacks", "status", stack)["devices"]
    return {r["device"] for r in rows if r["state"] == "running"}


def _desired_on_disk(agent: AgentProcess) -> DesiredState | None:
    path = agent.data_dir / "desired.msgpack"
    return codec.decode(path.read_bytes(), DesiredState) if path.exists() else None


def test_a_device_cannot_put_itself_in_a_group(tmp_path: Path) -> None:
    """A device reporting a group's label gets neither its stack nor its secret; an operator
    label does; `groups trust` opts a group into device labels, and back out."""
    run = uuid.uuid4().hex[:6]
    liar, honest = f"liar-{run}", f"honest-{run}"
    secret = f"s3cret-{uuid.uuid4().hex}"
    out = tmp_path / "out"
    out.mkdir()
    controller = ControllerProcess(tmp_path / "c")
    url = controller.url
    agent_liar = AgentProcess(url, liar, tmp_path / liar, labels={"pool": f"pB-{run}"})
    agent_honest = AgentProcess(url, honest, tmp_path / honest)
    try:
        wait_online(url, liar)
        wait_online(url, honest)
        wait_until(lambda: cli_json(url, "devices", "show", liar)["labels"] == {"pool": f"pB-{run}"}, 30)
        group = cli_json(url, "groups", "create", "pb", "--select", f"pool=pB-{run}")
        assert group["members"] == [] and group["trust_device_labels"] is False
        assert (
            cli(url, "vars", "set", "db", "password=-", "--secret", "--group", "pb", stdin=secret).returncode
            == 0
        )
        stack = tmp_path / "secret.yml"
        stack.write_text(SECRET_STACK.format(out=out))
        cli_json(url, "stacks", "deploy", str(stack), "--name", "vault", "--group", "pb")

        # The operator vouches for one device: it joins, runs the stack, opens the secret.
        labelled = cli_json(url, "devices", "label", honest, f"pool=pB-{run}")
        assert labelled["label_sources"] == {"pool": "operator"}
        wait_until(lambda: _runs(url, "vault") == {honest}, 60, message="the labelled device runs the stack")
        wait_until(lambda: any(p.read_text().strip() == secret for p in out.glob("*.seen")), 30)
        assert cli_json(url, "groups", "show", "pb")["members"] == [honest]

        # The device that only claims the label has nothing of the group: not a member, no
        # stack in its desired state, no sealed secret, nothing rendered.
        shown = cli_json(url, "devices", "show", liar)
        assert shown["label_sources"] == {"pool": "device"}
        assert shown["desired"] == []
        on_disk = _desired_on_disk(agent_liar)
        assert on_disk is None or (on_disk.stacks == () and on_disk.vars == ())
        assert len(list(out.glob("*.seen"))) == 1
        table = cli(url, "devices", "show", liar)
        assert "pool=pB-" in table.stdout and "[device]" in table.stdout

        # The operator opts the group into device labels: now the claim is enough...
        trusted = cli_json(url, "groups", "trust", "pb")
        assert trusted["trust_device_labels"] is True and trusted["members"] == sorted([honest, liar])
        wait_until(lambda: _runs(url, "vault") == {honest, liar}, 60, message="trusted: the claim counts")
        # ...and out again: the device that only claimed it loses the stack.
        assert cli_json(url, "groups", "trust", "pb", "--off")["members"] == [honest]
        wait_until(lambda: _runs(url, "vault") == {honest}, 60, message="untrusted again")
        wait_until(
            lambda: (d := _desired_on_disk(agent_liar)) is not None and d.stacks == () and d.vars == (), 30
        )
    finally:
        agent_liar.stop()
        agent_honest.stop()
        controller.stop()


def test_labels_and_constraints(tmp_path: Path) -> None:
    """A labels command feeds a group that trusts device labels; `tether devices label` moves
    devices in and out of any selector group; placement constraints restrict a stack to
    matching devices (device-reported facts included)."""
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
        cli_json(url, "groups", "create", "north", "--select", f"zone=north-{run}", "--trust-device-labels")
        (tmp_path / "s.yml").write_text(STACK)
        cli_json(
            url,
            "stacks",
            "deploy",
            str(tmp_path / "s.yml"),
            "--name",
            "s",
            "--group",
            "north",
            "--wait",
            "--min-healthy-time",
            "1s",
        )
        assert _runs(url, "s") == {a}

        assert cli(url, "devices", "label", b, f"zone=north-{run}").returncode == 0
        wait_until(lambda: _runs(url, "s") == {a, b}, 30, message="b joined through an operator label")
        assert cli(url, "devices", "label", b, "zone-").returncode == 0
        wait_until(lambda: _runs(url, "s") == {a}, 30, message="b left when the label was removed")
        bad = cli(url, "devices", "label", b, "nolabel")
        assert bad.returncode != 0 and "key=value" in bad.stderr
        bad = cli(url, "devices", "label", b, "k=a\x1b[2Kb", "x y=1")
        assert bad.returncode != 0 and "invalid label" in bad.stderr and "'x y'" in bad.stderr

        cli_json(url, "groups", "create", "both", "--device", a, "--device", b)
        (tmp_path / "c.yml").write_text(CONSTRAINED)
        cli_json(
            url,
            "stacks",
            "deploy",
            str(tmp_path / "c.yml"),
            "--name",
            "c",
            "--group",
            "both",
            "--wait",
            "--min-healthy-time",
            "1s",
        )
        assert _runs(url, "c") == {b}
        assert {r["device"] for r in cli_json(url, "stacks", "status", "c")["devices"]} == {b}
    finally:
        agent_a.stop()
        agent_b.stop()
        controller.stop()
