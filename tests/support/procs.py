"""Real Tether processes for end-to-end tests: `tether up`, `tether-agent` and the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support.infra import wait_until

PY = sys.executable


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TETHER_BROKER", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Proc:
    """A child process whose combined output is collected line by line.

    ``argv_prefix`` (on the subclasses) runs the command under a wrapper that execs it,
    e.g. ``["ip", "netns", "exec", NS]``, so that ``proc.pid`` is still the program's.
    """

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
            cwd="/",  # as cli(): never a ./tether-data/operator.json of whoever runs the tests
            start_new_session=True,
            # SIGINT as a terminal gives it, even when the suite runs in the background (where
            # the shell hands children SIGINT ignored and Ctrl-C would do nothing).
            preexec_fn=_default_sigint,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "a") as log:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                try:
                    log.write(line)
                    log.flush()
                except OSError:  # the log's disk is full or read-only (a fault test): keep reading
                    pass

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            if self.proc.poll() is not None and not any(regex.search(line) for line in self.lines):
                raise AssertionError(f"{self.argv[2:4]} exited with {self.proc.returncode}:\n{self.output()}")
            return next((m for m in map(regex.search, list(self.lines)) if m), None)

        return wait_until(found, timeout, message=f"line matching {pattern!r}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: no goodbye, the broker publishes the will."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class ControllerProcess(_Proc):
    """`tether up` on an ephemeral port (embedded broker) or against ``broker``.

    Anonymous clients are allowed (``--allow-anonymous``) unless ``auth``; with ``auth``,
    :attr:`operator_file` holds the operator credentials (for ``TETHER_CREDENTIALS``).
    """

    def __init__(
        self,
        data_dir: Path,
        broker: str | None = None,
        port: int = 0,
        db: str | None = None,
        argv_prefix: list[str] | None = None,
        extra: list[str] | None = None,
        auth: bool = False,
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.operator_file = data_dir / "operator.json"
        argv = [PY, "-m", "tether.cli.main", "up", "--data-dir", str(data_dir), *(extra or [])]
        if not auth:
            argv.append("--allow-anonymous")
        if db:
            argv += ["--db", db]
        argv += ["--broker", broker] if broker else ["--port", str(port)]
        super().__init__([*(argv_prefix or []), *argv], data_dir / "controller.log")
        if broker:
            self.url = broker
        else:
            m = self.wait_for_line(r"embedded broker listening on (mqtts?)://[\d.]+:(\d+)")
            self.port = int(m.group(2))
            self.url = f"{m.group(1)}://127.0.0.1:{self.port}"
        self.wait_for_line(r"controller ready")


class AgentProcess(_Proc):
    """`tether-agent` for one device."""

    def run_cli(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        """Run `tether-agent` with this agent's device id and data dir (e.g. ``--hold``)."""
        result = subprocess.run(
            [
                PY,
                "-m",
                "tether.agent.main",
                "--device-id",
                self.device_id,
                "--data-dir",
                str(self.data_dir),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=_env(),
        )
        assert result.returncode == 0, result.stderr
        return result

    def __init__(
        self,
        broker: str | list[str],
        device_id: str,
        data_dir: Path,
        driver: str = "process",
        labels: dict[str, str] | None = None,
        extra: list[str] | None = None,
        argv_prefix: list[str] | None = None,
    ) -> None:
        self.device_id = device_id
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = [PY, "-m", "tether.agent.main", "--device-id", device_id, "--data-dir", str(data_dir)]
        for url in [broker] if isinstance(broker, str) else broker:
            argv += ["--broker", url]
        argv += ["--driver", driver, "--reconcile-interval", "2", "--keepalive", "10"]
        for k, v in (labels or {}).items():
            argv += ["--label", f"{k}={v}"]
        argv += extra or []
        super().__init__([*(argv_prefix or []), *argv], data_dir / "agent.log")


def credentialed_agent(broker: str, device_id: str, root: Path, ca: Path | None = None) -> AgentProcess:
    """Issue ``device_id`` its credentials (`tether devices credentials --out`, saved under
    ``root``) and start its agent with them (and ``--ca-file ca`` when given)."""
    creds = root / f"{device_id}.json"
    cli_json(broker, "devices", "credentials", device_id, "--out", str(creds))
    saved = json.loads(creds.read_text())
    extra = ["--username", saved["username"], "--password", saved["password"]]
    return AgentProcess(
        broker, device_id, root / device_id, extra=extra + (["--ca-file", str(ca)] if ca else [])
    )


def cli(
    broker: str, *args: str, timeout: float = 120.0, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the operator CLI against ``broker`` (given as TETHER_BROKER, so ``--`` arguments stay intact)."""
    env = _env()
    env["TETHER_BROKER"] = broker
    return subprocess.run(
        [PY, "-m", "tether.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=stdin,
        cwd="/",  # never pick up a ./tether-data/operator.json of whoever runs the tests
    )


def cli_json(broker: str, *args: str, timeout: float = 120.0) -> Any:
    """Run a CLI command with ``-o json``; fail the test on a non-zero exit."""
    split = args.index("--") if "--" in args else len(args)
    result = cli(broker, *args[:split], "-o", "json", *args[split:], timeout=timeout)
    assert result.returncode == 0, f"tether {' '.join(args)} failed ({result.returncode}): {result.stderr}"
    return json.loads(result.stdout)


def device_view(broker: str, device_id: str) -> dict[str, Any] | None:
    devices = cli_json(broker, "devices", "ls")
    return next((d for d in devices if d["id"] == device_id), None)


def wait_online(broker: str, device_id: str, timeout: float = 30.0) -> dict[str, Any]:
    return wait_until(
        lambda: (d := device_view(broker, device_id)) is not None and d["status"] == "online" and d,
        timeout,
        interval=0.2,
        message=f"device {device_id} online",
    )


def pool_group(broker: str, run: str, *device_ids: str) -> None:
    """Wait for the devices (started with the label ``pool=run``) to be online, then create the
    group ``pool`` that selects them by that label (trusting device labels), as deploy tests do."""
    for device_id in device_ids:
        wait_online(broker, device_id)
    cli_json(broker, "groups", "create", "pool", "--select", f"pool={run}", "--trust-device-labels")


@contextlib.contextmanager
def pool_device(tmp_path: Path, prefix: str, driver: str = "process") -> Iterator[tuple[str, str]]:
    """A controller (`tether up` in ``tmp_path``/controller) and one agent, device
    ``prefix-RUN``, online and the one member of group ``pool``; its URL and the device id. Both
    stop afterwards."""
    run = uuid.uuid4().hex[:6]
    device = f"{prefix}-{run}"
    controller = ControllerProcess(tmp_path / "controller")
    agent = AgentProcess(controller.url, device, tmp_path / device, driver=driver, labels={"pool": run})
    try:
        pool_group(controller.url, run, device)
        yield controller.url, device
    finally:
        agent.stop()
        controller.stop()


BROKERS = ["embedded", "mosquitto"]
"""What the broker-parametrized end-to-end tests run on (see :func:`secured_controller`)."""


def mosquitto_dynsec_conf(out: Path) -> str:
    """Mosquitto configuration lines for the dynamic security file `tether mosquitto-config` wrote."""
    from tether.controller.mosquitto import DYNSEC_FILE, find_plugin

    return f"allow_anonymous false\nplugin {find_plugin()}\nplugin_opt_config_file {out / DYNSEC_FILE}\n"


@contextlib.contextmanager
def secured_controller(
    kind: str, tmp_path: Path, extra: list[str] | None = None
) -> Iterator[ControllerProcess]:
    """`tether up` with authentication on ``kind`` of broker: the embedded one, or a private
    Mosquitto running Tether's dynamic security file (`tether mosquitto-config`, then
    `tether up --broker ... --mosquitto-dir`), as an operator would set it up."""
    from support.infra import MOSQUITTO_BIN, Mosquitto

    data = tmp_path / "ctl"
    if kind == "embedded":
        ctl = ControllerProcess(data, auth=True, extra=extra)
        try:
            yield ctl
        finally:
            ctl.stop()
        return
    if not os.access(MOSQUITTO_BIN, os.X_OK):
        if os.environ.get("TETHER_REQUIRE_MOSQUITTO") == "1":
            raise AssertionError(f"TETHER_REQUIRE_MOSQUITTO=1 but {MOSQUITTO_BIN} is missing")
        import pytest

        pytest.skip(f"{MOSQUITTO_BIN} not installed")
    out = tmp_path / "mosq"
    setup = subprocess.run(
        [PY, "-m", "tether.cli.main", "mosquitto-config", "--out", str(out), "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert setup.returncode == 0, setup.stderr
    broker_dir = tmp_path / "mosquitto"
    broker_dir.mkdir()
    with Mosquitto(broker_dir, extra_conf=mosquitto_dynsec_conf(out)) as broker:
        ctl = ControllerProcess(
            data, broker=broker.url, auth=True, extra=["--mosquitto-dir", str(out), *(extra or [])]
        )
        ctl.broker = broker  # type: ignore[attr-defined]
        try:
            yield ctl
        finally:
            ctl.stop()
