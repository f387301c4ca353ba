"""The fault suite's harness: a broker, a controller and real agents behind a faultable network.

Theory of operation
-------------------
A :class:`Fleet` runs Mosquitto (persistence on, as in production), ``tether up --broker``
and one ``tether-agent`` per device (process driver, ``--keepalive 10``,
``--reconcile-interval 2``), on one of two backends with the same fault vocabulary:

* :class:`NetnsBackend` (root): broker and controller in the hub namespace, each agent in
  its own device namespace, faults made by :class:`~faults.netns.Lab` on real packets;
* :class:`ProxyBackend` (anywhere): everything on loopback, each agent behind its own
  :class:`~faults.faultproxy.FaultProxy`. It cannot drop packets (no ``impair`` with loss).

Every device runs three stacks, so that each scenario can check the four promises of the
issue: ``steady`` (a process whose pid must survive the fault), ``noise`` (a service whose
command does not exist: every retry is an ``action.failed`` event, at 0, 1, 3, 7, 15, 31 s...
after it is deployed, so events are produced while the fault is on) and, deployed *during*
the fault, ``late`` (which must be applied after healing, exactly once: its process writes
one line to ``starts`` per start).

The test process talks to the controller like the CLI does (:class:`ControllerClient`), from
a thread inside the hub namespace (:func:`~faults.netns.run_in_netns`), and a second MQTT
session with a persistent subscription to every device's events counts what crosses the
wire, duplicates included. Convergence is polled (never slept for): every device online,
generation applied == desired, its stacks running, and every event the agent numbered
(``outbox/state`` in its data directory) stored once by the controller.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.infra import MOSQUITTO_BIN, free_port, wait_until
from support.procs import AgentProcess, ControllerProcess
from tether.protocol import codec, topics
from tether.protocol.client import ControllerClient
from tether.protocol.commands import DevicesShow, GroupsCreate, StacksDeploy, StacksStatus
from tether.protocol.errors import RequestError, TetherError
from tether.protocol.models import Event
from tether.protocol.mqtt import MqttClient, parse_broker_url
from tether.protocol.topics import DeviceTopic

from .faultproxy import FaultProxy
from .netns import Lab, run_in_netns

KEEPALIVE = 10
MQTT_PORT = 1883

STEADY = """
services:
  steady:
    command: ["sh", "-c", "echo $$$$ > pid; echo $$$$ >> starts; exec sleep 3600"]
    restart: always
"""
NOISE = """
services:
  crashy:
    command: ["/nonexistent/tether-fault-noise"]
    restart: always
"""
LATE = """
services:
  late:
    command: ["sh", "-c", "echo $$$$ > pid; echo {tag} >> starts; exec sleep 3600"]
    restart: always
"""


class Unsupported(Exception):
    """The backend cannot make this fault."""


# --- backends ---------------------------------------------------------------------------


class NetnsBackend:
    """Real packets: namespaces, a bridge, nft, tc and NFQUEUE (see netns.py)."""

    name = "netns"
    drops_packets = True

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.lab = Lab().create()
        self.broker_listeners = [(self.lab.hub_addr, MQTT_PORT), ("127.0.0.1", MQTT_PORT)]
        self.hub_url = f"mqtt://127.0.0.1:{MQTT_PORT}"

    def hub_prefix(self) -> list[str]:
        return self.lab.exec_prefix(self.lab.hub)

    def add_device(self, name: str) -> None:
        self.lab.add_device(name)

    def device_prefix(self, name: str) -> list[str]:
        return self.lab.exec_prefix(self.lab.devices[name].ns)

    def device_url(self, name: str) -> str:
        return f"mqtt://{self.lab.hub_addr}:{MQTT_PORT}"

    def in_hub(self, fn: Callable[[], Any]) -> Any:
        return run_in_netns(self.lab.hub, fn)

    def partition(self, name: str) -> None:
        self.lab.partition(name)

    def heal(self, name: str) -> None:
        self.lab.heal(name)

    def block(self, name: str, direction: str) -> None:
        self.lab.block(name, direction)

    def isolate_broker(self, cut: bool = True) -> None:
        """Every device loses (or gets back) the broker at once."""
        self.lab.isolate_hub(cut)

    def carrier(self, name: str, up: bool) -> None:
        self.lab.carrier(name, up)

    def shape(self, name: str, bits_per_s: int) -> None:
        self.lab.shape(name, f"{bits_per_s}bit")

    def unshape(self, name: str) -> None:
        self.lab.unshape(name)

    def impair(self, name: str, delay_ms: float, loss: float) -> None:
        self.lab.impair(name, delay_ms, loss, self.tmp / f"nfq-{name}.log")

    def unimpair(self, name: str) -> None:
        self.lab.unimpair(name)

    def change_address(self, name: str) -> str:
        device = self.lab.devices[name]
        host = int(device.addr.rsplit(".", 1)[1]) + 100
        return self.lab.change_address(name, host)

    def blackhole_dns(self, name: str) -> None:
        self.lab.blackhole_dns(name)

    def close(self) -> None:
        self.lab.destroy()


class ProxyBackend:
    """Loopback only: one fault proxy in front of the broker per device (see faultproxy.py)."""

    name = "proxy"
    drops_packets = False

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.broker_listeners = [("127.0.0.1", self.port)]
        self.hub_url = f"mqtt://127.0.0.1:{self.port}"
        self.proxies: dict[str, FaultProxy] = {}

    def hub_prefix(self) -> list[str]:
        return []

    def add_device(self, name: str) -> None:
        proxy = FaultProxy(("127.0.0.1", self.port))
        proxy.start()
        self.proxies[name] = proxy

    def device_prefix(self, name: str) -> list[str]:
        return []

    def device_url(self, name: str) -> str:
        return f"mqtt://127.0.0.1:{self.proxies[name].port}"

    def in_hub(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def partition(self, name: str) -> None:
        self.proxies[name].partition()

    def heal(self, name: str) -> None:
        self.proxies[name].heal()

    def block(self, name: str, direction: str) -> None:
        self.proxies[name].set(**{f"{direction}_paused": True, "accept": "hang"})

    def isolate_broker(self, cut: bool = True) -> None:
        for name in self.proxies:
            if cut:
                self.partition(name)
            else:
                self.heal(name)

    def carrier(self, name: str, up: bool) -> None:
        if up:
            self.heal(name)
        else:
            self.partition(name)

    def shape(self, name: str, bits_per_s: int) -> None:
        self.proxies[name].set(up_rate_bps=bits_per_s / 8, down_rate_bps=bits_per_s / 8)

    def unshape(self, name: str) -> None:
        self.proxies[name].set(up_rate_bps=0, down_rate_bps=0)

    def impair(self, name: str, delay_ms: float, loss: float) -> None:
        if loss:
            raise Unsupported("packet loss needs network namespaces (a TCP proxy cannot drop packets)")
        self.proxies[name].set(up_delay_ms=delay_ms, down_delay_ms=delay_ms)

    def unimpair(self, name: str) -> None:
        self.proxies[name].set(up_delay_ms=0, down_delay_ms=0)

    def change_address(self, name: str) -> str:
        self.proxies[name].stall_existing()
        return "127.0.0.1"

    def blackhole_dns(self, name: str) -> None:
        """Nothing to do: the unresolvable name fails through the host's resolver."""

    def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()


Backend = NetnsBackend | ProxyBackend


# --- the broker -------------------------------------------------------------------------


class Broker:
    """Mosquitto with persistence, in the hub namespace (or on loopback)."""

    def __init__(self, directory: Path, listeners: list[tuple[str, int]], prefix: list[str]) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.listeners = listeners
        self.prefix = prefix
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "mosquitto.log"
        self.starts = 0

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        conf = self.dir / "mosquitto.conf"
        lines = [f"listener {port} {host}" for host, port in self.listeners]
        lines += [
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.dir}/",
            f"log_dest file {self.log_path}",
            "log_type all",
            "user root",
        ]
        conf.write_text("\n".join(lines) + "\n")
        self.starts += 1
        marker = "running"
        before = self.log_text().count(marker)
        out = (self.dir / "mosquitto.out").open("ab")
        self.proc = subprocess.Popen([*self.prefix, MOSQUITTO_BIN, "-c", str(conf)], stdout=out, stderr=out)
        proc = self.proc
        wait_until(
            lambda: proc.poll() is not None or self.log_text().count(marker) > before,
            15,
            message="mosquitto running",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {self.log_text()[-2000:]}")

    def snapshot(self) -> None:
        """Have Mosquitto write its persistence file now (SIGUSR1), as an autosave would."""
        db = self.dir / "mosquitto.db"
        before = db.stat().st_mtime_ns if db.exists() else 0
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: db.exists() and db.stat().st_mtime_ns != before, 10, 0.05, "mosquitto.db written")

    def crash(self) -> None:
        """SIGKILL: nothing is saved; a restart comes back from the last snapshot."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def forget(self) -> None:
        """Delete what the stopped broker saved: it starts again with no retained message or session."""
        (self.dir / "mosquitto.db").unlink(missing_ok=True)

    def stop(self) -> None:
        """SIGTERM: a planned restart (the broker saves its retained messages and sessions)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- the fleet --------------------------------------------------------------------------


class Observer:
    """A persistent MQTT session counting every event delivery (duplicates included)."""

    def __init__(self, url: str, run: str) -> None:
        self.lock = threading.Lock()
        self.deliveries: dict[str, list[int]] = {}
        self.client = MqttClient(
            [parse_broker_url(url)],
            client_id=f"fault-observer-{run}",
            clean_session=False,
            keepalive=KEEPALIVE,
            on_message=self._on_message,
        )
        self.client.subscribe(topics.all_devices(DeviceTopic.EVENTS), qos=1)
        self.client.connect(15)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        with contextlib.suppress(TetherError):
            events = codec.decode_many(payload, Event, 1000, "seq")
            with self.lock:
                for event in events:
                    self.deliveries.setdefault(event.device_id, []).append(event.seq)

    def seqs(self, device: str) -> list[int]:
        with self.lock:
            return list(self.deliveries.get(device, []))

    def close(self) -> None:
        self.client.stop()


class Fleet:
    """Broker, controller and agents for one scenario; see the module docstring."""

    def __init__(self, backend: Backend, tmp: Path, embedded: bool = False) -> None:
        """``embedded``: the controller's own broker (it lives and dies with ``tether up``)
        instead of Mosquitto, listening where Mosquitto would."""
        self.backend = backend
        self.tmp = tmp
        self.embedded = embedded
        self.run = uuid.uuid4().hex[:6]
        self.group = "fleet"
        self.broker = Broker(tmp / "broker", backend.broker_listeners, backend.hub_prefix())
        self.controller: ControllerProcess | None = None
        self.agents: dict[str, AgentProcess] = {}
        self.brokers: dict[str, list[str]] = {}
        self._ops: ControllerClient | None = None
        self.observer: Observer | None = None
        self.late_tag = ""
        self.keepalive = KEEPALIVE
        """The agents' ``--keepalive`` (a scenario about presence alone may shorten its wait)."""

    # --- processes ---

    def start(self) -> Fleet:
        if not self.embedded:
            self.broker.start()
        self.start_controller()
        self.observer = self.backend.in_hub(lambda: Observer(self.backend.hub_url, self.run))
        return self

    def start_controller(self) -> None:
        if self.embedded:
            host, port = self.backend.broker_listeners[0]
            self.controller = ControllerProcess(
                self.tmp / "controller",
                port=port,
                argv_prefix=self.backend.hub_prefix(),
                extra=[
                    "--bind",
                    "0.0.0.0" if self.backend.name == "netns" else host,
                    "--http",
                    "127.0.0.1:0",
                ],
            )
            return
        self.controller = ControllerProcess(
            self.tmp / "controller", broker=self.backend.hub_url, argv_prefix=self.backend.hub_prefix()
        )

    def metrics(self) -> str:
        """The controller's /metrics (``--http``, embedded mode), fetched where the hub is reachable."""
        assert self.controller is not None
        port = self.controller.wait_for_line(r"health and metrics on http://127.0.0.1:(\d+)/").group(1)

        def get() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                return resp.read().decode()

        return self.backend.in_hub(get)  # type: ignore[no-any-return]

    def agent_dir(self, name: str) -> Path:
        return self.tmp / name

    def add_device(self, name: str, brokers: list[str] | None = None) -> None:
        """A device namespace (or proxy); ``brokers`` go before the real one in --broker order."""
        self.backend.add_device(name)
        self.brokers[name] = [*(brokers or []), self.backend.device_url(name)]

    def start_agent(self, name: str, extra: list[str] | None = None) -> AgentProcess:
        agent = AgentProcess(
            self.brokers[name],
            name,
            self.agent_dir(name),
            labels={"lab": self.run},
            extra=[
                *(["--keepalive", str(self.keepalive)] if self.keepalive != KEEPALIVE else []),
                *(extra or []),
            ],
            argv_prefix=self.backend.device_prefix(name),
        )
        self.agents[name] = agent
        return agent

    def boot(
        self,
        count: int = 2,
        brokers: dict[int, list[str]] | None = None,
        prepare: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Start ``count`` agents, deploy ``steady`` and ``noise`` to all and wait until they run.

        ``brokers`` maps a device's index (0-based) to broker URLs tried before the real one;
        ``prepare(name)`` runs between creating a device's network and starting its agent.
        """
        names = [f"d{i}-{self.run}" for i in range(1, count + 1)]
        for index, name in enumerate(names):
            self.add_device(name, (brokers or {}).get(index))
            if prepare is not None:
                prepare(name)
            self.start_agent(name)
        for name in names:
            wait_until(lambda n=name: self.show(n)["status"] == "online", 40, 0.1, f"{name} online")
        self.request(GroupsCreate(name=self.group, selector=f"lab={self.run}", trust_device_labels=True))
        self.deploy("steady", STEADY)
        self.deploy("noise", NOISE)
        wait_until(lambda: self.converged(names, {"steady", "noise"}), 40, 0.1, "steady running everywhere")
        for name in names:  # seq 1 and 2: generations accepted; 3: noise's first failure
            wait_until(lambda n=name: self.agent_seq(n) >= 3, 20, 0.1, f"{name}: first noise event")
        return names

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.signal(signal.SIGTERM)  # all at once: a big fleet stops in parallel
        for agent in self.agents.values():
            agent.stop(10)
        if self.observer is not None:
            self.observer.close()
        if self._ops is not None:
            with contextlib.suppress(Exception):
                self._ops.close()
        if self.controller is not None:
            self.controller.stop(10)
        if not self.embedded:
            self.broker.stop()

    # --- requests, like the CLI ---

    def request(self, command: Any, timeout: float = 30.0) -> Any:
        """Send a request; reconnect first if the session is gone (a broker restart)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._ops is None:
                    self._ops = self.backend.in_hub(
                        lambda: ControllerClient(self.backend.hub_url, timeout=10)
                    )
                return self._ops.request(command)
            except TetherError as exc:
                if "unknown" in str(exc) or time.monotonic() >= deadline:
                    raise
                if self._ops is not None:
                    with contextlib.suppress(Exception):
                        self._ops.close()
                self._ops = None
                time.sleep(0.2)

    def show(self, name: str) -> dict[str, Any]:
        """The controller's full view of a device (``status`` ``"unknown"`` before it is heard of)."""
        try:
            return self.request(DevicesShow(device_id=name))["device"]  # type: ignore[no-any-return]
        except RequestError as exc:
            if "unknown device" not in str(exc):
                raise
            return {"id": name, "status": "unknown"}

    def status(self, stack: str) -> list[dict[str, Any]]:
        return self.request(StacksStatus(name=stack))["devices"]  # type: ignore[no-any-return]

    def deploy(self, name: str, compose: str) -> dict[str, Any]:
        return self.request(StacksDeploy(name=name, group=self.group, compose=compose))  # type: ignore[no-any-return]

    def deploy_late(self) -> dict[str, Any]:
        """The deploy issued during the fault: a new stack with a unique tag."""
        self.late_tag = f"late-{uuid.uuid4().hex[:8]}"
        return self.deploy("late", LATE.format(tag=self.late_tag))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The real CLI, run where the hub is reachable."""
        argv = [*self.backend.hub_prefix(), sys.executable, "-m", "tether.cli.main", *args]
        argv += ["--broker", self.backend.hub_url]
        env = {k: v for k, v in os.environ.items() if k not in ("TETHER_BROKER", "TETHER_CREDENTIALS")}
        # cwd: no ./tether-data/operator.json there, so the CLI connects anonymously as the controller allows.
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=self.tmp)

    def cli_json(self, *args: str) -> Any:
        result = self.cli(*args, "-o", "json")
        assert result.returncode == 0, f"tether {' '.join(args)}: {result.stderr}"
        return json.loads(result.stdout)

    # --- what runs on a device ---

    def workdir(self, name: str, stack: str, service: str) -> Path:
        return self.agent_dir(name) / "work" / stack / service

    def pid(self, name: str, stack: str = "steady", service: str = "steady") -> int | None:
        try:
            return int((self.workdir(name, stack, service) / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def process_pid(self, name: str, stack: str, service: str) -> int:
        """The pid the process driver recorded for a service instance."""
        record = json.loads((self.agent_dir(name) / "processes" / f"{stack}.{service}.json").read_text())
        return int(record["pid"])

    def starts(self, name: str, stack: str, service: str) -> list[str]:
        path = self.workdir(name, stack, service) / "starts"
        return path.read_text().split() if path.exists() else []

    @staticmethod
    def alive(pid: int | None) -> bool:
        if not pid:
            return False
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(") ", 1)[1][0] != "Z"
        except OSError:
            return False

    # --- events ---

    def agent_seq(self, name: str) -> int:
        """The last event sequence number the agent handed out (survives restarts, on disk)."""
        try:
            return int(json.loads((self.agent_dir(name) / "outbox" / "state").read_text())["seq"])
        except (OSError, ValueError, KeyError):
            return 0

    def outbox_len(self, name: str) -> int:
        return len(list((self.agent_dir(name) / "outbox").glob("*.msgpack")))

    def events_complete(self, name: str, view: dict[str, Any], excused: set[int] = frozenset()) -> bool:  # type: ignore[assignment]
        """Nothing queued on the device, and every event it numbered (but ``excused``) stored."""
        produced = self.agent_seq(name)
        stored = [e["seq"] for e in view.get("events", [])]
        expected = set(range(max(1, produced - 49), produced + 1)) - excused
        return self.outbox_len(name) == 0 and expected <= set(stored)

    def event_report(self, name: str) -> dict[str, Any]:
        """Produced by the agent, stored by the controller (via the real CLI), seen on the wire.

        An event produced a moment ago is in flight, not lost: what the agent has numbered
        is given a few seconds to land before the comparison.
        """
        with contextlib.suppress(AssertionError):
            wait_until(lambda: self.events_complete(name, self.show(name)), 10, 0.1)
        produced = self.agent_seq(name)
        view = self.cli_json("devices", "show", name)
        stored = [e["seq"] for e in view["events"] if e["seq"] <= produced]
        assert produced <= 50, "the device view lists the newest 50 events: keep scenarios under that"
        wire = self.observer.seqs(name) if self.observer else []
        return {
            "produced": produced,
            "stored": len(stored),
            "lost": sorted(set(range(1, produced + 1)) - set(stored)),
            "duplicates_stored": len(stored) - len(set(stored)),
            "duplicates_on_wire": len(wire) - len(set(wire)),
            "queued_on_device": self.outbox_len(name),
        }

    # --- convergence ---

    def converged(
        self, names: list[str], stacks: set[str], excused: dict[str, set[int]] | None = None
    ) -> bool:
        """Every device online, generation applied == desired, ``stacks`` running, events stored
        (but the ``excused`` ones: a known loss, checked by the caller)."""
        for name in names:
            view = self.show(name)
            if view["status"] != "online" or view["applied_generation"] != view["desired_generation"]:
                return False
            wanted = {ref["name"] for ref in view["desired"]}
            if not stacks <= wanted:
                return False
            if any(view["stacks"].get(s) != "running" for s in stacks - {"noise"}):
                return False
            if not self.events_complete(name, view, (excused or {}).get(name, set())):
                return False
        return True

    def wait_converged(
        self,
        since: float,
        names: list[str],
        stacks: set[str],
        timeout: float = 90.0,
        extra: Callable[[], bool] | None = None,
        excused: dict[str, set[int]] | None = None,
    ) -> float:
        """Poll until :meth:`converged` (and ``extra``); return the seconds since ``since`` (monotonic)."""
        try:
            wait_until(
                lambda: self.converged(names, stacks, excused) and (extra is None or extra()),
                timeout,
                0.1,
                f"fleet converged ({sorted(stacks)})",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.describe(names)}") from None
        return time.monotonic() - since

    def describe(self, names: list[str]) -> str:
        """Where each device stands (for failure messages)."""
        lines = []
        for name in names:
            view = self.show(name)
            lines.append(
                f"{name}: {view.get('status')} gen {view.get('applied_generation')}/"
                f"{view.get('desired_generation')} stacks {view.get('stacks')} "
                f"events stored {[e['seq'] for e in view.get('events', [])]} produced {self.agent_seq(name)} "
                f"queued {self.outbox_len(name)}; log {self.agent_dir(name) / 'agent.log'}"
            )
        return "\n".join(lines)

    def reconnects(self, name: str) -> int:
        """How many times the agent (this process) connected."""
        return sum("connected to" in line for line in self.agents[name].lines)

    def signal_agent(self, name: str, sig: int) -> None:
        os.kill(self.agents[name].proc.pid, sig)

    def kill_device_processes(self, name: str) -> None:
        """A power cut: SIGKILL the agent and every workload it started; return once all are gone."""
        self.agents[name].kill()
        pids = []
        for pid_file in (self.agent_dir(name) / "processes").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, ProcessLookupError):
                pid = int(json.loads(pid_file.read_text())["pid"])
                os.killpg(pid, signal.SIGKILL)
                pids.append(pid)
        wait_until(lambda: not any(self.alive(p) for p in pids), 10, 0.05, f"{name}: workloads dead")
