"""Variables and secrets end to end: `tether vars`, ${var:...} rendered on the device,
secrets sealed end to end, rotation per change_mode.

Real processes: `tether up` (embedded broker, anonymous clients allowed so that a wiretap
may subscribe to ``#``), `tether-agent` with the process driver, the CLI. The wiretap records
every byte the broker delivers, to prove that a secret never crosses it in plaintext.
"""

from __future__ import annotations

import base64
import contextlib
import os
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.infra import Mosquitto, remove_tether_containers, wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, wait_online
from support.wiretap import Wiretap
from tether.protocol import codec
from tether.protocol.models import DesiredState

pytestmark = pytest.mark.e2e
# On PostgreSQL too (scripts/test's second pass) only the tests marked `store` below: every
# line of controller/store.py and lease.py that the Docker test runs on PostgreSQL is run there by the
# store-level tests and the other `store` tests (coverage compared per line).

STACK = """
services:
  env:
    command: ["sh", "-c", "echo $$$$ > {out}/env.pid; echo \\"$$DB_PASSWORD $$GREETING\\" > {out}/env.seen; exec sleep 600"]
    environment:
      DB_PASSWORD: ${{var:db/password}}
      GREETING: ${{var:app/greeting}}
  signalled:
    command:
      - sh
      - -c
      - >-
        echo $$$$ > {out}/signalled.pid;
        trap 'cat etc/app.conf > {out}/signalled.seen' HUP;
        cat etc/app.conf > {out}/signalled.seen;
        while true; do sleep 1 & wait $$!; done
    configs:
      - source: app.conf
        target: /etc/app.conf
        x-tether-change-mode: signal
  untouched:
    command: ["sh", "-c", "echo $$$$ > {out}/untouched.pid; cat app.conf > {out}/untouched.seen; exec sleep 600"]
    configs:
      - source: app.conf
        target: app.conf
        x-tether-change-mode: noop
configs:
  app.conf:
    content: |
      password=${{var:db/password}}
      greeting=${{var:app/greeting}}
"""


def _flip(sealed: str) -> str:
    """The sealed box with one ciphertext byte changed."""
    raw = bytearray(base64.b64decode(sealed))
    raw[-1] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _files_containing(root: Path, text: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


@pytest.mark.store
def test_secrets_rendered_on_device_and_rotated_per_change_mode(tmp_path: Path) -> None:
    controller = ControllerProcess(tmp_path / "ctl")
    out = tmp_path / "out"
    out.mkdir()
    device = f"vars-{uuid.uuid4().hex[:6]}"
    agent = AgentProcess(controller.url, device, tmp_path / "agent")
    wiretap = Wiretap(controller.port)
    secret, rotated = f"s3cret-{uuid.uuid4().hex}", f"r0tated-{uuid.uuid4().hex}"
    try:
        wait_online(controller.url, device)
        cli_json(controller.url, "groups", "create", "site", "--device", device)
        stack = tmp_path / "stack.yml"
        stack.write_text(STACK.format(out=out))

        # A reference without a value: refused at deploy, naming it; nothing deployed.
        refused = cli(controller.url, "stacks", "deploy", str(stack), "--name", "app", "--group", "site")
        assert refused.returncode != 0
        assert "${var:app/greeting}" in refused.stderr and "Traceback" not in refused.stderr
        assert cli_json(controller.url, "stacks", "ls") == []

        # The secret goes in on stdin (not on the command line), sealed to the controller.
        assert (
            cli(controller.url, "vars", "set", "db", "password=-", "--secret", stdin=secret).returncode == 0
        )
        cli_json(controller.url, "vars", "set", "app", "greeting=hello")
        listed = cli_json(controller.url, "vars", "ls")
        assert [(v["path"], v["secret"], v["keys"]) for v in listed] == [
            ("app", False, ["greeting"]),
            ("db", True, ["password"]),
        ]
        shown = cli_json(controller.url, "vars", "get", "db")
        assert shown["keys"] == ["password"] and "items" not in shown

        deploy = cli(
            controller.url, "stacks", "deploy", str(stack), "--name", "app", "--group", "site", "--wait",
            "--min-healthy-time", "1s", "--timeout", "60",
        )  # fmt: skip
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        wait_until(lambda: _read(out / "env.seen") == f"{secret} hello", 20, message="env rendered")
        wait_until(lambda: _read(out / "signalled.seen") == f"password={secret}\ngreeting=hello", 20)
        wait_until(lambda: _read(out / "untouched.seen") == f"password={secret}\ngreeting=hello", 20)
        pids = {name: _read(out / f"{name}.pid") for name in ("env", "signalled", "untouched")}
        rendered = tmp_path / "agent" / "configs" / "app" / "app.conf"
        assert (rendered.stat().st_mode & 0o777) == 0o444

        # Rotation: every device that uses the secret gets it; each service as its change_mode says.
        assert (
            cli(controller.url, "vars", "set", "db", "password=-", "--secret", stdin=rotated).returncode == 0
        )
        wait_until(lambda: _read(out / "env.seen") == f"{rotated} hello", 30, message="env restarted")
        assert _read(out / "env.pid") != pids["env"]  # restart (an environment value changed)
        wait_until(lambda: _read(out / "signalled.seen") == f"password={rotated}\ngreeting=hello", 30)
        assert _read(out / "signalled.pid") == pids["signalled"]  # signalled, not restarted
        assert rendered.read_text() == f"password={rotated}\ngreeting=hello\n"
        assert _read(out / "untouched.pid") == pids["untouched"]  # noop: not restarted...
        assert _read(out / "untouched.seen") == f"password={secret}\ngreeting=hello"  # ...not told

        # Removing a value a stack needs is refused; the variable stays.
        in_use = cli(controller.url, "vars", "rm", "db")
        assert in_use.returncode != 0 and "app" in in_use.stderr
        assert cli_json(controller.url, "vars", "get", "db")["version"] == 2
        # Keys merge; removing one the stack does not use is fine; an unknown key is an error.
        cli_json(controller.url, "vars", "set", "app", "unused=1")
        assert cli_json(controller.url, "vars", "get", "app")["items"] == {"greeting": "hello", "unused": "1"}
        assert cli_json(controller.url, "vars", "rm", "app", "unused")["removed"] == ["unused"]
        unknown = cli(controller.url, "vars", "rm", "app", "nope")
        assert unknown.returncode != 0 and "no key 'nope'" in unknown.stderr
        assert cli_json(controller.url, "vars", "get", "app")["keys"] == ["greeting"]

        # A tampered secret (published by hand, as a newer generation): the device refuses to
        # render it, keeps every service as it was and says why; the controller then issues
        # a generation past it and the device is whole again.
        desired_topic = f"tether/v1/devices/{device}/desired"
        running = {name: _read(out / f"{name}.pid") for name in pids}
        current = codec.decode(wiretap.latest(desired_topic) or b"", DesiredState)
        tampered = [b.model_copy(update={"sealed": _flip(b.sealed)}) if b.sealed else b for b in current.vars]
        forged = current.model_copy(update={"generation": current.generation + 1, "vars": tuple(tampered)})
        wiretap.client.publish(desired_topic, codec.encode(forged), qos=1, retain=True).wait_for_publish(10)
        show = wait_until(
            lambda: (
                (d := cli_json(controller.url, "devices", "show", device))
                and any(e["kind"] == "stack.render_failed" for e in d["events"])
                and d
            ),
            30,
            message="render failure reported",
        )
        failure = next(e for e in show["events"] if e["kind"] == "stack.render_failed")
        assert "cannot be opened" in failure["message"] and "db/password" in failure["message"]
        assert {name: _read(out / f"{name}.pid") for name in pids} == running
        assert _read(out / "env.seen") == f"{rotated} hello"
        wait_until(
            lambda: (
                cli_json(controller.url, "devices", "show", device)["desired_generation"] > forged.generation
            ),
            30,
            message="controller issues a generation past the forged one",
        )

        # Nothing on the broker and nothing the controller keeps holds a secret in plaintext.
        assert wiretap.count > 0 and wiretap.saw(f"tether/v1/devices/{device}/desired")
        assert wiretap.saw("hello")  # plain variables do travel in plaintext: the tap works
        for text in (secret, rotated):
            assert not wiretap.saw(text)
            assert _files_containing(tmp_path / "ctl", text) == []
    finally:
        wiretap.close()
        agent.stop()
        controller.stop()
        for name in ("env", "signalled", "untouched"):
            pid = _read(out / f"{name}.pid")
            if pid:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)


DOCKER_STACK = """
services:
  web:
    image: tether-test/busybox:1
    command:
      - sh
      - -c
      - >-
        mkdir -p /www;
        trap 'cat /etc/app.conf > /www/signalled.txt' HUP;
        cat /etc/app.conf > /www/signalled.txt;
        echo "$$TOKEN" > /www/env.txt;
        httpd -p 8080 -h /www;
        while true; do sleep 1 & wait $$!; done
    environment:
      TOKEN: ${var:api/token}
    ports: ["127.0.0.1::8080"]
    configs:
      - source: app.conf
        target: /etc/app.conf
        x-tether-change-mode: signal
      - source: app.conf
        target: /www/live.txt
        mode: 0440
        x-tether-change-mode: noop
configs:
  app.conf:
    content: "motd=${var:site/motd}"
"""


def _web(engine: Any, device_id: str, name: str) -> tuple[str, str] | None:
    """(container id, body of /NAME) of the device's running web container, or None."""
    import docker.errors

    try:
        running = engine.containers.list(filters={"label": [f"io.tether.device={device_id}"]})
    except docker.errors.NotFound:
        return None
    if len(running) != 1 or not running[0].ports.get("8080/tcp"):
        return None
    port = running[0].ports["8080/tcp"][0]["HostPort"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{name}", timeout=2) as resp:
            return running[0].id, resp.read().decode().strip()
    except OSError:
        return None


@pytest.mark.docker
def test_secrets_in_containers_on_mosquitto(
    docker_engine: Any, busybox_image: str, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Docker driver, Mosquitto: a secret reaches the container's environment, a config file is
    bind-mounted read-only; a plain change signals (same container) and shows through the
    noop mount at once; a secret rotation replaces the container."""
    controller = ControllerProcess(tmp_path / "ctl", broker=mosquitto.url)
    device = f"dock-vars-{uuid.uuid4().hex[:6]}"
    agent = AgentProcess(mosquitto.url, device, tmp_path / "agent", driver="docker")
    token, rotated = f"tok-{uuid.uuid4().hex}", f"tok2-{uuid.uuid4().hex}"
    try:
        wait_online(mosquitto.url, device)
        cli_json(mosquitto.url, "groups", "create", "edge", "--device", device)
        assert cli(mosquitto.url, "vars", "set", "api", "token=-", "--secret", stdin=token).returncode == 0
        cli_json(mosquitto.url, "vars", "set", "site", "motd=hello", "--group", "edge")
        stack = tmp_path / "web.yml"
        stack.write_text(DOCKER_STACK)
        deploy = cli(
            mosquitto.url,
            "stacks",
            "deploy",
            str(stack),
            "--name",
            "web",
            "--group",
            "edge",
            "--wait",
            "--min-healthy-time",
            "1s",
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        first, body = wait_until(lambda: _web(docker_engine, device, "env.txt"), 30, message="web serving")
        assert body == token
        assert _web(docker_engine, device, "signalled.txt") == (first, "motd=hello")
        mounts = {m["Destination"]: m for m in docker_engine.containers.get(first).attrs["Mounts"]}
        assert mounts["/etc/app.conf"]["Type"] == "bind" and mounts["/etc/app.conf"]["RW"] is False

        # A plain value in a config changes: signal mode, the same container reads it again.
        cli_json(mosquitto.url, "vars", "set", "site", "motd=world", "--group", "edge")
        wait_until(lambda: _web(docker_engine, device, "signalled.txt") == (first, "motd=world"), 30)
        assert _web(docker_engine, device, "live.txt") == (first, "motd=world")  # in place (noop)

        # A secret rotation changes the environment: the container is replaced.
        assert cli(mosquitto.url, "vars", "set", "api", "token=-", "--secret", stdin=rotated).returncode == 0
        second, body = wait_until(
            lambda: (r := _web(docker_engine, device, "env.txt")) and r[1] == rotated and r, 40
        )
        assert second != first
        assert token not in mosquitto.log_text()
    finally:
        agent.stop()
        controller.stop()
        remove_tether_containers(docker_engine, "dock-vars-")
