"""The agent's local state: what survives a restart or a reboot without a broker.

    {data_dir}/desired.msgpack         the last accepted DesiredState
    {data_dir}/stacks/{hash}.msgpack   definitions of the stacks it references
    {data_dir}/session                 the presence session counter
    {data_dir}/outbox/{seq}.msgpack    events not yet stored by the controller (its acknowledgement), oldest first
    {data_dir}/outbox/state            next event sequence number and events dropped
    {data_dir}/jobs.json               the job scheduler's state (finished one-shot runs...)
    {data_dir}/applied.json            per stack, the version that runs and the one it replaced
    {data_dir}/images/                 the image stager's content store (agent/staging.py)
    {data_dir}/configs/{stack}/{name}  config files rendered from variables (bind-mounted)
    {data_dir}/volumes/{stack}/        the stack's directory: its relative bind mounts
                                       (``./data``) and the files shipped with it; kept
                                       across updates and removal, like named volumes
    {data_dir}/volumes/{stack}.shipped.json  digest of each shipped file as last written

Every write is atomic (write a temporary file, fsync, rename over, fsync the directory),
so a power cut leaves either the old or the new file, never a torn one.

A write that fails (a full disk, a read-only file system) never stops the agent: the
previous file stays whole, the new content is kept in memory (and read from there) and
written again by :meth:`LocalStore.retry` until it succeeds; meanwhile
:meth:`LocalStore.problem` says what is wrong (path, error, free bytes), for the report.

:class:`MemoryStore` keeps the same things in memory, for the fleet simulator and tests.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tether.protocol import codec
from tether.protocol.errors import PayloadError
from tether.protocol.models import DesiredState, Event, StackDefinition, StackFile, content_hash
from tether.protocol.secret_files import private_dir

log = logging.getLogger(__name__)

OUTBOX_LIMIT = 1000
"""Events kept while offline; past this the oldest are dropped (and counted)."""


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


def free_bytes(path: Path) -> int | None:
    """Bytes available to us on the file system holding ``path`` (None if unknown)."""
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


@dataclass(frozen=True)
class StorageProblem:
    """A write that failed: what, why, and how much space was left."""

    path: str
    error: str
    free_bytes: int | None

    def message(self) -> str:
        free = "unknown" if self.free_bytes is None else f"{self.free_bytes}"
        return f"cannot write {self.path}: {self.error} (free bytes: {free}); running from memory, retrying"


class StateStore(Protocol):
    """What the agent core needs to keep."""

    def load_desired(self) -> DesiredState | None: ...
    def save_desired(self, desired: DesiredState) -> None: ...
    def load_definition(self, spec_hash: str) -> StackDefinition | None: ...
    def save_definition(self, definition: StackDefinition) -> None: ...
    def prune_definitions(self, keep: set[str]) -> None: ...
    def next_session(self) -> int: ...
    def next_event_seq(self) -> int: ...
    def outbox_put(self, event: Event) -> None: ...
    def outbox_dropped(self) -> int: ...
    def outbox_head(self, n: int) -> list[Event]: ...
    def outbox_ack(self, seq: int) -> None: ...
    def outbox_ack_through(self, seq: int) -> None: ...
    def outbox_size(self) -> int: ...
    def last_event_seq(self) -> int: ...
    def events_acked(self) -> int | None: ...
    def set_events_acked(self, seq: int) -> None: ...
    def load_json(self, name: str) -> Any: ...
    def save_json(self, name: str, value: Any) -> None: ...
    def config_path(self, stack: str, name: str) -> str: ...
    def write_config(self, stack: str, name: str, content: bytes, mode: int) -> bool: ...
    def prune_configs(self, stacks: set[str]) -> None: ...
    def stack_paths(self, stack: str, sources: set[str], files: tuple[StackFile, ...]) -> dict[str, str]: ...
    def problem(self) -> StorageProblem | None: ...
    def retry(self) -> None: ...


def shipped_layout(sources: set[str], files: tuple[StackFile, ...]) -> tuple[set[str], set[str]]:
    """(directories to create, sources that are shipped files) in a stack's directory: a
    source that is not a shipped file is a directory (created empty if nothing is shipped
    there, as Docker creates a missing bind source), and so is every parent of a file."""
    shipped = {f.path for f in files}
    dirs = {s for s in sources if s not in shipped and s != "."}
    for path in shipped:
        parent = path.rpartition("/")[0]
        while parent:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    return dirs, sources & shipped


class MemoryStore:
    """Everything in memory: nothing survives the process."""

    def __init__(self, limit: int = OUTBOX_LIMIT) -> None:
        self.desired: DesiredState | None = None
        self.definitions: dict[str, StackDefinition] = {}
        self.session = 0
        self.seq = 0
        self.outbox: deque[Event] = deque()
        self.limit = limit
        self.dropped = 0
        self.acked: int | None = 0
        self.blobs: dict[str, Any] = {}
        self.configs: dict[tuple[str, str], bytes] = {}
        self.stack_files: dict[tuple[str, str], bytes] = {}

    def load_desired(self) -> DesiredState | None:
        return self.desired

    def save_desired(self, desired: DesiredState) -> None:
        self.desired = desired

    def load_definition(self, spec_hash: str) -> StackDefinition | None:
        return self.definitions.get(spec_hash)

    def save_definition(self, definition: StackDefinition) -> None:
        self.definitions[definition.spec_hash] = definition

    def prune_definitions(self, keep: set[str]) -> None:
        self.definitions = {h: d for h, d in self.definitions.items() if h in keep}

    def next_session(self) -> int:
        self.session += 1
        return self.session

    def next_event_seq(self) -> int:
        self.seq += 1
        return self.seq

    def outbox_put(self, event: Event) -> None:
        self.outbox.append(event)
        while len(self.outbox) > self.limit:
            self.outbox.popleft()
            self.dropped += 1

    def outbox_dropped(self) -> int:
        return self.dropped

    def outbox_head(self, n: int) -> list[Event]:
        return list(itertools.islice(self.outbox, n))  # not a copy of the whole outbox per call

    def outbox_ack(self, seq: int) -> None:
        self.outbox = deque(e for e in self.outbox if e.seq != seq)

    def outbox_ack_through(self, seq: int) -> None:
        while self.outbox and self.outbox[0].seq <= seq:
            self.outbox.popleft()

    def outbox_size(self) -> int:
        return len(self.outbox)

    def last_event_seq(self) -> int:
        return self.seq

    def events_acked(self) -> int | None:
        return self.acked

    def set_events_acked(self, seq: int) -> None:
        self.acked = seq

    def load_json(self, name: str) -> Any:
        return self.blobs.get(name)

    def save_json(self, name: str, value: Any) -> None:
        if self.blobs.get(name) == value:
            return  # the same content again (the agent saves its jobs and applied stacks at every accept)
        self.blobs[name] = json.loads(json.dumps(value))

    def config_path(self, stack: str, name: str) -> str:
        return f"memory:/configs/{stack}/{name}"

    def write_config(self, stack: str, name: str, content: bytes, mode: int) -> bool:
        changed = self.configs.get((stack, name)) != content
        self.configs[(stack, name)] = content
        return changed

    def prune_configs(self, stacks: set[str]) -> None:
        self.configs = {k: v for k, v in self.configs.items() if k[0] in stacks}

    def stack_paths(self, stack: str, sources: set[str], files: tuple[StackFile, ...]) -> dict[str, str]:
        for f in files:
            self.stack_files[(stack, f.path)] = f.content()
        return {source: f"memory:/volumes/{stack}/{source}" for source in sources}

    def problem(self) -> StorageProblem | None:
        return None

    def retry(self) -> None:
        return None


class LocalStore:
    """The agent's files under ``data_dir``."""

    def __init__(self, data_dir: Path, outbox_limit: int = OUTBOX_LIMIT) -> None:
        self.dir = Path(data_dir)
        private_dir(self.dir)
        (self.dir / "stacks").mkdir(exist_ok=True)
        self.outbox_dir = self.dir / "outbox"
        self.outbox_dir.mkdir(exist_ok=True)
        self.outbox_limit = outbox_limit
        self._unsaved: dict[Path, bytes] = {}  # content whose write failed, newest per path
        self._undeleted: set[Path] = set()  # files to delete that could not be (read-only)
        self._problem: StorageProblem | None = None
        self._session = 0
        self._outbox_state = self._read_outbox_state()
        self._queued = sorted(p.name for p in self.outbox_dir.glob("*.msgpack"))
        self._events: dict[str, Event] = {}  # queued events already decoded (or just written)

    # --- writes that may fail ---

    def _write(self, path: Path, data: bytes) -> bool:
        """Write ``path`` atomically; on failure keep ``data`` in memory to retry (False)."""
        self._undeleted.discard(path)
        try:
            atomic_write(path, data)
        except OSError as exc:
            self._unsaved[path] = data
            self._failed(path, exc)
            return False
        self._unsaved.pop(path, None)
        return True

    def _failed(self, path: Path, exc: OSError) -> None:
        problem = StorageProblem(str(path), exc.strerror or str(exc), free_bytes(path.parent))
        if self._problem is None:
            log.error("%s", problem.message())
        self._problem = problem

    def _read(self, path: Path) -> bytes:
        """The content of ``path``: what is waiting to be written, else the file."""
        unsaved = self._unsaved.get(path)
        return unsaved if unsaved is not None else path.read_bytes()

    def _delete(self, path: Path) -> bool:
        """Delete ``path``; if that fails (read-only), remember to delete it later (False)."""
        self._unsaved.pop(path, None)
        if path.parent == self.outbox_dir:
            self._events.pop(path.name, None)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            self._undeleted.add(path)
            self._failed(path, exc)
            return False
        self._undeleted.discard(path)
        return True

    def problem(self) -> StorageProblem | None:
        """The last write that failed, while something is still unwritten; else None."""
        return self._problem

    def retry(self) -> None:
        """Write again what could not be written (and delete what could not be deleted), oldest
        first; clear the problem once all is done."""
        if self._problem is None:
            return
        for path, data in list(self._unsaved.items()):
            if not self._write(path, data):
                return
        for path in list(self._undeleted):
            if not self._delete(path):
                return
        log.warning("storage writable again: everything kept in memory is on disk")
        self._problem = None

    # --- desired state and definitions ---

    def load_desired(self) -> DesiredState | None:
        path = self.dir / "desired.msgpack"
        try:
            return codec.decode(self._read(path), DesiredState)
        except FileNotFoundError:
            return None
        except (OSError, PayloadError) as exc:
            log.error("ignoring unreadable %s: %s", path, exc)
            return None

    def save_desired(self, desired: DesiredState) -> None:
        self._write(self.dir / "desired.msgpack", codec.encode(desired))

    def load_definition(self, spec_hash: str) -> StackDefinition | None:
        path = self.dir / "stacks" / f"{spec_hash}.msgpack"
        try:
            definition = codec.decode(self._read(path), StackDefinition)
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
        self._write(self.dir / "stacks" / f"{definition.spec_hash}.msgpack", codec.encode(definition))

    def prune_definitions(self, keep: set[str]) -> None:
        stacks = self.dir / "stacks"
        for path in {*stacks.glob("*.msgpack"), *(p for p in self._unsaved if p.parent == stacks)}:
            if path.stem not in keep:
                self._delete(path)

    def next_session(self) -> int:
        """Persist and return the next presence session number.

        It is the larger of the last one + 1 and the current Unix time in seconds, so it keeps
        increasing even when the data dir is wiped (a reinstalled device is not mistaken
        for an older session of itself), and even when the clock steps back. It also
        increases when the file cannot be written (kept in memory meanwhile).
        """
        path = self.dir / "session"
        try:
            current = int(self._read(path).decode().strip() or 0)
        except (OSError, ValueError):
            current = 0
        session = max(current + 1, self._session + 1, int(time.time()))
        self._session = session
        self._write(path, str(session).encode())
        return session

    # --- outbox ---

    def _read_outbox_state(self) -> dict[str, int]:
        try:
            state = json.loads(self._read(self.outbox_dir / "state"))
            result = {"seq": int(state["seq"]), "dropped": int(state["dropped"])}
            if "acked" in state:
                result["acked"] = int(state["acked"])
            return result
        except (OSError, ValueError, KeyError, TypeError):
            # A new device expects the controller's acknowledgements from its first event on;
            # one upgraded from an agent without them (a state without "acked") waits for the
            # first before it stops trusting the broker's PUBACK.
            return {"seq": 0, "dropped": 0, "acked": 0}

    def _write_outbox_state(self) -> None:
        self._write(self.outbox_dir / "state", json.dumps(self._outbox_state).encode())

    def next_event_seq(self) -> int:
        self._outbox_state["seq"] += 1
        self._write_outbox_state()
        return self._outbox_state["seq"]

    def outbox_put(self, event: Event) -> None:
        name = f"{event.seq:016d}.msgpack"
        self._write(self.outbox_dir / name, codec.encode(event))
        self._queued.append(name)
        self._events[name] = event
        dropped = 0
        while len(self._queued) > self.outbox_limit:
            self._delete(self.outbox_dir / self._queued.pop(0))
            dropped += 1
        if dropped:
            self._outbox_state["dropped"] += dropped
            self._write_outbox_state()

    def outbox_dropped(self) -> int:
        return self._outbox_state["dropped"]

    def last_event_seq(self) -> int:
        return self._outbox_state["seq"]

    def events_acked(self) -> int | None:
        """The controller's last acknowledgement (every event up to it is stored); None on a
        device upgraded from an agent without them, until the first (meanwhile the broker's
        PUBACK counts)."""
        return self._outbox_state.get("acked")

    def set_events_acked(self, seq: int) -> None:
        self._outbox_state["acked"] = seq
        self._write_outbox_state()

    def outbox_ack_through(self, seq: int) -> None:
        """The controller stored every event up to ``seq``: forget them."""
        while self._queued and int(self._queued[0].split(".")[0]) <= seq:
            self._delete(self.outbox_dir / self._queued.pop(0))

    def outbox_head(self, n: int) -> list[Event]:
        """The oldest ``n`` queued events (unreadable files are dropped)."""
        events = []
        for name in list(self._queued[:n]):
            path = self.outbox_dir / name
            cached = self._events.get(name)
            if cached is not None:
                events.append(cached)
                continue
            try:
                events.append(event := codec.decode(self._read(path), Event))
                self._events[name] = event
            except (OSError, PayloadError) as exc:
                log.error("dropping unreadable queued event %s: %s", path, exc)
                self._delete(path)
                self._queued.remove(name)
        return events

    def outbox_ack(self, seq: int) -> None:
        """The broker has the event ``seq``: forget it (if still queued)."""
        name = f"{seq:016d}.msgpack"
        if name in self._queued:
            self._queued.remove(name)
            self._delete(self.outbox_dir / name)

    def outbox_size(self) -> int:
        return len(self._queued)

    # --- small JSON documents (e.g. the job scheduler's state) ---

    def load_json(self, name: str) -> Any:
        try:
            return json.loads(self._read(self.dir / f"{name}.json"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable %s.json: %s", name, exc)
            return None

    def save_json(self, name: str, value: Any) -> None:
        self._write(self.dir / f"{name}.json", json.dumps(value).encode())

    # --- rendered config files ---

    def config_path(self, stack: str, name: str) -> str:
        # Absolute: bind mounts and the process driver's links need it with a relative data dir.
        return str((self.dir / "configs" / stack / name).absolute())

    def write_config(self, stack: str, name: str, content: bytes, mode: int) -> bool:
        """Write a rendered config file if its content changed; True if it did.

        Written in place, not renamed over: a running container bind-mounts the file's
        inode, and must see the new content (``change_mode: signal`` or ``noop``). A torn
        write (power cut) is repaired at the next start, which renders and compares again.
        The directory is the agent's only (0700); the file has the mount's mode.
        """
        path = Path(self.config_path(stack, name))
        try:
            if path.read_bytes() == content:
                if path.stat().st_mode & 0o777 != mode:
                    os.chmod(path, mode)
                return False
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent.parent, 0o700)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.truncate(0)
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), mode)
        return True

    # --- the stacks' own directories (relative bind mounts) ---

    def stack_paths(self, stack: str, sources: set[str], files: tuple[StackFile, ...]) -> dict[str, str]:
        """The absolute path of each ``stack`` volume source in the stack's directory, made
        ready: directories created, shipped files written where the shipped content changed
        since it was last written (a file the service changed in place is left alone until
        the operator ships another version). Nothing is ever deleted here.

        A path that leads out of the directory through a link (which a container could have
        planted in its bind mount) is refused: :class:`OSError`."""
        root = (self.dir / "volumes" / stack).absolute()
        root.mkdir(parents=True, exist_ok=True)
        real_root = os.path.realpath(root)
        manifest_path = self.dir / "volumes" / f"{stack}.shipped.json"
        try:
            written: dict[str, str] = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            written = {}

        def inside(path: Path) -> Path:
            real = os.path.realpath(path)
            if real != real_root and not real.startswith(real_root + os.sep):
                raise OSError(f"{path.relative_to(root)} leads out of the stack's directory")
            return path

        dirs, _ = shipped_layout(sources, files)
        for d in sorted(dirs):
            path = root / d
            inside(path.parent)
            path.mkdir(parents=True, exist_ok=True)
            inside(path)
        changed = False
        for f in files:
            path = root / f.path
            inside(path.parent)
            data = f.content()
            digest = hashlib.sha256(data).hexdigest() + f":{f.mode:o}"
            if written.get(f.path) == digest and path.is_file() and not path.is_symlink():
                continue
            atomic_write(path, data)  # renamed over: never follows a link planted at the name
            os.chmod(path, f.mode)
            written[f.path] = digest
            changed = True
        if changed:
            atomic_write(manifest_path, json.dumps(written, sort_keys=True).encode())
        return {source: str(inside(root / source) if source != "." else root) for source in sources}

    def prune_configs(self, stacks: set[str]) -> None:
        root = self.dir / "configs"
        if not root.is_dir():
            return
        for stack_dir in root.iterdir():
            if stack_dir.name not in stacks:
                for f in stack_dir.iterdir():
                    f.unlink(missing_ok=True)
                stack_dir.rmdir()
