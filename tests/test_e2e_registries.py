"""`tether registries` end to end: credentials sealed from the CLI to each device's key.

Real processes: `tether up` (embedded broker; a wiretap on ``#`` records every byte it
delivers), `tether-agent` (process driver: the images are only named, never pulled here;
pulling with these credentials from an htpasswd registry is tested with the agent's
downloads), the CLI. The controller's database and data directory are searched for the
credentials too.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from support.infra import wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, wait_online
from support.wiretap import Wiretap
from tether.protocol import codec
from tether.protocol.enrollment import DeviceKey
from tether.protocol.models import DesiredState

pytestmark = pytest.mark.e2e

HOST = "registry.example:5000"
PRIVATE = f'services:\n  app:\n    image: {HOST}/shop/app:2\n    command: ["sleep", "600"]\n'
PUBLIC = 'services:\n  app:\n    image: busybox:1.36\n    command: ["sleep", "600"]\n'


def _files_containing(root: Path, text: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_registry_credentials_are_sealed_end_to_end(tmp_path: Path) -> None:
    """add/ls/rm; a device gets credentials only for the registries its images use, sealed to
    its own key (a device-scoped entry wins over the fleet's); neither the broker nor the
    controller's files ever hold the username or password in plaintext."""
    controller = ControllerProcess(tmp_path / "ctl")
    url = controller.url
    device = f"reg-{uuid.uuid4().hex[:6]}"
    agent = AgentProcess(url, device, tmp_path / "agent")
    wiretap = Wiretap(controller.port)
    user, password = f"u{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    own_user, own_password = f"o{uuid.uuid4().hex[:8]}", f"own-{uuid.uuid4().hex}"
    topic = f"tether/v1/devices/{device}/desired"

    def desired() -> DesiredState | None:
        payload = wiretap.latest(topic)
        return codec.decode(payload, DesiredState) if payload else None

    try:
        wait_online(url, device)
        cli_json(url, "groups", "create", "site", "--device", device)

        # Bad input: one clear error each, nothing stored.
        bad = cli(
            url, "registries", "add", "not a host", "--username", user, "--password-stdin", stdin=password
        )
        assert bad.returncode != 0 and "invalid registry host" in bad.stderr and "Traceback" not in bad.stderr
        empty = cli(url, "registries", "add", HOST, "--username", user, "--password-stdin", stdin="")
        assert empty.returncode != 0 and "password is empty" in empty.stderr
        gone = cli(url, "registries", "rm", HOST)
        assert gone.returncode != 0 and f"no registry {HOST} (fleet)" in gone.stderr
        assert cli_json(url, "registries", "ls") == []

        added = cli(
            url, "registries", "add", HOST, "--username", user, "--password-stdin", stdin=password + "\n"
        )
        assert added.returncode == 0, added.stderr
        assert f"registry {HOST} for the fleet: set (version 1)" in added.stdout
        listed = cli_json(url, "registries", "ls")
        assert [(r["host"], r["scope"], r["version"]) for r in listed] == [(HOST, "fleet", 1)]

        # A stack on Docker Hub only: the device gets no credentials for HOST.
        stack = tmp_path / "app.yml"
        stack.write_text(PUBLIC)
        cli_json(url, "stacks", "deploy", str(stack), "--name", "app", "--group", "site")
        wait_until(lambda: (d := desired()) is not None and d.stacks, 30, message="desired state published")
        assert desired().registries == ()  # type: ignore[union-attr]

        # A stack from HOST: its credentials arrive sealed to the device's own key.
        stack.write_text(PRIVATE)
        cli_json(url, "stacks", "deploy", str(stack), "--name", "app", "--group", "site")
        wait_until(lambda: (d := desired()) is not None and d.registries, 30, message="credentials sent")
        key = DeviceKey.from_text((tmp_path / "agent" / "enroll.key").read_text())

        def opened() -> dict[str, str]:
            (auth,) = desired().registries  # type: ignore[union-attr]
            assert auth.host == HOST and auth.sealed is not None and auth.error is None
            return json.loads(key.open_text(auth.sealed, "test"))

        assert opened() == {"username": user, "password": password}

        # The device's own credentials win over the fleet's.
        own = cli(url, "registries", "add", HOST, "-u", own_user, "--password-stdin", "--device", device,
                  stdin=own_password)  # fmt: skip
        assert own.returncode == 0, own.stderr
        wait_until(lambda: opened()["username"] == own_user, 30, message="device credentials win")
        assert opened() == {"username": own_user, "password": own_password}
        again = cli(url, "registries", "add", HOST, "-u", own_user, "--password-stdin", "--device", device,
                    stdin=own_password)  # fmt: skip
        assert "unchanged" in again.stdout

        # rm: back to the fleet's; then none at all.
        cli_json(url, "registries", "rm", HOST, "--device", device)
        wait_until(lambda: opened()["username"] == user, 30, message="fleet credentials again")
        cli_json(url, "registries", "rm", HOST)
        wait_until(lambda: desired().registries == (), 30, message="credentials withdrawn")  # type: ignore[union-attr]
        assert cli_json(url, "registries", "ls") == []

        # Nothing on the broker and nothing the controller keeps holds them in plaintext.
        assert wiretap.count > 0 and wiretap.saw(HOST)  # the tap works
        for text in (user, password, own_user, own_password):
            assert not wiretap.saw(text), text
            assert _files_containing(tmp_path / "ctl", text) == [], text
    finally:
        wiretap.close()
        agent.stop()
        controller.stop()
