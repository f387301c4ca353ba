"""The CLI's per-user configuration: named contexts written by `tether up` and `tether login`.

Each test has its own configuration file (TETHER_CLI_CONFIG, tests/conftest.py); the CLI runs
from / (support.procs.cli), where no ./tether-data/operator.json is.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from support.procs import PY, ControllerProcess, cli, cli_json
from tether.cli.contexts import Config
from tether.protocol.errors import ConfigError


def _config() -> dict:  # type: ignore[type-arg]
    return json.loads(Path(os.environ["TETHER_CLI_CONFIG"]).read_text())


@pytest.mark.e2e
def test_up_login_and_contexts(tmp_path: Path) -> None:
    """`tether up` writes the context 'local' (current) so the CLI works from any directory; without
    one a refusal says where it looked; `tether login` keeps a copy of a credentials file as a
    context of its own; `context use|rm` switch and forget."""
    config_file = Path(os.environ["TETHER_CLI_CONFIG"])
    controller = ControllerProcess(tmp_path / "ctl", auth=True)
    try:
        url = controller.url
        controller.wait_for_line(rf"the CLI finds them from any directory: context 'local' in {config_file}")
        assert _config() == {
            "current": "local",
            "contexts": {"local": {"credentials": str(controller.operator_file.resolve())}},
        }
        assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
        assert cli_json(url, "devices", "ls") == []  # from /, through the current context

        # No configuration: the refusal says where the CLI looked.
        saved = config_file.read_text()
        config_file.unlink()
        refused = cli(url, "devices", "ls")
        assert refused.returncode == 1
        line = refused.stderr.strip()
        assert "Not authorized" in line and "credentials: none found" in line, line
        assert "TETHER_CREDENTIALS" in line and str(config_file) in line and len(line.splitlines()) == 1
        config_file.write_text(saved)

        # Another operator's machine: a copy of the credentials file, kept as context 'lab'.
        given = tmp_path / "given.json"
        shutil.copyfile(controller.operator_file, given)
        logged_in = cli(url, "login", "--credentials", str(given), "--name", "lab")
        assert logged_in.returncode == 0, logged_in.stderr
        given.unlink()  # the context keeps its own copy
        copy = config_file.parent / "credentials" / "lab.json"
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
        assert _config()["current"] == "lab" and _config()["contexts"]["lab"]["credentials"] == str(copy)
        assert cli_json(url, "devices", "ls") == []
        listed = {c["name"]: c for c in cli_json(url, "context", "ls")}
        assert listed["lab"]["current"] and not listed["local"]["current"]

        # A named context that does not exist is one error naming the known ones.
        unknown = cli(url, "devices", "ls", "--context", "nope")
        assert unknown.returncode == 1
        assert f"no context 'nope' in {config_file} (known: lab, local" in unknown.stderr

        assert cli(url, "context", "use", "local").returncode == 0
        assert _config()["current"] == "local"
        removed = cli(url, "context", "rm", "lab")
        assert removed.returncode == 0 and not copy.exists()
        assert set(_config()["contexts"]) == {"local"}
        assert cli(url, "context", "use", "lab").returncode == 1

        # The current context's file gone (its data dir deleted): one error saying what to do.
        moved = controller.operator_file.with_name("moved.json")
        controller.operator_file.rename(moved)
        gone = cli(url, "devices", "ls")
        assert gone.returncode == 1
        assert f"the current context 'local' ({config_file}) names " in gone.stderr
        assert "which does not exist" in gone.stderr and "tether context rm local" in gone.stderr
        moved.rename(controller.operator_file)
    finally:
        controller.stop()


def test_a_bad_configuration_is_one_error_with_every_problem(tmp_path: Path) -> None:
    """Unknown keys, a bad name and a current context that is not defined: all in one error naming the file."""
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "current": "gone",
                "contexts": {"ok": {"broker": "mqtt://h:1883"}, "Bad Name": {}, "x": {"token": "t"}},
            }
        )
    )
    with pytest.raises(ConfigError) as raised:
        Config.load(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert "'Bad Name'" in message and "unknown keys ['token']" in message
    assert "current context 'gone' is not defined" in message
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a Tether CLI configuration"):
        Config.load(path)
    assert Config.load(tmp_path / "missing.json").contexts == {}


def test_help_names_the_configuration() -> None:
    """`--help` of a command tells about contexts and TETHER_CREDENTIALS (a newcomer finds them)."""
    import subprocess

    shown = subprocess.run(
        [PY, "-m", "tether.cli.main", "devices", "ls", "--help"], capture_output=True, text=True
    )
    assert "--context" in shown.stdout and "TETHER_CREDENTIALS" in shown.stdout
