"""Bandwidth on the wire: what one device's MQTT connection costs, idle and per deploy.

    .venv/bin/python bench/bandwidth.py [--window 600]

Eight real agents (``tether-agent``, process driver) run at once: plain MQTT and TLS, each
at keepalive 60 s (the default) and 300 s, each with device metrics at their default
settings and with metrics off (``--metrics-interval 0``). Each connects to Mosquitto through its own
loopback counting proxy, so every device's traffic is counted alone. A real controller
(``tether up --broker``, connected to Mosquitto directly) deploys a 3-service stack to
all of them, then a new version of it, then the same version again (a no-op redeploy).
Afterwards the devices are left idle for ``--window`` seconds and the traffic is
extrapolated to an hour.

How bytes are counted
---------------------
* **IP bytes (the headline figures)**: a packet capture on the loopback interface
  (``AF_PACKET`` with a kernel BPF filter on the proxies' ports; needs root) adds up
  the IP length of every packet between device and proxy, both directions: IPv4 and
  TCP headers (with timestamps: 52 bytes), TLS records and pure ACKs included - what a
  metered link bills, apart from the link layer.
* **Application bytes**: what the proxy reads from each socket, with 52 bytes of
  TCP/IP header added per read as an estimate of the segments (this misses pure ACKs,
  so it is lower); used when no capture is possible.
* For plain MQTT the proxy also parses the stream and counts MQTT packets by type.

The floor is measured the same way: a bare paho client at the same keepalive (plain and
TLS), connected through its own proxy, doing nothing. Issue 7's figure for it is 160 IP
bytes per PINGREQ/PINGRESP/ACK cycle, 9.6 KB/hour at keepalive 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    BIN,
    PY,
    Controller,
    Mosquitto,
    Proc,
    Row,
    child_env,
    compose_stack,
    log,
    report,
    request,
    rnd,
    wait_until,
)
from tether.protocol.commands import DevicesList, GroupsCreate, StacksDeploy

NAME = "bandwidth"
HEADER_ESTIMATE = 52  # IPv4 (20) + TCP (20) + TCP timestamps option (12)
MQTT_TYPES = {
    1: "CONNECT",
    2: "CONNACK",
    3: "PUBLISH",
    4: "PUBACK",
    5: "PUBREC",
    6: "PUBREL",
    7: "PUBCOMP",
    8: "SUBSCRIBE",
    9: "SUBACK",
    10: "UNSUBSCRIBE",
    11: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    14: "DISCONNECT",
}


# --- counting ---------------------------------------------------------------------------------


@dataclass
class Counts:
    """Traffic of one device connection (all its TCP connections), by direction."""

    up_bytes: int = 0  # device -> broker, application bytes
    down_bytes: int = 0
    up_reads: int = 0
    down_reads: int = 0
    ip_up: int = 0  # from the capture: IP bytes
    ip_down: int = 0
    ip_packets: int = 0
    connections: int = 0
    mqtt: dict[str, int] = field(default_factory=dict)  # "up PUBLISH" -> count

    def snapshot(self) -> Counts:
        return Counts(
            self.up_bytes,
            self.down_bytes,
            self.up_reads,
            self.down_reads,
            self.ip_up,
            self.ip_down,
            self.ip_packets,
            self.connections,
            dict(self.mqtt),
        )

    def minus(self, other: Counts) -> dict[str, Any]:
        mqtt = {k: v - other.mqtt.get(k, 0) for k, v in self.mqtt.items() if v - other.mqtt.get(k, 0)}
        up, down = self.up_bytes - other.up_bytes, self.down_bytes - other.down_bytes
        reads = (self.up_reads - other.up_reads) + (self.down_reads - other.down_reads)
        return {
            "app_up": up,
            "app_down": down,
            "app_with_header_estimate": up + down + HEADER_ESTIMATE * reads,
            "ip_up": self.ip_up - other.ip_up,
            "ip_down": self.ip_down - other.ip_down,
            "ip_total": (self.ip_up - other.ip_up) + (self.ip_down - other.ip_down),
            "ip_packets": self.ip_packets - other.ip_packets,
            "tcp_connections": self.connections - other.connections,
            "mqtt_packets": dict(sorted(mqtt.items())),
        }


class MqttTally:
    """Counts MQTT packets by type in one direction of a plain MQTT stream."""

    def __init__(self, counts: Counts, direction: str) -> None:
        self.counts = counts
        self.direction = direction
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while len(buf) - pos >= 2:
            length, shift, i, complete = 0, 0, pos + 1, False
            while i < len(buf) and i - pos <= 4:
                byte = buf[i]
                i += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if byte < 0x80:
                    complete = True
                    break
            if not complete or i + length > len(buf):
                break
            kind = MQTT_TYPES.get(buf[pos] >> 4, "?")
            if kind == "PUBLISH" and length >= 2:  # name the topic's last level: reported, events...
                tlen = int.from_bytes(buf[i : i + 2], "big")
                kind += (
                    " " + bytes(buf[i + 2 : i + 2 + tlen]).decode(errors="replace").rsplit("/", 1)[-1][:20]
                )
            key = f"{self.direction} {kind}"
            self.counts.mqtt[key] = self.counts.mqtt.get(key, 0) + 1
            pos = i + length
        del buf[:pos]


class Proxy:
    """A loopback TCP proxy to ``target``; counts what passes through it."""

    def __init__(self, name: str, target_port: int, parse_mqtt: bool) -> None:
        self.name = name
        self.target_port = target_port
        self.parse_mqtt = parse_mqtt
        self.counts = Counts()
        self.port = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counts.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        up_tally = MqttTally(self.counts, "up") if self.parse_mqtt else None
        down_tally = MqttTally(self.counts, "down") if self.parse_mqtt else None
        await asyncio.gather(
            self._pump(reader, up_writer, "up", up_tally),
            self._pump(up_reader, writer, "down", down_tally),
            return_exceptions=True,
        )

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str, tally: MqttTally | None
    ) -> None:
        try:
            while data := await src.read(65536):
                if direction == "up":
                    self.counts.up_bytes += len(data)
                    self.counts.up_reads += 1
                else:
                    self.counts.down_bytes += len(data)
                    self.counts.down_reads += 1
                if tally is not None:
                    tally.feed(data)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()


class ProxyThread:
    """Proxies on one event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="proxies", daemon=True)
        self.thread.start()

    def add(self, name: str, target_port: int, parse_mqtt: bool) -> Proxy:
        proxy = Proxy(name, target_port, parse_mqtt)
        asyncio.run_coroutine_threadsafe(proxy.start(), self.loop).result(10)
        return proxy

    def snapshot(self, proxies: list[Proxy]) -> dict[str, Counts]:
        async def snap() -> dict[str, Counts]:
            return {p.name: p.counts.snapshot() for p in proxies}

        return asyncio.run_coroutine_threadsafe(snap(), self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Capture:
    """IP bytes to and from some local TCP ports, from a packet socket on ``lo`` (root only).

    A classic-BPF filter in the kernel passes only IPv4 TCP packets with one of the ports as
    source or destination; each loopback packet is seen twice (sent and received), so only
    the outgoing copy is counted.
    """

    def __init__(self, ports: dict[int, Proxy]) -> None:
        self.ports = ports
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self._attach_filter(sorted(ports))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self.thread.start()

    def _attach_filter(self, ports: list[int]) -> None:
        n = len(ports)
        drop, accept = 9 + 2 * n, 10 + 2 * n
        prog: list[tuple[int, int, int, int]] = [
            (0x28, 0, 0, 12),  # ldh [12]: ethertype
            (0x15, 0, drop - 2, 0x0800),  # IPv4?
            (0x30, 0, 0, 23),  # ldb [23]: IP protocol
            (0x15, 0, drop - 4, 6),  # TCP?
            (0x28, 0, 0, 20),  # ldh [20]: fragment offset
            (0x45, drop - 6, 0, 0x1FFF),  # not a later fragment
            (0xB1, 0, 0, 14),  # ldxb 4*([14]&0xf): IP header length
            (0x48, 0, 0, 14),  # ldh [x+14]: source port
        ]
        for i, port in enumerate(ports):
            here = 8 + i
            prog.append((0x15, accept - here - 1, 0, port))
        prog.append((0x48, 0, 0, 16))  # ldh [x+16]: destination port
        for i, port in enumerate(ports):
            here = 9 + n + i
            prog.append((0x15, accept - here - 1, 0, port))
        prog.append((0x06, 0, 0, 0))  # drop
        prog.append((0x06, 0, 0, 0x40000))  # accept (whole packet)
        assert len(prog) == accept + 1
        raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
        self._filter_buf = ctypes.create_string_buffer(raw)
        fprog = struct.pack("HL", len(prog), ctypes.addressof(self._filter_buf))
        self.sock.setsockopt(socket.SOL_SOCKET, 26, fprog)  # SO_ATTACH_FILTER

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                frame, addr = self.sock.recvfrom(70000)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] != socket.PACKET_OUTGOING or len(frame) < 34:
                continue
            ip = frame[14:]
            total = struct.unpack_from("!H", ip, 2)[0]
            ihl = (ip[0] & 0x0F) * 4
            sport, dport = struct.unpack_from("!HH", ip, ihl)
            with self.lock:
                if dport in self.ports:
                    counts = self.ports[dport].counts
                    counts.ip_up += total
                    counts.ip_packets += 1
                elif sport in self.ports:
                    counts = self.ports[sport].counts
                    counts.ip_down += total
                    counts.ip_packets += 1

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(2)
        self.sock.close()


# --- the setup --------------------------------------------------------------------------------


def make_certs(workdir: Path) -> dict[str, str]:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl)."""
    d = workdir / "tls"
    d.mkdir(parents=True, exist_ok=True)
    ext = d / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    run(
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=tether-bench-ca",
    )
    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "server.key")
    run("req", "-new", "-key", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    run(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", str(ext),
    )  # fmt: skip
    return {"cafile": str(d / "ca.crt"), "certfile": str(d / "server.crt"), "keyfile": str(d / "server.key")}


@dataclass
class Device:
    name: str  # "plain-60" (metrics at their defaults) or "plain-60-nometrics"
    tls: bool
    keepalive: int
    metrics: bool
    proxy: Proxy
    floor_proxy: Proxy  # shared by the two devices of one (TLS, keepalive)
    agent: Proc | None = None
    device_id: str = ""


def start_agent(dev: Device, workdir: Path, cafile: str) -> Proc:
    scheme = "mqtts" if dev.tls else "mqtt"
    agent_bin = BIN / "tether-agent"
    argv = [str(agent_bin)] if agent_bin.exists() else [PY, "-m", "tether.agent.main"]
    argv += ["--broker", f"{scheme}://127.0.0.1:{dev.proxy.port}", "--device-id", dev.device_id]
    argv += ["--driver", "process", "--data-dir", str(workdir / dev.device_id)]
    argv += ["--keepalive", str(dev.keepalive), "--label", "bench=bw", "--log-level", "warning"]
    if not dev.metrics:
        argv += ["--metrics-interval", "0"]
    env = child_env(SSL_CERT_FILE=cafile) if dev.tls else child_env()
    (workdir / dev.device_id).mkdir(parents=True, exist_ok=True)
    return Proc(argv, workdir / f"{dev.device_id}.log", env=env)


def start_floor_client(dev: Device, cafile: str) -> Any:
    """A bare paho client: CONNECT and keepalive, nothing else."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=dev.floor_proxy.name,
        protocol=paho.MQTTv311,
    )
    if dev.tls:
        client.tls_set(ca_certs=cafile)
    client.connect("127.0.0.1", dev.floor_proxy.port, keepalive=dev.keepalive)
    client.loop_start()
    return client


def quiet(proxies: ProxyThread, devices: list[Device], seconds: float, timeout: float) -> None:
    """Wait until no device connection has carried a byte for ``seconds``."""
    deadline = time.monotonic() + timeout
    last = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        snap = proxies.snapshot([d.proxy for d in devices])
        key = tuple((c.up_bytes, c.down_bytes, c.ip_up, c.ip_down) for c in snap.values())
        if key != last:
            last, since = key, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return
        time.sleep(0.1)


def device_states(url: str) -> dict[str, dict[str, Any]]:
    return {d["id"]: d for d in request(url, DevicesList())["devices"]}


def measure_deploy(
    label: str,
    url: str,
    proxies: ProxyThread,
    devices: list[Device],
    compose: str,
    expect_change: bool,
    args: Any,
) -> dict[str, dict[str, Any]]:
    before = proxies.snapshot([d.proxy for d in devices])
    reply = request(url, StacksDeploy(name="bw", group="bw", compose=compose))
    if reply["changed"] != expect_change:
        raise RuntimeError(f"{label}: the controller says changed={reply['changed']}")
    if expect_change:
        target = reply["stack"]["version"]

        def applied() -> bool:
            states = device_states(url)
            return all(
                states.get(d.device_id, {}).get("stacks", {}).get("bw") == "running"
                and states[d.device_id]["applied_generation"] == states[d.device_id]["desired_generation"]
                for d in devices
            )

        wait_until(applied, 120, interval=0.5, message=f"{label}: stack v{target} running everywhere")
    quiet(proxies, devices, args.quiet, 60)
    after = proxies.snapshot([d.proxy for d in devices])
    return {d.name: after[d.name].minus(before[d.name]) for d in devices}


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    certs = make_certs(workdir)
    with contextlib.ExitStack() as stack:  # whatever started is stopped, in reverse order
        broker = stack.enter_context(Mosquitto(workdir / "mosquitto", tls=certs))
        stack.enter_context(Controller(workdir / "controller", broker.url))
        proxies = ProxyThread()
        stack.callback(proxies.stop)
        devices: list[Device] = []
        floors: list[Proxy] = []
        for tls in (False, True):
            for ka in (60, 300):
                base = f"{'tls' if tls else 'plain'}-{ka}"
                target = broker.tls_port if tls else broker.port
                floor = proxies.add(f"floor-{base}", target, parse_mqtt=not tls)
                floors.append(floor)
                for metrics in (True, False):
                    name = base if metrics else f"{base}-nometrics"
                    proxy = proxies.add(name, target, parse_mqtt=not tls)
                    devices.append(Device(name, tls, ka, metrics, proxy, floor, device_id=f"bw-{name}"))
        all_proxies = [d.proxy for d in devices] + floors
        capture: Capture | None = None
        if args.capture:
            try:
                capture = Capture({p.port: p for p in all_proxies})
                stack.callback(capture.stop)
            except (PermissionError, OSError) as exc:
                log(
                    f"no packet capture ({exc}); falling back to application bytes + {HEADER_ESTIMATE} B per read"
                )
        floor_clients: list[Any] = []
        result: dict[str, Any] = {"capture": capture is not None, "window_s": args.window}
        try:
            request(broker.url, GroupsCreate(name="bw", selector="bench=bw", trust_device_labels=True))
            t_start = proxies.snapshot(all_proxies)
            for dev in devices:
                dev.agent = start_agent(dev, workdir, certs["cafile"])
                if dev.metrics:  # one floor client per (TLS, keepalive)
                    floor_clients.append(start_floor_client(dev, certs["cafile"]))

            def online() -> bool:
                states = device_states(broker.url)
                return all(states.get(d.device_id, {}).get("status") == "online" for d in devices)

            wait_until(online, 60, interval=0.5, message="agents online")
            quiet(proxies, devices, args.quiet, 60)
            t_online = proxies.snapshot(all_proxies)
            result["connect"] = {d.name: t_online[d.name].minus(t_start[d.name]) for d in devices}
            log("agents online; deploying a new stack")
            result["new_stack"] = measure_deploy(
                "new stack", broker.url, proxies, devices, compose_stack(3, 1), True, args
            )
            log("deploying a new version")
            result["new_version"] = measure_deploy(
                "new version", broker.url, proxies, devices, compose_stack(3, 2), True, args
            )
            log("redeploying the same version (no-op)")
            result["noop_redeploy"] = measure_deploy(
                "no-op redeploy", broker.url, proxies, devices, compose_stack(3, 2), False, args
            )
            log(f"idle for {args.window:g} s")
            before = proxies.snapshot(all_proxies)
            time.sleep(args.window)
            after = proxies.snapshot(all_proxies)
            idle = {}
            for d in devices:
                agent = after[d.name].minus(before[d.name])
                floor = after[d.floor_proxy.name].minus(before[d.floor_proxy.name])
                key = "ip_total" if capture is not None else "app_with_header_estimate"
                per_hour = agent[key] * 3600 / args.window
                floor_per_hour = floor[key] * 3600 / args.window
                idle[d.name] = {
                    "tls": d.tls,
                    "keepalive_s": d.keepalive,
                    "metrics": d.metrics,
                    "bytes": agent[key],
                    "bytes_per_hour": round(per_hour),
                    "floor_bytes": floor[key],
                    "floor_bytes_per_hour": round(floor_per_hour),
                    "vs_floor": rnd(per_hour / floor_per_hour, 3) if floor_per_hour else None,
                    "agent": agent,
                    "floor": floor,
                }
            result["idle"] = idle
            result["tcp_connections"] = {d.name: after[d.name].connections for d in devices}
        finally:
            for client in floor_clients:
                with contextlib.suppress(Exception):
                    client.disconnect()
                    client.loop_stop()
            for dev in devices:
                if dev.agent is not None:
                    dev.agent.stop()
    return result


def rows(data: dict[str, Any]) -> list[Row]:
    key = "ip_total" if data["capture"] else "app_with_header_estimate"
    unit = " B" + ("" if data["capture"] else " (est.)")
    out: list[Row] = []
    for tls in (False, True):
        mode = "TLS" if tls else "plain"
        prefix = "tls" if tls else "plain"
        name = f"{prefix}-60-nometrics"  # deploys are measured where no metric sample can interleave
        out.append(Row(f"{mode}: connect (to idle)", data["connect"][name][key], unit))
        out.append(Row(f"{mode}: receive a new stack", data["new_stack"][name][key], unit))
        out.append(Row(f"{mode}: receive a new version", data["new_version"][name][key], unit))
        noop = data["noop_redeploy"][name]
        sent_to_device = noop["ip_down"] if data["capture"] else noop["app_down"]
        # A keepalive cycle may fall into the window: only what is not one counts against it.
        plain = data["noop_redeploy"]["plain-60-nometrics"]["mqtt_packets"]
        other = sum(n for k, n in plain.items() if k.startswith("down ") and k != "down PINGRESP")
        out.append(
            Row(
                f"{mode}: no-op redeploy, to the device",
                sent_to_device,
                unit,
                "nothing but keepalive",
                other == 0,
            )
        )
        for ka in (60, 300):
            short = data["window_s"] < 2 * ka
            off = data["idle"][f"{prefix}-{ka}-nometrics"]
            on = data["idle"][f"{prefix}-{ka}"]
            floor = off["floor_bytes_per_hour"]
            target = "<= floor + 5 %" + (", <= 2 KB/h" if ka == 300 and not tls else "")
            met: bool | None = off["bytes_per_hour"] <= floor * 1.05 and (
                off["bytes_per_hour"] <= 2048 if ka == 300 and not tls else True
            )
            out.append(
                Row(
                    f"{mode}: idle per hour, keepalive {ka} s, no metrics",
                    off["bytes_per_hour"],
                    " B/h",
                    "(window < 2 keepalives)" if short else target,
                    None if short else met,
                )
            )
            out.append(
                Row(
                    f"{mode}: idle per hour, keepalive {ka} s, default metrics",
                    on["bytes_per_hour"],
                    " B/h",
                    "(window < 2 keepalives)" if short else "<= 2x floor",
                    None if short else on["bytes_per_hour"] <= 2 * floor,
                )
            )
            out.append(Row(f"{mode}: floor (bare paho client), keepalive {ka} s", floor, " B/h"))
        extra = sum(n - 1 for k, n in data["tcp_connections"].items() if k.startswith(prefix))
        out.append(Row(f"{mode}: reconnections during the run", extra, "", "0", extra == 0))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--window",
        type=float,
        default=900.0,
        help="seconds of idle to extrapolate from (900: a multiple of both keepalives and of the full metrics sample)",
    )
    p.add_argument("--quiet", type=float, default=3.0, help="seconds without traffic that end a deploy")
    p.add_argument(
        "--capture", action=argparse.BooleanOptionalAction, default=True, help="count IP bytes (root)"
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tether-bandwidth-") as tmp:
        data = run(args, Path(tmp))
    report(NAME, "Bandwidth per device (IP bytes on the wire)", rows(data), data, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
