"""``tether up``: the controller process, with the embedded broker unless given another."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from tether.protocol.mqtt import BrokerAddress, parse_broker_url

from .service import Controller
from .store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpOptions:
    data_dir: Path
    db: str | None
    broker: str | None
    bind: str
    port: int
    with_agent: bool
    agent_driver: str | None


def _agent_command(url: str, options: UpOptions) -> list[str]:
    exe = shutil.which("tether-agent")
    base = [exe] if exe else [sys.executable, "-m", "tether.agent.main"]
    driver = options.agent_driver
    if driver is None:
        driver = "docker" if _docker_reachable() else "process"
    return [
        *base,
        "--broker",
        url,
        "--device-id",
        "local",
        "--label",
        "role=local",
        "--data-dir",
        str(options.data_dir / "agent"),
        "--driver",
        driver,
    ]


def _docker_reachable() -> bool:
    try:
        import docker  # noqa: TID251 - only a probe for the local agent's default driver

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def serve(options: UpOptions, echo: callable[[str], None]) -> int:  # type: ignore[valid-type]
    """Run until SIGTERM/SIGINT. Returns the exit status."""
    options.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(options.db or options.data_dir / "tether.db")
    embedded = None
    if options.broker is None:
        from tether.broker import EmbeddedBroker

        embedded = EmbeddedBroker(options.bind, options.port)
        port = embedded.start()
        host = "127.0.0.1" if options.bind in ("0.0.0.0", "", "::") else options.bind
        address = BrokerAddress(host, port)
        echo(f"tether: embedded broker listening on mqtt://{options.bind}:{port}")
    else:
        address = parse_broker_url(options.broker)
        echo(f"tether: using broker {address.url()}")
    controller = Controller(store)
    agent: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        controller.start(address, fresh_broker=embedded is not None)
        controller.ready.wait(15)
        echo(f"tether: controller ready (data in {options.data_dir})")
        if options.with_agent:
            cmd = _agent_command(address.url(), options)
            agent = subprocess.Popen(cmd, env=dict(os.environ))
            echo(f"tether: local agent started (device 'local', driver {cmd[cmd.index('--driver') + 1]})")
        stop.wait()
    finally:
        echo("tether: shutting down")
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
        controller.stop()
        if embedded is not None:
            embedded.stop()
        store.close()
    return 0
