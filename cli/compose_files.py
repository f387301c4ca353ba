"""The operator's Compose files resolved on this machine (protocol/compose_resolve.py) for
``tether stacks deploy`` and ``tether stacks config``: the thin I/O around the pure resolver."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tether.protocol.errors import ConfigError

if TYPE_CHECKING:
    from tether.protocol.compose_resolve import Resolved

DEFAULT_NAMES = ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")
"""Looked for in the current directory when no file is given, in this order (as docker compose)."""


class LocalFiles:
    """The local file system as :class:`~tether.protocol.compose_resolve.Files`."""

    def read(self, path: str) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None

    def kind(self, path: str) -> str | None:
        p = Path(path)
        return "dir" if p.is_dir() else "file" if p.is_file() else None

    def walk(self, path: str) -> list[str]:
        found = []
        for top, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(top, name)
                if os.path.isfile(full):  # regular files (through links); sockets, fifos skipped
                    found.append(os.path.relpath(full, path).replace(os.sep, "/"))
        return found

    def mode(self, path: str) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)


def compose_paths(files: Iterable[str]) -> list[str]:
    """The files given, absolute; or the default file of the current directory."""
    given = [os.path.abspath(f) for f in files]
    if given:
        return given
    for name in DEFAULT_NAMES:
        if os.path.isfile(name):
            return [os.path.abspath(name)]
    raise ConfigError(f"no Compose file given and none of {', '.join(DEFAULT_NAMES)} here")


def resolve_files(
    files: Iterable[str],
    env_files: Iterable[str] = (),
    env: Iterable[str] = (),
    profiles: Iterable[str] = (),
) -> Resolved:
    """Resolve the stack's files with this shell's environment (``env``: ``KEY=VALUE`` items)."""
    try:
        from tether.protocol.compose_resolve import Resolver
    except ImportError:
        raise ConfigError(
            "reading Compose files needs PyYAML on this machine: pip install 'tether[cli]'"
        ) from None
    overrides = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"-e {item!r}: write KEY=VALUE")
        overrides[key] = value
    paths = compose_paths(files)
    resolver = Resolver(LocalFiles(), home=os.path.expanduser("~"))
    values = resolver.project_env(
        os.path.dirname(paths[0]), dict(os.environ), [os.path.abspath(f) for f in env_files], overrides
    )
    return resolver.resolve(paths, values, tuple(profiles))
