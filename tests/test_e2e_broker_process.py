"""`tether up` runs its embedded broker in a child process that never outlives it.

Real processes: `tether up` (embedded broker) and its broker process
(``python -m tether.broker.child``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.infra import accepts, wait_until
from support.procs import ControllerProcess, cli_json

pytestmark = pytest.mark.e2e


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _broker_process(controller: ControllerProcess) -> int:
    """The pid of the controller's broker process (its child running tether.broker.child)."""
    brokers = [
        pid
        for pid in _children(controller.proc.pid)
        if b"tether.broker.child" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(brokers) == 1, brokers
    return brokers[0]


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for init to reap it counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_broker_process_dies_with_a_sigkilled_controller(tmp_path: Path) -> None:
    controller = ControllerProcess(tmp_path / "ctl")
    try:
        broker = _broker_process(controller)
        assert accepts(controller.port)
        controller.kill()  # SIGKILL: the controller cannot stop its broker
        wait_until(lambda: _gone(broker), 20, message="broker process exited after its controller")
        assert not accepts(controller.port)
    finally:
        controller.kill()


def test_broker_process_ignores_ctrl_c_and_stops_with_the_controller(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the whole process group: the broker ignores it, and the
    controller, stopping, stops its broker last."""
    controller = ControllerProcess(tmp_path / "ctl")
    try:
        broker = _broker_process(controller)
        os.kill(broker, signal.SIGINT)
        assert cli_json(controller.url, "devices", "ls") == []  # a request through the broker
        assert not _gone(broker)
        controller.signal(signal.SIGINT)
        assert controller.proc.wait(30) == 0
        assert _gone(broker)  # stopped before the controller exited
        assert "embedded broker process exited" not in controller.output()  # stopped, it did not die
    finally:
        controller.kill()


def test_controller_exits_when_its_broker_process_dies(tmp_path: Path) -> None:
    """Without its broker the controller is useless: it says so and exits (status 1) to be restarted."""
    controller = ControllerProcess(tmp_path / "ctl")
    try:
        os.kill(_broker_process(controller), signal.SIGKILL)
        assert controller.proc.wait(30) == 1
        controller.wait_for_line(r"the embedded broker process exited")
    finally:
        controller.kill()


def test_a_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    """A busy broker or --http port is one line naming the port and the flag to change, and the
    data directory `tether up` would have made is not left behind (issue 18)."""
    data_dir = tmp_path / "tether-data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, option in (
            (["--port", str(port)], "--port"),
            (["--port", "0", "--http", f"127.0.0.1:{port}"], "--http"),
        ):
            result = subprocess.run(
                [sys.executable, "-m", "tether.cli.main", "up", "--data-dir", str(data_dir), *flags],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 1, result.stderr
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
            assert lines[0].startswith(f"tether: error: cannot listen on 127.0.0.1:{port} ("), lines[0]
            assert f"Choose another port with {option}" in lines[0]
            assert not data_dir.exists()


def test_a_failed_first_start_leaves_no_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start that fails after the data directory was made removes it again; an existing one stays
    (the SQLite case: with a PostgreSQL store the data directory is kept on purpose)."""
    monkeypatch.delenv("TETHER_DB", raising=False)
    data_dir = tmp_path / "tether-data"
    argv = [sys.executable, "-m", "tether.cli.main", "up", "--data-dir", str(data_dir), "--port", "0"]
    half_tls = [*argv, "--tls-cert", str(tmp_path / "cert.pem")]
    result = subprocess.run(half_tls, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "--tls-cert and --tls-key go together" in result.stderr
    assert not data_dir.exists()
    data_dir.mkdir()
    (data_dir / "keep").write_text("x")
    result = subprocess.run(half_tls, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and (data_dir / "keep").exists()
