"""The agent's local state on disk: what survives a restart or a reboot without a broker.

    {data_dir}/desired.msgpack         the last accepted DesiredState
    {data_dir}/stacks/{hash}.msgpack   definitions of the stacks it references
    {data_dir}/session                 the presence session counter

Every write is atomic (write a temporary file, fsync, rename over, fsync the directory),
so a power cut leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from tether.protocol import codec
from tether.protocol.errors import PayloadError
from tether.protocol.models import DesiredState, StackDefinition, content_hash

log = logging.getLogger(__name__)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class LocalStore:
    """Reads and writes the agent's files under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "stacks").mkdir(exist_ok=True)

    def load_desired(self) -> DesiredState | None:
        path = self.dir / "desired.msgpack"
        try:
            return codec.decode(path.read_bytes(), DesiredState)
        except FileNotFoundError:
            return None
        except (OSError, PayloadError) as exc:
            log.error("ignoring unreadable %s: %s", path, exc)
            return None

    def save_desired(self, desired: DesiredState) -> None:
        atomic_write(self.dir / "desired.msgpack", codec.encode(desired))

    def load_definition(self, spec_hash: str) -> StackDefinition | None:
        path = self.dir / "stacks" / f"{spec_hash}.msgpack"
        try:
            definition = codec.decode(path.read_bytes(), StackDefinition)
        except FileNotFoundError:
            return None
        except (OSError, PayloadError) as exc:
            log.error("ignoring unreadable %s: %s", path, exc)
            return None
        if content_hash(definition.spec) != spec_hash:
            log.error("ignoring %s: content does not match its hash", path)
            return None
        return definition

    def save_definition(self, definition: StackDefinition) -> None:
        atomic_write(self.dir / "stacks" / f"{definition.spec_hash}.msgpack", codec.encode(definition))

    def prune_definitions(self, keep: set[str]) -> None:
        for path in (self.dir / "stacks").glob("*.msgpack"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)

    def next_session(self) -> int:
        """Increment and persist the presence session counter; return the new value."""
        path = self.dir / "session"
        try:
            current = int(path.read_text().strip() or 0)
        except (OSError, ValueError):
            current = 0
        atomic_write(path, str(current + 1).encode())
        return current + 1
