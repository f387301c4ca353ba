"""Stage now, switch later, from a private registry: `tether registries` credentials reach the
agent sealed, `--stage-only` downloads everywhere while the old version runs, `deployments
switch` switches. Real processes, a real registry (Debian's docker-registry with htpasswd)
and a real Docker engine."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.images import skip_or_fail
from support.infra import remove_tether_containers, wait_until
from support.procs import AgentProcess, ControllerProcess, cli, cli_json, pool_device, pool_group
from support.registry import Registry, push_image, registry_available

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

STACK = 'services:\n  app:\n    image: {ref}\n    command: ["sleep", "600"]\n    restart: always\n'


def _running_hash(url: str, device: str) -> str | None:
    stacks = (cli_json(url, "devices", "show", device).get("reported") or {}).get("stacks") or {}
    app = stacks.get("app")
    return app["spec_hash"] if app and app["state"] == "running" else None


def test_stage_only_from_a_private_registry_then_switch(
    docker_engine: Any, busybox_image: str, tmp_path: Path
) -> None:
    """--stage-only --wait returns once the new image is on the device, which still runs the old
    version; deployments status shows it staged; deployments switch then moves it, and the
    registry's credentials came through `tether registries` (the registry refuses anonymous pulls)."""
    reason = registry_available()
    if reason:
        skip_or_fail(reason)
    run = uuid.uuid4().hex[:6]
    device = f"stage-{run}"
    password = f"pw-{run}"
    with Registry(tmp_path / "registry", htpasswd={"edge": password}) as registry:
        v1 = push_image(docker_engine, registry.host, f"s{run}/app:v1", 100_000, auth=("edge", password))
        v2 = push_image(docker_engine, registry.host, f"s{run}/app:v2", 2_000_000, auth=("edge", password))
        controller = ControllerProcess(tmp_path / "controller")
        url = controller.url
        agent = AgentProcess(url, device, tmp_path / device, driver="docker", labels={"pool": run})
        try:
            pool_group(url, run, device)
            added = cli(
                url, "registries", "add", registry.host, "-u", "edge", "--password-stdin", stdin=password
            )
            assert added.returncode == 0, added.stderr
            stack = tmp_path / "app.yml"
            stack.write_text(STACK.format(ref=v1))
            first = cli(url, "stacks", "deploy", str(stack), "--name", "app", "--group", "pool", "--wait",
                        "--min-healthy-time", "1s", "--timeout", "120", timeout=180)  # fmt: skip
            assert first.returncode == 0, first.stdout + first.stderr
            old_hash = _running_hash(url, device)
            assert old_hash is not None, cli_json(url, "devices", "show", device)

            stack.write_text(STACK.format(ref=v2))
            staged = cli(url, "stacks", "deploy", str(stack), "--name", "app", "--group", "pool", "--stage-only",
                         "--min-healthy-time", "1s", "--wait", "--timeout", "120", "-o", "json", timeout=180)  # fmt: skip
            assert staged.returncode == 0, staged.stdout + staged.stderr
            deployment = cli_json(url, "deployments", "ls", "--stack", "app")[0]
            assert deployment["state"] == "staged"
            status = cli_json(url, "deployments", "status", str(deployment["id"]))
            assert status["devices"][device]["state"] == "staged"
            assert _running_hash(url, device) == old_hash  # nothing switched
            assert docker_engine.images.get(v2) is not None  # but the new image is on the device

            switched = cli(url, "deployments", "switch", str(deployment["id"]))
            assert switched.returncode == 0, switched.stderr
            done = cli(url, "deployments", "switch", str(deployment["id"]))
            assert done.returncode != 0  # a second switch is one clear error

            wait_until(
                lambda: cli_json(url, "deployments", "status", str(deployment["id"]))["state"] == "succeeded",
                90,
                message="switched deployment succeeded",
            )
            assert _running_hash(url, device) not in (None, old_hash)
        finally:
            agent.stop()
            controller.stop()
            remove_tether_containers(docker_engine, "stage-")
            for ref in (v1, v2):
                with contextlib.suppress(Exception):
                    docker_engine.images.remove(ref, force=True)


PROCESS_STACK = 'services:\n  app:\n    command: ["sh", "-c", "echo {version} > version; exec sleep 600"]\n    restart: always\n'


def test_stage_only_on_a_process_driver_device_then_switch(tmp_path: Path) -> None:
    """A process-driver device (nothing to download) reports the staged version `staged` at once,
    keeps running the old one, and `deployments switch` then moves it."""
    with pool_device(tmp_path, "pstage") as (url, device):
        stack = tmp_path / "app.yml"
        deploy = ["stacks", "deploy", str(stack), "--name", "app", "--group", "pool", "--wait"]
        deploy += ["--min-healthy-time", "1s", "--timeout", "60"]
        stack.write_text(PROCESS_STACK.format(version="v1"))
        first = cli(url, *deploy, timeout=90)
        assert first.returncode == 0, first.stdout + first.stderr
        old_hash = _running_hash(url, device)
        assert old_hash is not None

        stack.write_text(PROCESS_STACK.format(version="v2"))
        staged = cli(url, *deploy, "--stage-only", timeout=90)
        assert staged.returncode == 0, staged.stdout + staged.stderr
        deployment = cli_json(url, "deployments", "ls", "--stack", "app")[0]
        assert deployment["state"] == "staged"
        assert (
            cli_json(url, "deployments", "status", str(deployment["id"]))["devices"][device]["state"]
            == "staged"
        )
        downloads = cli_json(url, "devices", "show", device)["reported"]["downloads"]
        assert downloads["app"]["state"] == "staged" and downloads["app"]["spec_hash"] != old_hash
        assert _running_hash(url, device) == old_hash, "nothing switched"

        switched = cli(url, "deployments", "switch", str(deployment["id"]))
        assert switched.returncode == 0, switched.stderr
        wait_until(
            lambda: cli_json(url, "deployments", "status", str(deployment["id"]))["state"] == "succeeded",
            60,
            message="switched deployment succeeded",
        )
        assert _running_hash(url, device) == downloads["app"]["spec_hash"]
