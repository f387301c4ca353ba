"""packaging/install-agent.sh in a clean Debian root filesystem, and the systemd units.

The root filesystem is a fresh copy of the debootstrap one of tests/support/images.py
(cached across runs), without python3-venv, as on a minimal Raspberry Pi OS or Debian:
the script has to install it with apt-get. The script installs the agent from a copy of
this repository (``--from``); pip reaches PyPI for the dependencies. systemd does not run
in the chroot, so the script installs the unit without enabling it. The chroot tests share
one installation and run in the order they are written, each building on the last.

test_one_line_install_from_the_controller does what a newcomer does, on a fresh root of
each architecture (arm64 and armhf under qemu-user-static): ``curl .../install.sh | sh``
from a real controller, the agent enrolls with a fleet token, runs a stack, and its logs
come back. Not marked e2e, so that CI runs these slow tests once (not again on PostgreSQL);
the foreign ones only when TETHER_TEST_FOREIGN_ARCHES names them.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.images import (
    REPO_ROOT,
    chroot_command,
    chroot_run,
    copy_repo,
    ensure_debian_rootfs,
    foreign_arch_problem,
    host_arch,
    rootfs_dir,
    skip_or_fail,
)
from support.infra import docker_client, wait_until
from support.procs import ControllerProcess, _Proc, cli, cli_json, wait_online
from tether.protocol import __version__

SCRIPT = REPO_ROOT / "packaging" / "install-agent.sh"
AGENT_UNIT = REPO_ROOT / "packaging" / "tether-agent.service"
CONTROLLER_UNIT = REPO_ROOT / "packaging" / "tether-controller.service"
ARGS = [
    "--broker", "mqtt://ctl.example:1883", "--broker", "mqtts://backup.example:8883",
    "--label", "site=berlin", "--label", "example.com/role=edge gateway",
    "--token", 'tok-"quoted"', "--driver", "process", "--device-id", "pi-1",
    "--from", "/src/tether",
]  # fmt: skip
# systemd >= 254 keys in the units, which older versions (Debian 12: 252) ignore with a warning.
NEWER_SYSTEMD_KEYS = ("RestartSteps", "RestartMaxDelaySec")


@dataclass
class Installed:
    root: Path
    first: subprocess.CompletedProcess[str]
    seconds: float

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return chroot_run(self.root, list(argv))

    def install_piped(self, *args: str) -> subprocess.CompletedProcess[str]:
        """As ``curl -fsSL .../install-agent.sh | sh -s -- ARGS`` runs it: the script on stdin."""
        return chroot_run(self.root, ["sh", "-s", "--", *args], stdin=SCRIPT.read_text())

    def install(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "/src/tether/packaging/install-agent.sh", *args)

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")


def _check_tools(arch: str | None = None) -> None:
    if os.geteuid() != 0:
        skip_or_fail("the install test chroots into a Debian root filesystem, which needs root")
    for tool in ("unshare", "chroot", "mount"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} is not installed (util-linux / coreutils)")
    problem = foreign_arch_problem(arch) if arch else None
    if problem:
        skip_or_fail(f"a {arch} root file system cannot run here: {problem}")
    cached = (rootfs_dir(arch) / ".tether-rootfs-complete").exists()
    if not cached and shutil.which("debootstrap") is None and not os.access("/usr/sbin/debootstrap", os.X_OK):
        skip_or_fail(
            "debootstrap is not installed, so no Debian root filesystem can be made (apt-get install debootstrap)"
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    _check_tools()
    base = ensure_debian_rootfs(docker_client())
    root = tmp_path_factory.mktemp("install") / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True, timeout=600)
    try:
        shutil.copyfile("/etc/resolv.conf", root / "etc" / "resolv.conf")
        copy_repo(root / "src" / "tether")
        purge = chroot_run(root, ["dpkg", "--purge", "python3-venv", "python3.11-venv"])
        assert purge.returncode == 0, purge.stderr
        assert chroot_run(root, ["python3", "-c", "import ensurepip"]).returncode != 0
        started = time.monotonic()
        first = chroot_run(root, ["sh", "/src/tether/packaging/install-agent.sh", *ARGS])
        seconds = time.monotonic() - started
        print(f"\ninstall-agent.sh in a clean chroot: {seconds:.1f}s")
        yield Installed(root, first, seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_install_in_a_clean_root(installed: Installed) -> None:
    result = installed.first
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "apt-get install python3-venv" in out
    assert "creating the virtualenv /opt/tether-agent" in out
    assert "wrote /etc/tether/agent.toml (device pi-1)" in out
    # No systemd in a chroot: the unit is in place, and the script says how to start.
    assert "systemd is not running here" in out
    assert "/opt/tether-agent/bin/tether-agent --config /etc/tether/agent.toml" in out

    config_path = installed.path("/etc/tether/agent.toml")
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    config = tomllib.loads(config_path.read_text())
    assert config == {
        "brokers": ["mqtt://ctl.example:1883", "mqtts://backup.example:8883"],
        "device_id": "pi-1",
        "driver": "process",
        "data_dir": "/var/lib/tether-agent",
        "enrollment_token": 'tok-"quoted"',
        "labels": {"site": "berlin", "example.com/role": "edge gateway"},
    }

    unit = installed.path("/etc/systemd/system/tether-agent.service")
    assert unit.read_text() == AGENT_UNIT.read_text()
    assert os.readlink(installed.path("/usr/local/bin/tether-agent")) == "/opt/tether-agent/bin/tether-agent"
    assert stat.S_IMODE(installed.path("/var/lib/tether-agent").stat().st_mode) == 0o700


def test_installed_agent_accepts_the_config(installed: Installed) -> None:
    agent = "/opt/tether-agent/bin/tether-agent"
    held = installed.run(agent, "--config", "/etc/tether/agent.toml", "--hold")
    assert held.returncode == 0, held.stderr
    assert "updates held on pi-1 (/var/lib/tether-agent/hold)" in held.stdout
    released = installed.run(agent, "--config", "/etc/tether/agent.toml", "--release")
    assert released.returncode == 0, released.stderr
    # The agent only: no controller dependencies in the device's virtualenv.
    probe = "import importlib.util as u; print([m for m in ('amqtt', 'yaml', 'psycopg') if u.find_spec(m)])"
    assert installed.run("/opt/tether-agent/bin/python", "-c", probe).stdout.strip() == "[]"


def test_install_again(installed: Installed) -> None:
    """Idempotent: the same arguments change nothing; new ones rewrite the config (kept .bak).

    The second run reads the script from standard input, as ``curl ... | sh -s --`` does.
    """
    config = installed.path("/etc/tether/agent.toml")
    unit = installed.path("/etc/systemd/system/tether-agent.service")
    before, unit_mtime = config.read_bytes(), unit.stat().st_mtime_ns

    again = installed.install_piped(*ARGS)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "apt-get" not in again.stdout
    assert "reusing the virtualenv /opt/tether-agent" in again.stdout
    assert "/etc/tether/agent.toml unchanged (device pi-1)" in again.stdout
    assert config.read_bytes() == before
    assert unit.stat().st_mtime_ns == unit_mtime
    assert not installed.path("/etc/tether/agent.toml.bak").exists()

    # A configuration the agent would reject is refused before it replaces the good one.
    bad = installed.install(*ARGS, "--label", "not a key=1")
    assert bad.returncode == 1
    assert "the configuration is not valid" in bad.stderr and "/etc/tether/agent.toml" in bad.stderr
    assert config.read_bytes() == before
    assert not list(installed.path("/etc/tether").glob(".agent.toml.*"))

    hamburg = [a if a != "site=berlin" else "site=hamburg" for a in ARGS]
    changed = installed.install(*hamburg, "--username", "pi-1", "--password", 'pa"ss')
    assert changed.returncode == 0, changed.stdout + changed.stderr
    settings = tomllib.loads(config.read_text())
    assert settings["labels"]["site"] == "hamburg"
    assert (settings["username"], settings["password"]) == ("pi-1", 'pa"ss')
    assert installed.path("/etc/tether/agent.toml.bak").read_bytes() == before
    # Credentials name their device: another id is refused.
    other = installed.install(*hamburg, "--username", "pi-2", "--password", "x")
    assert other.returncode == 1 and "the credentials are for device 'pi-2', not 'pi-1'" in other.stderr


def test_installed_agent_comes_online(
    installed: Installed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials from the controller, installed with --credentials, and the installed agent,
    run in the chroot as the unit runs it, comes online at a controller that refuses
    anonymous clients. The chroot shares this machine's network, so the controller's
    loopback address works; ``--broker`` (over the file's brokers) points the agent at it.
    Runs last: it changes the installation the tests above look at.
    """
    controller = ControllerProcess(tmp_path / "controller", auth=True)
    monkeypatch.setenv("TETHER_CREDENTIALS", str(controller.operator_file))
    issued = tmp_path / "pi-1.json"
    result = cli(controller.url, "devices", "credentials", "pi-1", "--out", str(issued))
    assert result.returncode == 0, result.stderr
    shutil.copyfile(issued, installed.path("/root/pi-1.json"))
    again = installed.install(*ARGS, "--credentials", "/root/pi-1.json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "installed the broker credentials as /var/lib/tether-agent/credentials.json" in again.stdout
    saved = installed.path("/var/lib/tether-agent/credentials.json")
    assert saved.read_bytes() == issued.read_bytes()
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert "username" not in tomllib.loads(installed.path("/etc/tether/agent.toml").read_text())

    argv = [
        "/opt/tether-agent/bin/tether-agent",
        "--config",
        "/etc/tether/agent.toml",
        "--broker",
        controller.url,
    ]
    agent = _Proc(chroot_command(installed.root, argv), tmp_path / "agent.log")
    try:
        try:
            device = wait_online(controller.url, "pi-1", timeout=60)
        except AssertionError:
            raise AssertionError(agent.output()) from None
        assert device["labels"] == {"site": "berlin", "example.com/role": "edge gateway"}
        facts = cli_json(controller.url, "devices", "show", "pi-1")["facts"]
        assert facts["driver"] == "process"
        assert facts["os"].startswith("Debian GNU/Linux 12")
        assert agent.stop() == 0
    finally:
        agent.stop()
        controller.stop()


# --- without a chroot -------------------------------------------------------------------------


def _shells() -> list[list[str]]:
    found = [[s] for s in ("dash", "sh") if shutil.which(s)]
    if shutil.which("busybox"):
        found.append(["busybox", "sh"])
    if shutil.which("bash"):
        found.append(["bash", "--posix"])
    return found


@pytest.mark.parametrize("shell", _shells(), ids=" ".join)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "at least one --broker is needed"),
        (["--broker"], "--broker needs a value"),
        (["--broker", "mqtt://x", "--driver", "kubernetes"], "--driver must be docker or process"),
        (["--broker", "mqtt://x", "--label", "novalue"], "expected KEY=VALUE"),
        (["--broker", "mqtt://x", "--frobnicate", "1"], "unknown option: --frobnicate"),
        (["--broker=mqtt://x", "stray"], "unexpected argument: stray"),
        (["--broker", "mqtt://x"], "--from PATH is needed (or run the script your controller serves"),
        (["--broker", "mqtt://x", "--username", "pi-1"], "--username and --password go together"),
        (
            ["--broker", "mqtt://x", "--username", "a", "--password", "b", "--credentials", "c.json"],
            "--credentials or --username/--password, not both",
        ),
    ],
)
def test_bad_arguments_change_nothing(shell: list[str], args: list[str], message: str) -> None:
    """Argument errors stop the script before it touches anything (and without root)."""
    result = subprocess.run([*shell, str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Usage: install-agent.sh" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("shell", _shells(), ids=" ".join)
def test_help(shell: list[str]) -> None:
    result = subprocess.run([*shell, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--broker URL" in result.stdout


def test_script_embeds_the_unit_file() -> None:
    """The script carries packaging/tether-agent.service (curl | sh has no checkout to copy from)."""
    text = SCRIPT.read_text()
    m = re.search(r"<<'UNIT'\n(.*?\n)UNIT\n", text, re.S)
    assert m is not None
    assert m.group(1) == AGENT_UNIT.read_text()


def test_systemd_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on both units, in a root with stand-ins for their programs."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    root = tmp_path / "root"
    # The system's own units (sysinit.target, ...), which verify loads as dependencies.
    for system_units in {Path(d).resolve() for d in ("/usr/lib/systemd/system", "/lib/systemd/system")}:
        if system_units.is_dir():
            shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    for program in ("/opt/tether-agent/bin/tether-agent", "/opt/tether/bin/tether"):
        stub = root / program.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in (AGENT_UNIT, CONTROLLER_UNIT):
        shutil.copyfile(unit, units / unit.name)
    result = subprocess.run(
        [analyze, "verify", f"--root={root}", AGENT_UNIT.name, CONTROLLER_UNIT.name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and not any(f"Unknown key '{key}'" in line for key in NEWER_SYSTEMD_KEYS)
    ]
    assert result.returncode == 0 and problems == [], result.stdout + result.stderr
    for unit in (AGENT_UNIT, CONTROLLER_UNIT):
        security = subprocess.run(
            [analyze, "security", "--offline=yes", f"--root={root}", unit.name],
            capture_output=True,
            text=True,
            timeout=60,
        )
        exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
        print(f"\n{unit.name}: systemd-analyze security exposure {exposure.group(1) if exposure else '?'}")


def _unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_agent_unit_settings() -> None:
    s: dict[str, Any] = _unit_settings(AGENT_UNIT)
    assert s["Restart"] == ["always"]
    assert s["After"] == ["network-online.target docker.service"]
    assert s["Wants"] == ["network-online.target"]
    assert s["ProtectSystem"] == ["strict"]
    assert s["ReadWritePaths"] == ["/var/lib/tether-agent"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert s[key] == ["yes"], key
    assert s["ExecStart"] == ["/opt/tether-agent/bin/tether-agent --config /etc/tether/agent.toml"]


# --- the one-line install from the controller, per architecture -----------------------------

# Foreign architectures to test (comma-separated, e.g. arm64,armhf): slow under qemu, so
# asked for, not run by default (CI's budget is 45 minutes for the whole suite).
FOREIGN_ARCHES = "TETHER_TEST_FOREIGN_ARCHES"
# What `uname -m` says in a root of each architecture (under qemu-user-static for foreign ones).
MACHINES = {"amd64": "x86_64", "arm64": "aarch64", "armhf": "armv7l"}
STACK = """
services:
  where:
    command: ["sh", "-c", "echo \\"running on $$(uname -m)\\"; exec sleep 3600"]
    restart: always
"""


@pytest.mark.parametrize("arch", list(MACHINES))
@pytest.mark.timeout(3600)  # a foreign root's first debootstrap runs under qemu
def test_one_line_install_from_the_controller(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`curl -fsSL http://CONTROLLER/install.sh | sh -s -- --token ...` on a fresh Debian 12 root of
    ``arch`` installs the controller's own wheel (checksum checked, Debian's msgpack/nacl/cffi),
    and the agent enrolls with the token, comes online, runs a stack and sends its logs back."""
    native = arch == host_arch()
    if not native and arch not in os.environ.get(FOREIGN_ARCHES, "").split(","):
        pytest.skip(
            f"{arch} runs under qemu: about 10 minutes on 2 cores, and 20 more to make its root the "
            f"first time; set {FOREIGN_ARCHES}=arm64,armhf to run it"
        )
    _check_tools(arch)
    base = ensure_debian_rootfs(docker_client() if native else None, arch=None if native else arch)
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True, timeout=600)
    shutil.copyfile("/etc/resolv.conf", root / "etc" / "resolv.conf")
    assert chroot_run(root, ["uname", "-m"]).stdout.strip() == MACHINES[arch]
    curl = chroot_run(
        root, ["sh", "-c", "apt-get update -qq && apt-get install -y -qq --no-install-recommends curl"]
    )
    assert curl.returncode == 0, curl.stdout + curl.stderr

    controller = ControllerProcess(tmp_path / "controller", auth=True, extra=["--http", "127.0.0.1:0"])
    agent: _Proc | None = None
    try:
        monkeypatch.setenv("TETHER_CREDENTIALS", str(controller.operator_file))
        url = controller.url
        port = int(controller.wait_for_line(r"health and metrics on http://[^:]+:(\d+)/").group(1))
        cli_json(url, "groups", "create", "edge", "--select", "fleet=one-line")
        created = cli_json(
            url,
            "tokens",
            "create",
            "--group",
            "edge",
            "--label",
            "fleet=one-line",
            "--auto-approve",
            "--uses",
            "1",
        )
        device = f"pi-{arch}"
        one_line = (
            f"curl -fsSL http://127.0.0.1:{port}/install.sh | "
            f"sh -s -- --token {created['token']} --driver process --device-id {device}"
        )
        started = time.monotonic()
        installed = chroot_run(root, ["sh", "-c", one_line], timeout=1800)
        print(f"\none-line install on {arch}: {time.monotonic() - started:.1f}s")
        out = installed.stdout + installed.stderr
        assert installed.returncode == 0, out
        assert "SHA-256 checked" in out and f"installed tether-agent {__version__}" in out
        assert "apt-get install python3-msgpack python3-nacl python3-cffi" in out
        config = tomllib.loads(root.joinpath("etc/tether/agent.toml").read_text())
        assert config["brokers"] == [url] and config["enrollment_token"] == created["token"]

        argv = ["/opt/tether-agent/bin/tether-agent", "--config", "/etc/tether/agent.toml"]
        agent = _Proc(chroot_command(root, argv), tmp_path / "agent.log")
        try:
            wait_online(url, device, timeout=300)
        except AssertionError:
            raise AssertionError(agent.output()) from None
        stack = tmp_path / "where.yml"
        stack.write_text(STACK)
        deployed = cli(url, "stacks", "deploy", str(stack), "--name", "where", "--group", "edge", "--wait",
                       "--min-healthy-time", "1s", timeout=600)  # fmt: skip
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr + agent.output()

        def logged() -> str | None:
            result = cli(url, "logs", device, "where", "--tail", "1", timeout=120)
            return result.stdout if f"running on {MACHINES[arch]}" in result.stdout else None

        wait_until(logged, 120, interval=1, message=f"the stack's log line from {device}")
        assert agent.stop() == 0
    finally:
        if agent is not None:
            agent.stop()
        controller.stop()
        shutil.rmtree(root, ignore_errors=True)
