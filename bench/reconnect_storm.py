"""Reconnect storm: every device connected, the broker restarted; how long until all are back.

    .venv/bin/python bench/reconnect_storm.py --devices 10000

Mosquitto (with persistence, as a production broker runs: retained messages and sessions
survive the restart), a real controller (``tether up --broker``) and ``--devices``
simulated devices in one group with a 3-service stack deployed and running. Then the
broker is restarted (SIGTERM, start again on the same port) and every device reconnects
on its own, with the agent's backoff (capped exponential, full jitter).

Measured from the moment the broker was stopped:

* *all online again*: every simulated device has a CONNACK on a new connection;
* *all converged*: every device has also re-published its presence and its report, with
  the stack's generation applied and nothing converging;
* *controller sees all*: ``tether devices ls`` shows every device online in a newer
  session with its desired generation applied;
* the broker's peak connection rate (CONNACKs in any one second), and how many connect
  attempts failed; a device never gives up (it retries with backoff), so "gave up" counts
  devices still not connected when the benchmark's time ran out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import Controller, CpuMeter, Mosquitto, Row, cli, compose_stack, log, report, rnd, wait_until
from tether.protocol.client import ControllerClient
from tether.protocol.commands import GroupsCreate, GroupsShow, StacksDeploy, StacksList
from tether.sim import Fleet, FleetConfig, FleetThread

NAME = "reconnect_storm"
TARGET_S = 60.0


def converged(fleet: Fleet, since: float) -> int:
    """Devices reconnected after ``since`` whose latest report shows their generation applied."""
    count = 0
    for d in fleet.devices:
        if d.connected_at is None or d.connected_at < since or d.core.converging:
            continue
        if d.generation >= 1 and d.done_at(d.generation) is not None:
            count += 1
    return count


def controller_view(url: str) -> list[dict[str, Any]]:
    """``tether devices ls -o json`` (a separate process: this one holds thousands of sockets)."""
    result = cli(url, "devices", "ls", "-o", "json", "--request-timeout", "300")
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip())
    return list(json.loads(result.stdout))


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    stack = contextlib.ExitStack()  # whatever started is stopped, in reverse order
    with stack:
        broker = stack.enter_context(Mosquitto(workdir / "mosquitto", persistence=not args.no_persistence))
        controller = stack.enter_context(Controller(workdir / "controller", broker.url))
        url = broker.url
        n = args.devices
        config = FleetConfig(
            broker=url,
            devices=n,
            prefix="rs",
            labels={"bench": "storm"},
            start_delay=args.start_delay,
            connect_rate=args.connect_rate,
            connect_concurrency=args.connect_concurrency,
        )
        client = ControllerClient(url, timeout=args.timeout)  # before the devices: see deploy_latency.py
        stack.callback(client.close)
        sim = FleetThread(config)
        stack.callback(sim.stop)
        client.request(GroupsCreate(name="fleet", selector="bench=storm", trust_device_labels=True))
        sim.start()
        sim.wait(lambda f: f.connected() >= n, args.timeout, interval=0.2, message="all connected")
        log(f"{n} devices connected")
        wait_until(
            lambda: _members(client) >= n,
            args.timeout,
            interval=1.0,
            message="controller to know every device",
        )
        client.request(StacksDeploy(name="app", group="fleet", compose=compose_stack(3, 1)))
        sim.wait(lambda f: converged(f, 0.0) >= n, args.timeout, interval=0.2, message="all running")
        log("stack running on every device")
        # Let the controller catch up first, so the storm is not measured with a backlog.
        wait_until(lambda: _running(client) >= n, args.timeout, interval=1.0, message="controller sees all")
        client.close()
        log("the controller sees every device running")
        before = sim.call(lambda f: {d.device_id: d.core.session for d in f.devices})
        time.sleep(args.settle)
        controller.snapshot("before")
        controller.snapshot("arm")

        ctl_cpu, sim_cpu0 = CpuMeter(controller.pid), time.process_time()
        t0 = time.monotonic()
        down_s = broker.restart(kill=args.kill)
        broker_cpu = CpuMeter(broker.pid)
        log(f"broker restarted in {down_s:.2f} s")
        online_s = converged_s = None
        try:
            sim.wait(
                lambda f: sum(1 for d in f.devices if d.connected_at and d.connected_at > t0) >= n,
                args.timeout,
                interval=0.1,
                message="all online again",
            )
            online_s = time.monotonic() - t0
            log(f"all {n} devices online again after {online_s:.1f} s")
            sim.wait(lambda f: converged(f, t0) >= n, args.timeout, interval=0.1, message="all converged")
            converged_s = time.monotonic() - t0
            log(f"all {n} devices converged after {converged_s:.1f} s")
        except TimeoutError as exc:
            log(str(exc))
        cpu = {
            "simulator": rnd(time.process_time() - sim_cpu0, 2),
            "mosquitto": rnd(broker_cpu.seconds(), 2),
            "controller": rnd(ctl_cpu.seconds(), 2),
        }

        def controller_sees_all() -> bool:
            rows = controller_view(url)
            ok = sum(
                1
                for d in rows
                if d["status"] == "online"
                and d["session"] > before.get(d["id"], -1)
                and d["applied_generation"] is not None
                and d["applied_generation"] == d["desired_generation"]
            )
            return ok >= n

        seen_s = None
        try:
            wait_until(controller_sees_all, args.timeout, interval=2.0, message="controller sees all")
            seen_s = time.monotonic() - t0
            log(f"the controller sees all {n} devices back after {seen_s:.1f} s")
        except (TimeoutError, RuntimeError) as exc:
            log(f"controller view: {exc}")
        controller.snapshot("disarm")
        controller.snapshot("after")

        def storm_stats(f: Fleet) -> dict[str, Any]:
            back = [d for d in f.devices if d.connected_at and d.connected_at > t0]
            return {
                "reconnected": len(back),
                "not_reconnected": n - len(back),
                "peak_connacks_per_s": f.peak_connect_rate(since=t0),
                "max_attempts_one_device": max((d.max_attempt for d in f.devices), default=0),
                "failed_connect_attempts": f.counters.refused,
                "summary": f.summary(),
            }

        stats = sim.call(storm_stats)
    return {
        "devices": n,
        "persistence": not args.no_persistence,
        "restart": "SIGKILL" if args.kill else "SIGTERM",
        "broker_restart_s": rnd(down_s),
        "all_online_s": rnd(online_s),
        "all_converged_s": rnd(converged_s),
        "controller_sees_all_s": rnd(seen_s),
        **{k: v for k, v in stats.items() if k != "summary"},
        "sim": stats["summary"],
        "connect_concurrency": args.connect_concurrency,
        "cpu_s_until_converged": cpu,
    }


def _running(client: ControllerClient) -> int:
    stacks = client.request(StacksList())["stacks"]
    return next((int(s["running"]) for s in stacks if s["name"] == "app"), 0)


def _members(client: ControllerClient) -> int:
    return len(client.request(GroupsShow(name="fleet"))["group"]["members"])


def rows(data: dict[str, Any]) -> list[Row]:
    conv = data["all_converged_s"]
    return [
        Row("devices (simulated)", data["devices"]),
        Row("broker restart (stop + start)", data["broker_restart_s"], " s"),
        Row("all online again", data["all_online_s"], " s"),
        Row(
            "all online and converged",
            conv,
            " s",
            f"<= {TARGET_S:g} s",
            conv is not None and conv <= TARGET_S,
        ),
        Row("controller sees all back", data["controller_sees_all_s"], " s"),
        Row("peak connection rate", data["peak_connacks_per_s"], " /s"),
        Row(
            "CPU s until converged",
            " / ".join(f"{k} {v:g}" for k, v in data["cpu_s_until_converged"].items()),
        ),
        Row("failed connect attempts", data["failed_connect_attempts"]),
        Row("most attempts by one device", data["max_attempts_one_device"]),
        Row("devices that gave up", data["not_reconnected"], "", "0", data["not_reconnected"] == 0),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--start-delay", type=float, default=0.2)
    p.add_argument("--connect-rate", type=float, default=1000.0, help="new devices per second at start")
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=1000,
        help="handshakes the simulator keeps in flight (a real fleet has no such limit)",
    )
    p.add_argument("--settle", type=float, default=2.0, help="seconds of quiet before the restart")
    p.add_argument("--kill", action="store_true", help="SIGKILL the broker instead of SIGTERM")
    p.add_argument("--no-persistence", action="store_true", help="the broker forgets everything")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tether-storm-") as tmp:
        data = run(args, Path(tmp))
    report(
        NAME,
        f"Reconnect storm: {args.devices} simulated devices, Mosquitto restarted",
        rows(data),
        data,
        args.json,
        args.devices,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
