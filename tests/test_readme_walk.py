"""The README's commands, run as written and in order, so that the docs cannot drift.

Every ```sh block line of every ``##`` section runs verbatim with bash, in README order, in
a fresh directory laid out as the repository root (``docs/`` and ``.venv`` linked), inside a
network namespace of its own, so the README's fixed addresses (127.0.0.1:1883, ports 8080
and 8081) are free and nothing else on this machine is reached. A section that cannot run
here is in :data:`SKIPPED`, with the reason; a new section is walked unless it is added there.

The Docker sections talk to a Docker engine of the walk's own (dockerd started in the
namespace, its state in the test's directory; ``DOCKER_HOST`` points at it), so the images
the README builds and the ports it publishes are the walk's alone. As root without
``sudo`` installed, ``sudo`` runs the command as it is (what a reader who is root does).

The harness only does what a reader does: starts `tether up` (terminal 1) and agents
(``tether-agent ...``, a terminal of their own, or ``... &``) in the background and waits for
them to be online (a helper such as the webhook receiver, ``python3 ... &``, it only starts),
reads a deployment's or webhook's id from the output where the README says "the id
printed above", retries a line whose comment shows its output (``# → hello``: the text before
any `` (``; ``...`` ends it) until that output appears (the device takes a moment), and
expects an error where the README shows one (`# tether: error: ...`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.images import REPO_ROOT
from support.infra import wait_until
from support.procs import _Proc

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

SKIPPED = {
    "Install and start (Debian / Ubuntu)": "the walk runs in the checkout's own .venv, which that pip "
    "install made; scripts/install-test-deps and scripts/test install packages and run this suite",
    "Real devices": "the device is another machine: the one-line install runs apt-get and reaches the "
    "package index for the agent's dependencies, which the walk's namespace cannot; "
    "tests/test_install_script.py::test_one_line_install_from_the_controller runs the same "
    "`curl .../install.sh | sh -s -- --token ...` against a real controller in Debian roots, and "
    "tests/test_e2e_enroll.py the token, waiting room and approval",
    "Running the controller for real": "an HA pair needs PostgreSQL and Mosquitto at example hosts; "
    "tests/test_e2e_ha.py runs it",
    "Performance": "the benchmarks take minutes to an hour; tests/test_bench_smoke.py runs each small",
}
"""Sections with ```sh blocks that the walk does not run, and why."""


@dataclass
class Line:
    section: str
    command: str
    comment: str
    expect_error: str | None = None


def sections(text: str) -> dict[str, str]:
    """The README's ``##`` sections, title to text, in order."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def walked_sections(text: str) -> list[str]:
    """The sections with ```sh blocks, in order, but those in :data:`SKIPPED`."""
    return [t for t, body in sections(text).items() if "```sh\n" in body and t not in SKIPPED]


def readme_lines(text: str, titles: list[str] | None = None) -> list[Line]:
    """The commands of the ```sh blocks of ``titles`` (default: every walked section; continuations
    joined), in order."""
    by_title = sections(text)
    lines: list[Line] = []
    for title in walked_sections(text) if titles is None else titles:
        for block in re.findall(r"^```sh\n(.*?)^```", by_title[title], flags=re.M | re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            compound: list[str] = []  # the lines of a `for ...; do` until its `done`
            for raw in joined.splitlines():
                if compound:
                    compound.append(raw)
                    if _complete("\n".join(compound)):
                        lines.append(Line(title, "\n".join(compound), ""))
                        compound = []
                    continue
                if not raw.strip():
                    continue
                if raw.startswith("# tether: error:") and lines:
                    lines[-1].expect_error = raw.removeprefix("# tether: error:").strip()
                    continue
                if raw.lstrip().startswith("#"):
                    continue
                if re.match(r"(for|while|if|case)\b", raw) and not _complete(raw):
                    compound = [raw]
                    continue
                command, _, comment = raw.partition("  #")
                if not comment and " # " in raw:
                    command, _, comment = raw.partition(" # ")
                lines.append(Line(title, command.strip(), comment.strip()))
            assert not compound, f"[{title}] an unterminated compound command: {compound[0]!r}"
    return lines


def _complete(script: str) -> bool:
    """Whether bash reads ``script`` as complete commands (a `for` has its `done`)."""
    return subprocess.run(["bash", "-n", "-c", script], capture_output=True).returncode == 0


def expected_output(comment: str) -> str | None:
    """What a line's comment shows it prints (``# → hello (...)``: ``hello``), or None."""
    if not comment.startswith("→"):
        return None
    return comment.removeprefix("→").split(" (")[0].strip().removesuffix("...").strip()


def is_agent(command: str) -> bool:
    """Whether a line starts an agent in a terminal of its own (it runs until stopped)."""
    return command.split(" ", 1)[0] in ("tether-agent", ".venv/bin/tether-agent")


def test_readme_parses_into_the_walk() -> None:
    """The walk finds the commands it relies on in the sections a newcomer follows, in README order
    (a renamed section or block fails here, not silently), and every skipped section exists."""
    text = (REPO_ROOT / "README.md").read_text()
    lines = readme_lines(text)
    commands = [line.command for line in lines]
    assert any(c.startswith("tether up --with-agent") for c in commands)
    assert any(c.endswith("&") and "demo-1" in c for c in commands)
    assert any(is_agent(c) and "--driver docker" in c for c in commands)
    assert any(line.expect_error for line in lines)
    assert any(ln.command.startswith("curl ") and expected_output(ln.comment) for ln in lines)
    walked = walked_sections(text)
    newcomer = [
        "Quick start",
        "Variables and secrets",
        "With Docker: a web server on a published port",
        "Rolling out updates",
        "Edge jobs",
        "Notifications",
        "Users, roles and the audit log",
        "Remote operations and metrics",
    ]
    assert [t for t in walked if t in newcomer] == newcomer
    assert set(SKIPPED) <= set(sections(text)), "a skipped section is gone: drop it from SKIPPED"
    assert expected_output("→ hello from the fleet (token: 12 characters)") == "hello from the fleet"
    assert expected_output("→ bonjour from ...") == "bonjour from"
    assert expected_output("the id printed above") is None


class Namespace:
    def __init__(self) -> None:
        self.name = f"tether-readme-{uuid.uuid4().hex[:8]}"
        self.env = ""
        self.dockerd: subprocess.Popen[bytes] | None = None
        self.docker_dir: Path | None = None
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"], check=True)

    def argv(self, work: Path, command: str) -> list[str]:
        script = f"cd {work} && {self.env}. .venv/bin/activate && {command}"
        return ["ip", "netns", "exec", self.name, "bash", "-c", script]

    def start_dockerd(self) -> str:
        """A Docker engine of the namespace's own (nsenter keeps the host's mounts: cgroups);
        its socket's URL."""
        self.docker_dir = Path(tempfile.mkdtemp(prefix="tw-docker-"))  # short: socket paths
        socket = self.docker_dir / "docker.sock"
        self.dockerd = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{self.name}", "dockerd", "--host", f"unix://{socket}",
             "--data-root", str(self.docker_dir / "data"), "--exec-root", str(self.docker_dir / "exec"),
             "--pidfile", str(self.docker_dir / "dockerd.pid"), "--shutdown-timeout", "2"],
            stdout=open(self.docker_dir / "dockerd.log", "wb"),  # noqa: SIM115 - the process keeps it
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"unix://{socket}"

        def answers() -> bool:
            assert self.dockerd is not None
            if self.dockerd.poll() is not None:
                log = (self.docker_dir / "dockerd.log").read_text()[-2000:] if self.docker_dir else ""
                pytest.fail(f"dockerd in the walk's namespace exited:\n{log}")
            probe = subprocess.run(
                ["docker", "--host", url, "info", "--format", "{{.ID}}"], capture_output=True, timeout=30
            )
            return probe.returncode == 0

        wait_until(answers, 60, 0.25, "the walk's dockerd answering")
        return url

    def stop_dockerd(self) -> None:
        if self.dockerd is not None and self.dockerd.poll() is None:
            self.dockerd.send_signal(signal.SIGTERM)
            try:
                self.dockerd.wait(60)
            except subprocess.TimeoutExpired:
                self.dockerd.kill()
                self.dockerd.wait(10)
        if self.docker_dir is not None:
            shutil.rmtree(self.docker_dir, ignore_errors=True)

    def delete(self) -> None:
        self.stop_dockerd()
        pids = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True
        ).stdout.split()
        for pid in pids:
            subprocess.run(["kill", "-9", pid], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def _skip(reason: str) -> None:
    if os.environ.get("TETHER_REQUIRE_NETNS") == "1":
        pytest.fail(f"TETHER_REQUIRE_NETNS=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    for tool in ("ip", "nsenter", "dockerd", "docker", "curl"):
        if shutil.which(tool) is None:
            _skip(f"{tool} is not installed (the walk needs it)")
    try:
        ns = Namespace()
    except subprocess.CalledProcessError as exc:
        _skip(f"no network namespace here (root needed): {exc.stderr!r}")
    yield ns
    ns.delete()


def test_readme_walk(tmp_path: Path, namespace: Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every README section a newcomer follows (quick start, variables, Docker, rollouts, jobs, remote
    operations...), verbatim and in order, succeeds (on SQLite, as the README's controller does: a
    PostgreSQL on the root namespace's loopback is out of the walk's namespace's reach)."""
    monkeypatch.delenv("TETHER_DB", raising=False)
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "docs").symlink_to(REPO_ROOT / "docs")
    (work / ".venv").symlink_to(Path(sys.prefix))
    env = f"export DOCKER_HOST={namespace.start_dockerd()} && "
    if shutil.which("sudo") is None and os.geteuid() == 0:
        (work / ".bin").mkdir()
        (work / ".bin" / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
        (work / ".bin" / "sudo").chmod(0o755)
        env += f"export PATH={work / '.bin'}:$PATH && "
    namespace.env = env
    background: list[_Proc] = []

    def run(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            namespace.argv(work, command),
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )

    def online(device: str) -> bool:
        listed = run("tether devices ls -o json")
        return listed.returncode == 0 and any(
            d["id"] == device and d["status"] == "online" for d in json.loads(listed.stdout)
        )

    transcript: list[str] = []
    last_output = ""
    try:
        for line in readme_lines((REPO_ROOT / "README.md").read_text()):
            command = line.command
            if command.startswith(". .venv/bin/activate"):
                continue  # every command runs with it
            if command.startswith("tether up") or command.endswith("&") or is_agent(command):
                argv = namespace.argv(work, f"exec {command.removesuffix('&').strip()}")
                background.append(_Proc(argv, tmp_path / f"background-{len(background)}.log"))
                if not (command.startswith("tether up") or is_agent(command)):
                    transcript.append(f"$ {command}   (in the background)")
                    continue  # a helper (the webhook receiver): what follows waits for it
                device = re.search(r"--device-id (\S+)", command)
                name = device.group(1) if device else "local"
                began = time.monotonic()
                wait_until(lambda name=name: online(name), 60, 0.5, f"{name} online after `{command}`")
                took = time.monotonic() - began
                transcript.append(f"$ {command}   (in the background; {name} online after {took:.1f}s)")
                continue
            if "the id printed above" in line.comment and (webhook := re.search(r"\bwh-\w+", command)):
                printed = re.findall(r"webhook (wh-\w+)", last_output)
                assert printed, f"no webhook id printed before `{command}`:\n{last_output}"
                command = command.replace(webhook.group(0), printed[-1])
            elif "the id printed above" in line.comment:
                printed = re.findall(r"deployment (\d+)", last_output)
                assert printed, f"no deployment id printed before `{command}`:\n{last_output}"
                command = re.sub(r"\b\d+\b", printed[-1], command)
            expected = expected_output(line.comment)

            def attempt(
                command: str = command, expected: str | None = expected
            ) -> subprocess.CompletedProcess[str] | None:
                result = run(command)
                return result if expected is None or expected in result.stdout else None

            began = time.monotonic()
            result = (
                wait_until(attempt, 30, 1, f"`{command}` printing {expected!r}") if expected else run(command)
            )
            assert result is not None
            took = time.monotonic() - began
            transcript.append(f"$ {command}   ({took:.1f}s)\n{result.stdout}{result.stderr}")
            last_output = result.stdout + result.stderr
            context = "\n".join(transcript[-5:])
            if line.expect_error is not None:
                assert result.returncode != 0, f"`{command}` should fail as the README shows:\n{context}"
                # Numbers may differ (ids); "..." stands for what varies (log lines, dates).
                actual = re.sub(r"\d+", "N", result.stderr)
                pieces = re.sub(r"\d+", "N", line.expect_error).split("...")
                assert all(p.strip() in actual for p in pieces), (
                    f"README shows `tether: error: {line.expect_error}`:\n{context}"
                )
            else:
                assert result.returncode == 0, f"[{line.section}] `{command}` failed:\n{context}"
    finally:
        for proc in reversed(background):
            proc.stop()
        print("\n".join(transcript))
        started = time.monotonic()
        namespace.stop_dockerd()
        print(f"(the walk's dockerd stopped in {time.monotonic() - started:.1f}s)")
