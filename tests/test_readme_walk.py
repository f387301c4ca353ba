"""The README's commands, run as written and in order, so that the docs cannot drift.

The sections that need neither Docker nor a device: Quick start, Variables and secrets,
Rolling out updates, Edge jobs, HTTP API. Every ```sh block line runs verbatim with bash in a fresh
directory laid out as the repository root (``docs/`` and ``.venv`` linked), inside a network
namespace of its own, so the README's fixed address (127.0.0.1:1883) is free and nothing
else on this machine is reached. The harness only does what a reader does: starts
`tether up` (terminal 1) and `... &` agents in the background and waits for them to be
online, reads a deployment id from the output where the README says "the id printed above",
retries a `tether logs` line until its documented output appears (the device takes a moment),
and expects an error where the README shows one (`# tether: error: ...`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.images import REPO_ROOT
from support.infra import wait_until
from support.procs import _Proc

pytestmark = pytest.mark.e2e

SECTIONS = ("Quick start", "Variables and secrets", "Rolling out updates", "Edge jobs", "HTTP API")


@dataclass
class Line:
    section: str
    command: str
    comment: str
    expect_error: str | None = None


def readme_lines(text: str, sections: tuple[str, ...] = SECTIONS) -> list[Line]:
    """The commands of the ```sh blocks of ``sections`` (continuations joined), in order."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    by_title = {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    lines: list[Line] = []
    for title in sections:
        for block in re.findall(r"^```sh\n(.*?)^```", by_title[title], flags=re.M | re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for raw in joined.splitlines():
                if not raw.strip():
                    continue
                if raw.startswith("# tether: error:") and lines:
                    lines[-1].expect_error = raw.removeprefix("# tether: error:").strip()
                    continue
                if raw.lstrip().startswith("#"):
                    continue
                command, _, comment = raw.partition("  #")
                if not comment and " # " in raw:
                    command, _, comment = raw.partition(" # ")
                lines.append(Line(title, command.strip(), comment.strip()))
    return lines


def test_readme_parses_into_the_walk() -> None:
    """The walk finds the commands it relies on (a renamed section or block fails here, not silently)."""
    lines = readme_lines((REPO_ROOT / "README.md").read_text())
    commands = [line.command for line in lines]
    assert any(c.startswith("tether up --with-agent") for c in commands)
    assert any(c.endswith("&") and "demo-1" in c for c in commands)
    assert any(line.expect_error for line in lines)
    assert {line.section for line in lines} == set(SECTIONS)


class Namespace:
    def __init__(self) -> None:
        self.name = f"tether-readme-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"], check=True)

    def argv(self, work: Path, command: str) -> list[str]:
        script = f"cd {work} && . .venv/bin/activate && {command}"
        return ["ip", "netns", "exec", self.name, "bash", "-c", script]

    def delete(self) -> None:
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
    if subprocess.run(["sh", "-c", "command -v ip"], capture_output=True).returncode != 0:
        _skip("ip (iproute2) is not installed")
    try:
        ns = Namespace()
    except subprocess.CalledProcessError as exc:
        _skip(f"no network namespace here (root needed): {exc.stderr!r}")
    yield ns
    ns.delete()


def test_readme_walk(tmp_path: Path, namespace: Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Quick start, variables, rollouts and jobs of README.md, verbatim and in order, succeed
    (on SQLite, as the README's controller does: a PostgreSQL on the root namespace's loopback
    is out of the walk's namespace's reach)."""
    monkeypatch.delenv("TETHER_DB", raising=False)
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "docs").symlink_to(REPO_ROOT / "docs")
    (work / ".venv").symlink_to(Path(sys.prefix))
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
            if command.startswith("tether up") or command.endswith("&"):
                argv = namespace.argv(work, f"exec {command.removesuffix('&').strip()}")
                background.append(_Proc(argv, tmp_path / f"background-{len(background)}.log"))
                device = re.search(r"--device-id (\S+)", command)
                name = device.group(1) if device else "local"
                wait_until(lambda name=name: online(name), 60, 0.5, f"{name} online after `{command}`")
                transcript.append(f"$ {command}   (in the background; {name} online)")
                continue
            if "the id printed above" in line.comment:
                printed = re.findall(r"deployment (\d+)", last_output)
                assert printed, f"no deployment id printed before `{command}`:\n{last_output}"
                command = re.sub(r"\b\d+\b", printed[-1], command)
            expected = None
            if command.startswith("tether logs") and line.comment:
                expected = line.comment.split(" (")[0].removesuffix("...").strip()

            def attempt(
                command: str = command, expected: str | None = expected
            ) -> subprocess.CompletedProcess[str] | None:
                result = run(command)
                return result if expected is None or expected in result.stdout else None

            result = (
                wait_until(attempt, 30, 1, f"`{command}` printing {expected!r}") if expected else run(command)
            )
            assert result is not None
            transcript.append(f"$ {command}\n{result.stdout}{result.stderr}")
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
