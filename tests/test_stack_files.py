"""Relative bind mounts: `stack` volumes and the files shipped with a stack, from the
controller's parsing to the agent's stack directory (agent/store.py)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from pydantic import ValidationError
from tether.agent.store import LocalStore
from tether.controller.compose import parse_compose
from tether.protocol.errors import ComposeError
from tether.protocol.models import MAX_STACK_FILE_BYTES, StackFile, StackSpec, VolumeSpec

COMPOSE = "services:\n  s:\n    image: x\n    volumes: ['./conf:/conf:ro', './app.conf:/app.conf', './data:/data']\n"


def shipped(path: str, data: bytes, mode: int = 0o644) -> StackFile:
    return StackFile(path=path, data=base64.b64encode(data).decode(), mode=mode)


def test_relative_sources_are_stack_volumes_with_a_digest_of_their_files() -> None:
    """./x sources become `stack` volumes; the digest covers what is shipped under each, so a
    changed file changes only the services mounting it; nothing shipped, no digest."""
    one = parse_compose(COMPOSE, (shipped("conf/a.yml", b"a"), shipped("app.conf", b"x")))
    volumes = {v.target: v for v in one.services[0].volumes}
    assert (
        volumes["/conf"].type == "stack" and volumes["/conf"].source == "conf" and volumes["/conf"].read_only
    )
    assert volumes["/conf"].digest and volumes["/app.conf"].digest
    assert volumes["/data"].digest is None and "digest" not in volumes["/data"].model_dump(mode="json")
    assert [f.path for f in one.files] == ["app.conf", "conf/a.yml"]
    two = parse_compose(COMPOSE, (shipped("conf/a.yml", b"a"), shipped("app.conf", b"y")))
    volumes2 = {v.target: v for v in two.services[0].volumes}
    assert volumes2["/conf"].digest == volumes["/conf"].digest
    assert volumes2["/app.conf"].digest != volumes["/app.conf"].digest
    assert two.spec_hash() != one.spec_hash()


def test_stacks_without_files_keep_their_hash() -> None:
    """The new fields are absent from a stack that ships nothing: its hash is as before."""
    spec = parse_compose("services:\n  s: {image: x, volumes: ['/srv:/srv']}\n")
    dumped = spec.model_dump(mode="json")
    assert "files" not in dumped and "digest" not in dumped["services"][0]["volumes"][0]
    assert spec == StackSpec(services=spec.services)


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        ((shipped("other/x", b"1"),), "not under any relative bind mount"),
        ((shipped("app.conf", b"1"), shipped("app.conf", b"2")), "sent twice"),
        ((shipped("conf", b"1"), shipped("conf/a", b"2")), "inside the shipped file"),
        ((StackFile(path="app.conf", data="%%%"),), "not base64"),
        ((shipped("app.conf", b"\0" * (MAX_STACK_FILE_BYTES + 1)),), "larger than"),
    ],
)
def test_bad_shipped_files_are_refused(files: tuple[StackFile, ...], fragment: str) -> None:
    """What a deploy ships is checked by the controller (remote input): one clear error."""
    with pytest.raises(ComposeError, match=fragment):
        parse_compose(COMPOSE, files)


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../x", "a//b", "./a", "", "."])
def test_shipped_paths_stay_in_the_stack_directory(path: str) -> None:
    """A file path or stack source that would leave the stack's directory does not validate."""
    with pytest.raises(ValidationError):
        StackFile(path=path, data="")
    if path not in ("", ".", "/etc/passwd"):
        with pytest.raises(ValidationError):
            VolumeSpec(type="stack", source=path, target="/x")


def test_controller_refuses_relative_paths_leaving_the_stack() -> None:
    """../ and ~/ sources (the CLI maps them) and ./.. tricks are refused by the controller."""
    for source in ("../x", "~/x", "./a/../../x"):
        with pytest.raises(ComposeError):
            parse_compose(f"services:\n  s: {{image: x, volumes: ['{source}:/x']}}\n")


def test_agent_writes_shipped_files_and_keeps_what_the_service_changed(tmp_path: Path) -> None:
    """The stack's directory: shipped files written (with their mode), missing sources created
    as directories, a file the service changed kept until another version is shipped, files
    it created never touched."""
    store = LocalStore(tmp_path)
    files = (shipped("app.conf", b"v1", 0o600), shipped("conf/sub/run.sh", b"#!/bin/sh\n", 0o755))
    paths = store.stack_paths("web", {"app.conf", "conf", "data"}, files)
    root = (tmp_path / "volumes" / "web").absolute()
    assert paths == {s: str(root / s) for s in ("app.conf", "conf", "data")}
    assert (root / "app.conf").read_bytes() == b"v1" and (root / "app.conf").stat().st_mode & 0o777 == 0o600
    assert (root / "conf/sub/run.sh").stat().st_mode & 0o777 == 0o755
    assert (root / "data").is_dir()
    (root / "app.conf").write_bytes(b"changed by the service")
    (root / "data" / "db").write_bytes(b"state")
    store.stack_paths("web", {"app.conf", "conf", "data"}, files)
    assert (root / "app.conf").read_bytes() == b"changed by the service"
    store.stack_paths("web", {"app.conf", "conf", "data"}, (shipped("app.conf", b"v2", 0o600), files[1]))
    assert (root / "app.conf").read_bytes() == b"v2"
    assert (root / "data" / "db").read_bytes() == b"state"


def test_agent_refuses_a_link_out_of_the_stack_directory(tmp_path: Path) -> None:
    """A link planted in the stack's directory (by a container) never makes the agent write
    or mount outside it."""
    store = LocalStore(tmp_path)
    root = tmp_path / "volumes" / "web"
    root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "conf")
    with pytest.raises(OSError, match="leads out of the stack's directory"):
        store.stack_paths("web", {"conf"}, (shipped("conf/a", b"x"),))
    with pytest.raises(OSError, match="leads out"):
        store.stack_paths("web", {"conf"}, ())
    assert list(outside.iterdir()) == []
