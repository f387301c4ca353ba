"""The fleet simulator's own CPU per device per deploy: a deploy replayed into N simulated devices.

    .venv/bin/python bench/sim_cpu.py --devices 10000

First, what a device receives for two deploys (a new 3-service stack, then a new version)
is recorded from a real controller on a private Mosquitto (one simulated device). Then N
simulated devices (:class:`tether.sim.Fleet`: their MQTT sessions, agent cores and
simulated runtimes, exactly as ``tether-sim`` builds them) are connected to transports
that only count what is written, and each receives those messages as MQTT packets on its
own session, renamed for it (its desired state names it): it parses them, decodes and
validates them, accepts the generation, reconciles, starts its instances and publishes
its events and report, as against a broker. Per deploy, until every device applied it
(and got the controller's acknowledgement of its events), then ``--watch`` seconds after:

* this process's CPU time (``time.process_time``): no broker, no controller, no sockets,
  so the figure depends on the simulator's code and little on what else the machine runs;
  the benchmark to compare two versions of the simulator with;
* per device, and per device and second while the devices only watch their runtime.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import Controller, Mosquitto, Row, compose_stack, load_average, log, report, rnd, wait_until
from tether.protocol.client import ControllerClient
from tether.protocol.commands import GroupsCreate, GroupsShow, StacksDeploy
from tether.sim import Fleet, FleetConfig, FleetThread
from tether.sim.mqtt import publish_packet

NAME = "sim_cpu"
TEMPLATE = "sim-00000"
"""The recorded device; every replayed device id has the same length (``sim-NNNNN``)."""

Message = tuple[str, bytes]


def record(workdir: Path, services: int, timeout: float) -> list[list[Message]]:
    """Per deploy, the messages one simulated device received for it (a real controller's)."""
    deploys: list[list[Message]] = [[], []]
    current = [0]
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Mosquitto(workdir / "mosquitto"))
        controller = stack.enter_context(Controller(workdir / "controller", broker.url))
        client = ControllerClient(controller.url, timeout=timeout)
        stack.callback(client.close)
        client.request(GroupsCreate(name="one", selector="bench=simcpu", trust_device_labels=True))
        config = FleetConfig(broker=controller.url, devices=1, prefix="sim", labels={"bench": "simcpu"})
        sim = stack.enter_context(FleetThread(config))

        def tap(fleet: Fleet) -> None:
            session = fleet.devices[0].session
            deliver = session.on_message
            assert deliver is not None

            def on_message(topic: str, payload: bytes, retained: bool) -> None:
                if current[0]:
                    deploys[current[0] - 1].append((topic, payload))
                deliver(topic, payload, retained)

            session.on_message = on_message

        sim.call(tap)
        sim.wait(lambda f: f.connected() == 1, timeout, message="the device connected")
        wait_until(lambda: client.request(GroupsShow(name="one"))["group"]["members"], timeout, interval=0.2)
        for version in (1, 2):
            current[0] = version
            client.request(StacksDeploy(name="app", group="one", compose=compose_stack(services, version)))
            sim.wait(lambda f, v=version: f.devices[0].done_at(v) is not None, timeout, message="applied")
            # The controller acknowledges the device's events after storing them.
            sim.wait(lambda f: not f.devices[0].core._inflight, timeout, message="events acknowledged")
            current[0] = 0
    return deploys


class CountingTransport:
    """Stands for a socket: what is written is counted, and goes nowhere."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def close(self) -> None:
        return None

    def abort(self) -> None:
        return None

    def is_closing(self) -> bool:
        return False


async def replay(devices: int, deploys: list[list[Message]], watch: float) -> dict[str, Any]:
    config = FleetConfig(
        broker="mqtt://127.0.0.1:1", devices=devices, prefix="sim", labels={"bench": "simcpu"}
    )
    fleet = Fleet(config)
    fleet.prepare()
    for device in fleet.devices:  # connected: a CONNACK on each session
        device.session.connection_made(CountingTransport())  # type: ignore[arg-type]
        device.session.data_received(bytes((0x20, 2, 0, 0)))
        device.kick()
    # Every device's connect messages (its online presence and first report) sent before the
    # first deploy arrives, or the deploy's report could take the place of the first one.
    deadline = time.monotonic() + 60
    while fleet.counters.messages_out < 2 * devices:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {fleet.counters.messages_out} connect messages of {2 * devices} in 60 s")
        await asyncio.sleep(0.05)
    gc.freeze()
    results = []
    for version, messages in enumerate(deploys, 1):
        load0 = load_average()
        r0, k0 = fleet.reconciles, fleet.idle_reconciles
        marks0 = fleet.settled_marks
        # The packets are made before the clock starts: making them is the broker's work, not
        # the simulator's (it was 1.5 % of what this counted).
        packets = [
            [
                publish_packet(
                    topic.replace(TEMPLATE, device.device_id),
                    payload.replace(TEMPLATE.encode(), device.device_id.encode()),
                    1,
                    False,
                    pid,
                )
                for pid, (topic, payload) in enumerate(messages, 1)
            ]
            for device in fleet.devices
        ]
        cpu0, t0 = time.process_time(), time.monotonic()
        for device, mine in zip(fleet.devices, packets, strict=True):
            for packet in mine:
                device.session.data_received(packet)
            await asyncio.sleep(0)
        del packets
        settled = 0
        deadline = time.monotonic() + 300
        while settled < devices:
            if time.monotonic() > deadline:
                raise SystemExit(f"deploy v{version}: {settled} of {devices} devices applied it in 300 s")
            await asyncio.sleep(0.05)
            # A counter first (as deploy_latency.py waits): walking 10,000 devices' marks 20
            # times a second was the benchmark's own CPU, counted as the simulator's.
            if fleet.settled_marks - marks0 >= devices:
                settled = sum(1 for d in fleet.devices if d.done_at(version) is not None)
        cpu1, t1 = time.process_time(), time.monotonic()
        await asyncio.sleep(watch)
        cpu2 = time.process_time()
        gc.freeze()
        deploy_s = cpu1 - cpu0
        results.append(
            {
                "version": version,
                "messages_per_device": len(messages),
                "cpu_s": rnd(deploy_s),
                "cpu_ms_per_device": rnd(1000 * deploy_s / devices),
                "wall_s": rnd(t1 - t0),
                "watch_cpu_s": rnd(cpu2 - cpu1),
                "watch_cpu_us_per_device_s": rnd(1e6 * (cpu2 - cpu1) / devices / watch, 1) if watch else None,
                "reconciles": fleet.reconciles - r0,
                "reconciles_skipped": fleet.idle_reconciles - k0,
                "load_average": [load0, load_average()],
            }
        )
        log(f"deploy v{version}: {deploy_s:.2f} s of CPU, {1000 * deploy_s / devices:.3f} ms per device")
    summary = fleet.summary()
    for device in fleet.devices:
        device.stop()
    return {"deploys": results, "messages_out": summary["messages_out"], "bytes_out": summary["bytes_out"]}


def rows(data: dict[str, Any]) -> list[Row]:
    out = [Row("devices (simulated)", data["devices"])]
    for d, label in zip(data["deploys"], ("new stack", "new version"), strict=True):
        out += [
            Row(f"{label}: messages replayed per device", d["messages_per_device"]),
            Row(f"{label}: load average, start / end", " / ".join(map(str, d["load_average"]))),
            Row(f"{label}: simulator CPU until all applied", d["cpu_s"], " s"),
            Row(
                f"{label}: simulator CPU per device",
                d["cpu_ms_per_device"],
                " ms",
                "<= 0.3 ms",
                d["cpu_ms_per_device"] <= 0.3,
            ),
            Row(f"{label}: then, watching: CPU per device and second", d["watch_cpu_us_per_device_s"], " us"),
            Row(
                f"{label}: reconciles (and skipped: nothing to see)",
                f"{d['reconciles']} ({d['reconciles_skipped']})",
            ),
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--services", type=int, default=3, help="services in the deployed stack")
    p.add_argument("--watch", type=float, default=5.0, help="seconds measured after each deploy")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--json", type=Path, default=None, help="default: bench/results/sim_cpu-N.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tether-simcpu-") as tmp:
        deploys = record(Path(tmp), args.services, args.timeout)
    log(f"recorded {sum(map(len, deploys))} messages; replaying into {args.devices} devices")
    data = {
        "devices": args.devices,
        "services": args.services,
        **asyncio.run(replay(args.devices, deploys, args.watch)),
    }
    report(
        NAME,
        f"Simulator CPU: {args.devices} simulated devices, a deploy replayed",
        rows(data),
        data,
        args.json,
        args.devices,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
