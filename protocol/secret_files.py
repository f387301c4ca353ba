"""Files that hold secrets (credentials): written 0600 and atomically, read with clear errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["private_dir", "private_file", "read_credentials", "write_secret_json", "write_secret_text"]


def private_dir(path: Path) -> Path:
    """Make ``path`` (with any missing parents) a directory only its owner may enter (0700).

    For data directories (the controller's, the agent's): what they hold (the database,
    credentials, logs, rendered configs) is nobody else's business. An existing one that
    others may read is tightened."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty if missing, and make it readable by its owner only (0600)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, mode & 0o600)
    return path


def write_secret_text(path: Path, text: str) -> None:
    """Write ``text``, readable by the owner only (0600), replacing ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_secret_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON (0600, atomically)."""
    write_secret_text(path, json.dumps(data, indent=2) + "\n")


def read_credentials(path: Path) -> dict[str, str]:
    """``{"username", "password"[, "broker", "ca_file", "tls_cert", "tls_key"]}`` from a credentials file; :class:`ConfigError` if unusable."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read credentials file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"credentials file {path}: not JSON ({exc})") from exc
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("username"), str)
        or not isinstance(data.get("password"), str)
    ):
        raise ConfigError(f"credentials file {path}: needs string fields 'username' and 'password'")
    keep = ("username", "password", "broker", "ca_file", "tls_cert", "tls_key")
    return {k: v for k, v in data.items() if k in keep and isinstance(v, str)}
