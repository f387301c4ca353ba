"""Broker benchmark: a fleet of devices, each with one retained 1 KB desired state.

    .venv/bin/python bench/broker_bench.py --devices 1000 --broker embedded --json out.json

``--broker`` is ``embedded`` (Tether's fixed amqtt broker), ``embedded-stock`` (amqtt
0.12.1 as shipped) or ``mosquitto`` (/usr/sbin/mosquitto). The broker runs in a child
process, so its memory is measured alone (VmRSS/VmHWM from /proc/PID/status); the
devices and the controller are raw asyncio MQTT 3.1.1 clients written here (one event
loop, one TCP connection per device) - far lighter than thousands of paho clients, so
the client side is not what is measured. On a 2-core machine the clients share the CPU
with the broker; that favours no broker in particular.

Phases, each bounded by ``--phase-timeout`` (what did not finish is reported as such):

1. *publish*: a controller client publishes one retained QoS 1 message of
   ``--payload`` bytes to ``tether/v1/devices/dev-{i}/desired`` for every device.
2. *storm*: every device connects (persistent session, keepalive 60 s) and subscribes
   (QoS 1) to its own desired topic, at most ``--window`` handshakes in flight at once.
   Storm time runs until the last SUBACK; each device must also get its retained message.
3. *update*: the controller publishes a new retained desired state to every device;
   latency runs from the first publish until the device has it.
4. *restart*: the broker process is killed and a fresh one started (no persistence,
   like ``tether up``); the controller republishes every retained message from its
   store; then every device reconnects and resubscribes. Replay latency per device runs
   from the start of the reconnect storm until it has its retained message.

Counted throughout: *unsolicited* messages (a topic the device did not subscribe to) and
*dropped* connections (closed by the broker outside the restart, or never accepted; a
dropped device reconnects after a short random delay, as a real one would).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, accepts, free_port, log, report  # noqa: E402  (bench/common.py: tables, JSON, machine info)

MOSQUITTO_BIN = "/usr/sbin/mosquitto"
TOPIC = "tether/v1/devices/dev-{}/desired"
KEEPALIVE = 60
MB = 1024 * 1024

# --- the broker under test, in a child process --------------------------------------


def _serve_embedded(stock: bool) -> None:
    """Child process: run the broker (in this process, as ``tether up``'s broker process does)
    on an ephemeral port until stdin closes."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    from tether.broker.child import BrokerThread

    broker = BrokerThread("127.0.0.1", 0, stock=stock)
    port = broker.start()
    print(f"PORT {port}", flush=True)
    sys.stdin.read()  # until the parent closes the pipe (or kills us)
    os._exit(0)


class BrokerProcess:
    """One broker in a child process; :meth:`start` again after :meth:`kill` is a restart."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.generation = 0
        self.log_paths: list[Path] = []

    def start(self) -> int:
        self.generation += 1
        log_path = self.workdir / f"broker-{self.generation}.log"
        self.log_paths.append(log_path)
        if self.kind == "mosquitto":
            return self._start_mosquitto(log_path)
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", self.kind]
        with log_path.open("wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.kill()
            raise RuntimeError(f"embedded broker did not start: {line!r} {log_path.read_text()[-2000:]}")
        self.port = int(line.split()[1])
        return self.port

    def _start_mosquitto(self, log_path: Path) -> int:
        if not os.access(MOSQUITTO_BIN, os.X_OK):
            raise RuntimeError(f"{MOSQUITTO_BIN} is not installed (apt-get install mosquitto)")
        for _ in range(5):
            self.port = free_port()
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "log_dest stderr\nlog_type error\nlog_type warning\nmax_queued_messages 1000\nuser root\n"
            )
            with log_path.open("wb") as err:
                self.proc = subprocess.Popen([MOSQUITTO_BIN, "-c", str(conf)], stderr=err, stdout=err)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None and not accepts(self.port):
                time.sleep(0.02)
            if self.proc.poll() is None and accepts(self.port):
                return self.port
            self.kill()
        raise RuntimeError(f"mosquitto did not start: {log_path.read_text()[-2000:]}")

    def rss(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) of the broker process in MiB."""
        if self.proc is None:
            return 0.0, 0.0
        values = {}
        with contextlib.suppress(OSError), open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    values[line.split(":")[0]] = int(line.split()[1]) / 1024
        return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log_counts(self) -> dict[str, int]:
        text = "".join(p.read_text(errors="replace") for p in self.log_paths if p.exists())
        return {
            "warnings": len(re.findall(r"^WARNING", text, re.M)),
            "errors": len(re.findall(r"^(ERROR|CRITICAL)", text, re.M)),
            "dictionary_changed_size": text.count("dictionary changed size during iteration"),
            "puback_timeouts": text.count("Timeout waiting for PUBACK"),
        }


# --- a minimal MQTT 3.1.1 client ------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, clean: bool, keepalive: int) -> bytes:
    body = _string("MQTT") + bytes([4, 0x02 if clean else 0x00]) + struct.pack("!H", keepalive)
    body += _string(client_id)
    return b"\x10" + _varint(len(body)) + body


def subscribe_packet(packet_id: int, topic_filter: str, qos: int) -> bytes:
    body = struct.pack("!H", packet_id) + _string(topic_filter) + bytes([qos])
    return b"\x82" + _varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int, retain: bool, packet_id: int = 0) -> bytes:
    body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1) | int(retain)]) + _varint(len(body)) + body


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(first byte, body) of the next packet; IncompleteReadError at EOF."""
    head = await reader.readexactly(1)
    length, shift = 0, 0
    while True:
        b = (await reader.readexactly(1))[0]
        length |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
    body = await reader.readexactly(length) if length else b""
    return head[0], body


def parse_publish(first: int, body: bytes) -> tuple[str, int, int, bool, bytes]:
    """(topic, qos, packet_id, retain, payload) of a PUBLISH."""
    qos = (first >> 1) & 3
    n = struct.unpack_from("!H", body)[0]
    topic = body[2 : 2 + n].decode()
    pos = 2 + n
    pid = 0
    if qos:
        pid = struct.unpack_from("!H", body, pos)[0]
        pos += 2
    return topic, qos, pid, bool(first & 1), body[pos:]


class Dropped(Exception):
    """The broker closed the connection or refused it."""


@dataclass
class Stats:
    unsolicited: int = 0
    dropped: int = 0
    connect_failures: int = 0
    unsolicited_examples: list[str] = field(default_factory=list)


class Device:
    """One device: connects, subscribes to its desired topic, records when each generation arrives."""

    def __init__(self, index: int, stats: Stats, clean: bool) -> None:
        self.index = index
        self.topic = TOPIC.format(index)
        self.client_id = f"tether-dev-{index}"
        self.stats = stats
        self.clean = clean
        self.received: dict[int, float] = {}  # generation -> monotonic time of first receipt
        self.subscribed_at: float | None = None
        self.connacked = False
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.expect_close = False
        self.last_send = 0.0
        self.waiters: dict[int, asyncio.Event] = {}

    def wait_generation(self, gen: int) -> asyncio.Event:
        ev = self.waiters.setdefault(gen, asyncio.Event())
        if gen in self.received:
            ev.set()
        return ev

    async def session(self, port: int, window: asyncio.Semaphore, subscribed: asyncio.Event) -> None:
        """Connect and subscribe (inside the window), then receive until closed."""
        async with window:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as exc:
                raise Dropped(f"connect: {exc}") from exc
            self.writer = writer
            writer.write(connect_packet(self.client_id, self.clean, KEEPALIVE))
            writer.write(subscribe_packet(1, self.topic, 1))
            self.last_send = time.monotonic()
            first, body = await self._read(reader)
            if first >> 4 != 2 or body[1] != 0:
                raise Dropped(f"CONNACK {first:#x} {body!r}")
            self.connacked = True
            while True:  # retained messages may come before or after SUBACK: handle both
                first, body = await self._read(reader)
                if first >> 4 == 9:
                    self.subscribed_at = time.monotonic()
                    subscribed.set()
                    break
                self._on_packet(first, body)
        while True:
            first, body = await self._read(reader)
            self._on_packet(first, body)

    async def _read(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        try:
            return await read_packet(reader)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise Dropped("closed by broker") from exc

    def _on_packet(self, first: int, body: bytes) -> None:
        if first >> 4 != 3:
            return  # PINGRESP and the like
        topic, qos, pid, _retain, payload = parse_publish(first, body)
        if qos == 1 and self.writer is not None:
            self.writer.write(b"\x40\x02" + struct.pack("!H", pid))
        elif qos == 2 and self.writer is not None:
            self.writer.write(b"\x50\x02" + struct.pack("!H", pid))  # PUBREC; PUBREL is ignored
        if topic != self.topic:
            self.stats.unsolicited += 1
            if len(self.stats.unsolicited_examples) < 3:
                self.stats.unsolicited_examples.append(f"{self.topic} got {topic}")
            return
        gen = int(payload[4 : payload.index(b";")]) if payload.startswith(b"gen=") else -1
        if gen not in self.received:
            self.received[gen] = time.monotonic()
            ev = self.waiters.get(gen)
            if ev is not None:
                ev.set()

    def close(self, expected: bool) -> None:
        self.expect_close = expected
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.transport.abort()
            self.writer = None

    async def run(self, port_ref: list[int], window: asyncio.Semaphore, subscribed: asyncio.Event) -> None:
        """Keep a session up; count unexpected closes as drops and reconnect after a pause."""
        while True:
            self.expect_close = False
            self.connacked = False
            try:
                await self.session(port_ref[0], window, subscribed)
            except Dropped:
                pass
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                if self.writer is not None:
                    with contextlib.suppress(Exception):
                        self.writer.transport.abort()
                    self.writer = None
            if self.expect_close:
                return
            if self.connacked:
                self.stats.dropped += 1  # accepted (CONNACK), then closed by the broker
            else:
                self.stats.connect_failures += 1
            self.subscribed_at = None
            await asyncio.sleep(random.uniform(0.2, 1.0))

    def ping_if_idle(self, now: float) -> None:
        if self.writer is not None and now - self.last_send > KEEPALIVE / 2:
            self.writer.write(PINGREQ)
            self.last_send = now


class Controller:
    """Publishes retained desired states, QoS 1, at most ``inflight`` unacknowledged at a time."""

    def __init__(self, inflight: int = 100) -> None:
        self.inflight = asyncio.Semaphore(inflight)
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.next_id = 0
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None

    async def connect(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self.writer = writer
        writer.write(connect_packet("tether-controller", True, KEEPALIVE))
        first, body = await read_packet(reader)
        if first >> 4 != 2 or body[1] != 0:
            raise RuntimeError(f"controller refused: {body!r}")
        writer.write(subscribe_packet(1, "tether/v1/devices/+/reported", 1))  # as the real controller
        self.reader_task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                first, body = await read_packet(reader)
                if first >> 4 == 4:
                    fut = self.pending.pop(struct.unpack("!H", body[:2])[0], None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                elif first >> 4 == 3:
                    _t, qos, pid, _r, _p = parse_publish(first, body)
                    if qos == 1 and self.writer is not None:
                        self.writer.write(b"\x40\x02" + struct.pack("!H", pid))

    async def publish(self, topic: str, payload: bytes) -> None:
        async with self.inflight:
            assert self.writer is not None
            self.next_id = self.next_id % 65535 + 1
            pid = self.next_id
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.pending[pid] = fut
            self.writer.write(publish_packet(topic, payload, 1, True, pid))
            await fut

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.write(DISCONNECT)
                self.writer.transport.close()
        if self.reader_task is not None:
            self.reader_task.cancel()


# --- the benchmark --------------------------------------------------------------------


def payload_for(gen: int, index: int, size: int) -> bytes:
    head = f"gen={gen};dev={index};".encode()
    return head + b"x" * max(0, size - len(head))


def percentile(values: list[float], total: int, q: float) -> float | None:
    """The q-th percentile over ``total`` devices, missing ones counting as infinitely late."""
    if total == 0:
        return None
    rank = max(1, math.ceil(q / 100 * total))
    if rank > len(values):
        return None
    return sorted(values)[rank - 1]


async def publish_all(ctrl: Controller, n: int, gen: int, size: int, timeout: float) -> float | None:
    start = time.monotonic()
    try:
        await asyncio.wait_for(
            asyncio.gather(*(ctrl.publish(TOPIC.format(i), payload_for(gen, i, size)) for i in range(n))),
            timeout,
        )
    except TimeoutError:
        return None
    return time.monotonic() - start


async def wait_for_all(events: list[asyncio.Event], timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout)


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    n = args.devices
    broker = BrokerProcess(args.broker, workdir)
    stats = Stats()
    res: dict[str, Any] = {
        "broker": args.broker,
        "devices": n,
        "payload_bytes": args.payload,
        "window": args.window,
        "clean_session": args.clean_session,
        "client": "bench asyncio raw MQTT 3.1.1 client, one event loop",
        "phase_timeout_s": args.phase_timeout,
        "cpus": os.cpu_count(),
    }
    if args.broker.startswith("embedded"):
        from importlib.metadata import version

        res["amqtt_version"] = version("amqtt")
    t_wall = time.monotonic()
    devices = [Device(i, stats, args.clean_session) for i in range(n)]
    window = asyncio.Semaphore(args.window)
    port_ref = [0]
    pinger: asyncio.Task[None] | None = None
    try:
        port_ref[0] = broker.start()
        await asyncio.sleep(0.5)  # let the child settle before measuring its baseline
        res["rss_baseline_mb"] = round(broker.rss()[0], 1)

        async def ping_loop() -> None:
            while True:
                await asyncio.sleep(5)
                now = time.monotonic()
                for d in devices:
                    d.ping_if_idle(now)

        pinger = asyncio.create_task(ping_loop())

        # 1. publish the retained desired states
        ctrl = Controller()
        await ctrl.connect(port_ref[0])
        t = await publish_all(ctrl, n, 1, args.payload, args.phase_timeout)
        res["publish_retained_s"] = None if t is None else round(t, 3)

        # 2. connect + subscribe storm
        subscribed = [asyncio.Event() for _ in range(n)]
        start = time.monotonic()
        for d, ev in zip(devices, subscribed, strict=True):
            d.task = asyncio.create_task(d.run(port_ref, window, ev))
        await wait_for_all(subscribed, args.phase_timeout)
        done = [d.subscribed_at - start for d in devices if d.subscribed_at is not None]
        res["storm_subscribed"] = len(done)
        res["storm_s"] = round(max(done), 3) if len(done) == n else None
        await wait_for_all([d.wait_generation(1) for d in devices], args.phase_timeout)
        got = [d.received[1] - start for d in devices if 1 in d.received]
        res["storm_retained_received"] = len(got)
        res["storm_retained_p99_s"] = _r(percentile(got, n, 99))
        res["rss_after_storm_mb"] = round(broker.rss()[0], 1)
        res["rss_per_device_kb"] = round((res["rss_after_storm_mb"] - res["rss_baseline_mb"]) * 1024 / n, 1)

        # 3. a fleet-wide update
        start = time.monotonic()
        pub = asyncio.create_task(publish_all(ctrl, n, 2, args.payload, args.phase_timeout))
        await wait_for_all([d.wait_generation(2) for d in devices], args.phase_timeout)
        t = await pub
        got = [d.received[2] - start for d in devices if 2 in d.received]
        res["update_publish_s"] = _r(t)
        res["update_received"] = len(got)
        res["update_p50_s"] = _r(percentile(got, n, 50))
        res["update_p99_s"] = _r(percentile(got, n, 99))
        rss, hwm_first = broker.rss()
        res["rss_after_update_mb"] = round(rss, 1)

        # 4. broker restart, controller republishes, every device reconnects
        for d in devices:
            d.close(expected=True)
        ctrl.close()
        for d in devices:
            if d.task is not None:
                d.task.cancel()
        await asyncio.gather(*(d.task for d in devices if d.task is not None), return_exceptions=True)
        broker.kill()
        port_ref[0] = broker.start()
        ctrl = Controller()
        await ctrl.connect(port_ref[0])
        t = await publish_all(ctrl, n, 3, args.payload, args.phase_timeout)
        res["replay_republish_s"] = _r(t)
        subscribed = [asyncio.Event() for _ in range(n)]
        start = time.monotonic()
        for d, ev in zip(devices, subscribed, strict=True):
            d.subscribed_at = None
            d.task = asyncio.create_task(d.run(port_ref, window, ev))
        await wait_for_all([d.wait_generation(3) for d in devices], args.phase_timeout)
        done = [d.subscribed_at - start for d in devices if d.subscribed_at is not None]
        got = [d.received[3] - start for d in devices if 3 in d.received]
        res["replay_storm_s"] = round(max(done), 3) if len(done) == n else None
        res["replay_received"] = len(got)
        res["replay_p50_s"] = _r(percentile(got, n, 50))
        res["replay_p99_s"] = _r(percentile(got, n, 99))
        res["replay_max_s"] = _r(max(got)) if len(got) == n else None
        rss, hwm = broker.rss()
        res["rss_end_mb"], res["rss_peak_mb"] = round(rss, 1), round(max(hwm, hwm_first), 1)
        # a moment for stragglers (e.g. other devices' retained messages still in flight)
        await asyncio.sleep(min(2.0, args.phase_timeout))
        ctrl.close()
    finally:
        if pinger is not None:
            pinger.cancel()
        for d in devices:
            d.close(expected=True)
            if d.task is not None:
                d.task.cancel()
        await asyncio.gather(*(d.task for d in devices if d.task is not None), return_exceptions=True)
        broker.kill()
    res["unsolicited"] = stats.unsolicited
    res["unsolicited_examples"] = stats.unsolicited_examples
    res["dropped"] = stats.dropped
    res["connect_failures"] = stats.connect_failures
    res["broker_log"] = broker.log_counts()
    res["wall_s"] = round(time.monotonic() - t_wall, 1)
    return res


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "did not finish"
    if isinstance(x, float):
        return f"{x:.2f}{unit}"
    return f"{x}{unit}"


def print_table(results: list[dict[str, Any]]) -> None:
    rows = [
        ("devices", "devices", ""),
        ("publish N retained", "publish_retained_s", " s"),
        ("connect+subscribe storm", "storm_s", " s"),
        ("storm: retained received", "storm_retained_received", ""),
        ("fleet update p50", "update_p50_s", " s"),
        ("fleet update p99", "update_p99_s", " s"),
        ("restart: republish", "replay_republish_s", " s"),
        ("restart: replay p50", "replay_p50_s", " s"),
        ("restart: replay p99", "replay_p99_s", " s"),
        ("restart: replay received", "replay_received", ""),
        ("RSS baseline", "rss_baseline_mb", " MB"),
        ("RSS after storm", "rss_after_storm_mb", " MB"),
        ("RSS per connected device", "rss_per_device_kb", " KB"),
        ("RSS peak", "rss_peak_mb", " MB"),
        ("unsolicited messages", "unsolicited", ""),
        ("dropped after CONNACK", "dropped", ""),
        ("connects without CONNACK", "connect_failures", ""),
        ("wall time", "wall_s", " s"),
    ]
    header = ["metric"] + [r["broker"] for r in results]
    table = [header] + [[label] + [_fmt(r.get(key), unit) for r in results] for label, key, unit in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for j, row in enumerate(table):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    for r in results:
        if r.get("unsolicited_examples"):
            print(f"{r['broker']}: unsolicited e.g. {', '.join(r['unsolicited_examples'])}")
        if any(r.get("broker_log", {}).values()):
            print(f"{r['broker']}: broker log {r['broker_log']}")


def target_rows(res: dict[str, Any]) -> list[Row]:
    """Issue 3's targets: performance for the fixed embedded broker, correctness for every broker."""
    n, kind = res["devices"], res["broker"]
    rows: list[Row] = []
    perf = kind == "embedded" and n <= 5000
    scale = 1000 if n <= 1000 else 5000
    storm_t, replay_t, rss_t = (3.0, 5.0, 60.0) if scale == 1000 else (20.0, 10.0, 200.0)

    def upto(metric: str, value: float | None, unit: str, limit: float) -> None:
        if perf:
            met = value is not None and value <= limit
            rows.append(Row(f"{kind}: {metric}", value, unit, f"<= {limit:g}{unit} (for {scale:,})", met))
        else:
            rows.append(Row(f"{kind}: {metric}", value, unit))

    upto("connect+subscribe storm", res.get("storm_s"), " s", storm_t)
    upto("retained replay after restart, p99", res.get("replay_p99_s"), " s", replay_t)
    upto("broker RSS, peak", res.get("rss_peak_mb"), " MB", rss_t)
    for metric, key in (
        ("unsolicited messages", "unsolicited"),
        ("connections dropped after CONNACK", "dropped"),
        ("connects without CONNACK", "connect_failures"),
    ):
        rows.append(Row(f"{kind}: {metric}", res.get(key), "", "= 0", res.get(key) == 0))
    missing = n - (res.get("replay_received") or 0)
    rows.append(Row(f"{kind}: devices without their state after restart", missing, "", "= 0", missing == 0))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument(
        "--broker",
        default="embedded",
        help="embedded, embedded-stock or mosquitto; comma-separated to run several in turn",
    )
    p.add_argument("--payload", type=int, default=1024, help="retained message size in bytes")
    p.add_argument("--window", type=int, default=500, help="connection handshakes in flight at once")
    p.add_argument("--phase-timeout", type=float, default=60.0, help="seconds each phase may take")
    p.add_argument("--clean-session", action="store_true", help="devices use clean sessions")
    p.add_argument(
        "--json", type=Path, help="write the results here (default bench/results/broker_bench.json)"
    )
    p.add_argument("--serve", choices=["embedded", "embedded-stock"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        _serve_embedded(stock=args.serve == "embedded-stock")
        return 0
    kinds = [k.strip() for k in args.broker.split(",") if k.strip()]
    for k in kinds:
        if k not in ("embedded", "embedded-stock", "mosquitto"):
            p.error(f"unknown broker {k!r}")
    results = []
    for kind in kinds:
        args.broker = kind
        with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
            log(f"broker_bench: {kind} with {args.devices} devices")
            results.append(asyncio.run(bench(args, Path(tmp))))
    print_table(results)
    print()
    rows = [row for res in results for row in target_rows(res)]
    title = f"Broker benchmark: {args.devices:,} devices, one {args.payload} B retained message each"
    report("broker_bench", title, rows, {"devices": args.devices, "results": results}, args.json)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    threading.current_thread().name = "bench"
    sys.exit(main())
