"""Fleet scale: one controller, devices spread over edge Mosquittos bridged to a central one.

    .venv/bin/python bench/fleet_scale.py --devices 50000 --edge-brokers 3

Issue 21 asks for 50,000 simulated devices on one Mosquitto and one controller. A process
here may hold at most 20,000 open files (the hard limit, which not even root may raise),
so one Mosquitto holds at most about 19,900 devices. This benchmark measures the
controller's side of the target instead with the setup docs/scaling.md prescribes for
more devices than one broker holds: ``--edge-brokers`` Mosquittos, each with the shipped
regional bridge (packaging/mosquitto-region-bridge.conf) to the central Mosquitto that the
one controller (``tether up --broker``) connects to; the simulated devices (``tether-sim``
as ``--processes`` processes, each on one edge broker, each holding one socket per device)
are labelled ``bench=fleet`` and matched by one group. In order:

* *connect* and *register*: until every device has a CONNACK, and until the controller's
  group has every device as a member; then the controller's own view (``tether devices
  ls``) must show every device online;
* two deploys (a new stack, then a new version): the controller's reply, until every
  device reports the new generation applied (read from the simulators' progress lines,
  every ``--progress`` seconds), until the controller counts every device running;
* *storm*: every edge broker restarted at once (SIGTERM, started again on its port, with
  its persistence, as production brokers run); until every device is connected again and
  until the controller shows every device online in a newer session with its desired
  generation applied. A device never gives up (capped backoff); "gave up" counts devices
  not connected when the time ran out;
* *bridge checks*: one simulator process is killed (SIGKILL, no goodbye): its edge broker
  publishes each device's retained ``offline`` will, which must cross the bridge to the
  controller; then a new simulator process starts the same devices with no memory: their
  desired state and stack definition, retained on the edge broker before they connected,
  must bring them to the current generation, and the controller must see them back.

Controller CPU is read for each phase (and per device), its RSS once every device is
registered and idle, over the storm (sampled) and its peak (VmHWM) at the end. With
``TETHER_BENCH_PROFILE_STORM=FILE`` py-spy samples the controller over the storm alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from common import (
    PY,
    Controller,
    CpuMeter,
    Mosquitto,
    Proc,
    Row,
    cli,
    compose_stack,
    cpu_seconds,
    load_average,
    log,
    memory,
    peak_rss_mb,
    per_device_ms,
    report,
    rnd,
    wait_until,
)
from deploy_latency import wait_registered
from support.infra import region_bridge_conf
from tether.protocol.client import ControllerClient
from tether.protocol.commands import GroupsCreate, StacksDeploy, StacksList

NAME = "fleet_scale"
PREFIX = "fs"
DEPLOY_TARGET_S = 30.0
"""Issue 21: a new version to 50,000 devices, last device applied."""
STORM_TARGET_S = 120.0
"""Issue 21: a broker restart storm at 50,000 devices, every device back."""
RSS_TARGET_MB = 400.0
"""Issue 21: the controller's RSS with 50,000 devices."""

_PROGRESS = re.compile(
    r"tether-sim: (\d+)/(\d+) connected \((\d+) connects\); (.*); in \d+ / out \d+ messages"
)
_GEN = re.compile(r"gen (-?\d+): (\d+)/(\d+)")


class SimProcess(Proc):
    """One ``tether-sim`` process (devices ``first``..``first + count - 1`` on one edge
    broker); its latest progress line, and when it was read."""

    def __init__(
        self, broker: Mosquitto, first: int, count: int, args: argparse.Namespace, workdir: Path
    ) -> None:
        self.first, self.count, self.broker = first, count, broker
        self.status: dict[str, Any] | None = None
        self.status_at = 0.0
        self.changed = threading.Condition()
        self.summary_path = workdir / f"sim-{first}-{uuid.uuid4().hex[:6]}.json"
        argv = [PY, "-m", "tether.sim", "--broker", broker.url, "--prefix", PREFIX, "--labels", "bench=fleet"]
        argv += ["--devices", str(count), "--first-index", str(first), "--duration", "86400"]
        argv += ["--progress", str(args.progress), "--start-delay", str(args.start_delay)]
        argv += ["--connect-rate", str(args.connect_rate / args.processes)]
        argv += ["--connect-concurrency", str(max(1, args.connect_concurrency // args.processes))]
        argv += ["--json", str(self.summary_path)]
        super().__init__(argv, workdir / f"sim-{first}.log")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "a") as f:
            for line in self.proc.stdout:
                f.write(line)
                f.flush()
                m = _PROGRESS.search(line)
                if m is None:
                    self.lines.append(line.rstrip("\n"))
                    continue
                gens = {int(g): (int(c), int(d)) for g, c, d in _GEN.findall(m.group(4))}
                status = {"connected": int(m.group(1)), "connects": int(m.group(3)), "generations": gens}
                with self.changed:
                    self.status, self.status_at = status, time.monotonic()
                    self.changed.notify_all()

    def converged(self, generation: int) -> int:
        """Devices of this process holding ``generation`` with every stack settled."""
        return self.status["generations"].get(generation, (0, 0))[0] if self.status else 0

    def cpu_s(self) -> float:
        with contextlib.suppress(OSError):
            return cpu_seconds(self.pid)
        return 0.0

    def summary(self) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(self.summary_path.read_text()))
        return None


class Sims:
    """The simulator processes; waits on what their progress lines say."""

    def __init__(self, procs: list[SimProcess]) -> None:
        self.procs = procs

    def wait(self, what: str, ok: Any, timeout: float, since: float = 0.0) -> float | None:
        """Until ``ok(proc)`` holds for every process on a progress line read after
        ``since``; the time that line was read (monotonic), None on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p.status is not None and p.status_at > since and ok(p) for p in self.procs):
                return max(p.status_at for p in self.procs)
            for p in self.procs:
                if p.proc.poll() is not None:
                    raise RuntimeError(f"simulator {p.first} exited:\n" + "\n".join(p.lines[-20:]))
            time.sleep(0.05)
        log(f"{what}: not within {timeout:g} s")
        return None

    def cpu_s(self) -> float:
        return sum(p.cpu_s() for p in self.procs)

    def generation(self) -> int:
        """The newest desired generation any device holds (0: none yet)."""
        return max([0, *(g for p in self.procs if p.status for g in p.status["generations"])])


def controller_view(url: str) -> dict[str, dict[str, Any]]:
    """``tether devices ls -o json`` of this benchmark's devices, by id (a separate process)."""
    result = cli(url, "devices", "ls", "-o", "json", "--request-timeout", "600", timeout=900)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip())
    return {d["id"]: d for d in json.loads(result.stdout) if d["id"].startswith(f"{PREFIX}-")}


def retained_topics(broker: Mosquitto, topic_filter: str, expected: int) -> set[str]:
    """Topics matching ``topic_filter`` that ``broker`` holds a retained message on (read
    until ``expected`` of them arrived, or for a few seconds)."""
    argv = ["mosquitto_sub", "-p", str(broker.port), "-t", topic_filter, "--retained-only", "-F", "%t"]
    result = subprocess.run(
        [*argv, "-C", str(expected), "-W", str(3 + expected // 5000)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return set(result.stdout.split())


def in_step(d: dict[str, Any]) -> bool:
    return bool(d["status"] == "online" and d["applied_generation"] == d["desired_generation"])


def deploy(
    sims: Sims,
    client: ControllerClient,
    ctl: Controller,
    brokers: dict[str, int],
    n: int,
    version: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    generation = sims.generation() + 1
    meters = {name: CpuMeter(pid) for name, pid in brokers.items()}
    controller, sim0, load0 = CpuMeter(ctl.pid), sims.cpu_s(), load_average()
    t0 = time.monotonic()
    reply = client.request(StacksDeploy(name="app", group="fleet", compose=compose_stack(3, version)))
    t_reply = time.monotonic() - t0
    cpu_reply = controller.seconds()
    log(f"deploy v{version}: the controller replied after {t_reply:.2f} s ({len(reply['devices'])} devices)")
    done = sims.wait(
        f"deploy v{version}", lambda p: p.converged(generation) >= p.count, args.timeout, since=t0
    )
    applied_s = None if done is None else done - t0
    cpu = {name: rnd(m.seconds(), 2) for name, m in meters.items()}
    cpu["simulators"] = rnd(sims.cpu_s() - sim0, 2)
    cpu["controller"] = rnd(controller.seconds(), 2)
    log(f"deploy v{version}: every device applied generation {generation} after {applied_s} s")

    def sees_all() -> bool:
        stacks = client.request(StacksList())["stacks"]
        app = next((s for s in stacks if s["name"] == "app"), None)
        return app is not None and app["version"] == version and app["running"] >= n

    seen = None
    with contextlib.suppress(TimeoutError):
        wait_until(sees_all, args.timeout, interval=0.5, message="the controller sees every device running")
        seen = time.monotonic() - t0
    cpu_deploy = controller.seconds()
    return {
        "version": version,
        "generation": generation,
        "request_s": rnd(t_reply),
        "all_applied_s": rnd(applied_s),
        "controller_sees_all_running_s": rnd(seen),
        "cpu_s_until_all_applied": cpu,
        "controller_cpu_s_reply": rnd(cpu_reply),
        "controller_cpu_s_deploy": rnd(cpu_deploy),
        "controller_cpu_ms_per_device": per_device_ms(cpu_deploy, n),
        "load_average": [load0, load_average()],
    }


class RssSampler:
    """The highest RSS of ``pid`` over a phase, read every ``interval`` seconds (VmHWM tells
    only the process's peak over its whole life: the deploys' included)."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval, self.peak_mb = pid, interval, 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)
            self._done.wait(self.interval)

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return round(self.peak_mb, 1)


def storm_profile(pid: int) -> subprocess.Popen[bytes] | None:
    """With ``TETHER_BENCH_PROFILE_STORM=FILE``: py-spy (not a project dependency) samples the
    controller from the edge brokers' stop until it shows every device back, into FILE (raw)."""
    out = os.environ.get("TETHER_BENCH_PROFILE_STORM")
    if not out:
        return None
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    argv = [spy, "record", "--pid", str(pid), "--format", "raw", "-r", "100", "-o", out]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def storm(
    sims: Sims, edges: list[Mosquitto], ctl: Controller, central: Mosquitto, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    before = {i: d["session"] for i, d in controller_view(central.url).items()}
    connects0 = {id(p): p.status["connects"] if p.status else 0 for p in sims.procs}
    controller, sim0, load0 = CpuMeter(ctl.pid), sims.cpu_s(), load_average()
    rss0, sampler = memory(ctl.pid)["rss_mb"], RssSampler(ctl.pid)
    spy = storm_profile(ctl.pid)
    t0 = time.monotonic()
    for edge in edges:
        edge.stop()
    for edge in edges:
        edge.start()
    restart_s = time.monotonic() - t0
    log(f"{len(edges)} edge brokers restarted in {restart_s:.2f} s")
    # Every device connected, and as many new connections as devices since the restart.
    back = sims.wait(
        "storm: every device connected again",
        lambda p: p.status["connected"] >= p.count and p.status["connects"] >= connects0[id(p)] + p.count,
        args.timeout,
        since=t0 + restart_s,
    )
    online_s = None if back is None else back - t0
    log(f"storm: every device connected again after {online_s} s")

    def controller_sees_all() -> bool:
        view = controller_view(central.url)
        return sum(1 for i, d in view.items() if in_step(d) and d["session"] > before.get(i, -1)) >= n

    seen = None
    try:
        wait_until(
            controller_sees_all, args.timeout, interval=2.0, message="the controller sees every device back"
        )
        seen = time.monotonic() - t0
    except (TimeoutError, RuntimeError) as exc:
        log(f"storm: {exc}")
    log(f"storm: the controller sees every device back after {seen} s")
    rss_peak = sampler.stop()
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its samples and exits
        spy.wait(60)
    not_connected = sum(max(0, p.count - p.status["connected"]) if p.status else p.count for p in sims.procs)
    return {
        "edge_restart_s": rnd(restart_s),
        "all_connected_again_s": rnd(online_s),
        "controller_sees_all_back_s": rnd(seen),
        "devices_not_connected": not_connected,
        "controller_cpu_s": rnd(controller.seconds()),
        "controller_cpu_ms_per_device": per_device_ms(controller.seconds(), n),
        "simulators_cpu_s": rnd(sims.cpu_s() - sim0),
        "controller_rss_mb": [rss0, rss_peak, memory(ctl.pid)["rss_mb"]],
        "load_average": [load0, load_average()],
    }


def bridge_checks(sims: Sims, central: Mosquitto, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """A simulator killed: its devices' wills cross the bridge; started again with no memory:
    the retained desired states on its edge broker bring its devices back in step."""
    victim = sims.procs[-1]
    ids = {f"{PREFIX}-{i:05d}" for i in range(victim.first, victim.first + victim.count)}
    generation = sims.generation()
    t0 = time.monotonic()
    victim.proc.kill()
    victim.proc.wait(30)

    def offline() -> int:
        view = controller_view(central.url)
        return sum(1 for i in ids if view.get(i, {}).get("status") == "offline")

    wills = 0
    with contextlib.suppress(TimeoutError):
        wait_until(
            lambda: offline() >= len(ids), args.timeout, interval=1.0, message="wills through the bridge"
        )
    wills = offline()
    wills_s = time.monotonic() - t0
    log(f"bridge: {wills} of {len(ids)} killed devices shown offline (wills) after {wills_s:.1f} s")

    # What the restarted devices will find: their desired states, retained on their edge broker.
    retained = retained_topics(victim.broker, "tether/v1/devices/+/desired", args.devices)
    held = sum(1 for i in ids if f"tether/v1/devices/{i}/desired" in retained)
    log(f"bridge: the edge broker holds {held} of their {len(ids)} desired states retained")

    t1 = time.monotonic()
    fresh = SimProcess(victim.broker, victim.first, victim.count, args, workdir)
    sims.procs[-1] = fresh
    done = sims.wait(
        "bridge: restarted devices", lambda p: p.converged(generation) >= p.count, args.timeout, since=t1
    )
    converged = fresh.converged(generation)

    def back() -> int:
        view = controller_view(central.url)
        return sum(1 for i in ids if i in view and in_step(view[i]))

    with contextlib.suppress(TimeoutError):
        wait_until(lambda: back() >= len(ids), args.timeout, interval=1.0, message="restarted devices back")
    seen = back()
    return {
        "devices": len(ids),
        "wills_shown_offline": wills,
        "wills_s": rnd(wills_s),
        "desired_retained_on_edge": held,
        "generation": generation,
        "restarted_converged_from_retained": converged,
        "restarted_converged_s": rnd(None if done is None else done - t1),
        "controller_sees_restarted_in_step": seen,
        "controller_sees_restarted_s": rnd(time.monotonic() - t1),
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    n, k = args.devices, args.edge_brokers
    # docs/scaling.md: behind bridges, at least ten times the devices. At a storm an edge
    # broker queues for its bridge every device's presence, report, event, facts reply and
    # old will, and the retained presence and reports it forwards again once the bridge is
    # back; with three times the fleet (the one-broker rule) edges and central dropped QoS 1
    # messages at 50,000 devices and the controller showed 35,657 connected devices offline.
    queued = max(100_000, 10 * n)
    run_id = uuid.uuid4().hex[:6]
    with contextlib.ExitStack() as stack:  # whatever started is stopped, in reverse order
        central = stack.enter_context(
            Mosquitto(workdir / "central", persistence=True, max_queued_messages=queued)
        )
        edges = []
        for e in range(k):
            bridge = region_bridge_conf(central.port, f"edge{e}-{run_id}")
            edges.append(
                stack.enter_context(
                    Mosquitto(
                        workdir / f"edge{e}", persistence=True, max_queued_messages=queued, extra_conf=bridge
                    )
                )
            )
        for e in range(k):
            wait_until(
                lambda e=e: (
                    f"as tether-bridge-edge{e}-{run_id}" in central.log_path.read_text(errors="replace")
                ),
                30,
                message=f"edge broker {e} bridged to the central one",
            )
        controller = stack.enter_context(Controller(workdir / "controller", central.url))
        log(f"central broker {central.url}, {k} edge brokers, controller pid {controller.pid}")
        client = ControllerClient(central.url, timeout=args.timeout)
        stack.callback(client.close)
        client.request(GroupsCreate(name="fleet", selector="bench=fleet", trust_device_labels=True))

        sims = Sims([])
        stack.callback(lambda: [p.stop() for p in sims.procs])
        base, extra = divmod(n, args.processes)
        first = 0
        registration = CpuMeter(controller.pid)
        load0 = load_average()
        t0 = time.monotonic()
        for p in range(args.processes):
            count = base + (1 if p < extra else 0)
            sims.procs.append(SimProcess(edges[p % k], first, count, args, workdir))
            first += count
        connected = sims.wait("connect", lambda p: p.status["connected"] >= p.count, args.timeout)
        if connected is None:
            raise RuntimeError("not every device connected")
        connect_s = connected - t0
        log(f"{n} devices connected in {connect_s:.1f} s")
        wait_registered(client, n, args.timeout)
        registered_s = time.monotonic() - t0
        log(f"the controller knows every device after {registered_s:.1f} s")
        reg_cpu = registration.seconds()
        view = controller_view(central.url)
        online = sum(1 for d in view.values() if d["status"] == "online")
        log(f"the controller shows {online} of {n} devices online")
        time.sleep(args.settle)
        idle = memory(controller.pid)
        idle_cpu = CpuMeter(controller.pid)
        time.sleep(args.settle)
        idle_cpu_pct = idle_cpu.percent()
        brokers = {"central": central.pid, **{f"edge{e}": b.pid for e, b in enumerate(edges)}}
        deploys = [deploy(sims, client, controller, brokers, n, v, args) for v in (1, 2)]
        storm_result = storm(sims, edges, controller, central, n, args)
        checks = None if args.no_bridge_checks else bridge_checks(sims, central, args, workdir)
        ctl_mem = {**memory(controller.pid), "peak_rss_mb": peak_rss_mb(controller.pid)}
        brokers = {"central": central.pid, **{f"edge{e}": b.pid for e, b in enumerate(edges)}}  # restarted
        broker_mem = {name: memory(pid)["rss_mb"] for name, pid in brokers.items()}
        for p in sims.procs:
            p.stop(timeout=120)
        summaries = [s for s in (p.summary() for p in sims.procs) if s]
    return {
        "devices": n,
        "edge_brokers": k,
        "processes": args.processes,
        "connect_s": rnd(connect_s),
        "registered_s": rnd(registered_s),
        "registration": {
            "cpu_s": rnd(reg_cpu),
            "cpu_ms_per_device": per_device_ms(reg_cpu, n),
            "load_average": [load0, load_average()],
        },
        "controller_shows_online": online,
        "controller_idle": {**idle, "cpu_percent": rnd(idle_cpu_pct, 1)},
        "deploys": deploys,
        "storm": storm_result,
        "bridge_checks": checks,
        "controller_memory": ctl_mem,
        "broker_rss_mb": broker_mem,
        "sim_failed_connect_attempts": sum(s.get("refused_or_failed_connects", 0) for s in summaries),
    }


def rows(data: dict[str, Any]) -> list[Row]:
    n = data["devices"]
    out = [
        Row("devices (simulated)", n),
        Row("edge brokers / simulator processes", f"{data['edge_brokers']} / {data['processes']}"),
        Row("all connected after", data["connect_s"], " s"),
        Row("controller knows all after", data["registered_s"], " s"),
        Row("registration: controller CPU", data["registration"]["cpu_s"], " s"),
        Row("registration: controller CPU per device", data["registration"]["cpu_ms_per_device"], " ms"),
        Row(
            "registration: load average, start / end",
            " / ".join(map(str, data["registration"]["load_average"])),
        ),
        Row(
            "controller shows online",
            data["controller_shows_online"],
            "",
            f"{n}",
            data["controller_shows_online"] == n,
        ),
        Row("controller RSS, idle", data["controller_idle"]["rss_mb"], " MB"),
        Row("controller CPU, idle", data["controller_idle"]["cpu_percent"], " %"),
    ]
    for d, label in zip(data["deploys"], ("new stack", "new version"), strict=True):
        applied = d["all_applied_s"]
        out += [
            Row(f"{label}: load average, start / end", " / ".join(map(str, d["load_average"]))),
            Row(f"{label}: controller reply", d["request_s"], " s"),
            Row(
                f"{label}: every device applied",
                applied,
                " s",
                f"<= {DEPLOY_TARGET_S:g} s",
                applied is not None and applied <= DEPLOY_TARGET_S,
            ),
            Row(f"{label}: controller sees all running", d["controller_sees_all_running_s"], " s"),
            Row(
                f"{label}: CPU s until all applied",
                " / ".join(f"{k} {v:g}" for k, v in d["cpu_s_until_all_applied"].items() if v is not None),
            ),
            Row(f"{label}: controller CPU, until it sees all running", d["controller_cpu_s_deploy"], " s"),
            Row(f"{label}: controller CPU per device", d["controller_cpu_ms_per_device"], " ms"),
        ]
    s = data["storm"]
    back = s["controller_sees_all_back_s"]
    out += [
        Row("storm: load average, start / end", " / ".join(map(str, s["load_average"]))),
        Row("storm: edge brokers restarted (stop + start)", s["edge_restart_s"], " s"),
        Row("storm: every device connected again", s["all_connected_again_s"], " s"),
        Row(
            "storm: controller sees every device back",
            back,
            " s",
            f"<= {STORM_TARGET_S:g} s",
            back is not None and back <= STORM_TARGET_S,
        ),
        Row(
            "storm: devices that gave up",
            s["devices_not_connected"],
            "",
            "0",
            s["devices_not_connected"] == 0,
        ),
        Row("storm: controller CPU", s["controller_cpu_s"], " s"),
        Row("storm: controller CPU per device", s["controller_cpu_ms_per_device"], " ms"),
        Row("storm: simulators CPU", s["simulators_cpu_s"], " s"),
        Row(
            "storm: controller RSS before / peak / after", " / ".join(map(str, s["controller_rss_mb"])), " MB"
        ),
    ]
    c = data["bridge_checks"]
    if c:
        m = c["devices"]
        out += [
            Row(
                "bridge: killed devices shown offline (wills)",
                c["wills_shown_offline"],
                "",
                f"{m}",
                c["wills_shown_offline"] == m,
            ),
            Row("bridge: wills seen after", c["wills_s"], " s"),
            Row(
                "bridge: their desired states retained on the edge",
                c["desired_retained_on_edge"],
                "",
                f"{m}",
                c["desired_retained_on_edge"] == m,
            ),
            Row(
                "bridge: restarted devices in step from retained state",
                c["restarted_converged_from_retained"],
                "",
                f"{m}",
                c["restarted_converged_from_retained"] == m,
            ),
            Row(
                "bridge: controller sees them back",
                c["controller_sees_restarted_in_step"],
                "",
                f"{m}",
                c["controller_sees_restarted_in_step"] == m,
            ),
        ]
    mem = data["controller_memory"]
    out += [
        Row("controller RSS after", mem["rss_mb"], " MB"),
        Row(
            "controller peak RSS",
            mem["peak_rss_mb"],
            " MB",
            f"<= {RSS_TARGET_MB:g} MB",
            mem["peak_rss_mb"] <= RSS_TARGET_MB,
        ),
        Row("broker RSS after", " / ".join(f"{k} {v:g}" for k, v in data["broker_rss_mb"].items()), " MB"),
        Row("simulators' failed connect attempts", data["sim_failed_connect_attempts"]),
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--edge-brokers", type=int, default=3, help="edge Mosquittos bridged to the central one")
    p.add_argument(
        "--processes", type=int, default=0, help="simulator processes (default: one per edge broker)"
    )
    p.add_argument(
        "--start-delay", type=float, default=0.2, help="seconds a simulated instance takes to start"
    )
    p.add_argument(
        "--connect-rate", type=float, default=1000.0, help="new simulated devices per second, all processes"
    )
    p.add_argument("--connect-concurrency", type=int, default=600, help="handshakes in flight, all processes")
    p.add_argument(
        "--progress", type=float, default=0.5, help="seconds between the simulators' progress lines"
    )
    p.add_argument(
        "--settle", type=float, default=5.0, help="seconds idle before reading the idle RSS and CPU"
    )
    p.add_argument(
        "--no-bridge-checks", action="store_true", help="skip the will and restarted-device checks"
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds each phase may take")
    p.add_argument("--json", type=Path, default=None, help="default: bench/results/fleet_scale-N-eK.json")
    args = p.parse_args(argv)
    args.processes = args.processes or args.edge_brokers
    if args.edge_brokers < 1 or args.processes < 1 or args.processes > args.devices:
        p.error("need at least one edge broker and one simulator process, and no more processes than devices")
    with tempfile.TemporaryDirectory(prefix="tether-fleet-") as tmp:
        data = run(args, Path(tmp))
    report(
        NAME,
        f"Fleet scale: {args.devices} simulated devices on {args.edge_brokers} bridged edge Mosquittos",
        rows(data),
        data,
        args.json,
        args.devices,
        f"e{args.edge_brokers}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
