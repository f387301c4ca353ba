"""Network namespaces for fault injection: a switch, a hub and devices on one private /24.

::

    {p}-hub   10.201.N.1  --eth0==p-{p}-h--+
    {p}-d1    10.201.N.11 --eth0==p-{p}-1--+-- br0   (a bridge inside netns {p}-sw)
    {p}-d2    10.201.N.12 --eth0==p-{p}-2--+

Theory of operation
-------------------
Every fault is made where a real network would make it, outside the programs under test:
cuts, one-way drops and DNS blackholes are nft rules in the *bridge* family of the switch
namespace (the endpoints see true silence, and ARP is let through for one-way cuts, see
../shared/FAULTS.md section 4); rate limits are tbf qdiscs on the sending side of each
direction (switch port for the downlink, the device's eth0 for the uplink); carrier loss is
the switch port going down; an address change happens inside the device namespace (with
``promote_secondaries``, without which deleting the old address deletes the new one);
latency and loss come from ``nfq_delay.py`` on NFQUEUE rules in the device namespace
(there is no netem on this kernel).

The bridge lives in its own namespace because the root namespace's bridge netfilter and
Docker's ``FORWARD DROP`` would silently eat bridged traffic. The root namespace gets only
a blackhole route for the lab's /24, so a slip that probes a lab address from the root
namespace fails locally instead of leaving the host. Names carry a per-lab random prefix;
:meth:`Lab.destroy` kills every process left in the namespaces (``ip netns pids``: ``ip netns
del`` does not), deletes them with their interfaces and rules, and removes the route.

:func:`run_in_netns` runs Python code in a thread that has joined a namespace: sockets it
(and threads it starts) open belong to that namespace, so the test process can talk MQTT to
the hub without a subprocess.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
SUBNET_BASE = "10.201"
NFQ_DELAY = Path(__file__).with_name("nfq_delay.py")


class NetnsError(RuntimeError):
    """A namespace command failed."""


def sh(*argv: str, input: str | None = None, check: bool = True) -> str:
    """Run a command; return its stdout; raise :class:`NetnsError` with its stderr on failure."""
    result = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=30)
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft", "tc", "iptables"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            return f"{tool} is not installed (apt-get install iproute2 nftables iptables)"
    probe = f"tfprobe-{os.getpid()}"
    try:
        sh("ip", "netns", "add", probe)
    except NetnsError as exc:
        return f"`ip netns add` fails: {exc}"
    try:
        sh("ip", "netns", "exec", probe, "nft", "list", "tables")
    except NetnsError as exc:
        return f"nft does not work in a namespace: {exc}"
    finally:
        sh("ip", "netns", "del", probe, check=False)
    return None


def run_in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a new thread that has joined network namespace ``ns``; return its result.

    Only that thread moves (setns affects the calling thread), and threads it starts stay
    in ``ns`` for their lifetime, as do the sockets they open.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


@dataclass
class Device:
    """One device namespace: its name, switch port and current address."""

    name: str
    ns: str
    port: str
    addr: str
    nfq: subprocess.Popen[bytes] | None = None


@dataclass
class Lab:
    """The topology above; build with :meth:`create`, always :meth:`destroy`."""

    prefix: str = field(default_factory=lambda: f"tf{random.randrange(16**4):04x}")
    octet: int = field(default_factory=lambda: random.randrange(1, 255))
    devices: dict[str, Device] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    _route: str | None = None

    @property
    def subnet(self) -> str:
        return f"{SUBNET_BASE}.{self.octet}"

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    @property
    def hub_addr(self) -> str:
        return f"{self.subnet}.1"

    def exec_prefix(self, ns: str) -> list[str]:
        """argv prefix that runs a program in ``ns`` (``ip`` execs it: the pid stays the program's)."""
        return ["ip", "netns", "exec", ns]

    def ns_sh(self, ns: str, *argv: str, input: str | None = None, check: bool = True) -> str:
        return sh(*self.exec_prefix(ns), *argv, input=input, check=check)

    # --- building ---

    def create(self) -> Lab:
        """Switch, hub and the blackhole guard; a fresh /24 if the chosen one is taken."""
        for _ in range(20):
            try:
                sh("ip", "route", "add", "blackhole", f"{self.subnet}.0/24")
            except NetnsError:
                self.octet = random.randrange(1, 255)
                continue
            self._route = f"{self.subnet}.0/24"
            break
        else:
            raise NetnsError("no free 10.201.N.0/24 for the lab")
        try:
            self._add_ns(self.switch)
            sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.switch, "link", "set", "br0", "up")
            self._attach(self.hub, self.hub_port, self.hub_addr)
            # The hub answers for its own address only: nothing it receives is routed on.
            self.ns_sh(self.hub, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        except BaseException:
            self.destroy()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _attach(self, ns: str, port: str, addr: str) -> None:
        self._add_ns(ns)
        sh("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def add_device(self, name: str) -> Device:
        index = len(self.devices) + 1
        device = Device(
            name, f"{self.prefix}-d{index}", f"p-{self.prefix}-{index}", f"{self.subnet}.{10 + index}"
        )
        self._attach(device.ns, device.port, device.addr)
        self.ns_sh(device.ns, "sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1")
        self.devices[name] = device
        return device

    def spawn(self, ns: str, argv: list[str], **popen: object) -> subprocess.Popen[bytes]:
        """Start a helper process in ``ns`` (killed by :meth:`destroy` at the latest)."""
        proc: subprocess.Popen[bytes] = subprocess.Popen([*self.exec_prefix(ns), *argv], **popen)  # type: ignore[call-overload]
        self.pids.append(proc.pid)
        return proc

    # --- faults at the switch ---

    @property
    def hub_port(self) -> str:
        return f"p-{self.prefix}-h"

    def _switch_rules(self, key: str, rules: list[str]) -> None:
        """Replace the fault rules named ``key`` in the switch's bridge forward path."""
        table = "fault_" + re.sub(r"[^A-Za-z0-9_]", "_", key)
        self.ns_sh(self.switch, "nft", "delete", "table", "bridge", table, check=False)
        if rules:
            body = "\n".join(f"    {r}" for r in rules)
            script = (
                f"table bridge {table} {{\n  chain forward {{ type filter hook forward priority 0; policy accept;\n"
                f"{body}\n  }}\n}}\n"
            )
            self.ns_sh(self.switch, "nft", "-f", "-", input=script)

    def partition(self, name: str) -> None:
        """Nothing passes to or from the device (the endpoints see silence)."""
        port = self.devices[name].port
        self._switch_rules(name, [f'iifname "{port}" drop', f'oifname "{port}" drop'])

    def block(self, name: str, direction: str) -> None:
        """One-way cut of IPv4 (ARP still passes): ``"down"`` toward the device, ``"up"`` from it."""
        port = self.devices[name].port
        match = "oifname" if direction == "down" else "iifname"
        self._switch_rules(name, [f'{match} "{port}" ether type ip drop'])

    def blackhole_dns(self, name: str) -> None:
        """The device's resolver becomes unreachable in silence: a default route to the hub,
        and DNS dropped at the switch (lookups then time out instead of failing at once)."""
        device = self.devices[name]
        self.ns_sh(device.ns, "ip", "route", "replace", "default", "via", self.hub_addr)
        port = device.port
        self._switch_rules(
            name, [f'iifname "{port}" udp dport 53 drop', f'iifname "{port}" tcp dport 53 drop']
        )

    def heal(self, name: str) -> None:
        """Remove the device's switch rules and bring its port up."""
        self._switch_rules(name, [])
        sh("ip", "-n", self.switch, "link", "set", self.devices[name].port, "up")

    def isolate_hub(self, cut: bool = True) -> None:
        """Cut (or restore) the hub's port: every device loses the broker at once."""
        port = self.hub_port
        self._switch_rules("hub", [f'iifname "{port}" drop', f'oifname "{port}" drop'] if cut else [])

    def carrier(self, name: str, up: bool) -> None:
        """The far end of the device's cable: down means NO-CARRIER on its eth0."""
        sh("ip", "-n", self.switch, "link", "set", self.devices[name].port, "up" if up else "down")

    def shape(self, name: str, rate: str) -> None:
        """Limit both directions to ``rate`` (tc syntax, e.g. ``16kbit``)."""
        device = self.devices[name]
        tbf = ["tbf", "rate", rate, "burst", "2kb", "latency", "2s"]
        sh("ip", "netns", "exec", self.switch, "tc", "qdisc", "replace", "dev", device.port, "root", *tbf)
        self.ns_sh(device.ns, "tc", "qdisc", "replace", "dev", "eth0", "root", *tbf)

    def unshape(self, name: str) -> None:
        device = self.devices[name]
        sh("ip", "netns", "exec", self.switch, "tc", "qdisc", "del", "dev", device.port, "root", check=False)
        self.ns_sh(device.ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)

    # --- faults inside the device ---

    def change_address(self, name: str, host: int) -> str:
        """Give the device ``{subnet}.{host}`` and remove its old address; return the new one."""
        device = self.devices[name]
        new = f"{self.subnet}.{host}"
        self.ns_sh(device.ns, "ip", "addr", "add", f"{new}/24", "dev", "eth0")
        self.ns_sh(device.ns, "ip", "addr", "del", f"{device.addr}/24", "dev", "eth0")
        device.addr = new
        return new

    def impair(self, name: str, delay_ms: float, loss: float, log: Path) -> None:
        """Delay every packet of the device ``delay_ms`` each way and drop ``loss`` of them."""
        device = self.devices[name]
        out = log.open("ab")
        device.nfq = self.spawn(
            device.ns,
            ["python3", str(NFQ_DELAY), "--queue", "7", "--delay", str(delay_ms), "--loss", str(loss)],
            stdout=subprocess.PIPE,
            stderr=out,
        )
        assert device.nfq.stdout is not None
        line = device.nfq.stdout.readline()
        if line.strip() != b"ready":
            raise NetnsError(f"nfq_delay did not start: {line!r} (see {log})")
        for chain, iface in (("OUTPUT", "-o"), ("INPUT", "-i")):
            self.ns_sh(
                device.ns,
                *(
                    "iptables",
                    "-A",
                    chain,
                    iface,
                    "eth0",
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    "7",
                    "--queue-bypass",
                ),
            )

    def unimpair(self, name: str) -> None:
        device = self.devices[name]
        self.ns_sh(device.ns, "iptables", "-F", "OUTPUT")
        self.ns_sh(device.ns, "iptables", "-F", "INPUT")
        if device.nfq is not None:
            device.nfq.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                device.nfq.wait(10)
            device.nfq = None

    # --- teardown ---

    def destroy(self) -> None:
        """Kill what runs in the lab, delete its namespaces and the guard route. Idempotent."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for ns in self.namespaces:
            self._kill_all(ns)
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        if self._route is not None:
            sh("ip", "route", "del", "blackhole", self._route, check=False)
            self._route = None

    def _kill_all(self, ns: str) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).split()]
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
