"""The backup and restore procedures of docs/operations.md, run as documented.

SQLite: an online ``sqlite3 tether.db ".backup FILE"`` (and Python's ``Connection.backup``,
for hosts without the sqlite3 program) while the controller runs, restored into a new data
directory. PostgreSQL: ``pg_dump --format=custom`` and ``pg_restore`` into a new database.
Each restored store is opened by a new controller, which must see what was there.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.infra import _pg_bin
from support.procs import ControllerProcess, cli_json

PYTHON_BACKUP = "import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))"


def _make_state(url: str) -> str:
    group = f"g-{uuid.uuid4().hex[:6]}"
    cli_json(url, "groups", "create", group, "--device", "some-device")
    return group


def _groups(url: str) -> list[str]:
    return [g["name"] for g in cli_json(url, "groups", "ls")]


@pytest.mark.parametrize("tool", ["sqlite3", "python"])
def test_sqlite_online_backup_and_restore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tool: str) -> None:
    monkeypatch.delenv("TETHER_DB", raising=False)
    if tool == "sqlite3" and shutil.which("sqlite3") is None:
        pytest.skip("the sqlite3 program is not installed (apt-get install sqlite3)")
    live = tmp_path / "live"
    backup = tmp_path / "tether-backup.db"
    controller = ControllerProcess(live)
    try:
        group = _make_state(controller.url)
        # Online, while the controller runs and holds the database open.
        if tool == "sqlite3":
            subprocess.run(
                ["sqlite3", str(live / "tether.db"), f".backup '{backup}'"], check=True, timeout=60
            )
        else:  # the one-liner of docs/operations.md
            subprocess.run(
                [sys.executable, "-c", PYTHON_BACKUP, str(live / "tether.db"), str(backup)], check=True
            )
        assert _groups(controller.url) == [group]
    finally:
        controller.stop()
    with sqlite3.connect(backup) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copyfile(backup, restored / "tether.db")
    controller = ControllerProcess(restored)
    try:
        assert _groups(controller.url) == [group]
    finally:
        controller.stop()


def test_postgres_dump_and_restore(
    tmp_path: Path, postgres_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TETHER_DB", raising=False)
    pg_dump, pg_restore = _pg_bin("pg_dump"), _pg_bin("pg_restore")
    assert pg_dump and pg_restore
    source = postgres_server.create_database(f"src_{uuid.uuid4().hex[:8]}")
    dump = tmp_path / "tether.dump"
    controller = ControllerProcess(tmp_path / "c1", db=source)
    try:
        group = _make_state(controller.url)
        # Online: pg_dump reads one consistent snapshot while the controller writes.
        subprocess.run([pg_dump, "--format=custom", f"--file={dump}", source], check=True, timeout=120)
    finally:
        controller.stop()

    target = postgres_server.create_database(f"dst_{uuid.uuid4().hex[:8]}")
    subprocess.run(
        [
            pg_restore,
            "--no-owner",
            "--exit-on-error",
            "--single-transaction",
            f"--dbname={target}",
            str(dump),
        ],
        check=True,
        timeout=120,
    )
    controller = ControllerProcess(tmp_path / "c2", db=target)
    try:
        assert _groups(controller.url) == [group]
    finally:
        controller.stop()
