"""Agent footprint: memory and idle CPU of a real agent running a stack, and its install size.

    .venv/bin/python bench/footprint.py [--window 300] [--no-install-size]

A real ``tether-agent`` (Docker driver, default settings: keepalive 60 s, reconcile every
10 s) connects through Mosquitto to a real controller, which deploys a stack of 3
services (image ``tether-test/busybox:1``, built locally without a registry). Once the
stack runs and a short settle time has passed, the agent is left alone for ``--window``
seconds (issue 7 asks for 5 minutes); then:

* RSS, PSS and USS (private clean + private dirty) from ``/proc/PID/smaps_rollup``;
* idle CPU: user + system time of all its threads (``/proc/PID/stat``) over the window,
  as a percentage of one core;
* the *floor*: the same readings for a bare Python process that only imports the
  agent's dependencies (paho-mqtt, msgpack, pydantic, click, docker) - what any Python
  agent with these libraries costs before doing anything;
* install size: ``pip install <repo>`` (no extras: the device install) into a fresh
  virtualenv; the size of its site-packages minus pip, setuptools and their helpers
  (file sizes, ``.pyc`` caches included, as pip leaves them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import (
    BIN,
    PY,
    REPO,
    Controller,
    CpuMeter,
    Mosquitto,
    Proc,
    Row,
    child_env,
    compose_stack,
    log,
    memory,
    report,
    request,
    rnd,
    wait_until,
)
from tether.protocol.commands import DevicesShow, GroupsCreate, StacksDeploy
from tether.protocol.errors import RequestError

NAME = "footprint"
TARGETS = {"rss_mb": 45.0, "uss_mb": 32.0, "cpu_percent": 0.5, "install_mb": 25.0}
INSTALL_EXCLUDE = (
    "pip",
    "setuptools",
    "pkg_resources",
    "_distutils_hack",
    "distutils-precedence.pth",
    "wheel",
)

FLOOR_SCRIPT = """
import sys, time
import paho.mqtt.client, msgpack, pydantic, click, docker
print("ready", flush=True)
time.sleep(600)
"""


def tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = Path(root) / name
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def install_size(workdir: Path) -> dict[str, Any]:
    """Install the repo without extras into a fresh venv; measure its site-packages."""
    venv = workdir / "venv"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    result = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-cache-dir", str(REPO)],
        capture_output=True,
        text=True,
        env=child_env(PIP_DISABLE_PIP_VERSION_CHECK="1"),
    )
    if result.returncode != 0:
        raise RuntimeError(f"pip install failed:\n{result.stderr[-2000:]}")
    site = next((venv / "lib").glob("python*/site-packages"))
    sizes: dict[str, int] = {}
    for entry in site.iterdir():
        if entry.name.startswith(INSTALL_EXCLUDE) or entry.name == "__pycache__":
            continue
        key = entry.name.split("-")[0] if entry.name.endswith(".dist-info") else entry.name
        key = key.removesuffix(".py").lower()
        size = tree_size(entry) if entry.is_dir() else entry.stat().st_size
        sizes[key] = sizes.get(key, 0) + size
    total = sum(sizes.values())
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:12]
    return {
        "site_packages_mb": rnd(total / 1024 / 1024, 2),
        "largest_mb": {k: rnd(v / 1024 / 1024, 2) for k, v in top},
        "pip_install_s": rnd(time.monotonic() - t0, 1),
    }


def floor(window: float) -> dict[str, Any]:
    """A Python process that imports the agent's dependencies and sleeps."""
    proc = subprocess.Popen([PY, "-c", FLOOR_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        meter = CpuMeter(proc.pid)
        time.sleep(min(window, 5.0))
        return {**memory(proc.pid), "cpu_percent": rnd(meter.percent(), 3)}
    finally:
        proc.kill()
        proc.wait()


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from support.infra import docker_client, ensure_busybox_image

    docker = docker_client()
    if docker is None:
        raise SystemExit("footprint: no Docker engine answers (the agent runs its stack on Docker)")
    image = ensure_busybox_image(docker)
    device = f"fp-{uuid.uuid4().hex[:6]}"
    agent_bin = BIN / "tether-agent"
    argv = [str(agent_bin)] if agent_bin.exists() else [PY, "-m", "tether.agent.main"]
    argv += ["--device-id", device, "--driver", "docker", "--data-dir", str(workdir / "agent")]
    argv += ["--label", "bench=footprint", "--log-level", "warning"]
    result: dict[str, Any] = {"device": device, "image": image, "window_s": args.window}
    with contextlib.ExitStack() as stack:  # whatever started is stopped, in reverse order
        stack.callback(_remove_containers, docker, device)
        broker = stack.enter_context(Mosquitto(workdir / "mosquitto"))
        stack.enter_context(Controller(workdir / "controller", broker.url))
        agent = Proc([*argv, "--broker", broker.url], workdir / "agent.log")
        stack.callback(agent.stop)
        request(broker.url, GroupsCreate(name="fp", selector="bench=footprint", trust_device_labels=True))
        wait_until(
            lambda: _status(broker.url, device) == "online",
            60,
            interval=0.5,
            message="agent online",
        )
        request(broker.url, StacksDeploy(name="fp", group="fp", compose=compose_stack(3, 1, image=image)))

        def running() -> bool:
            d = request(broker.url, DevicesShow(device_id=device))["device"]
            return bool(d["stacks"].get("fp") == "running")

        wait_until(running, 180, interval=1.0, message="the 3-service stack to run")
        log(f"stack running on {device}; settling {args.settle:g} s, then measuring for {args.window:g} s")
        time.sleep(args.settle)
        meter = CpuMeter(agent.pid)
        time.sleep(args.window)
        cpu = meter.percent()
        mem = memory(agent.pid)
        threads = len(os.listdir(f"/proc/{agent.pid}/task"))
        result.update({**mem, "cpu_percent": rnd(cpu, 3), "threads": threads})
        log(f"agent: RSS {mem['rss_mb']} MB, USS {mem['uss_mb']} MB, idle CPU {cpu:.3f} %")
    result["floor"] = floor(args.window)
    if args.install_size:
        log("measuring an agent-only install (pip install <repo> into a fresh venv)...")
        result["install"] = install_size(workdir)
    return result


def _remove_containers(docker: Any, device: str) -> None:
    """docker rm -f: removing the stack through Tether would wait out each service's stop
    grace period, which measures nothing here."""
    for c in docker.containers.list(all=True, filters={"label": f"io.tether.device={device}"}):
        c.remove(force=True)
    for n in docker.networks.list(filters={"label": f"io.tether.device={device}"}):
        n.remove()


def _status(url: str, device: str) -> str | None:
    try:
        return str(request(url, DevicesShow(device_id=device))["device"]["status"])
    except RequestError:
        return None  # not heard of yet


def rows(data: dict[str, Any]) -> list[Row]:
    t = TARGETS
    out = [
        Row("agent RSS", data["rss_mb"], " MB", f"<= {t['rss_mb']:g} MB", data["rss_mb"] <= t["rss_mb"]),
        Row("agent USS", data["uss_mb"], " MB", f"<= {t['uss_mb']:g} MB", data["uss_mb"] <= t["uss_mb"]),
        Row("agent PSS", data["pss_mb"], " MB"),
        Row(
            f"agent idle CPU over {data['window_s']:g} s",
            data["cpu_percent"],
            " %",
            f"<= {t['cpu_percent']:g} %",
            data["cpu_percent"] <= t["cpu_percent"],
        ),
        Row("agent threads", data["threads"]),
        Row("floor: Python + dependencies, RSS", data["floor"]["rss_mb"], " MB"),
        Row("floor: Python + dependencies, USS", data["floor"]["uss_mb"], " MB"),
    ]
    if "install" in data:
        size = data["install"]["site_packages_mb"]
        out.append(
            Row(
                "agent-only install (site-packages)",
                size,
                " MB",
                f"<= {t['install_mb']:g} MB",
                size <= t["install_mb"],
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=float, default=300.0, help="seconds of idle to measure over")
    p.add_argument("--settle", type=float, default=15.0, help="seconds to wait after the stack runs")
    p.add_argument("--install-size", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tether-footprint-") as tmp:
        data = run(args, Path(tmp))
    report(NAME, "Agent footprint (Docker driver, one 3-service stack)", rows(data), data, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
