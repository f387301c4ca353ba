"""Data directories 0700 and their files 0600, on the controller's side (the agent's: test_e2e_process)."""

from __future__ import annotations

import stat
from pathlib import Path

from tether.controller.app import _session
from tether.controller.models import Device
from tether.controller.store import Store
from tether.protocol.secret_files import private_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_dir_creates_and_tightens(tmp_path: Path) -> None:
    """A new data directory (and missing parents) is 0700; an existing world-readable one is tightened."""
    new = private_dir(tmp_path / "a" / "b")
    assert _mode(new) == 0o700
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    old.chmod(0o755)
    private_dir(old)
    assert _mode(old) == 0o700


def test_sqlite_store_and_its_wal_are_private(tmp_path: Path) -> None:
    """tether.db and the WAL and SHM files SQLite makes beside it are 0600, an old 0644 one too."""
    db = tmp_path / "tether.db"
    db.touch(mode=0o644)
    db.chmod(0o644)
    store = Store(db)
    store.put_device(Device(id="probe"))
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        if path.exists():
            assert _mode(path) == 0o600, path
    assert Path(f"{db}-wal").exists()
    store.close()


def test_controller_session_file_is_private(tmp_path: Path) -> None:
    """{data_dir}/mqtt-session (the client id that resumes the controller's session) is 0600,
    an existing world-readable one is tightened and kept; a malformed one is replaced."""
    session, known = _session(tmp_path)
    assert not known and _mode(tmp_path / "mqtt-session") == 0o600
    (tmp_path / "mqtt-session").chmod(0o644)
    assert _session(tmp_path) == (session, True)
    assert _mode(tmp_path / "mqtt-session") == 0o600
    (tmp_path / "mqtt-session").write_text("tether-controller-x\n\nevil")
    other, known = _session(tmp_path)
    assert not known and other != session and _mode(tmp_path / "mqtt-session") == 0o600
